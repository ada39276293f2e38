"""Grouped fp32 GEMMs on CPU in one BLAS call: MKL's `cblas_sgemm_batch`, from the MKL that torch
itself links (no new dependency).

Why: an MoE layer's expert GEMMs are many small ones (E=64, T=4096, K=2: ~128 rows an expert).
A loop of `torch.mm` calls splits each small GEMM over the threads and joins them 64 times per
GEMM; MKL's batch interface spreads whole GEMMs over the threads instead. Measured here on 2
cores (`python benchmarks/grouped_gemm_cpu.py --experts 64`, outputs reused in both): the six
expert GEMMs at E=64 take 1.25x a dense GEMM of equal FLOPs batched, against 1.48x as a loop.

It serves only small GEMMs (`MAX_MEAN_ROWS`): for large ones the loop wins. Each call is one
"group" per expert (group size 1), so every expert keeps its own row count: no
padding. Used by `grouped_gemm`'s torch path and `expert_ffn_torch` for fp32 on CPU when torch is
built with MKL (the usual x86 wheels); elsewhere (OpenBLAS, Arm, macOS) `available()` is False and
the callers keep their per-expert loop. `set_enabled(False)` (the trainer's `trainer.cpu_gemm_batch=false`)
turns it off.
"""
from __future__ import annotations

import ctypes
import os
from typing import Optional

import numpy as np
import torch

_ROW_MAJOR, _NO_TRANS, _TRANS = 101, 111, 112  # CBLAS enum values


def _load() -> Optional[ctypes._CFuncPtr]:
    if not torch.backends.mkl.is_available():
        return None
    lib_dir = os.path.join(os.path.dirname(torch.__file__), "lib")
    for name in ("libtorch_cpu.so", "libtorch_cpu.dylib", "torch_cpu.dll"):
        path = os.path.join(lib_dir, name)
        if not os.path.exists(path):
            continue
        try:
            fn = ctypes.CDLL(path).cblas_sgemm_batch  # the already-loaded library: no second copy
        except (OSError, AttributeError):
            return None
        fn.restype = None
        p = ctypes.c_void_p
        fn.argtypes = [ctypes.c_int, p, p, p, p, p, p, p, p, p, p, p, p, p, ctypes.c_int, p]
        return fn
    return None


_FN = _load()
# Above this many rows an expert on average, a per-expert loop of multi-threaded GEMMs beats the
# batch (`benchmarks/grouped_gemm_cpu.py`, 2 cores, all six GEMMs vs dense: ~1024 rows: loop
# 0.98-1.04x, batch 1.12-1.14x; ~512 rows: loop 1.11x, batch 1.07x; ~128 rows: loop 1.48x,
# batch 1.25x).
MAX_MEAN_ROWS = 768
_enabled = True  # set_enabled(); the trainer sets it from trainer.cpu_gemm_batch


_checked: Optional[bool] = None  # the first use's check against torch.mm (wrong answers: never used)


def available() -> bool:
    """Whether the batched path runs in this process (MKL found, its answer checked against
    torch.mm once, and not turned off)."""
    global _checked
    if _FN is None or not _enabled:
        return False
    if _checked is None:
        _checked = False  # while checking, the calls below must not recurse into this check
        _checked = _self_check()
    return _checked


def _self_check() -> bool:
    """Two groups of different sizes, one transposed operand: the batched result must equal
    per-group torch.mm (guards against an MKL built with another integer width or layout).

    The check runs lazily, at the first fp32 grouped GEMM, which may be inside a caller's
    `torch.autocast`: there `@` would give a bf16 reference (and `allclose` refuses mixed dtypes),
    so the reference is computed with autocast off, in fp32 like the batched call itself."""
    with torch.autocast("cpu", enabled=False):
        g = torch.Generator().manual_seed(0)
        x = torch.randn(7, 5, generator=g, dtype=torch.float32)
        w = torch.randn(2, 6, 5, generator=g, dtype=torch.float32).transpose(1, 2)
        out = torch.zeros(7, 6, dtype=torch.float32)
        _rows_call(x, w, out, _layout(x), _layout(w), _layout(out), _groups([3, 4]))
        want = torch.cat([torch.mm(x[:3], w[0]), torch.mm(x[3:], w[1])])
        return bool(torch.allclose(out, want, rtol=1e-5, atol=1e-5))


def set_enabled(flag: bool) -> None:
    global _enabled
    _enabled = bool(flag)


def enabled() -> bool:
    """Whether the batched path is switched on (it runs only where `available()` too)."""
    return _enabled


def _layout(t: torch.Tensor):
    """(transpose flag, leading dimension) of a 2-D (or per-expert 3-D) operand, or None when
    neither of its last two dims has unit stride."""
    rs, cs = t.stride(-2), t.stride(-1)
    if cs == 1 or t.shape[-1] == 1:
        return _NO_TRANS, max(rs, t.shape[-1], 1)
    if rs == 1 or t.shape[-2] == 1:
        return _TRANS, max(cs, t.shape[-2], 1)
    return None


def _ptr_array(values) -> np.ndarray:
    return np.ascontiguousarray(values, dtype=np.uint64)


def _call(m, n, k, a_ptr, lda, ta, b_ptr, ldb, tb, c_ptr, ldc) -> None:
    """One cblas_sgemm_batch call, one group (of size 1) per entry of the pointer arrays; every
    other argument is a scalar or an array of that length."""
    G = len(a_ptr)
    i32 = lambda v: np.ascontiguousarray(np.broadcast_to(np.asarray(v, dtype=np.int32), (G,)))  # noqa: E731
    f32 = lambda v: np.full(G, v, dtype=np.float32)  # noqa: E731
    arrays = [i32(ta), i32(tb), i32(m), i32(n), i32(k), f32(1.0), _ptr_array(a_ptr), i32(lda),
              _ptr_array(b_ptr), i32(ldb), f32(0.0), _ptr_array(c_ptr), i32(ldc)]
    sizes = np.ones(G, dtype=np.int32)
    _FN(_ROW_MAJOR, *[a.ctypes.data for a in arrays], G, sizes.ctypes.data)


def _usable(*tensors: torch.Tensor) -> bool:
    # operands first: the MKL batch is sgemm (fp32) only, so bf16/fp16 operands never reach it,
    # nor the one-time self-check that `available()` runs
    return all(t.dtype == torch.float32 and t.device.type == "cpu" for t in tensors) and available()


def serves(x: torch.Tensor) -> bool:
    """Whether grouped GEMMs on tensors like `x` come here first (fp32 on CPU, MKL batch on)."""
    return _usable(x)


def _plan(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, counts):
    """What both entry points check and compute first: the three operands' layouts and the expert
    groups (`_groups`), or None when the batched path cannot run (dtype, device, layout, or
    experts too large on average)."""
    if not _usable(a, b, out):
        return None
    la, lb, lc = _layout(a), _layout(b), _layout(out)
    if la is None or lb is None or lc is None or la[0] != _NO_TRANS or lc[0] != _NO_TRANS:
        return None
    groups = _groups(counts)
    counts_np, _, live = groups
    if live.size and counts_np[live].mean() > MAX_MEAN_ROWS:
        return None  # large GEMMs: the caller's loop is faster
    return la, lb, lc, groups


def _groups(counts):
    """(rows per expert, each expert's first row, the experts with rows) as numpy arrays."""
    counts_np = np.asarray(counts, dtype=np.int64)
    return counts_np, np.concatenate(([0], np.cumsum(counts_np)[:-1])), np.nonzero(counts_np)[0]


_ES = 4  # fp32 bytes


def mm_rows(x_ND: torch.Tensor, w_EDF: torch.Tensor, counts, out_NF: torch.Tensor) -> bool:
    """out[rows of e] = x[rows of e] @ w[e] for every expert with rows, in one call.

    `counts` is a list of ints (rows per expert, summing to N). Returns False, writing nothing,
    when the batched path cannot run (then the caller loops)."""
    plan = _plan(x_ND, w_EDF, out_NF, counts)
    if plan is None:
        return False
    _rows_call(x_ND, w_EDF, out_NF, *plan)
    return True


def _rows_call(x_ND, w_EDF, out_NF, la, lb, lc, groups) -> None:
    """mm_rows' call, its operands already checked (the self-check calls it directly)."""
    counts_np, starts, live = groups
    if live.size:
        a_ptr = x_ND.data_ptr() + starts[live] * x_ND.stride(0) * _ES
        b_ptr = w_EDF.data_ptr() + live * w_EDF.stride(0) * _ES
        c_ptr = out_NF.data_ptr() + starts[live] * out_NF.stride(0) * _ES
        _call(counts_np[live], out_NF.shape[1], x_ND.shape[1], a_ptr, la[1], la[0], b_ptr, lb[1], lb[0],
              c_ptr, lc[1])


def mm_weight(x_ND: torch.Tensor, dy_NF: torch.Tensor, counts, out_EDF: torch.Tensor) -> bool:
    """out[e] = x[rows of e]^T @ dy[rows of e] for every expert with rows, in one call; experts
    with no rows are zeroed. Returns False, writing nothing, when the batched path cannot run."""
    plan = _plan(x_ND, dy_NF, out_EDF, counts)
    if plan is None:
        return False
    la, lb, lc, (counts_np, starts, live) = plan
    for e in np.nonzero(counts_np == 0)[0].tolist():
        out_EDF[e].zero_()
    if live.size:
        a_ptr = x_ND.data_ptr() + starts[live] * x_ND.stride(0) * _ES  # stored [n_e, D]: used transposed
        b_ptr = dy_NF.data_ptr() + starts[live] * dy_NF.stride(0) * _ES
        c_ptr = out_EDF.data_ptr() + live * out_EDF.stride(0) * _ES
        _call(out_EDF.shape[1], out_EDF.shape[2], counts_np[live], a_ptr, la[1], _TRANS, b_ptr, lb[1], lb[0],
              c_ptr, lc[1])
    return True
