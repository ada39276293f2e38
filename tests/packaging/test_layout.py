"""parallel/ and kernels/ import as moesys.parallel / moesys.kernels, never as top-level names:
from the repository root, from elsewhere, and from a built wheel."""
import os
import subprocess
import sys
import zipfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CHECK = (
    "import importlib.util, json, moesys\n"
    "from moesys import parallel, kernels, MoEConfig, MoELayer\n"
    "import moesys.configs\n"
    "print(json.dumps({'moesys': moesys.__file__, 'parallel': parallel.__file__, 'kernels': kernels.__file__,\n"
    "  'top_kernels': getattr(importlib.util.find_spec('kernels'), 'origin', None),\n"
    "  'top_parallel': getattr(importlib.util.find_spec('parallel'), 'origin', None)}))\n"
)


def run_check(cwd, env=None):
    import json

    out = subprocess.run([sys.executable, "-c", CHECK], cwd=cwd, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def _env_without_pythonpath():
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    return env


@pytest.mark.parametrize("where", ["root", "elsewhere"])
def test_installed_layout(where, tmp_path):
    cwd = ROOT if where == "root" else str(tmp_path)
    got = run_check(cwd, _env_without_pythonpath())
    assert got["parallel"] == os.path.join(ROOT, "parallel", "__init__.py")
    assert got["kernels"] == os.path.join(ROOT, "kernels", "__init__.py")
    if where == "elsewhere":
        # moesys claims no top-level `kernels` or `parallel` (Hugging Face's `kernels` may be installed:
        # if so it must be theirs, never our folder)
        for name, folder in (("top_kernels", "kernels"), ("top_parallel", "parallel")):
            assert got[name] is None or not got[name].startswith(os.path.join(ROOT, folder) + os.sep), got


@pytest.mark.slow
def test_wheel_installs_and_imports_the_same_way(tmp_path):
    wheel_dir = tmp_path / "wheel"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(wheel_dir), ROOT], check=True, cwd=tmp_path)
    (wheel,) = list(wheel_dir.glob("moesys-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "moesys/parallel/__init__.py" in names and "moesys/kernels/__init__.py" in names
    assert "moesys/configs/__init__.py" in names
    assert "moesys/configs/cluster/a100_dgx.yaml" in names and "moesys/planner/cli.py" in names  # moesys-plan
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith((".dist-info", ".data"))}
    assert tops == {"moesys"}, tops  # nothing else claimed at top level
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
                   check=True, cwd=tmp_path)
    env = _env_without_pythonpath()
    env["PYTHONPATH"] = str(target)
    got = run_check(str(tmp_path), env)
    assert got["moesys"].startswith(str(target))
    assert got["parallel"] == str(target / "moesys" / "parallel" / "__init__.py")
    assert got["kernels"] == str(target / "moesys" / "kernels" / "__init__.py")
