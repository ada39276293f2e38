"""Every benchmark script runs end to end on tiny shapes (CPU), so none rots unnoticed.

The figures they print are not checked here: speed targets are read from full runs, side by side
(README), never from timed tests."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--tokens", "256", "--hidden", "32", "--ffn", "48", "--experts", "7", "--repeats", "1"]

CASES = {
    "layer": ["benchmarks/layer.py", *TINY, "--no-deepspeed", "--no-memory"],
    "grouped_gemm_cpu": ["benchmarks/grouped_gemm_cpu.py", *TINY],
    "stack_cpu": ["benchmarks/stack_cpu.py", *TINY, "--layers", "2"],
    "layer_gpu": ["benchmarks/layer_gpu.py", "--small", "--device", "cpu", "--rounds", "1", "--steps", "1",
                  "--warmup", "1"],
    "kernels": ["benchmarks/kernels.py", "--small", "--iters", "1"],
    "ep": ["benchmarks/ep.py", "--worlds", "2", "--tokens", "64", "--hidden", "32", "--ffn", "48", "--rounds", "1",
           "--steps", "1", "--auto-steps", "4"],
    "ep_groups": ["benchmarks/ep.py", "--worlds", "2", "--tokens", "64", "--hidden", "32", "--ffn", "48", "--experts",
                  "8", "--top-k", "4", "--groups", "4", "--topk-groups", "2", "--rounds", "1", "--steps", "1"],
    "stability": ["benchmarks/stability.py", "--only", "tiny", "--seeds", "1", "--steps", "7"],
    "spike_probe": ["benchmarks/spike_probe.py", "--steps", "5", "--overrides", "preset=tiny"],
    "plan_check": ["benchmarks/plan_check.py", "--worlds", "2", "--tokens", "64", "--hidden", "32", "--ffn", "48",
                   "--rounds", "1", "--steps", "1", "--auto-steps", "4"],
    "sync_free": ["benchmarks/sync_free.py", "--tokens", "256", "--hidden", "32", "--ffn", "48", "--experts", "7",
                  "--repeats", "1"],
    "plan_tutel": ["benchmarks/plan_tutel.py"],
    "placement": ["benchmarks/placement.py", "--ranks", "2", "--experts", "4", "--d-model", "32", "--ffn", "48",
                  "--tokens", "64", "--steps", "2"],
    "placement_force": ["benchmarks/placement.py", "--ranks", "2", "--experts", "4", "--d-model", "32", "--ffn", "48",
                        "--tokens", "64", "--steps", "2", "--force", "--no-scale"],
    "placement_static": ["benchmarks/placement.py", "--ranks", "2", "--experts", "4", "--d-model", "32", "--ffn",
                         "48", "--tokens", "64", "--steps", "2", "--static-capacity-factor", "1.0", "--no-scale"],
    "walk": ["benchmarks/walk.py"],
    "walk_ep": ["benchmarks/walk.py", "--ep", "2"],
    "plan_evomoe": ["benchmarks/plan_evomoe.py", "--gpus", "64"],
    "memory": ["benchmarks/memory.py", "--ranks", "2", "--ep", "1", "2", "--d-model", "32", "--experts", "4",
               "--ffn", "48", "--seq-len", "16", "--steps", "1", "--engines", "plain", "fsdp"],
    "recompute": ["benchmarks/recompute.py", *TINY, "--layers", "2", "--activation", "swiglu", "--shared", "1"],
    "hf_io": ["benchmarks/hf_io.py", "--d-model", "32", "--ffn", "16", "--layers", "1", "--experts", "8", "--vocab",
              "64", "--eps", "1", "2", "--full-build"],
    "decoder_vs_gpt": ["benchmarks/decoder_vs_gpt.py", "--seeds", "1", "--steps", "3"],
    "rank_start": ["benchmarks/rank_start.py", "--worlds", "2", "--runs", "1"],
}


# Scripts run in a fresh interpreter, not forked: kernels.py sets TRITON_INTERPRET before it imports
# triton (read at import).
FRESH = {"kernels"}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CASES))
def test_benchmark_runs(name, forked):
    """Each script as its own process (`python script args`), forked from the session's forkserver
    that imported torch, triton and moesys once (tests/conftest.py); FRESH ones start an interpreter."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script, *args = CASES[name]
    if name in FRESH:
        proc = subprocess.run([sys.executable, script, *args], check=False, cwd=ROOT, env=env, capture_output=True,
                              text=True, timeout=300)
    else:
        proc = forked.run(os.path.join(ROOT, script), args, ROOT, env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "|" in proc.stdout or "==" in proc.stdout, proc.stdout[-2000:]  # it printed its table


# issue 24's targets for one token through one layer (README, "One token through one layer"): files
# and cross-file calls of a training forward, the EP 2 decisions pinned so the walk is the same on
# every machine (whatever the tuner would choose there)
WALK_TARGETS = {
    "one device": ([], 10, 20),
    "ep 2, ep mode": (["--ep", "2", "--mode", "ep", "--overlap", "1"], 14, 35),
    "ep 2, sharded_dp": (["--ep", "2", "--mode", "sharded_dp", "--overlap", "1"], 14, 35),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(WALK_TARGETS))
def test_walk_stays_within_its_targets(case, forked):
    args, max_files, max_calls = WALK_TARGETS[case]
    proc = forked.run(os.path.join(ROOT, "benchmarks", "walk.py"), ["--json", *args], ROOT, os.environ, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    w = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "parallel/tuner.py" not in w["files"] and "parallel/timing.py" not in w["files"], w["files"]
    assert len(w["files"]) <= max_files and len(w["calls"]) <= max_calls, (
        f"{case}: {len(w['files'])} files, {len(w['calls'])} calls (targets {max_files} / {max_calls}):\n"
        + "\n".join(w["calls"]))


def test_the_scripts_that_set_the_triton_flag_start_fresh():
    """A forked script finds triton imported without TRITON_INTERPRET: one that sets the flag itself
    (before its imports) must be in FRESH, or its kernels fail under the interpreter."""
    sets_flag = set()
    for name, (script, *_) in CASES.items():
        with open(os.path.join(ROOT, script)) as f:
            if "TRITON_INTERPRET" in f.read():
                sets_flag.add(name)
    assert sets_flag == {"kernels"} and sets_flag <= FRESH
