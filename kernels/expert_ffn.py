"""The whole expert FFN as one autograd Function on the torch path: memory it owns, freed early.

    h = x @ w1[e]; a = act(h)  (swiglu: a = silu(h) * (x @ w3[e]));  y = a @ w2[e]

Composing `grouped_gemm`, an activation and `grouped_gemm` again leaves autograd in charge of the
[N, F] intermediates: the activation's output and its input-gradient are separate full-size
tensors, each alive until the engine drops them. Here every intermediate is this Function's own:
the activation's input-gradient is written into the buffer of the incoming gradient (dA) in place,
and h, a are dropped as soon as the backward no longer needs them (they are kept on ctx, not
saved, so they can be freed mid-backward). Large buffers come from `workspace` on CPU. The peak
of a layer's backward, where the expert weight gradients pile up, is one [N, F] tensor lower.

`recompute=True` keeps none of them from the forward: the backward recomputes h (and g), then a,
from the saved x and weights (activation recomputation, as Megatron-core's `recompute_modules=
["moe"]`). Between forward and backward the Function then holds only what it saves (x, weights,
counts): 2 (swiglu: 3) [N, F] tensors fewer per layer, for one (two) more x @ w GEMMs in backward.
Ordinary activation checkpointing (torch.utils.checkpoint) could not do this here: it sees saved
tensors only, and the intermediates live on ctx.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch.autograd.function import once_differentiable

from . import workspace
from .grouped_gemm import _mm_rows, _mm_weight, check_counts_sum, check_grouped_gemm_args

ACTIVATIONS = ("gelu", "relu", "silu", "swiglu")


def _act_forward(h: torch.Tensor, activation: str) -> torch.Tensor:
    a = workspace.empty_as(h.shape, h)
    if activation == "gelu":
        return torch.ops.aten.gelu.out(h, out=a)
    if activation == "relu":
        return torch.clamp_min(h, 0, out=a)
    return torch.ops.aten.silu.out(h, out=a)  # silu, and swiglu's gate


def _intermediates(x_ND, w1, w3, counts_E, offs_E, activation: str) -> tuple:
    """(h, g, a) of the FFN's first layer: h = x @ w1[e], g = x @ w3[e] (swiglu, else None), a = act."""
    h = _mm_rows(x_ND, w1, counts_E, offs_E)
    g = None
    if activation == "swiglu":
        g = _mm_rows(x_ND, w3, counts_E, offs_E)
        a = _act_forward(h, "silu").mul_(g)
    else:
        a = _act_forward(h, activation)
    return h, g, a


class _ExpertFFN(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_ND, w1, w2, w3, counts_E, activation, recompute):
        x_ND = x_ND.contiguous()
        w1, w2 = w1.contiguous(), w2.contiguous()
        w3 = w3.contiguous() if w3 is not None else None
        offs_E = torch.cumsum(counts_E, 0).to(torch.int32)
        h, g, a = _intermediates(x_ND, w1, w3, counts_E, offs_E, activation)
        y = _mm_rows(a, w2, counts_E, offs_E)
        ctx.save_for_backward(x_ND, w1, w2, w3, counts_E, offs_E)
        ctx.activation = activation
        ctx.recompute = recompute
        # intermediates: on ctx so backward can drop them early; with recompute, not kept at all
        ctx.h, ctx.g, ctx.a = (None, None, None) if recompute else (h, g, a)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy_ND):
        x_ND, w1, w2, w3, counts_E, offs_E = ctx.saved_tensors
        need_x, need_w1, need_w2, need_w3 = ctx.needs_input_grad[:4]
        dy_ND = dy_ND.contiguous()
        if ctx.recompute:
            h, g, a = _intermediates(x_ND, w1, w3, counts_E, offs_E, ctx.activation)
        else:
            h, g, a = ctx.h, ctx.g, ctx.a
        ctx.h = ctx.g = ctx.a = None
        dx = dw1 = dw2 = dw3 = None
        if need_w2:
            dw2 = _mm_weight(a, dy_ND, counts_E, offs_E)
        del a
        if not (need_x or need_w1 or need_w3):
            return dx, dw1, dw2, dw3, None, None, None
        da = _mm_rows(dy_ND, w2.transpose(1, 2), counts_E, offs_E)  # strided view: no copy
        del dy_ND
        dg = None
        if ctx.activation == "swiglu":
            # a = silu(h) * g:  dg = dA * silu(h);  dh = silu'(h) * (dA * g)
            dg = _act_forward(h, "silu").mul_(da)
            da.mul_(g)
            del g
            dh = torch.ops.aten.silu_backward.grad_input(da, h, grad_input=da)
        elif ctx.activation == "gelu":
            dh = torch.ops.aten.gelu_backward.grad_input(da, h, grad_input=da)
        elif ctx.activation == "relu":
            dh = da.masked_fill_(h <= 0, 0)
        else:
            dh = torch.ops.aten.silu_backward.grad_input(da, h, grad_input=da)
        del h
        if need_w1:
            dw1 = _mm_weight(x_ND, dh, counts_E, offs_E)
        if need_w3:
            dw3 = _mm_weight(x_ND, dg, counts_E, offs_E)
        if need_x:
            dx = _mm_rows(dh, w1.transpose(1, 2), counts_E, offs_E)
            if dg is not None:
                dx.add_(_mm_rows(dg, w3.transpose(1, 2), counts_E, offs_E))
        return dx, dw1, dw2, dw3, None, None, None


def expert_ffn_torch(x_ND: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, w3: Optional[torch.Tensor],
                     counts_E: torch.Tensor, activation: str, recompute: bool = False) -> torch.Tensor:
    """y_ND = FFN_e(x rows of e) for every expert e; one autograd node (torch path).

    x_ND [N, D] grouped by expert in the order of counts_E; w1 [E, D, F], w2 [E, F, D], w3 [E, D, F]
    (swiglu only). recompute: keep no [N, F] intermediate from the forward; recompute it in backward."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"expert_ffn: activation {activation!r} is not one of {list(ACTIVATIONS)}")
    if (activation == "swiglu") != (w3 is not None):
        raise ValueError(f"expert_ffn: activation {activation!r} {'needs' if w3 is None else 'takes no'} w3")
    check_grouped_gemm_args(x_ND, w1, counts_E)
    E, D, F = w1.shape
    for name, w, want in (("w2", w2, (E, F, D)), ("w3", w3, (E, D, F))):
        if w is not None and tuple(w.shape) != want:
            raise ValueError(f"expert_ffn: {name} has shape {tuple(w.shape)}, expected {want} (w1 is {(E, D, F)})")
        if w is not None and w.dtype != x_ND.dtype:
            raise TypeError(f"expert_ffn: {name} dtype {w.dtype} != x dtype {x_ND.dtype}")
    check_counts_sum("expert_ffn", x_ND, counts_E)
    return _ExpertFFN.apply(x_ND, w1, w2, w3, counts_E, activation, bool(recompute))
