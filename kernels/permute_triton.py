"""Triton permute (gather into expert order) and unpermute (weighted combine back to tokens).

Legend: T tokens, N routes (rows in expert order), D hidden, BR/BD block sizes (rows / columns).

    permute    fwd  x_ND[i]  = x_TD[tok[i]]                         _gather_rows_kernel
               bwd  dx_TD[t] = sum_{i: tok[i]=t} dx_ND[i]            _combine_rows_kernel, no weight
    unpermute  fwd  y_TD[t]  = sum_{i: tok[i]=t} w_N[i] * y_ND[i]    _combine_rows_kernel, weighted
               bwd  dy_ND[i] = w_N[i] * dy_TD[tok[i]]                _unpermute_bwd_kernel (both
                    dw_N[i]  = <y_ND[i], dy_TD[tok[i]]>              outputs from one pass)

The combine is a gather on the token side, not an atomic scatter: routes are sorted by token
with torch ops on device (argsort + searchsorted, no host sync) and each program sums its
token's routes in a fixed order, so results are deterministic run to run. Sums are fp32;
outputs take y's dtype; weights and dw are fp32 (router precision).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from . import launch_triton as L
from .backend import interpreting

if interpreting():
    _ROW_CONFIGS = [triton.Config({"BLOCK_R": 16, "BLOCK_D": 32}, num_warps=4)]
    _TOKEN_CONFIGS = [triton.Config({"BLOCK_D": 64}, num_warps=4)]
else:
    # memory-bound: wide 16-byte-per-thread column blocks; few rows per program
    _ROW_CONFIGS = [triton.Config({"BLOCK_R": r, "BLOCK_D": d}, num_warps=w)
                    for r, d, w in [(2, 1024, 4), (4, 512, 4), (8, 256, 4), (4, 1024, 8)]]
    _TOKEN_CONFIGS = [triton.Config({"BLOCK_D": d}, num_warps=w) for d, w in [(256, 2), (512, 4), (1024, 4), (2048, 8)]]


@triton.autotune(configs=_ROW_CONFIGS, key=["D"])
@triton.jit
def _gather_rows_kernel(
    # pointers
    src_ptr, idx_ptr, dst_ptr,
    # sizes and strides
    N, T, D, stride_src, stride_dst,
    # meta-parameters
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    row_ok = rows < N
    tok = tl.load(idx_ptr + rows, mask=row_ok, other=0).to(tl.int64)
    # an out-of-range index reads zeros instead of faulting (the launcher checks on CPU)
    src_ok = row_ok & (tok >= 0) & (tok < T)
    col_ok = cols < D
    v = tl.load(src_ptr + tok[:, None] * stride_src + cols[None, :], mask=src_ok[:, None] & col_ok[None, :], other=0.0)
    tl.store(dst_ptr + rows[:, None].to(tl.int64) * stride_dst + cols[None, :], v, mask=row_ok[:, None] & col_ok[None, :])


@triton.autotune(configs=_TOKEN_CONFIGS, key=["D"])
@triton.jit
def _combine_rows_kernel(
    # pointers
    src_ptr, weight_ptr, order_ptr, starts_ptr, dst_ptr,
    # sizes and strides
    T, D, stride_src, stride_dst,
    # meta-parameters
    HAS_WEIGHT: tl.constexpr, BLOCK_D: tl.constexpr,
):
    t = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    col_ok = cols < D
    first = tl.load(starts_ptr + t)
    stop = tl.load(starts_ptr + t + 1)
    acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    # a token with no routes runs no iteration and gets 0
    for j in range(first, stop):
        i = tl.load(order_ptr + j).to(tl.int64)
        v = tl.load(src_ptr + i * stride_src + cols, mask=col_ok, other=0.0).to(tl.float32)
        if HAS_WEIGHT:
            v = v * tl.load(weight_ptr + i)
        acc += v
    tl.store(dst_ptr + t.to(tl.int64) * stride_dst + cols, acc.to(dst_ptr.dtype.element_ty), mask=col_ok)


@triton.autotune(configs=_ROW_CONFIGS, key=["D"])
@triton.jit
def _unpermute_bwd_kernel(
    # pointers
    dyT_ptr, y_ptr, idx_ptr, weight_ptr, dyN_ptr, dw_ptr,
    # sizes and strides
    N, T, D, stride_dyT, stride_y, stride_dyN,
    # meta-parameters
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # one program owns BLOCK_R routes and walks all of D: the dot product for dw needs the whole row
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < N
    tok = tl.load(idx_ptr + rows, mask=row_ok, other=0).to(tl.int64)
    src_ok = row_ok & (tok >= 0) & (tok < T)
    w = tl.load(weight_ptr + rows, mask=row_ok, other=0.0)
    rows64 = rows.to(tl.int64)
    dot = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        col_ok = cols < D
        g = tl.load(dyT_ptr + tok[:, None] * stride_dyT + cols[None, :], mask=src_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
        yv = tl.load(y_ptr + rows64[:, None] * stride_y + cols[None, :], mask=row_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
        dot += tl.sum(yv * g, 1)
        tl.store(dyN_ptr + rows64[:, None] * stride_dyN + cols[None, :], (g * w[:, None]).to(dyN_ptr.dtype.element_ty),
                 mask=row_ok[:, None] & col_ok[None, :])
    tl.store(dw_ptr + rows, dot, mask=row_ok)


def _check_index(op: str, token_idx_N: torch.Tensor, n_rows: int, num_tokens: int) -> None:
    L.check_dtype(op, "token_idx", token_idx_N, L.INDEX_DTYPES)
    L.check_dim(op, "token_idx", token_idx_N, 1, "[N]")
    L.check_contiguous(op, "token_idx", token_idx_N)
    if token_idx_N.shape[0] != n_rows:
        raise ValueError(f"{op}: token_idx has {token_idx_N.shape[0]} entries but there are {n_rows} rows")
    # range check only on CPU: on CUDA it is a host sync; the kernels read zeros for bad indices
    if token_idx_N.device.type == "cpu" and n_rows and not torch.compiler.is_compiling():
        lo, hi = int(token_idx_N.min()), int(token_idx_N.max())
        if lo < 0 or hi >= num_tokens:
            raise IndexError(f"{op}: token_idx values must lie in [0, {num_tokens}), got min {lo} max {hi}")


def _check_weight(op: str, weight_N: torch.Tensor, n_rows: int) -> None:
    L.check_dtype(op, "weight", weight_N, (torch.float32,))
    L.check_contiguous(op, "weight", weight_N)
    if weight_N.shape != (n_rows,):
        raise ValueError(f"{op}: weight must have shape ({n_rows},), got {tuple(weight_N.shape)}")


def launch_permute(x_TD: torch.Tensor, token_idx_N: torch.Tensor) -> torch.Tensor:
    op = "permute"
    L.check_dim(op, "x", x_TD, 2, "[T, D]")
    L.check_dtype(op, "x", x_TD, L.FLOAT_DTYPES)
    L.check_unit_last_stride(op, "x", x_TD)
    _check_index(op, token_idx_N, token_idx_N.shape[0], x_TD.shape[0])
    L.check_same_device(op, x=x_TD, token_idx=token_idx_N)
    (T, D), N = x_TD.shape, token_idx_N.shape[0]
    x_ND = x_TD.new_empty(N, D)
    if N == 0 or D == 0:
        return x_ND
    grid = lambda META: (triton.cdiv(N, META["BLOCK_R"]), triton.cdiv(D, META["BLOCK_D"]))  # noqa: E731
    _gather_rows_kernel[grid](x_TD, token_idx_N, x_ND, N, T, D, x_TD.stride(0), x_ND.stride(0))
    return x_ND


def launch_unpermute(y_ND: torch.Tensor, token_idx_N: torch.Tensor, weight_N: Optional[torch.Tensor], num_tokens: int) -> torch.Tensor:
    """Combine routes back to tokens; weight_N=None sums unweighted (permute's backward)."""
    op = "unpermute"
    L.check_dim(op, "y", y_ND, 2, "[N, D]")
    L.check_dtype(op, "y", y_ND, L.FLOAT_DTYPES)
    L.check_unit_last_stride(op, "y", y_ND)
    if num_tokens < 0:
        raise ValueError(f"{op}: num_tokens must be >= 0, got {num_tokens}")
    N, D = y_ND.shape
    _check_index(op, token_idx_N, N, num_tokens)
    if weight_N is not None:
        _check_weight(op, weight_N, N)
    L.check_same_device(op, y=y_ND, token_idx=token_idx_N, weight=weight_N)
    y_TD = y_ND.new_empty(num_tokens, D)
    if num_tokens == 0 or D == 0:
        return y_TD
    # CSR of routes by token, built on device: routes of token t are order_N[starts[t]:starts[t+1]]
    order_N = torch.argsort(token_idx_N, stable=True)
    tokens = torch.arange(num_tokens + 1, device=token_idx_N.device, dtype=token_idx_N.dtype)
    starts_T1 = torch.searchsorted(token_idx_N[order_N], tokens)
    grid = lambda META: (num_tokens, triton.cdiv(D, META["BLOCK_D"]))  # noqa: E731
    _combine_rows_kernel[grid](
        y_ND, weight_N if weight_N is not None else y_ND, order_N, starts_T1, y_TD,
        num_tokens, D, y_ND.stride(0), y_TD.stride(0),
        HAS_WEIGHT=weight_N is not None,
    )
    return y_TD


def launch_unpermute_backward(dy_TD: torch.Tensor, y_ND: torch.Tensor, token_idx_N: torch.Tensor, weight_N: torch.Tensor):
    """Returns (dy_ND in y's dtype, dweight_N fp32)."""
    op = "unpermute_backward"
    L.check_dim(op, "dy", dy_TD, 2, "[T, D]")
    L.check_dim(op, "y", y_ND, 2, "[N, D]")
    if dy_TD.shape[1] != y_ND.shape[1]:
        raise ValueError(f"{op}: dy has width {dy_TD.shape[1]} but y has {y_ND.shape[1]}")
    L.check_unit_last_stride(op, "dy", dy_TD)
    L.check_unit_last_stride(op, "y", y_ND)
    N, D = y_ND.shape
    _check_index(op, token_idx_N, N, dy_TD.shape[0])
    _check_weight(op, weight_N, N)
    L.check_same_device(op, dy=dy_TD, y=y_ND, token_idx=token_idx_N, weight=weight_N)
    dy_ND = y_ND.new_empty(N, D)
    dw_N = weight_N.new_empty(N)
    if N == 0:
        return dy_ND, dw_N
    grid = lambda META: (triton.cdiv(N, META["BLOCK_R"]),)  # noqa: E731
    _unpermute_bwd_kernel[grid](
        dy_TD, y_ND, token_idx_N, weight_N, dy_ND, dw_N,
        N, dy_TD.shape[0], D, dy_TD.stride(0), y_ND.stride(0), dy_ND.stride(0),
    )
    return dy_ND, dw_N


# ---- custom ops ----

@torch.library.custom_op("moesys::permute", mutates_args=())
def permute_op(x_TD: torch.Tensor, token_idx_N: torch.Tensor) -> torch.Tensor:
    return launch_permute(x_TD, token_idx_N)


@permute_op.register_fake
def _permute_fake(x_TD, token_idx_N):
    return x_TD.new_empty(token_idx_N.shape[0], x_TD.shape[1])


@torch.library.custom_op("moesys::unpermute", mutates_args=())
def unpermute_op(y_ND: torch.Tensor, token_idx_N: torch.Tensor, weight_N: Optional[torch.Tensor], num_tokens: int) -> torch.Tensor:
    return launch_unpermute(y_ND, token_idx_N, weight_N, num_tokens)


@unpermute_op.register_fake
def _unpermute_fake(y_ND, token_idx_N, weight_N, num_tokens):
    return y_ND.new_empty(num_tokens, y_ND.shape[1])


@torch.library.custom_op("moesys::unpermute_backward", mutates_args=())
def unpermute_backward_op(dy_TD: torch.Tensor, y_ND: torch.Tensor, token_idx_N: torch.Tensor, weight_N: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return launch_unpermute_backward(dy_TD, y_ND, token_idx_N, weight_N)


@unpermute_backward_op.register_fake
def _unpermute_backward_fake(dy_TD, y_ND, token_idx_N, weight_N):
    return y_ND.new_empty(y_ND.shape), weight_N.new_empty(weight_N.shape)


def _permute_setup(ctx, inputs, output):
    x_TD, token_idx_N = inputs
    ctx.save_for_backward(token_idx_N)
    ctx.num_tokens = x_TD.shape[0]


def _permute_backward(ctx, dx_ND):
    (token_idx_N,) = ctx.saved_tensors
    # the gather's adjoint is an unweighted combine: rows of one token summed in fp32
    return unpermute_op(dx_ND.contiguous(), token_idx_N, None, ctx.num_tokens), None


permute_op.register_autograd(_permute_backward, setup_context=_permute_setup)


def _unpermute_setup(ctx, inputs, output):
    y_ND, token_idx_N, weight_N, num_tokens = inputs
    ctx.save_for_backward(y_ND, token_idx_N, weight_N)


def _unpermute_backward(ctx, dy_TD):
    y_ND, token_idx_N, weight_N = ctx.saved_tensors
    dy_TD = dy_TD.contiguous()  # grads of a .sum() arrive as zero-stride expands
    if weight_N is None:
        return permute_op(dy_TD, token_idx_N), None, None, None
    dy_ND, dw_N = unpermute_backward_op(dy_TD, y_ND, token_idx_N, weight_N)
    return dy_ND, None, dw_N, None


unpermute_op.register_autograd(_unpermute_backward, setup_context=_unpermute_setup)


# ---- entry points used by moesys.kernels.permute / unpermute ----

def permute_triton(x_TD: torch.Tensor, token_idx_N: torch.Tensor) -> torch.Tensor:
    if x_TD.dim() == 2 and x_TD.shape[1] > 1 and x_TD.stride(1) != 1:
        x_TD = x_TD.contiguous()
    return permute_op(x_TD, token_idx_N.contiguous())


def unpermute_triton(y_ND: torch.Tensor, token_idx_N: torch.Tensor, weight_N: torch.Tensor, num_tokens: int) -> torch.Tensor:
    if not weight_N.dtype.is_floating_point:
        raise TypeError(f"unpermute: weight must be a floating tensor (fp32 preferred), got {weight_N.dtype}")
    if y_ND.dim() == 2 and y_ND.shape[1] > 1 and y_ND.stride(1) != 1:
        y_ND = y_ND.contiguous()
    # .float() is a no-op for fp32 weights and keeps other float dtypes differentiable
    return unpermute_op(y_ND, token_idx_N.contiguous(), weight_N.float().contiguous(), num_tokens)
