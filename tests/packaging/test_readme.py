"""The README's two set-up commands are the ones CI runs and the console script exists."""
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def read(*p):
    with open(os.path.join(ROOT, *p)) as f:
        return f.read()


def test_ci_runs_the_readme_test_command():
    ci = read(".ci", "run")
    readme = read("README.md")
    cmd = [line for line in ci.splitlines() if line.startswith("python3 -m venv")]
    assert len(cmd) == 1, cmd
    assert cmd[0] in readme


def test_readme_train_command_uses_the_console_script():
    readme = read("README.md")
    assert re.search(r'pip install -q -e "\.\[dev\]" && moesys-train\n', readme)
    assert 'moesys-train = "moesys.train:main"' in read("pyproject.toml")
