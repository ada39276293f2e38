"""Dispatch into and combine out of a static expert buffer, sync-free (gathers and one bmm).

Legend: T tokens, K routes per token (token-major: route r = t*K + k), R = T*K routes, M rows of
the expert buffer (M = R dropless, E*C with a capacity), D hidden.

The placement of routes (moesys/static_plan.py) is two index maps, both on the device:
    dest_R      [R] row of route r in the buffer, or M when the route is dropped
    row_route_M [M] route held by row m, or R when the row is empty (padding of an [E, C] buffer)
Every direction is then a gather, so no scatter-add (single-threaded on CPU, atomics on CUDA):
    dispatch:  x_MD[m] = x_TD[row_route_M[m] // K]            (an empty row reads token T-1: its
                                                             output is never read, its gradient is 0)
    combine:   y_TD[t] = sum_k w_TK[t, k] * y_MD[dest_R[t*K + k]]  (a dropped route reads a zero row)
and their backwards:
    dispatch:  dx_TD[t] = sum_k dx_MD[dest_R[t*K + k]]
    combine:   dy_MD[m] = w[r] * dout[r // K] at r = row_route_M[m];  dw[t, k] = <y_MD[dest], dout[t]>
"""
from __future__ import annotations

import torch


def _pad_row(rows: torch.Tensor) -> torch.Tensor:
    """rows with one zero row appended (what index M / R reads)."""
    return torch.cat([rows, rows.new_zeros(1, rows.shape[1])])


def _sum_routes(rows_MD: torch.Tensor, dest_R: torch.Tensor, T: int, K: int, padded: bool) -> torch.Tensor:
    src = _pad_row(rows_MD) if padded else rows_MD
    g = src.index_select(0, dest_R).view(T, K, rows_MD.shape[1])
    return g[:, 0] if K == 1 else g.sum(1)


class _Dispatch(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_TD, row_route_M, dest_R, top_k, padded):
        T = x_TD.shape[0]
        ctx.save_for_backward(dest_R)
        ctx.T, ctx.K, ctx.padded = T, top_k, padded
        if T == 0:  # no token: every row of the buffer is empty
            return x_TD.new_zeros(row_route_M.shape[0], x_TD.shape[1])
        # row_route_M // K is the token; an empty row (route R) gives T: clamp to a real row
        src_M = torch.div(row_route_M, top_k, rounding_mode="floor")
        if padded:
            src_M = src_M.clamp_max_(T - 1)
        return x_TD.index_select(0, src_M)

    @staticmethod
    def backward(ctx, dx_MD):
        (dest_R,) = ctx.saved_tensors
        return _sum_routes(dx_MD, dest_R, ctx.T, ctx.K, ctx.padded), None, None, None, None


class _Combine(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y_MD, weight_TK, row_route_M, dest_R, padded):
        T, K = weight_TK.shape
        src = _pad_row(y_MD) if padded else y_MD
        y_TKD = src.index_select(0, dest_R).view(T, K, y_MD.shape[1])
        w = weight_TK.to(y_MD.dtype)  # a no-op in fp32; bf16 experts combine in bf16 as the torch path
        ctx.save_for_backward(y_TKD, w, row_route_M)
        ctx.padded, ctx.w_dtype = padded, weight_TK.dtype
        return torch.bmm(w.unsqueeze(1), y_TKD).view(T, y_MD.shape[1])

    @staticmethod
    def backward(ctx, dout_TD):
        y_TKD, w_TK, row_route_M = ctx.saved_tensors
        T, K, D = y_TKD.shape
        dout_TD = dout_TD.to(y_TKD.dtype)
        dw = dy = None
        if ctx.needs_input_grad[1]:
            dw = torch.bmm(y_TKD, dout_TD.unsqueeze(2)).view(T, K).to(ctx.w_dtype)
        if ctx.needs_input_grad[0]:
            dY_RD = (w_TK.unsqueeze(2) * dout_TD.unsqueeze(1)).view(T * K, D)
            dy = (_pad_row(dY_RD) if ctx.padded else dY_RD).index_select(0, row_route_M)
        return dy, dw, None, None, None


def dispatch_static(x_TD: torch.Tensor, row_route_M: torch.Tensor, dest_R: torch.Tensor, top_k: int,
                    padded: bool) -> torch.Tensor:
    """x_MD: the buffer rows of every route (module docstring). Differentiable in x_TD.

    Args:
        padded: some row may be empty / some route dropped (capacity mode); False when the buffer is
            exactly the R routes (dropless), which skips the zero-row padding."""
    return _Dispatch.apply(x_TD, row_route_M, dest_R, top_k, padded)


def combine_static(y_MD: torch.Tensor, weight_TK: torch.Tensor, row_route_M: torch.Tensor, dest_R: torch.Tensor,
                   padded: bool) -> torch.Tensor:
    """y_TD[t] = sum_k weight_TK[t, k] * y_MD[dest_R[t*K+k]] (0 for a dropped route). Differentiable
    in y_MD and weight_TK."""
    if weight_TK.shape[0] * weight_TK.shape[1] != dest_R.shape[0]:
        raise ValueError(f"combine_static: weight {tuple(weight_TK.shape)} does not match {dest_R.shape[0]} routes")
    return _Combine.apply(y_MD, weight_TK, row_route_M, dest_R, padded)
