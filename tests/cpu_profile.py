"""A pytest plugin for the suite's profile (docs/testing.md): per test, its wall time, the CPU
seconds of pytest and every process it started (ended ones included: their time reaches their
parent when it reaps them), and the mean number of runnable threads in that process tree, sampled
every 50 ms (how much of the 2 cores the test asks for, whatever else runs on the machine).

    PYTHONPATH=tests CPU_PROFILE_OUT=profile.json python -m pytest -q -p cpu_profile FILES

writes [[nodeid, wall_s, cpu_s, mean_runnable], ...] and prints the totals."""
import json
import os
import threading
import time

import psutil
import pytest


def _tree_cpu():
    me = psutil.Process()
    tot = 0.0
    for p in [me, *me.children(recursive=True)]:
        try:
            t = p.cpu_times()
            tot += t.user + t.system + t.children_user + t.children_system
        except psutil.Error:
            pass
    return tot

class _Sampler(threading.Thread):
    def __init__(self):
        super().__init__(daemon=True)
        self.samples = 0
        self.runnable = 0
        self.lock = threading.Lock()
        self.stop = False
    def run(self):
        me = psutil.Process()
        mytid = threading.get_native_id()
        while not self.stop:
            n = 0
            try:
                procs = [me, *me.children(recursive=True)]
            except psutil.Error:
                procs = [me]
            for p in procs:
                try:
                    for tid in os.listdir(f"/proc/{p.pid}/task"):
                        if int(tid) == mytid:
                            continue
                        with open(f"/proc/{p.pid}/task/{tid}/stat") as f:
                            s = f.read()
                        if s[s.rindex(")") + 2] == "R":
                            n += 1
                except (OSError, ValueError):
                    pass
            with self.lock:
                self.samples += 1
                self.runnable += n
            time.sleep(0.05)
    def read(self):
        with self.lock:
            return self.samples, self.runnable

_ROWS = []
_S = None

def pytest_sessionstart(session):
    global _S
    _S = _Sampler()
    _S.start()

@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    c0, w0, (s0, r0) = _tree_cpu(), time.monotonic(), _S.read()
    yield
    s1, r1 = _S.read()
    _ROWS.append((item.nodeid, time.monotonic() - w0, _tree_cpu() - c0, (r1 - r0) / max(s1 - s0, 1)))

def pytest_sessionfinish(session):
    out = os.environ.get("CPU_PROFILE_OUT", "cpu_profile.json")
    with open(out, "w") as f:
        json.dump(_ROWS, f)
    w = sum(r[1] for r in _ROWS)
    c = sum(r[2] for r in _ROWS)
    d = sum(r[1] * r[3] for r in _ROWS) / max(w, 1e-9)
    print(f"\n[cpu_profile] {len(_ROWS)} tests wall {w:.1f}s cpu {c:.1f}s cpu/wall {c / max(w, 1e-9):.2f} "
          f"mean runnable threads {d:.2f} load {os.getloadavg()[0]:.1f}")
