"""Signals, rank deaths and restarts, with real signals on real processes (docs/fault-tolerance.md).

- a stop signal on one rank (or the parent) stops every rank after the same step; SIGTERM and
  SIGUSR1 write a checkpoint first, SIGINT does not; resuming gives the uninterrupted losses;
- a rank that raises or is SIGKILLed takes the job down at once, named, with its error;
- a SIGKILLed parent leaves no rank behind;
- torchrun --max-restarts=1 with a rank SIGKILLed mid-run ends with the uninterrupted weights;
- a SIGKILL while DCP is writing leaves the previous checkpoint whole, and resume is exact.
"""
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

from moesys import checkpoint as ckpt
from moesys import train as train_mod
from moesys.supervise import RankFailedError
from fault_helpers import alive as _alive
from stop_helpers import COMMON, abort_at, kill_self_at, raise_at, signal_at
from train_helpers import make_cfg, read_flat_checkpoint

HERE = os.path.dirname(os.path.abspath(__file__))
TWO = ("parallel.simulate_ranks=2", "parallel.ep=2")


def _cfg(out, *ov):
    return make_cfg(*ov, f"trainer.out_dir={out}", "trainer.ckpt_interval=2", *COMMON)


def _weights(ckpt_dir):
    return {k: v for k, v in read_flat_checkpoint(ckpt_dir).items() if k.startswith("model.")}


def _assert_same_weights(a_dir, b_dir):
    """fp32-close: one process resumes bitwise; with 2 gloo ranks the resumed weights have been seen
    1 ULP (7e-9 at 0.08) off the uninterrupted run's while every per-step loss is bitwise equal."""
    a, b = _weights(a_dir), _weights(b_dir)
    assert a.keys() == b.keys() and a
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-6, atol=1e-8, msg=k)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted 2-rank run of 5 steps (the runs below must end exactly here)."""
    out = str(tmp_path_factory.mktemp("ref") / "run")
    s = train_mod.run(_cfg(out, *TWO, "trainer.steps=5"), out)
    return s


@pytest.mark.slow  # spawned ranks x 3 runs; the fast set keeps a dying rank's and SIGUSR1's paths
@pytest.mark.multirank
def test_sigterm_to_one_rank_stops_every_rank_after_one_checkpoint_and_resume_is_exact(tmp_path, reference):
    """SIGTERM reaches rank 1 during step 2: both ranks finish step 2, write step_00000003 together,
    and stop; the resumed run's losses and final weights equal the uninterrupted run's (fp32, bitwise)."""
    out = str(tmp_path / "run")
    s = train_mod.run(_cfg(out, *TWO, "trainer.steps=5"), out, callbacks_fn=signal_at(2, 1, signal.SIGTERM))
    step3 = os.path.join(out, "checkpoints", "step_00000003")
    assert s["stopped"] == {"signal": "SIGTERM", "exit_code": 143, "step": 3, "checkpoint": step3, "saved": True}
    assert s["steps"] == 3 and len(s["train_losses"]) == 3
    assert ckpt.verify_checkpoint(step3) and ckpt.read_meta(step3)["step"] == 3
    assert s["train_losses"] == reference["train_losses"][:3]
    # the adaptive runtime's progress rides along (one tuner per MoE layer, mid-schedule after 3
    # steps): the resumed run continues the same trials, so its numbers do not depend on the
    # machine's load (before, a resumed tuner restarted its warm-up and, on a loaded machine, ran
    # other (mode, degree) trials than the uninterrupted run: the losses differed at 1e-7)
    tuners = ckpt.read_meta(step3)["trainer"]["tuners"]
    assert len(tuners) == 2 and all(t["step"] == 3 and t["phase"] != "warmup" for t in tuners), tuners
    r = train_mod.run(_cfg(out, *TWO, "trainer.steps=5", "trainer.resume=auto"), out)
    assert "stopped" not in r and r["train_losses"] == reference["train_losses"]
    _assert_same_weights(r["checkpoint"], reference["checkpoint"])


@pytest.mark.slow
@pytest.mark.multirank
def test_sigint_to_the_parent_is_forwarded_and_stops_without_a_checkpoint(tmp_path, reference):
    """Rank 1 sends SIGINT to its parent (this process) during step 2; the parent forwards it; every
    rank stops after step 2 and no checkpoint is written: the newest stays step 2's."""
    out = str(tmp_path / "run")
    s = train_mod.run(_cfg(out, *TWO, "trainer.steps=5"), out,
                      callbacks_fn=signal_at(2, 1, signal.SIGINT, to="parent"))
    step2 = os.path.join(out, "checkpoints", "step_00000002")
    assert s["stopped"] == {"signal": "SIGINT", "exit_code": 130, "step": 3, "checkpoint": step2, "saved": False}
    assert sorted(os.listdir(os.path.join(out, "checkpoints"))) == ["latest", "step_00000002"]
    assert s["train_losses"] == reference["train_losses"][:3]


def test_sigusr1_in_one_process_saves_and_stops(tmp_path):
    out = str(tmp_path / "run")
    ov = ("parallel.simulate_ranks=1", "parallel.ep=1", "trainer.steps=5")
    s = train_mod.run(_cfg(out, *ov), out, callbacks_fn=signal_at(0, 0, signal.SIGUSR1))
    step1 = os.path.join(out, "checkpoints", "step_00000001")
    assert s["stopped"] == {"signal": "SIGUSR1", "exit_code": 143, "step": 1, "checkpoint": step1, "saved": True}
    assert signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL  # the handlers are put back


@pytest.mark.multirank
@pytest.mark.parametrize("fault", ["raise", pytest.param("sigkill", marks=pytest.mark.slow),
                                   pytest.param("sigabrt", marks=pytest.mark.slow)])
def test_a_rank_that_dies_takes_the_job_down_at_once_named(tmp_path, fault):
    """Rank 1 raises (or is SIGKILLed, or aborts) at step 2 while rank 0 waits in a collective whose
    timeout is 10 minutes: the parent names rank 1 and its error, and rank 0 is killed at once."""
    out = str(tmp_path / "run")
    cb = {"raise": raise_at, "sigkill": kill_self_at, "sigabrt": abort_at}[fault](2, 1)
    t0 = time.time()
    with pytest.raises(RankFailedError) as e:
        train_mod.run(_cfg(out, *TWO, "trainer.steps=5", "parallel.timeout_s=600"), out, callbacks_fn=cb)
    assert e.value.rank == 1
    msg = str(e.value)
    if fault == "raise":
        assert e.value.exitcode == 1
        assert "rank 1 of 2 failed (exit code 1): ValueError: injected failure at step 2 on rank 1" in msg
        assert "stop_helpers.py" in msg  # its traceback
    elif fault == "sigkill":
        assert e.value.exitcode == -signal.SIGKILL and "rank 1 of 2 was killed by SIGKILL (no Python error" in msg
    else:  # the native crash's stack, from faulthandler: where the rank was
        assert e.value.exitcode == -signal.SIGABRT and "rank 1 of 2 was killed by SIGABRT; its stack:" in msg
        assert "Fatal Python error: Aborted" in msg and "stop_helpers.py" in msg
    assert "the other ranks were stopped" in msg
    assert time.time() - t0 < 300  # far below the 600 s collective timeout, startup included


def _children(pid):
    kids = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                kids.append(int(d))
    return kids


def _cmdline(pid) -> bytes:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read()
    except OSError:
        return b""


def _ranks(pid):
    """The rank processes of the moesys-train process `pid`: its spawned children, or the children
    of the forkserver it started (parallel.rank_start=auto); not the resource tracker or the server."""
    ranks = []
    for c in _children(pid):
        cmd = _cmdline(c)
        if b"multiprocessing.forkserver" in cmd:
            ranks += _children(c)
        elif b"multiprocessing.spawn" in cmd:
            ranks.append(c)
    return ranks


def _helper(*args):
    return subprocess.Popen([sys.executable, os.path.join(HERE, "stop_helpers.py"), *map(str, args)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=HERE)


@pytest.mark.slow
@pytest.mark.multirank
def test_cli_sigterm_prints_one_line_and_exits_143(tmp_path):
    """The command line's path (cli_run, as `moesys-train` runs it): rank 1 sends SIGTERM to the
    parent process; it forwards it, the run stops after step 2 with step_00000003, prints one line
    and exits 143."""
    out = str(tmp_path / "run")
    p = _helper("cli", out, 6, 2, 1, int(signal.SIGTERM), "parent")
    _, err = p.communicate(timeout=600)
    assert p.returncode == 143, err
    lines = [ln for ln in err.splitlines() if ln.startswith("moesys-train:")]
    step3 = os.path.join(out, "checkpoints", "step_00000003")
    assert lines == [f"moesys-train: stopped by SIGTERM at step 3; checkpoint {step3}; resume: moesys-train "
                     f"parallel.simulate_ranks=2 parallel.ep=2 trainer.steps=6 trainer.ckpt_interval=2 "
                     f"{' '.join(COMMON)} trainer.out_dir={out} trainer.resume=auto"], err


@pytest.mark.slow
@pytest.mark.multirank
def test_cli_rank_error_names_the_rank_and_exits_1(tmp_path):
    out = str(tmp_path / "run")
    p = _helper("cli", out, 6, 2, 1, "raise")
    _, err = p.communicate(timeout=600)
    assert p.returncode == 1, err
    assert "moesys-train: rank 1 of 2 failed (exit code 1): ValueError: injected failure at step 2 on rank 1" in err


@pytest.mark.slow
@pytest.mark.multirank
def test_a_sigkilled_parent_leaves_no_rank_running(tmp_path):
    out = str(tmp_path / "run")
    p = _helper("cli", out, 100000, 10**9, 0, "raise")  # trains on; the fault never fires
    metrics = os.path.join(out, "metrics.jsonl")
    deadline = time.time() + 400
    while not (os.path.isfile(metrics) and os.path.getsize(metrics) > 0) and time.time() < deadline:
        assert p.poll() is None, p.communicate()
        time.sleep(0.5)
    ranks = _ranks(p.pid)
    assert len([r for r in ranks if _alive(r)]) == 2, ranks
    helpers = _children(p.pid)  # the resource tracker, and the forkserver the ranks were forked from
    p.kill()
    p.wait()
    deadline = time.time() + 30
    while any(_alive(r) for r in ranks + helpers) and time.time() < deadline:
        time.sleep(0.2)
    assert not any(_alive(r) for r in ranks + helpers)


@pytest.mark.slow
@pytest.mark.multirank
def test_torchrun_restarts_a_job_whose_rank_was_sigkilled_and_ends_with_the_uninterrupted_weights(tmp_path, reference):
    """`torchrun --nproc_per_node=2 --max-restarts=1`: rank 1 SIGKILLs itself at step 3 (first attempt
    only); torchrun restarts both ranks, trainer.resume=auto continues from step_00000002, and the
    final weights equal the uninterrupted 2-rank run's."""
    out = str(tmp_path / "run")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "--max-restarts=1",
           "--monitor-interval=0.2", os.path.join(HERE, "stop_helpers.py"), "torchrun", out, "5", "3", "1"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=HERE)
    assert p.returncode == 0, p.stderr[-4000:]
    step2 = os.path.join(out, "checkpoints", "step_00000002")
    assert f"resumed from {step2} at step 2" in p.stdout, p.stdout[-3000:]
    final = os.path.join(out, "checkpoints", "step_00000005")
    _assert_same_weights(final, reference["checkpoint"])


@pytest.mark.slow
def test_sigkill_while_dcp_writes_keeps_the_previous_checkpoint_and_resume_is_exact(tmp_path, capsys):
    """The process is SIGKILLed inside DCP's write of step 4 (its data files written, not its
    .metadata nor moesys.json): step 2 still verifies and is `latest`; resume=auto from it gives the
    uninterrupted run's losses and weights, bitwise (one process)."""
    out = str(tmp_path / "run")
    p = _helper("blocksave", out, 6, 2)
    marker = os.path.join(out, "blocked")
    deadline = time.time() + 400
    while not os.path.exists(marker) and time.time() < deadline:
        assert p.poll() is None, p.communicate()
        time.sleep(0.2)
    p.send_signal(signal.SIGKILL)
    p.wait()
    root = os.path.join(out, "checkpoints")
    step2 = os.path.join(root, "step_00000002")
    partial = os.path.join(root, ".step_00000004.tmp")
    assert any(f.endswith(".distcp") for f in os.listdir(partial))  # killed mid-write, truly
    assert not os.path.exists(os.path.join(partial, ckpt.META_FILE))
    assert sorted(d for d in os.listdir(root) if not d.startswith(".")) == ["latest", "step_00000002"]
    assert ckpt.resolve_verified(root) == (step2, []) and ckpt.verify_checkpoint(step2)
    ov = ("parallel.simulate_ranks=1", "parallel.ep=1", "trainer.steps=6", "trainer.keep_checkpoints=5")
    resumed = train_mod.run(_cfg(out, *ov, "trainer.resume=auto"), out)
    assert f"resumed from {step2} at step 2" in capsys.readouterr().out
    ref_out = str(tmp_path / "ref")
    ref = train_mod.run(_cfg(ref_out, *ov), ref_out)
    assert resumed["train_losses"] == ref["train_losses"]
    a, b = _weights(resumed["checkpoint"]), _weights(ref["checkpoint"])
    assert all(torch.equal(a[k], b[k]) for k in a) and a.keys() == b.keys()
    assert not os.path.exists(partial)  # the crashed save's leftovers are gone once step 4 is written


@pytest.mark.slow
@pytest.mark.multirank
def test_readme_restart_commands_run(tmp_path):
    """The two commands of README "Stopping, preemption and restarts", as written (real torchrun
    through launchers/torchrun.sh, then moesys-train resuming the same out_dir)."""
    root = os.path.dirname(os.path.dirname(HERE))
    text = open(os.path.join(root, "README.md")).read()
    block = text.split("### Stopping, preemption and restarts", 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    cmds = [ln.split("#")[0].strip() for ln in block.strip().splitlines()]
    assert cmds[0].startswith("launchers/torchrun.sh --nproc 2 --max-restarts 1") and cmds[1].startswith("moesys-train")
    env = {**os.environ, "MASTER_PORT": str(train_mod._free_port())}
    bindir = os.path.dirname(sys.executable)  # moesys-train and torchrun of this environment
    env["PATH"] = f"{bindir}:{env['PATH']}"
    p = subprocess.run(os.path.join(root, cmds[0]), shell=True, cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert os.path.isdir(tmp_path / "runs" / "a" / "checkpoints" / "step_00000020")
    p = subprocess.run(cmds[1], shell=True, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "resumed from" in p.stdout and "step_00000020 at step 20" in p.stdout
    assert os.path.isdir(tmp_path / "runs" / "a" / "checkpoints" / "step_00000030")


@pytest.mark.slow
@pytest.mark.multirank
def test_torchrun_names_the_rank_that_raised(tmp_path):
    """Under torchrun (no restarts) torchrun's failure summary names rank 1 and its exception (the
    rank writes torchrun's error file)."""
    out = str(tmp_path / "run")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "--monitor-interval=0.2", os.path.join(HERE, "stop_helpers.py"), "torchrun", out, "5", "2", "1", "raise"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=HERE)
    assert p.returncode == 1
    root = p.stderr.split("Root Cause", 1)[1]
    assert re.search(r"rank\s*: 1 ", root), root
    assert "ValueError: injected failure at step 2 on rank 1" in root, root


@pytest.mark.slow
@pytest.mark.multirank
def test_sigterm_while_the_ranks_start_is_a_stop_not_a_failure(tmp_path):
    """SIGTERM to the parent as soon as its ranks exist (here they are still importing torch, before
    any handler): exit 143 and a stop line, not "rank failed" (on a fast machine the ranks may
    already handle it and stop after step 1: the same exit code and line)."""
    out = str(tmp_path / "run")
    p = _helper("cli", out, 100000, 10**9, 0, "raise")
    deadline = time.time() + 120
    while len([c for c in _ranks(p.pid) if _alive(c)]) < 2 and time.time() < deadline:
        time.sleep(0.02)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=600)
    assert p.returncode == 143, err
    assert [ln for ln in err.splitlines() if ln.startswith("moesys-train:")][0].startswith(
        "moesys-train: stopped by SIGTERM"), err
