"""The stress marker: repetition loops at full count run only when the marker expression names
them (tests/conftest.py); the default suite deselects them (they are marked slow as well, so
`-m "not slow"` leaves them out too)."""
from __future__ import annotations

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FILE = "tests/parallel/test_exit.py"
STRESS = "test_script_ending_in_destroy_process_group_exits_0_in_20_launches"
DEFAULT = "test_script_ending_in_destroy_process_group_exits_0_every_time"


def _collect(*marker_args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                             *marker_args, FILE], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _collected(proc: subprocess.Popen) -> str:
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-2000:] + err[-2000:]
    return out


def test_stress_runs_only_when_asked():
    both = _collect(), _collect("-m", "stress")  # two interpreters at once (two cores)
    default, stress = (_collected(p) for p in both)
    assert DEFAULT in default and STRESS not in default and "1 deselected" in default, default
    assert STRESS in stress and DEFAULT not in stress, stress
