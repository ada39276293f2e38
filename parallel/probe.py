"""One-off measurement of the machine for the tuner's cost model (run at apply time, ~10 ms).

Times a tiny all-to-all (latency), a larger one (bandwidth) in the ep group and a GEMM (FLOP/s),
with CUDA events on a GPU (the host clock would time launches) and the host clock on CPU;
every rank takes the slowest rank's figures over `agree_group` (all_reduce MAX of the times; the
whole job by default), so the tuners of every ep group get the same inputs.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from .comm import all_reduce_host, comm_device
from .timing import clock_for
from .tuner import Machine


def _timed(fn, reps: int, clock) -> float:
    fn()  # warm-up (first-call allocations, connection set-up)
    start = clock.mark()
    for _ in range(reps):
        fn()
    return clock.seconds(start, clock.mark()) / reps


def probe_machine(group, dtype: torch.dtype = torch.float32, nbytes: int = 1 << 20, agree_group=None,
                  clock=None) -> Machine:
    """clock: a step clock of parallel.timing (default: CUDA events for an NCCL group, else the host)."""
    P = dist.get_world_size(group)
    esize = torch.empty((), dtype=dtype).element_size()
    dev = comm_device(group)  # NCCL moves CUDA tensors only
    small = torch.zeros(P, dtype=dtype, device=dev)
    n = max(P, nbytes // esize // P * P)
    big = torch.zeros(n, dtype=dtype, device=dev)
    out_small, out_big = torch.empty_like(small), torch.empty_like(big)
    clock = clock if clock is not None else clock_for(dev)
    t_lat = _timed(lambda: dist.all_to_all_single(out_small, small, group=group), 3, clock)
    t_big = _timed(lambda: dist.all_to_all_single(out_big, big, group=group), 2, clock)
    a = torch.randn(128, 256, dtype=dtype, device=dev)
    b = torch.randn(256, 256, dtype=dtype, device=dev)
    t_mm = _timed(lambda: a @ b, 5, clock)
    times = all_reduce_host(torch.tensor([t_lat, t_big, t_mm], dtype=torch.float64),
                            group if agree_group is None else agree_group, op=dist.ReduceOp.MAX)
    t_lat, t_big, t_mm = times.tolist()
    sent = n * esize * (P - 1) / P  # bytes a rank sends to others
    # one rank sends nothing to others: communication is free (no division by a zero bandwidth)
    bandwidth = sent / max(t_big - t_lat, 1e-7) if sent > 0 else float("inf")
    return Machine(bandwidth=bandwidth, latency=t_lat, flops=2 * 128 * 256 * 256 / max(t_mm, 1e-9))
