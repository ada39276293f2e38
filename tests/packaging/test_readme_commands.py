"""Every `moesys-train`, `moesys-eval` and `moesys-generate` command the README shows runs, so a
documented command that crashes fails CI; and every `$ command` block prints what the README says.

The README's ```bash blocks are read in order and each block's commands run in order in one scratch
directory shared by the module (a block that resumes `runs/a` finds the run its earlier line made),
through the installed console scripts, each in a process of its own forked from a server that has
imported the apps once (the `forked` fixture of tests/conftest.py: the interpreter's start and the
imports, ~4 s of CPU a command, are paid once; test_a_forked_command_is_the_console_scripts_process
checks it against the script's own process). moesys-train commands run at tiny sizes: `preset=tiny` goes
first (the command's own settings win over it) and `trainer.steps=2` last (or the command's own
`trainer.ckpt_interval`, so the checkpoint a later line names exists); a command without
`trainer.out_dir` gets its own `hydra.run.dir` (Hydra's time-stamped dirs collide within a second).
A command with one of Hydra's flags (`moesys-train --help`) runs as written: it trains nothing.
A command whose tiny form an earlier block already ran (`moesys-train` is `moesys-train preset=tiny`;
the eval and generate lines shown twice) runs once per module: one run per distinct command, each a
few seconds of imports. Commands that resume run every time (what they find depends on before).
The files the commands name (book.txt, tokens.bin, launchers/, configs/, hf_model/, tok/) are made in the scratch
directory; a `model.init_from` command gets no preset (its model is the HF model's), only small batches.
`moesys-plan` lines run in tests/moesys/test_planner.py::test_readme_plan_commands_run (checked below
that it finds every one). Lines for torchrun.sh, sbatch and Python snippets are not run here.
"""
from __future__ import annotations

import os
import shlex
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
APPS = {"moesys-train": "moesys.train", "moesys-eval": "moesys.evaluate", "moesys-generate": "moesys.generate",
        "moesys-convert": "moesys.convert"}


def _readme() -> str:
    with open(os.path.join(ROOT, "README.md")) as f:
        return f.read()


def fenced_blocks() -> list:
    """[(info string, [lines])] of every ``` fenced block, in order."""
    out, cur = [], None
    for line in _readme().splitlines():
        if line.startswith("```"):
            if cur is None:
                cur = (line[3:].strip(), [])
            else:
                out.append(cur)
                cur = None
        elif cur is not None:
            cur[1].append(line)
    return out


def bash_blocks() -> list:
    """[[argv, ...] per ```bash block that shows a moesys-train/eval/generate command]; a command
    after `&&` (the set-up line) counts."""
    out = []
    for info, lines in fenced_blocks():
        if info != "bash":
            continue
        cmds = []
        for line in lines:
            argv = shlex.split(line.split("&&")[-1], comments=True)
            if argv and argv[0] in APPS:
                cmds.append(argv)
        if cmds:
            out.append(cmds)
    return out


def shown_sessions() -> list:
    """[(argv, expected output lines)] from the README's plain ``` blocks of `$ command` lines."""
    out = []
    for info, lines in fenced_blocks():
        if info:
            continue
        for i, line in enumerate(lines):
            if line.startswith("$ "):
                argv = shlex.split(line[2:], comments=True)
                if argv and argv[0] in APPS:
                    expect = []
                    for nxt in lines[i + 1:]:
                        if nxt.startswith("$ "):
                            break
                        expect.append(nxt)
                    out.append((argv, expect))
    return out


def _exe(name: str) -> list:
    script = os.path.join(os.path.dirname(sys.executable), name)
    return [script] if os.path.isfile(script) else [sys.executable, "-m", APPS[name]]


def tiny(argv: list, n: int) -> list:
    """The command at tiny sizes (see the module docstring)."""
    name, args = argv[0], argv[1:]
    if name != "moesys-train" or any(a.startswith("-") for a in args):  # Hydra's flags (--help): as written
        return _exe(name) + args
    keys = {a.split("=", 1)[0]: a.split("=", 1)[1] for a in args if "=" in a}
    steps = keys.get("trainer.ckpt_interval", "2")
    extra = [f"trainer.steps={steps}"]
    if "trainer.out_dir" not in keys:
        extra.append(f"hydra.run.dir=hydra_runs/{n}")
    if "model.init_from" in keys:  # the model is the (tiny) HF model's: no preset, small batches
        return _exe(name) + [*args, *extra, "trainer.batch_size=4", "model.seq_len=32", "logging.wandb_mode=disabled"]
    return _exe(name) + ["preset=tiny", *args, *extra]


def shape(cmd: list) -> tuple:
    """What makes two tiny commands the same run: everything but the Hydra run dir they get, an
    override given twice with the same value counted once (`preset=tiny` added before its own)."""
    return tuple(dict.fromkeys(a for a in cmd if not a.startswith("hydra.run.dir=")))


_RAN: set = set()  # shapes of the commands this module ran to exit 0 (scratch is per module too)


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    d = tmp_path_factory.mktemp("readme")
    from moesys.data import embedded_corpus

    (d / "book.txt").write_bytes(embedded_corpus()[:60_000])
    rng = np.random.default_rng(0)
    rng.integers(0, 50304, size=40_000, dtype=np.uint16).tofile(d / "tokens.bin")
    os.symlink(os.path.join(ROOT, "launchers"), d / "launchers")
    os.symlink(os.path.join(ROOT, "configs"), d / "configs")  # configs/deepspeed/*.json, named from the root
    _hf_inputs(d)
    return d


def _hf_inputs(d) -> None:
    """hf_model/: a tiny random Qwen3-MoE (byte vocabulary) saved by transformers; tok/: a BPE of 300
    ids trained on the embedded corpus (the README's Hugging Face commands name both)."""
    import importlib.util

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from moesys.data import embedded_corpus

    spec = importlib.util.spec_from_file_location("_hf_models", os.path.join(ROOT, "tests", "moesys", "hf_models.py"))
    hf_models = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hf_models)
    hf_models.build_hf("qwen3_moe", str(d / "hf_model"), vocab_size=256)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([embedded_corpus().decode("utf-8")], trainer=trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    (d / "tok").mkdir()
    tok.save(str(d / "tok" / "tokenizer.json"))


def _env() -> dict:
    return {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "TRITON_INTERPRET")}


def _run(cmd: list, cwd) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=False, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=900)


def _run_forked(forked, cmd: list, cwd) -> subprocess.CompletedProcess:
    """The console script as its own process, forked from the `forked` fixture's server (the
    interpreter's start and the imports paid once); without the script (no install), a process."""
    if cmd[0] == sys.executable:
        return _run(cmd, cwd)
    return forked.run(cmd[0], cmd[1:], cwd, _env(), timeout=900)


def test_the_readme_shows_commands_of_each_app():
    names = {argv[0] for block in bash_blocks() for argv in block}
    assert names == set(APPS), names
    import importlib.util

    spec = importlib.util.spec_from_file_location("_planner_tests", os.path.join(ROOT, "tests", "moesys",
                                                                                  "test_planner.py"))
    planner_tests = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(planner_tests)
    readme_plan_commands = planner_tests.readme_plan_commands  # the moesys-plan lines run there
    shown = sum(line.startswith("moesys-plan") for info, lines in fenced_blocks() if info == "bash" for line in lines)
    assert len(readme_plan_commands()) == shown >= 3


@pytest.mark.slow
@pytest.mark.timeout(1800)
@pytest.mark.parametrize("block", range(len(bash_blocks())),
                         ids=[" ".join(b[0][:3])[:60] for b in bash_blocks()])
def test_readme_block_runs(block, scratch, forked):
    for n, argv in enumerate(bash_blocks()[block]):
        cmd = tiny(argv, 100 * block + n)
        if shape(cmd) in _RAN:  # the same run, already passed in this module's scratch
            continue
        r = _run_forked(forked, cmd, scratch)
        assert r.returncode == 0, f"README command {shlex.join(argv)!r} failed as {shlex.join(cmd)!r}:\n" + \
            r.stdout[-2000:] + r.stderr[-4000:]
        if not any("resume" in a for a in argv):
            _RAN.add(shape(cmd))


@pytest.mark.parametrize("argv, expect", shown_sessions(), ids=[" ".join(a[1:]) for a, _ in shown_sessions()])
def test_readme_shown_output(argv, expect, tmp_path, forked):
    """Forked, as the blocks' commands (test_a_forked_command_is_the_console_scripts_process runs the
    first of these in the console script's own process as well, and requires the same output)."""
    r = _run_forked(forked, _exe(argv[0]) + argv[1:], tmp_path)
    assert (r.stdout + r.stderr).splitlines() == expect
    assert r.returncode == 2 and os.listdir(tmp_path) == []


def test_readme_commands_of_one_shape_run_once():
    """The duplicates the README shows today are skipped; none of the resuming commands is."""
    shapes = [shape(tiny(argv, 0)) for block in bash_blocks() for argv in block
              if not any("resume" in a for a in argv)]
    assert len(shapes) - len(set(shapes)) >= 3  # moesys-train twice, eval and generate of runs/b twice
    assert shape(tiny(["moesys-train"], 1)) == shape(tiny(["moesys-train", "preset=tiny"], 2))
    assert shape(tiny(["moesys-train", "trainer.steps=5"], 1)) != shape(tiny(["moesys-train"], 1))



@pytest.mark.slow
def test_a_forked_command_is_the_console_scripts_process(forked, tmp_path):
    """What test_readme_block_runs gets from the `forked` runner is what the installed console
    script's own process gives: exit code, stdout and stderr, for an error the README shows (exit 2,
    its message, no file written) and for Hydra's --help (exit 0), and the same files left behind."""
    (argv, expect), = [s for s in shown_sessions() if "trainer.batch_size=0" in s[0]]
    for n, (args, code) in enumerate(((argv[1:], 2), (["--help"], 0))):
        cmd = _exe(argv[0]) + args
        assert cmd[0] != sys.executable, "the console script is installed"
        real_dir, fork_dir = tmp_path / f"real{n}", tmp_path / f"forked{n}"
        real_dir.mkdir()
        fork_dir.mkdir()
        real, fork = _run(cmd, real_dir), _run_forked(forked, cmd, fork_dir)
        assert (fork.returncode, fork.stdout, fork.stderr) == (real.returncode, real.stdout, real.stderr)
        assert real.returncode == code
        if code == 2:
            assert (fork.stdout + fork.stderr).splitlines() == expect
        assert sorted(os.listdir(real_dir)) == sorted(os.listdir(fork_dir))
    assert os.listdir(tmp_path / "forked0") == [] and (real.stdout + real.stderr) != ""
