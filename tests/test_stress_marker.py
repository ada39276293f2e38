"""The stress marker: repetition loops at full count run only when the marker expression names
them (tests/conftest.py); the default suite deselects them (they are marked slow as well, so
`-m "not slow"` leaves them out too)."""
from __future__ import annotations

import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FILE = "tests/parallel/test_exit.py"
STRESS = "test_script_ending_in_destroy_process_group_exits_0_in_20_launches"
DEFAULT = "test_script_ending_in_destroy_process_group_exits_0_every_time"


def _collected(forked, *marker_args: str) -> str:
    """`python -m pytest --collect-only ...` as a process of its own, forked from the session's server
    (torch and moesys imported once: tests/conftest.py)."""
    r = forked.run(os.path.join(os.path.dirname(pytest.__file__), "__main__.py"),
                   ["--collect-only", "-q", "-p", "no:cacheprovider", *marker_args, FILE], ROOT, os.environ, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    return r.stdout


def test_stress_runs_only_when_asked(forked):
    default = _collected(forked)
    assert DEFAULT in default and STRESS not in default and "1 deselected" in default, default
    stress = _collected(forked, "-m", "stress")
    assert STRESS in stress and DEFAULT not in stress, stress
