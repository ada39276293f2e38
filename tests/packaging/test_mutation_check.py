"""The mutation check of README "Mutation check of the fault paths" runs as written: mutmut, configured
by pyproject.toml's [tool.mutmut], mutates one function of moesys/preemption.py in a scratch copy
of the tree and the fault tests kill every mutant."""
import os
import re
import shlex
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _commands():
    with open(os.path.join(ROOT, "README.md")) as f:
        text = f.read()
    block = text.split("### Mutation check of the fault paths", 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    return [shlex.split(line, comments=True) for line in block.strip().splitlines()]


@pytest.mark.slow
@pytest.mark.stress  # minutes of mutants: run with `python -m pytest -m stress` (mutmut is in the dev extra)
@pytest.mark.timeout(1800)
def test_readme_mutation_commands_run(tmp_path):
    import mutmut  # noqa: F401  (a dev dependency: a missing one is a failure, not a skip)
    cmds = _commands()
    assert [c[:3] for c in cmds] == [["python", "-m", "mutmut"]] * 2 and cmds[0][3] == "run"
    ignore = shutil.ignore_patterns("__pycache__", "mutants", "*.pyc")
    for d in ("moesys", "tests"):  # mutmut writes mutants/ beside the tree it mutates: a copy
        shutil.copytree(os.path.join(ROOT, d), tmp_path / d, ignore=ignore)
    shutil.copy(os.path.join(ROOT, "pyproject.toml"), tmp_path)
    outs = []
    for argv in cmds:
        p = subprocess.run([sys.executable, *argv[1:]], cwd=tmp_path, capture_output=True, text=True, timeout=1500)
        assert p.returncode == 0, (p.stdout[-3000:], p.stderr[-3000:])
        outs.append(p.stdout)
    verdicts = dict(re.findall(r"(moesys\.preemption\.x_agreed_signal__mutmut_\d+): (.+)", outs[1]))
    assert len(verdicts) >= 5 and set(verdicts.values()) == {"killed"}, verdicts
