"""What a multi-rank test pays before its work: a fresh interpreter importing torch and moesys,
a spawn of N gloo ranks (simulate), and a run on ranks kept alive (RankPool). docs/testing.md.
And what a one-step `moesys-train` of N simulated ranks takes with its ranks spawned against
forked from a preloaded server (parallel.rank_start=spawn | auto), side by side, alternating.

    python benchmarks/rank_start.py --worlds 2 4 --runs 3

Each line is the median of --runs wall-clock timings on this machine as loaded now (print
`uptime` beside it: on a shared machine the figures move with the load).
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch.distributed as dist

from moesys.parallel.simulate import RankPool, simulate


def noop_body() -> int:
    """One barrier: the rendezvous and a collective, no work."""
    t = dist.get_rank()
    dist.barrier()
    return t


def _median_s(fn, runs: int) -> float:
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--worlds", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--runs", type=int, default=3)
    a = ap.parse_args()
    print("| what | seconds |\n|---|---|")
    for what, code in (("python -c pass", "pass"), ("import torch", "import torch"),
                       ("import moesys.parallel", "import moesys.parallel")):
        s = _median_s(lambda: subprocess.run([sys.executable, "-c", code], check=True), a.runs)
        print(f"| fresh interpreter, `{what}` | {s:.2f} |")
    for world in a.worlds:
        s = _median_s(lambda: simulate(noop_body, world, timeout_s=120), a.runs)
        print(f"| `simulate(noop, {world})`: spawn + imports + rendezvous | {s:.2f} a call |")
        pool = RankPool(world)
        t0 = time.perf_counter()
        pool.run(noop_body, timeout_s=120)
        start = time.perf_counter() - t0
        s = _median_s(lambda: pool.run(noop_body, timeout_s=120), a.runs)
        pool.close()
        print(f"| `RankPool({world})`: first run (start) / each later run | {start:.1f} / {s:.3f} |")
    train_cmd = os.path.join(os.path.dirname(sys.executable), "moesys-train")  # the console script
    with tempfile.TemporaryDirectory() as d:
        for world in a.worlds:
            times = {"spawn": [], "auto": []}
            for i in range(a.runs):
                for how in ("spawn", "auto"):
                    cmd = [train_cmd, "preset=tiny", "trainer.steps=1",
                           "trainer.eval_interval=1", "trainer.eval_batches=1", f"parallel.simulate_ranks={world}",
                           f"parallel.ep={world}", "moe.num_experts=8", f"parallel.rank_start={how}",
                           f"trainer.out_dir={os.path.join(d, f'{how}{world}_{i}')}"]
                    t0 = time.perf_counter()
                    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
                    times[how].append(time.perf_counter() - t0)
            sp, fk = statistics.median(times["spawn"]), statistics.median(times["auto"])
            print(f"| `moesys-train` 1 step, {world} ranks: spawned / forked (rank_start=auto) | "
                  f"{sp:.1f} / {fk:.1f} ({sp / fk:.2f}x) |")


if __name__ == "__main__":
    main()
