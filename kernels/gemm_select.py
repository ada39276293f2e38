"""`auto` on CUDA: per shape bucket, the faster of `torch._grouped_mm` and our persistent kernel.

Legend: M rows grouped by expert, K reduction width, F output width, E experts.

A bucket is (device, dtype, E, K, F, rows bucket): the weight's shape exactly (a model has a few)
and the mean rows per expert rounded up to a power of two (`rows_bucket`: the tile choice follows
it). The first call in a bucket times both candidates on that call's own tensors, one forward
(x @ w[e]) and one weight gradient (x_e^T @ y_e) each, with CUDA events after a warm-up (which is
where Triton compiles and autotunes), median of a few repeats, and keeps the faster for the
process. Measuring syncs the device once per bucket, so it is skipped, and `torch._grouped_mm`
taken, while compiling or capturing a CUDA graph (run one eager step first to fill the cache).
On CPU nothing is measured: `auto` keeps the torch path there (`backend.resolve`).
"""
from __future__ import annotations

import statistics
from typing import Callable, Dict, Optional

import torch

from . import backend as _backend

GROUPED_MM, PERSISTENT = "grouped_mm", "triton_persistent"
REPEATS = 3

# bucket -> GROUPED_MM or PERSISTENT, decided once per process (a plain dict: torch.compile reads it)
_CHOICE: Dict[tuple, str] = {}


def bucket(x_MK: torch.Tensor, w_EKF: torch.Tensor) -> tuple:
    from .grouped_gemm_persistent import rows_bucket

    (M, K), (E, _, F) = x_MK.shape, w_EKF.shape
    dev = x_MK.device
    index = dev.index if dev.index is not None else (torch.cuda.current_device() if dev.type == "cuda" else 0)
    return (dev.type, index, x_MK.dtype, E, K, F, rows_bucket(M, E))


def cuda_event_timer(fn: Callable[[], object]) -> float:
    """Seconds one call of fn takes on the current stream (CUDA events, then a sync to read them)."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3


def measure(candidates: Dict[str, Callable[[], object]], timer: Callable, repeats: int = REPEATS) -> str:
    """The name of the fastest candidate: each runs once to warm up, then `repeats` timed calls
    (median). A candidate that raises is out (its error is not the caller's: the other still runs)."""
    best, best_t = None, float("inf")
    for name, fn in candidates.items():
        try:
            fn()
            t = statistics.median(timer(fn) for _ in range(repeats))
        except (RuntimeError, ValueError):  # e.g. no kernel image for this GPU, a Triton compile error
            continue
        if t < best_t:
            best, best_t = name, t
    if best is None:
        raise RuntimeError(f"gemm_select: every candidate failed ({list(candidates)})")
    return best


def _candidates(x_MK: torch.Tensor, w_EKF: torch.Tensor, offs_E: torch.Tensor) -> dict:
    from .grouped_gemm_persistent import launch_persistent_mm, launch_persistent_mm_dw

    x, w = x_MK.detach(), w_EKF.detach()
    dy = torch.randn(x.shape[0], w.shape[2], device=x.device, dtype=x.dtype)

    def torch_path():
        torch._grouped_mm(x, w, offs=offs_E)
        torch._grouped_mm(x.t(), dy, offs=offs_E)

    def persistent():
        launch_persistent_mm(x, w, offs_E=offs_E)
        launch_persistent_mm_dw(x, dy, offs_E=offs_E)

    return {GROUPED_MM: torch_path, PERSISTENT: persistent}


def choose(x_MK: torch.Tensor, w_EKF: torch.Tensor, offs_E: torch.Tensor,
           timer: Optional[Callable] = None) -> str:
    """GROUPED_MM or PERSISTENT for a grouped GEMM of x_MK [M, K] by w_EKF [E, K, F] with int32
    cumulative row ends offs_E; measured once per bucket on CUDA (see the module docstring).
    Off CUDA, without Triton, or while compiling/capturing with nothing cached: GROUPED_MM."""
    if x_MK.device.type != "cuda" and timer is None:
        return GROUPED_MM
    key = bucket(x_MK, w_EKF)
    if key in _CHOICE:
        return _CHOICE[key]
    if not _backend.triton_available():
        return GROUPED_MM
    if torch.compiler.is_compiling() or (x_MK.device.type == "cuda" and torch.cuda.is_current_stream_capturing()):
        return GROUPED_MM  # no sync allowed here; an eager step fills the cache
    with torch.no_grad():
        _CHOICE[key] = measure(_candidates(x_MK, w_EKF, offs_E), timer or cuda_event_timer)
    return _CHOICE[key]


def choices() -> dict:
    """The buckets decided so far (for benchmarks and logs)."""
    return dict(_CHOICE)
