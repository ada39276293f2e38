"""Softmax + top-k + renormalisation + the balance-loss statistics in one autograd node, sync-free.

Legend: T tokens, E experts, K experts chosen per token.

    probs_TE  = softmax(logits_TE)                       (fp32)
    idx_TK    = top-k experts, largest first; weight_TK = probs at idx_TK (/ their sum when normalize)
    routed_E  = routes per expert (a histogram of idx_TK: scatter-add, no bincount: bincount reads
                its maximum on the host)
    aux       = "switch": coef * E / (K T^2) * sum_e (sum_t p_te) * routed_e   (Megatron's top-k form)
                "gshard": coef * E / T^2     * sum_e (sum_t p_te) * first_e    (first choices only)
                "none":   0
The backward is written out (about 7 ops instead of autograd's ~15 through topk, the division and
the loss): dp = scatter of the weight grads into the chosen columns + the loss's per-expert
constant, then the softmax backward. The aux loss's gradient w.r.t. probs is constant over tokens
(c * counts_e), which is what lets it fold into the same scatter.
"""
from __future__ import annotations

import torch

from .backend import fused_on_triton as _use_triton  # a module attribute: tests patch it

AUX_KINDS = ("switch", "gshard", "none")


def histogram(idx: torch.Tensor, E: int) -> torch.Tensor:
    """[E] int64 count of each value of idx (any shape): a device scatter-add, no host read."""
    flat = idx.reshape(-1)
    return flat.new_zeros(E).scatter_add_(0, flat, flat.new_ones(1).expand(flat.shape[0]))


class _TopKRoute(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits_TE, k, normalize, aux, coef):
        T, E = logits_TE.shape
        s = None
        if _use_triton(logits_TE) and T > 0:
            from .topk_softmax_triton import topk_softmax_op  # a custom op: torch.compile sees its fake

            probs, w, idx = topk_softmax_op(logits_TE, k, bool(normalize))
            if normalize:  # the backward divides by the chosen probabilities' sum
                s = probs.gather(1, idx).sum(-1, keepdim=True)
        else:
            probs = torch.softmax(logits_TE.float(), dim=-1)
            w, idx = torch.topk(probs, k, dim=-1)
            if normalize:
                s = w.sum(-1, keepdim=True)
                w = w / s
        routed_E = histogram(idx, E)
        if aux == "none" or T == 0:
            c_E = probs.new_zeros(E)
        elif aux == "switch":
            c_E = routed_E.to(probs.dtype).mul_(coef * E / (k * T * T))
        else:  # gshard
            c_E = histogram(idx[:, 0], E).to(probs.dtype).mul_(coef * E / (T * T))
        loss = torch.dot(probs.sum(0), c_E) if aux != "none" else probs.new_zeros(())
        ctx.save_for_backward(probs, w, idx, s, c_E)
        ctx.normalize = normalize
        ctx.mark_non_differentiable(idx, routed_E)
        ctx.set_materialize_grads(False)  # an unused output's gradient stays None: no [T, E] zeros
        return probs, w, idx, routed_E, loss

    @staticmethod
    def backward(ctx, dprobs, dw, _didx, _drouted, dloss):
        probs, w, idx, s, c_E = ctx.saved_tensors
        T, E = probs.shape
        if dw is None:
            dw = torch.zeros_like(w)
        if ctx.normalize:
            # w = p / s:  dp_k = (dw_k - sum_j dw_j w_j) / s
            dw = (dw - (dw * w).sum(-1, keepdim=True)) / s
        base = None
        if dloss is not None:
            base = (dloss * c_E).expand(T, E)
        if dprobs is not None:
            base = dprobs if base is None else base + dprobs
        if base is None:
            dp = torch.zeros_like(probs).scatter_(1, idx, dw)
        else:
            dp = torch.scatter_add(base, 1, idx, dw)
        dz = torch._softmax_backward_data(dp, probs, -1, torch.float32)
        return dz, None, None, None, None


def topk_route_reference(logits_TE: torch.Tensor, k: int, normalize: bool, aux: str, coef: float):
    """Plain torch, autograd backward: the obviously-correct twin of `topk_route`."""
    T, E = logits_TE.shape
    probs = torch.softmax(logits_TE.float(), dim=-1)
    w, idx = torch.topk(probs, k, dim=-1)
    if normalize:
        w = w / w.sum(-1, keepdim=True)
    routed_E = torch.bincount(idx.reshape(-1), minlength=E)
    if aux == "switch":
        loss = coef * E / (k * T * T) * (probs.sum(0) * routed_E.float()).sum()
    elif aux == "gshard":
        loss = coef * E / (T * T) * (probs.sum(0) * torch.bincount(idx[:, 0], minlength=E).float()).sum()
    else:
        loss = probs.new_zeros(())
    return probs, w, idx, routed_E, loss


def topk_route(logits_TE: torch.Tensor, k: int, normalize: bool, aux: str = "switch", coef: float = 0.0):
    """Fused router step (module docstring).

    Args:
        logits_TE: [T, E] router logits (upcast to fp32).
        k: experts per token; normalize: renormalise the k weights; aux: one of AUX_KINDS; coef: its weight.
    Returns:
        (probs_TE fp32, weight_TK fp32, idx_TK int64, routed_E int64, aux loss 0-dim fp32); probs,
        weights and the loss are differentiable w.r.t. the logits.
    """
    if logits_TE.dim() != 2 or not 1 <= k <= logits_TE.shape[1]:
        raise ValueError(f"topk_route: logits must be [T, E] with 1 <= k <= E, got {tuple(logits_TE.shape)} and k={k}")
    if aux not in AUX_KINDS:
        raise ValueError(f"topk_route: aux {aux!r} is not one of {list(AUX_KINDS)}")
    return _TopKRoute.apply(logits_TE, k, normalize, aux, coef)
