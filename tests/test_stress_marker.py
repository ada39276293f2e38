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


def _collected(*marker_args: str) -> str:
    r = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                        *marker_args, FILE], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    return r.stdout


def test_stress_runs_only_when_asked():
    default = _collected()
    assert DEFAULT in default and STRESS not in default and "1 deselected" in default, default
    stress = _collected("-m", "stress")
    assert STRESS in stress and DEFAULT not in stress, stress
