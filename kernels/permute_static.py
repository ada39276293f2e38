"""Dispatch into and combine out of a static expert buffer, sync-free: one op per direction.

Legend: T tokens, K routes per token (token-major: route r = t*K + k), R = T*K routes, M rows of
the expert buffer (M = R dropless, E*C with a capacity), D hidden.

The placement of routes (route_place.py) is two index maps, both on the device:
    dest_R      [R] row of route r in the buffer, or M when the route is dropped
    row_route_M [M] route held by row m, or R when the row is empty (padding of an [E, C] buffer)
Every direction is then a gather, so no scatter-add (single-threaded on CPU, atomics on CUDA):
    dispatch:  x_MD[m]  = x_TD[row_route_M[m] // K]          (an empty row is 0)
    combine:   y_TD[t]  = sum_k w_TK[t, k] * y_MD[dest_R[t*K + k]]  (a dropped route adds 0)
and their backwards:
    dispatch:  dx_TD[t] = sum_k dx_MD[dest_R[t*K + k]]
    combine:   dy_MD[m] = w[r] * dout[r // K] at r = row_route_M[m];  dw[t, k] = <y_MD[dest], dout[t]>
renormalize (MoEConfig.renormalize_after_drop) is folded into the combine: w is replaced by
w' = keep * w / max(sum_k keep * w, eps) (keep = the route was not dropped), and the backward
carries dw through that division (dw_k = keep_k (dw'_k - sum_j dw'_j w'_j) / S, or dw'_k / eps
where the clamp holds).

Each direction is a `torch.library.custom_op` with its backward another one, so one fwd+bwd of
the layer issues four dispatcher calls here. On CUDA they run the Triton kernels of
permute_static_triton.py (one launch each, two for the combine's backward); elsewhere the torch
references below.
"""
from __future__ import annotations

import torch

from .backend import fused_on_triton as _use_triton  # a module attribute: tests patch it



def _pad_row(rows: torch.Tensor) -> torch.Tensor:
    """rows with one zero row appended (what index M / R reads)."""
    return torch.cat([rows, rows.new_zeros(1, rows.shape[1])])


# ---- torch references (the CPU path) ----------------------------------------------------------------
def dispatch_reference(x_TD: torch.Tensor, row_route_M: torch.Tensor, top_k: int, padded: bool) -> torch.Tensor:
    T = x_TD.shape[0]
    if T == 0:  # no token: every row of the buffer is empty
        return x_TD.new_zeros(row_route_M.shape[0], x_TD.shape[1])
    src_M = torch.div(row_route_M, top_k, rounding_mode="floor")
    if not padded:
        return x_TD.index_select(0, src_M)
    # an empty row (route R) gives token T: read a real row, then zero it
    x_MD = x_TD.index_select(0, src_M.clamp_max(T - 1))
    return x_MD.masked_fill_((row_route_M >= T * top_k).unsqueeze(1), 0)


def renormalized_weights(weight_TK: torch.Tensor, dest_R: torch.Tensor, num_rows: int) -> torch.Tensor:
    """w' = keep * w / max(sum_k keep * w, eps): each token's kept weights summing to 1 (0 if none kept)."""
    keep_TK = (dest_R < num_rows).view(weight_TK.shape)
    kept_w = torch.where(keep_TK, weight_TK, 0.0)
    return kept_w / kept_w.sum(-1, keepdim=True).clamp_min(torch.finfo(weight_TK.dtype).eps)


def route_sum_reference(rows_MD: torch.Tensor, dest_R: torch.Tensor, num_tokens: int, top_k: int, padded: bool,
                        weight_TK=None) -> torch.Tensor:
    """out_TD[t] = sum_k (w_TK[t, k] *) rows_MD[dest_R[t*K + k]] (a dropped route adds 0)."""
    T, K, D = num_tokens, top_k, rows_MD.shape[1]
    src = _pad_row(rows_MD) if padded else rows_MD
    g = src.index_select(0, dest_R).view(T, K, D)
    if weight_TK is None:
        return g[:, 0].clone() if K == 1 else g.sum(1)
    # a no-op cast in fp32; bf16 experts combine in bf16 as the host-plan torch path does
    return torch.bmm(weight_TK.to(rows_MD.dtype).unsqueeze(1), g).view(T, D)


def combine_reference(y_MD, weight_TK, dest_R, padded: bool, renormalize: bool) -> torch.Tensor:
    T, K = weight_TK.shape
    if renormalize:
        weight_TK = renormalized_weights(weight_TK, dest_R, y_MD.shape[0])
    return route_sum_reference(y_MD, dest_R, T, K, padded, weight_TK)


def combine_backward_reference(dout_TD, y_MD, weight_TK, row_route_M, dest_R, padded: bool, renormalize: bool):
    """(dy_MD in y's dtype, dw_TK in the weights' dtype) of `combine_reference`."""
    T, K = weight_TK.shape
    M, D = y_MD.shape
    dout_TD = dout_TD.to(y_MD.dtype)
    w_TK = renormalized_weights(weight_TK, dest_R, M) if renormalize else weight_TK
    y_TKD = (_pad_row(y_MD) if padded else y_MD).index_select(0, dest_R).view(T, K, D)
    dw_TK = torch.bmm(y_TKD, dout_TD.unsqueeze(2)).view(T, K).to(weight_TK.dtype)  # 0 for a dropped route
    if renormalize:
        keep_TK = (dest_R < M).view(T, K)
        s_T1 = torch.where(keep_TK, weight_TK, 0.0).sum(-1, keepdim=True)
        eps = torch.finfo(weight_TK.dtype).eps
        through_sum = torch.where(s_T1 >= eps, (dw_TK * w_TK).sum(-1, keepdim=True), 0.0)
        dw_TK = torch.where(keep_TK, (dw_TK - through_sum) / s_T1.clamp_min(eps), 0.0)
    dY_RD = (w_TK.to(y_MD.dtype).unsqueeze(2) * dout_TD.unsqueeze(1)).view(T * K, D)
    dy_MD = (_pad_row(dY_RD) if padded else dY_RD).index_select(0, row_route_M)
    return dy_MD, dw_TK


# ---- the ops ------------------------------------------------------------------------------------------
@torch.library.custom_op("moesys::static_dispatch", mutates_args=())
def static_dispatch_op(x_TD: torch.Tensor, row_route_M: torch.Tensor, dest_R: torch.Tensor, top_k: int,
                       padded: bool) -> torch.Tensor:
    if _use_triton(x_TD):
        from .permute_static_triton import launch_static_gather

        return launch_static_gather(x_TD, row_route_M, top_k)
    return dispatch_reference(x_TD, row_route_M, top_k, padded)


@static_dispatch_op.register_fake
def _(x_TD, row_route_M, dest_R, top_k, padded):
    return x_TD.new_empty(row_route_M.shape[0], x_TD.shape[1])


@torch.library.custom_op("moesys::static_route_sum", mutates_args=())
def static_route_sum_op(rows_MD: torch.Tensor, dest_R: torch.Tensor, num_tokens: int, top_k: int,
                        padded: bool) -> torch.Tensor:
    """The dispatch's backward: dx_TD[t] = sum_k dx_MD[dest_R[t*K + k]]."""
    if _use_triton(rows_MD):
        from .permute_static_triton import launch_static_route_sum

        return launch_static_route_sum(rows_MD, dest_R, num_tokens, top_k)
    return route_sum_reference(rows_MD, dest_R, num_tokens, top_k, padded)


@static_route_sum_op.register_fake
def _(rows_MD, dest_R, num_tokens, top_k, padded):
    return rows_MD.new_empty(num_tokens, rows_MD.shape[1])


def _dispatch_setup(ctx, inputs, output):
    x_TD, _row_route_M, dest_R, top_k, padded = inputs
    ctx.save_for_backward(dest_R)
    ctx.T, ctx.K, ctx.padded = x_TD.shape[0], top_k, padded


def _dispatch_backward(ctx, dx_MD):
    (dest_R,) = ctx.saved_tensors
    return static_route_sum_op(dx_MD.contiguous(), dest_R, ctx.T, ctx.K, ctx.padded), None, None, None, None


static_dispatch_op.register_autograd(_dispatch_backward, setup_context=_dispatch_setup)


@torch.library.custom_op("moesys::static_combine", mutates_args=())
def static_combine_op(y_MD: torch.Tensor, weight_TK: torch.Tensor, row_route_M: torch.Tensor, dest_R: torch.Tensor,
                      padded: bool, renormalize: bool) -> torch.Tensor:
    """row_route_M is unused here: it is an input so the backward has it."""
    if _use_triton(y_MD):
        from .permute_static_triton import launch_static_route_sum

        return launch_static_route_sum(y_MD, dest_R, weight_TK.shape[0], weight_TK.shape[1], weight_TK, renormalize)
    return combine_reference(y_MD, weight_TK, dest_R, padded, renormalize)


@static_combine_op.register_fake
def _(y_MD, weight_TK, row_route_M, dest_R, padded, renormalize):
    return y_MD.new_empty(weight_TK.shape[0], y_MD.shape[1])


@torch.library.custom_op("moesys::static_combine_backward", mutates_args=())
def static_combine_backward_op(dout_TD: torch.Tensor, y_MD: torch.Tensor, weight_TK: torch.Tensor,
                               row_route_M: torch.Tensor, dest_R: torch.Tensor, padded: bool,
                               renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    if _use_triton(y_MD):
        from .permute_static_triton import launch_static_combine_backward

        return launch_static_combine_backward(dout_TD, y_MD, weight_TK, row_route_M, dest_R, renormalize)
    return combine_backward_reference(dout_TD, y_MD, weight_TK, row_route_M, dest_R, padded, renormalize)


@static_combine_backward_op.register_fake
def _(dout_TD, y_MD, weight_TK, row_route_M, dest_R, padded, renormalize):
    return y_MD.new_empty(y_MD.shape), weight_TK.new_empty(weight_TK.shape)


def _combine_setup(ctx, inputs, output):
    y_MD, weight_TK, row_route_M, dest_R, padded, renormalize = inputs
    ctx.save_for_backward(y_MD, weight_TK, row_route_M, dest_R)
    ctx.padded, ctx.renormalize = padded, renormalize


def _combine_backward(ctx, dout_TD):
    y_MD, weight_TK, row_route_M, dest_R = ctx.saved_tensors
    # dout may be zero-stride (the expand of a .sum()): the kernels read dense rows
    dy_MD, dw_TK = static_combine_backward_op(dout_TD.contiguous(), y_MD, weight_TK, row_route_M, dest_R,
                                              ctx.padded, ctx.renormalize)
    return dy_MD, dw_TK, None, None, None, None


static_combine_op.register_autograd(_combine_backward, setup_context=_combine_setup)


# ---- entry points -------------------------------------------------------------------------------------
def dispatch_static(x_TD: torch.Tensor, row_route_M: torch.Tensor, dest_R: torch.Tensor, top_k: int,
                    padded: bool) -> torch.Tensor:
    """x_MD: the buffer rows of every route, 0 in an empty row (module docstring). Differentiable in x_TD.

    Args:
        padded: some row may be empty / some route dropped (capacity mode); False when the buffer is
            exactly the R routes (dropless), which skips the zero-row padding of the torch path."""
    if x_TD.shape[0] * top_k != dest_R.shape[0]:
        raise ValueError(f"dispatch_static: {x_TD.shape[0]} tokens x top_k {top_k} != {dest_R.shape[0]} routes")
    return static_dispatch_op(x_TD.contiguous(), row_route_M, dest_R, top_k, padded)


def combine_static(y_MD: torch.Tensor, weight_TK: torch.Tensor, row_route_M: torch.Tensor, dest_R: torch.Tensor,
                   padded: bool, renormalize: bool = False) -> torch.Tensor:
    """y_TD[t] = sum_k w[t, k] * y_MD[dest_R[t*K+k]] (0 for a dropped route); w = weight_TK, or its
    kept part renormalised per token when `renormalize`. Differentiable in y_MD and weight_TK."""
    if weight_TK.shape[0] * weight_TK.shape[1] != dest_R.shape[0]:
        raise ValueError(f"combine_static: weight {tuple(weight_TK.shape)} does not match {dest_R.shape[0]} routes")
    return static_combine_op(y_MD.contiguous(), weight_TK.contiguous(), row_route_M, dest_R, padded, renormalize)
