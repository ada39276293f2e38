"""One-off measurement of the machine for the tuner's cost model (run at apply time, ~20 ms).

Times, each as the median of a few repetitions: a tiny all-to-all (latency) and a 1 MB one
(bandwidth) in the ep group; a GEMM at 128 and at 16 rows (throughput, and the rows at which it
halves: `Machine.half_rows`); the 1 MB all-to-all started asynchronously while the rank runs GEMMs
of about the same length (the fraction of the shorter one hidden: `Machine.overlap`; on a CPU whose
cores are all busy with ranks, ~0); on CPU ranks, the threads that want a core on this host (its
ranks in the agree group x torch threads) over its cores: `Machine.core_share` = cores / that, at
most 1 (the cost model then prices the total work of ranks that share cores). Every rank takes the slowest rank's times over `agree_group`
(all_reduce MAX; the whole job by default), so the tuners of every ep group get the same inputs.
"""
from __future__ import annotations

import os
import socket
import statistics

import torch
import torch.distributed as dist

from .comm import all_reduce_host, comm_device
from .timing import clock_for
from .tuner import Machine

GEMM_ROWS = (128, 16)  # rows of the two probe GEMMs ([rows, 256] @ [256, 256])
MAX_HALF_ROWS = 4096.0


def _timed(fn, reps: int, clock) -> float:
    """Median of `reps` timed calls after one untimed warm-up (first-call allocations, connection
    set-up); each call is timed with `clock` (CUDA events on a GPU: one sync per read)."""
    fn()
    times = []
    for _ in range(reps):
        start = clock.mark()
        fn()
        times.append(clock.seconds(start, clock.mark()))
    return statistics.median(times)  # a shared machine's spikes hit single repetitions


def half_rows_from(t_big: float, t_small: float, rows=GEMM_ROWS) -> float:
    """h in t(r) proportional to (r + h), from the times of the same GEMM at two row counts."""
    r_big, r_small = rows
    ratio = t_big / max(t_small, 1e-12)
    if ratio <= 1.0 + 1e-9:  # the larger GEMM was no slower: all overhead (clamped)
        return MAX_HALF_ROWS
    return min(MAX_HALF_ROWS, max(0.0, (r_big - ratio * r_small) / (ratio - 1.0)))


def hidden_fraction(t_comm: float, t_comp: float, t_both: float) -> float:
    """Fraction of the shorter of comm and compute hidden when they run together, in [0, 1]."""
    short = min(t_comm, t_comp)
    if short <= 0:
        return 0.0
    return min(1.0, max(0.0, (t_comm + t_comp - t_both) / short))


def probe_machine(group, dtype: torch.dtype = torch.float32, nbytes: int = 1 << 20, agree_group=None,
                  clock=None) -> Machine:
    """clock: a step clock of parallel.timing (default: CUDA events for an NCCL group, else the host)."""
    P = dist.get_world_size(group)
    esize = torch.empty((), dtype=dtype).element_size()
    dev = comm_device(group)  # NCCL moves CUDA tensors only
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    small = torch.zeros(P, dtype=dtype, device=dev)
    n = max(P, nbytes // esize // P * P)
    big = torch.zeros(n, dtype=dtype, device=dev)
    out_small, out_big = torch.empty_like(small), torch.empty_like(big)
    clock = clock if clock is not None else clock_for(dev)
    t_lat = _timed(lambda: dist.all_to_all_single(out_small, small, group=group), 5, clock)
    t_big = _timed(lambda: dist.all_to_all_single(out_big, big, group=group), 3, clock)
    b = torch.randn(256, 256, dtype=dtype, device=dev)
    a_rows = [torch.randn(r, 256, dtype=dtype, device=dev) for r in GEMM_ROWS]
    t_mm = _timed(lambda: (a_rows[0] @ b, sync()), 5, clock)
    t_mm_small = _timed(lambda: (a_rows[1] @ b, sync()), 9, clock)
    k = max(1, min(64, round(t_big / max(t_mm, 1e-9))))  # GEMMs of about one all-to-all's length

    def both():
        work = dist.all_to_all_single(out_big, big, group=group, async_op=True)
        for _ in range(k):
            a_rows[0] @ b
        sync()
        work.wait()

    t_both = _timed(both, 3, clock)
    agree = group if agree_group is None else agree_group
    crowd = 1.0  # threads wanting a core per core of this host (CPU ranks only: a GPU computes alone)
    if dev.type == "cpu":
        host = socket.gethostname()
        hosts = [None] * dist.get_world_size(agree)
        dist.all_gather_object(hosts, host, group=agree)
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        crowd = hosts.count(host) * torch.get_num_threads() / cores
    times = all_reduce_host(torch.tensor([t_lat, t_big, t_mm, t_mm_small, t_both, k * t_mm, crowd],
                                         dtype=torch.float64), agree, op=dist.ReduceOp.MAX)
    t_lat, t_big, t_mm, t_mm_small, t_both, t_comp, crowd = times.tolist()
    sent = n * esize * (P - 1) / P  # bytes a rank sends to others
    h = half_rows_from(t_mm, t_mm_small)
    r = GEMM_ROWS[0]
    # a noisy latency can exceed the 1 MB time: bandwidth then from at least a tenth of it; one rank
    # sends nothing to others: communication is free (no division by a zero bandwidth)
    bandwidth = sent / max(t_big - t_lat, 0.1 * t_big, 1e-9) if sent > 0 else float("inf")
    return Machine(bandwidth=bandwidth, latency=t_lat,
                   flops=2 * r * 256 * 256 / max(t_mm, 1e-12) * (r + h) / r,  # the large-GEMM rate
                   half_rows=h, overlap=hidden_fraction(t_big, t_comp, t_both), core_share=min(1.0, 1.0 / crowd))
