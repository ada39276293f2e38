"""Helpers shared by the benchmarks: the layer benchmarks' shape options (defaults: the issue's
shape), a one-call timer that uses CUDA events on a GPU, and what simulated ranks are forked from."""
from __future__ import annotations

import argparse
import time

# simulate(..., preload=RANK_PRELOAD): the ranks of a timing benchmark are forked from a server that
# imported moesys once, rather than each starting an interpreter (seconds of CPU a rank, not what
# is measured); rank_start.py, which times the start itself, spawns its own
RANK_PRELOAD = ("moesys.parallel",)


def add_shape_args(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--ffn", type=int, default=1024)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--experts", type=int, nargs="+", default=[8, 16, 64])
    p.add_argument("--repeats", type=int, default=7)
    return p


def timed(fn, device) -> float:
    """Seconds one call of fn takes: CUDA events (then a sync) on a GPU, a wall clock elsewhere."""
    import torch

    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1e3
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0
