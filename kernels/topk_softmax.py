"""Router top-k: probabilities, the k largest and their (optionally renormalised) weights.

Legend: T tokens, E experts, K experts chosen per token.

    probs_TE   = softmax(logits_TE) in fp32 (bf16 logits would flip near-ties in the top-k)
    idx_TK     = indices of the K largest probs per token, largest first (as torch.topk)
    weights_TK = probs at idx_TK, divided by their sum over the K when `normalize`
                 (Mixtral/GShard) or left as they are (DeepSeek-MoE)

Differentiable w.r.t. logits through both probs_TE and weights_TK. The Triton path's backward is
torch code from the saved probs (see `topk_softmax_triton.topk_softmax_backward`): it is O(T*E)
elementwise work, small next to the GEMMs, so it does not earn a kernel of its own.
"""
from __future__ import annotations

import torch

from . import backend as _backend


def check_topk_softmax_args(logits_TE: torch.Tensor, k: int) -> None:
    if logits_TE.dim() != 2:
        raise ValueError(f"topk_softmax: logits must be 2-D [T, E], got shape {tuple(logits_TE.shape)}")
    if logits_TE.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"topk_softmax: logits dtype {logits_TE.dtype} not supported (fp32, bf16, fp16)")
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"topk_softmax: k must be an int, got {type(k).__name__}")
    E = logits_TE.shape[1]
    if not 1 <= k <= E:
        raise ValueError(f"topk_softmax: k ({k}) must be in [1, num_experts={E}]")


def topk_softmax_reference(logits_TE: torch.Tensor, k: int, normalize: bool):
    """Plain torch: softmax in fp32, torch.topk, renormalise over the k. Autograd does the backward."""
    probs_TE = torch.softmax(logits_TE.float(), dim=-1)
    weights_TK, idx_TK = torch.topk(probs_TE, k, dim=-1)
    if normalize:
        weights_TK = weights_TK / weights_TK.sum(dim=-1, keepdim=True)
    return probs_TE, weights_TK, idx_TK


def topk_softmax(logits_TE: torch.Tensor, k: int, normalize: bool, *, backend: str = "auto"):
    """Fused softmax + top-k router step.

    Args:
        logits_TE: [T, E] router logits (fp32 preferred; bf16/fp16 are upcast to fp32).
        k: experts per token, 1 <= k <= E.
        normalize: renormalise the k weights to sum to 1.
        backend: "auto" (Triton on CUDA, torch elsewhere), "torch" or "triton".
    Returns:
        (probs_TE fp32, weights_TK fp32, idx_TK int64).
    """
    check_topk_softmax_args(logits_TE, k)
    if backend != "torch" and _backend.resolve(backend, logits_TE.device) == "triton":
        from .topk_softmax_triton import topk_softmax_triton

        return topk_softmax_triton(logits_TE, k, normalize)
    return topk_softmax_reference(logits_TE, k, normalize)
