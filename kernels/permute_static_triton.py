"""Triton twins of permute_static.py's ops: dispatch, combine and their backwards on a static buffer.

Legend: T tokens, K routes per token (route r = t*K + k), R = T*K, M buffer rows, D hidden,
BT/BM/BD/BK block sizes (tokens / rows / columns / next_pow2(K)).

    dispatch   fwd  x_MD[m]  = x_TD[r // K], r = row_route_M[m]; 0 for an empty row   _static_gather_kernel
               bwd  dx_TD[t] = sum_k dx_MD[dest_R[t*K + k]]                             _static_route_sum_kernel
    combine    fwd  y_TD[t]  = sum_k w'[t, k] * y_MD[dest_R[t*K + k]]                   _static_route_sum_kernel
               bwd  dy_MD[m] = w'[r] * dout[r // K]                                     _static_gather_kernel
                    dw[t, k] from <y_MD[dest], dout[t]> (+ the renormalisation)       _static_route_dot_kernel
w' is w with dropped routes (dest = M) at 0, renormalised per token when RENORM; each kernel
rebuilds it from the token's K weights and rows (K is small), so nothing extra is stored.
Gathers only (no atomics): deterministic. Sums are fp32; outputs take the rows' dtype, dw the
weights' (fp32).
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
    _DOT_CONFIGS = [triton.Config({"BLOCK_R": 16, "BLOCK_D": 32}, num_warps=4)]
else:
    # memory-bound: wide column blocks, few rows per program
    _ROW_CONFIGS = [triton.Config({"BLOCK_R": r, "BLOCK_D": d}, num_warps=w)
                    for r, d, w in [(2, 1024, 4), (4, 512, 4), (8, 256, 4), (4, 1024, 8)]]
    _DOT_CONFIGS = [triton.Config({"BLOCK_R": r, "BLOCK_D": d}, num_warps=w)
                    for r, d, w in [(4, 256, 4), (8, 128, 4), (16, 128, 8), (4, 512, 8)]]


@triton.jit
def _token_weights(weight_ptr, dest_ptr, t, t_ok, M, eps, K: tl.constexpr, RENORM: tl.constexpr,
                   BLOCK_K: tl.constexpr):
    """[BR, BK] w' of tokens t (0 for dropped or padded k), their keep mask and the kept sum S."""
    ks = tl.arange(0, BLOCK_K)
    kk = t_ok[:, None] & (ks < K)[None, :]
    d = tl.load(dest_ptr + t[:, None] * K + ks[None, :], mask=kk, other=M)
    keep = kk & (d < M)
    w = tl.where(keep, tl.load(weight_ptr + t[:, None] * K + ks[None, :], mask=kk, other=0.0).to(tl.float32), 0.0)
    s = tl.sum(w, 1)
    if RENORM:
        w = w / tl.maximum(s, eps)[:, None]
    return w, keep, s


@triton.autotune(configs=_ROW_CONFIGS, key=["D", "K", "HAS_WEIGHT", "RENORM"])
@triton.jit
def _static_gather_kernel(
    # pointers
    src_ptr, weight_ptr, dest_ptr, row_route_ptr, dst_ptr,
    # sizes and strides
    M, R, D, num_rows, eps, stride_src, stride_dst,
    # meta-parameters
    K: tl.constexpr, HAS_WEIGHT: tl.constexpr, RENORM: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    row_ok = rows < M
    col_ok = cols < D
    r = tl.load(row_route_ptr + rows, mask=row_ok, other=R)
    full = row_ok & (r >= 0) & (r < R)  # an empty row (R) gets 0
    t = tl.where(full, r // K, 0)
    v = tl.load(src_ptr + t[:, None] * stride_src + cols[None, :], mask=full[:, None] & col_ok[None, :], other=0.0)
    if HAS_WEIGHT:
        w_k, _keep, _s = _token_weights(weight_ptr, dest_ptr, t, full, num_rows, eps, K, RENORM, BLOCK_K)
        ks = tl.arange(0, BLOCK_K)
        w = tl.sum(tl.where(ks[None, :] == (r % K)[:, None], w_k, 0.0), 1)  # this row's route's weight
        v = v.to(tl.float32) * w[:, None]
    tl.store(dst_ptr + rows[:, None].to(tl.int64) * stride_dst + cols[None, :], v.to(dst_ptr.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])


@triton.autotune(configs=_ROW_CONFIGS, key=["D", "K", "HAS_WEIGHT", "RENORM"])
@triton.jit
def _static_route_sum_kernel(
    # pointers
    src_ptr, weight_ptr, dest_ptr, dst_ptr,
    # sizes and strides
    T, D, num_rows, eps, stride_src, stride_dst,
    # meta-parameters
    K: tl.constexpr, HAS_WEIGHT: tl.constexpr, RENORM: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    t = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    t_ok = t < T
    col_ok = cols < D
    if HAS_WEIGHT:
        w_k, _keep, _s = _token_weights(weight_ptr, dest_ptr, t, t_ok, num_rows, eps, K, RENORM, BLOCK_K)
    ks = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_R, BLOCK_D), dtype=tl.float32)
    for k in tl.static_range(K):  # a fixed order: the same sums every run
        d = tl.load(dest_ptr + t * K + k, mask=t_ok, other=num_rows)
        ok = t_ok & (d < num_rows)  # a dropped route adds nothing
        v = tl.load(src_ptr + d[:, None] * stride_src + cols[None, :], mask=ok[:, None] & col_ok[None, :],
                    other=0.0).to(tl.float32)
        if HAS_WEIGHT:
            v = v * tl.sum(tl.where(ks[None, :] == k, w_k, 0.0), 1)[:, None]
        acc += v
    tl.store(dst_ptr + t[:, None] * stride_dst + cols[None, :], acc.to(dst_ptr.dtype.element_ty),
             mask=t_ok[:, None] & col_ok[None, :])


@triton.autotune(configs=_DOT_CONFIGS, key=["D", "K", "RENORM"])
@triton.jit
def _static_route_dot_kernel(
    # pointers
    y_ptr, dout_ptr, weight_ptr, dest_ptr, dw_ptr,
    # sizes and strides
    T, D, num_rows, eps, stride_y, stride_dout,
    # meta-parameters
    K: tl.constexpr, RENORM: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # one program owns BLOCK_R tokens and walks all of D: a dot product needs the whole row
    t = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    t_ok = t < T
    ks = tl.arange(0, BLOCK_K)
    kk = t_ok[:, None] & (ks < K)[None, :]
    dots = tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32)  # dw'[t, k] = <y_MD[dest], dout[t]>
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        col_ok = cols < D
        g = tl.load(dout_ptr + t[:, None] * stride_dout + cols[None, :], mask=t_ok[:, None] & col_ok[None, :],
                    other=0.0).to(tl.float32)
        for k in tl.static_range(K):
            d = tl.load(dest_ptr + t * K + k, mask=t_ok, other=num_rows)
            ok = t_ok & (d < num_rows)
            v = tl.load(y_ptr + d[:, None] * stride_y + cols[None, :], mask=ok[:, None] & col_ok[None, :],
                        other=0.0).to(tl.float32)
            dots += tl.where(ks[None, :] == k, tl.sum(v * g, 1)[:, None], 0.0)
    if RENORM:
        w_k, keep, s = _token_weights(weight_ptr, dest_ptr, t, t_ok, num_rows, eps, K, RENORM, BLOCK_K)
        # w' = keep * w / max(S, eps): through the sum only where the clamp does not hold
        through = tl.where(s >= eps, tl.sum(dots * w_k, 1), 0.0)
        dots = tl.where(keep, (dots - through[:, None]) / tl.maximum(s, eps)[:, None], 0.0)
    tl.store(dw_ptr + t[:, None] * K + ks[None, :], dots.to(dw_ptr.dtype.element_ty), mask=kk)


def _check_maps(op: str, num_tokens: int, top_k: int, dest_R: Optional[torch.Tensor],
                row_route_M: Optional[torch.Tensor]) -> None:
    for name, t in (("dest_R", dest_R), ("row_route_M", row_route_M)):
        if t is None:
            continue
        L.check_dtype(op, name, t, (torch.int64,))
        L.check_dim(op, name, t, 1, "[R] / [M]")
        L.check_contiguous(op, name, t)
    if dest_R is not None and dest_R.shape[0] != num_tokens * top_k:
        raise ValueError(f"{op}: dest_R has {dest_R.shape[0]} entries, expected T*K = {num_tokens}*{top_k}")


def _check_rows(op: str, name: str, t: torch.Tensor) -> None:
    L.check_dim(op, name, t, 2, "[rows, D]")
    L.check_dtype(op, name, t, L.FLOAT_DTYPES)
    L.check_unit_last_stride(op, name, t)


def _check_weight(op: str, weight_TK: torch.Tensor, num_tokens: int, top_k: int) -> None:
    L.check_dtype(op, "weight_TK", weight_TK, (torch.float32,))
    L.check_contiguous(op, "weight_TK", weight_TK)
    if weight_TK.shape != (num_tokens, top_k):
        raise ValueError(f"{op}: weight_TK must have shape ({num_tokens}, {top_k}), got {tuple(weight_TK.shape)}")


def _eps() -> float:
    return torch.finfo(torch.float32).eps


def launch_static_gather(x_TD: torch.Tensor, row_route_M: torch.Tensor, top_k: int,
                         weight_TK: Optional[torch.Tensor] = None, dest_R: Optional[torch.Tensor] = None,
                         num_rows: int = 0, renormalize: bool = False) -> torch.Tensor:
    """out_MD[m] = (w'[r] *) x_TD[r // K] for r = row_route_M[m], 0 for an empty row (r = R).
    Weighted (the combine's dy) needs weight_TK, dest_R and num_rows = M (dest M = dropped)."""
    op = "static_gather"
    _check_rows(op, "x_TD", x_TD)
    T, D = x_TD.shape
    if weight_TK is not None:
        _check_weight(op, weight_TK, T, top_k)
        if dest_R is None:
            raise ValueError(f"{op}: a weighted gather needs dest_R (the dropped routes)")
    _check_maps(op, T, top_k, dest_R, row_route_M)
    L.check_same_device(op, x=x_TD, row_route=row_route_M, weight=weight_TK, dest=dest_R)
    M = row_route_M.shape[0]
    out = x_TD.new_empty(M, D)
    if M == 0 or D == 0:
        return out
    grid = lambda META: (triton.cdiv(M, META["BLOCK_R"]), triton.cdiv(D, META["BLOCK_D"]))  # noqa: E731
    _static_gather_kernel[grid](
        x_TD, weight_TK if weight_TK is not None else x_TD, dest_R if dest_R is not None else row_route_M,
        row_route_M, out, M, T * top_k, D, num_rows, _eps(), x_TD.stride(0), out.stride(0),
        K=top_k, HAS_WEIGHT=weight_TK is not None, RENORM=bool(renormalize),
        BLOCK_K=triton.next_power_of_2(max(top_k, 2)),
    )
    return out


def launch_static_route_sum(rows_MD: torch.Tensor, dest_R: torch.Tensor, num_tokens: int, top_k: int,
                            weight_TK: Optional[torch.Tensor] = None, renormalize: bool = False) -> torch.Tensor:
    """out_TD[t] = sum_k (w'[t, k] *) rows_MD[dest_R[t*K + k]]; dest = M (rows) adds nothing."""
    op = "static_route_sum"
    _check_rows(op, "rows_MD", rows_MD)
    _check_maps(op, num_tokens, top_k, dest_R, None)
    if weight_TK is not None:
        _check_weight(op, weight_TK, num_tokens, top_k)
    L.check_same_device(op, rows=rows_MD, dest=dest_R, weight=weight_TK)
    M, D = rows_MD.shape
    out = rows_MD.new_empty(num_tokens, D)
    if num_tokens == 0 or D == 0:
        return out
    grid = lambda META: (triton.cdiv(num_tokens, META["BLOCK_R"]), triton.cdiv(D, META["BLOCK_D"]))  # noqa: E731
    _static_route_sum_kernel[grid](
        rows_MD, weight_TK if weight_TK is not None else rows_MD, dest_R, out,
        num_tokens, D, M, _eps(), rows_MD.stride(0), out.stride(0),
        K=top_k, HAS_WEIGHT=weight_TK is not None, RENORM=bool(renormalize),
        BLOCK_K=triton.next_power_of_2(max(top_k, 2)),
    )
    return out


def launch_static_combine_backward(dout_TD: torch.Tensor, y_MD: torch.Tensor, weight_TK: torch.Tensor,
                                   row_route_M: torch.Tensor, dest_R: torch.Tensor, renormalize: bool):
    """(dy_MD in y's dtype, dw_TK fp32) of the combine: two launches."""
    op = "static_combine_backward"
    _check_rows(op, "dout_TD", dout_TD)
    _check_rows(op, "y_MD", y_MD)
    T, K = weight_TK.shape
    _check_weight(op, weight_TK, T, K)
    _check_maps(op, T, K, dest_R, row_route_M)
    if dout_TD.shape != (T, y_MD.shape[1]) or row_route_M.shape[0] != y_MD.shape[0]:
        raise ValueError(f"{op}: dout {tuple(dout_TD.shape)}, y {tuple(y_MD.shape)}, row_route "
                         f"{tuple(row_route_M.shape)} and weight {tuple(weight_TK.shape)} do not fit together")
    L.check_same_device(op, dout=dout_TD, y=y_MD, weight=weight_TK, row_route=row_route_M, dest=dest_R)
    M, D = y_MD.shape
    dy_MD = launch_static_gather(dout_TD.to(y_MD.dtype), row_route_M, K, weight_TK, dest_R, M, renormalize)
    dw_TK = torch.empty_like(weight_TK)
    if T == 0:
        return dy_MD, dw_TK
    grid = lambda META: (triton.cdiv(T, META["BLOCK_R"]),)  # noqa: E731
    _static_route_dot_kernel[grid](
        y_MD, dout_TD, weight_TK, dest_R, dw_TK, T, D, M, _eps(), y_MD.stride(0), dout_TD.stride(0),
        K=K, RENORM=bool(renormalize), BLOCK_K=triton.next_power_of_2(max(K, 2)),
    )
    return dy_MD, dw_TK
