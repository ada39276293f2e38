"""Triton fused softmax + top-k router kernel (forward); the backward is torch code.

Legend: T tokens, E experts, K chosen per token, BT rows per program, BE = next_pow2(E),
BK = next_pow2(K).

One program takes BT rows whole (E is at most a few hundred, so a row fits in registers):
softmax in fp32, then K rounds of argmax (K is small; a sort would cost more), each round
masking out the winner. Ties go to the lowest expert index; torch.topk leaves tie order
unspecified, so the two agree on inputs without exact ties.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import launch_triton as L
from .backend import interpreting
from .topk_softmax import check_topk_softmax_args

if interpreting():
    _CONFIGS = [triton.Config({"BLOCK_T": 16}, num_warps=4)]
else:
    _CONFIGS = [triton.Config({"BLOCK_T": bt}, num_warps=w) for bt, w in [(4, 2), (16, 4), (32, 4), (64, 8)]]


@triton.autotune(configs=_CONFIGS, key=["E", "K"])
@triton.jit
def _topk_softmax_kernel(
    # pointers
    logits_ptr, probs_ptr, weights_ptr, idx_ptr,
    # sizes and strides
    T, E, stride_lt, stride_le,
    # meta-parameters
    K: tl.constexpr, NORMALIZE: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.arange(0, BLOCK_E)
    row_ok = rows < T
    col_ok = cols < E
    ok = row_ok[:, None] & col_ok[None, :]
    rows64 = rows.to(tl.int64)
    z = tl.load(logits_ptr + rows64[:, None] * stride_lt + cols[None, :] * stride_le, mask=ok, other=float("-inf"))
    z = z.to(tl.float32)
    z_max = tl.max(z, 1)
    # padded rows are all -inf: subtract 0 there so they give 0/0 only in masked-out lanes
    z_max = tl.where(row_ok, z_max, 0.0)
    ex = tl.where(ok, tl.exp(z - z_max[:, None]), 0.0)
    denom = tl.where(row_ok, tl.sum(ex, 1), 1.0)
    p = ex / denom[:, None]
    tl.store(probs_ptr + rows64[:, None] * E + cols[None, :], p, mask=ok)

    # K rounds of argmax; padded experts hold -1 so they never win (probs are >= 0)
    work = tl.where(col_ok[None, :], p, -1.0)
    kcols = tl.arange(0, BLOCK_K)
    w_TK = tl.zeros((BLOCK_T, BLOCK_K), dtype=tl.float32)
    i_TK = tl.zeros((BLOCK_T, BLOCK_K), dtype=tl.int64)
    for j in tl.static_range(K):
        best = tl.max(work, 1)
        arg = tl.min(tl.where(work == best[:, None], cols[None, :], BLOCK_E), 1)
        w_TK = tl.where(kcols[None, :] == j, best[:, None], w_TK)
        i_TK = tl.where(kcols[None, :] == j, arg[:, None].to(tl.int64), i_TK)
        work = tl.where(cols[None, :] == arg[:, None], -1.0, work)
    if NORMALIZE:
        # padded k columns hold 0 and add nothing; padded rows divide by 1, not 0
        w_sum = tl.where(row_ok, tl.sum(w_TK, 1), 1.0)
        w_TK = w_TK / w_sum[:, None]
    k_ok = row_ok[:, None] & (kcols[None, :] < K)
    tl.store(weights_ptr + rows64[:, None] * K + kcols[None, :], w_TK, mask=k_ok)
    tl.store(idx_ptr + rows64[:, None] * K + kcols[None, :], i_TK, mask=k_ok)


def launch_topk_softmax(logits_TE: torch.Tensor, k: int, normalize: bool):
    """Returns (probs_TE fp32, weights_TK fp32, idx_TK int64), all contiguous."""
    check_topk_softmax_args(logits_TE, k)
    T, E = logits_TE.shape
    probs_TE = logits_TE.new_empty(T, E, dtype=torch.float32)
    weights_TK = logits_TE.new_empty(T, k, dtype=torch.float32)
    idx_TK = logits_TE.new_empty(T, k, dtype=torch.int64)
    if T == 0:
        return probs_TE, weights_TK, idx_TK
    grid = lambda META: (triton.cdiv(T, META["BLOCK_T"]),)  # noqa: E731
    _topk_softmax_kernel[grid](
        logits_TE, probs_TE, weights_TK, idx_TK,
        T, E, logits_TE.stride(0), logits_TE.stride(1),
        K=k, NORMALIZE=bool(normalize), BLOCK_E=triton.next_power_of_2(E),
        BLOCK_K=triton.next_power_of_2(max(k, 2)),
    )
    return probs_TE, weights_TK, idx_TK


@torch.library.custom_op("moesys::topk_softmax", mutates_args=())
def topk_softmax_op(logits_TE: torch.Tensor, k: int, normalize: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return launch_topk_softmax(logits_TE, k, normalize)


@topk_softmax_op.register_fake
def _topk_softmax_fake(logits_TE, k, normalize):
    T, E = logits_TE.shape
    return (logits_TE.new_empty(T, E, dtype=torch.float32), logits_TE.new_empty(T, k, dtype=torch.float32),
            logits_TE.new_empty(T, k, dtype=torch.int64))


def topk_softmax_backward(probs_TE, idx_TK, normalize: bool, dprobs_TE, dweights_TK):
    """dlogits_TE (fp32) from the saved probs, in torch.

    With s = probs at idx and S = sum_k s_k: weights = s / S (normalize) or s. Then
    ds_k = (dw_k - sum_j dw_j * w_j) / S (normalize) or dw_k; dprobs gets ds scattered to idx;
    softmax: dz = p * (dp - sum_e dp_e * p_e).
    """
    dp_TE = dprobs_TE.float().clone() if dprobs_TE is not None else torch.zeros_like(probs_TE)
    if dweights_TK is not None:
        dw_TK = dweights_TK.float()
        if normalize:
            s_TK = probs_TE.gather(1, idx_TK)
            S_T1 = s_TK.sum(1, keepdim=True)
            w_TK = s_TK / S_T1
            ds_TK = (dw_TK - (dw_TK * w_TK).sum(1, keepdim=True)) / S_T1
        else:
            ds_TK = dw_TK
        dp_TE.scatter_add_(1, idx_TK, ds_TK)
    return probs_TE * (dp_TE - (dp_TE * probs_TE).sum(1, keepdim=True))


def _setup(ctx, inputs, output):
    logits_TE, k, normalize = inputs
    probs_TE, _, idx_TK = output
    ctx.save_for_backward(probs_TE, idx_TK)
    ctx.normalize = normalize
    ctx.logits_dtype = logits_TE.dtype


def _backward(ctx, dprobs_TE, dweights_TK, _didx):
    probs_TE, idx_TK = ctx.saved_tensors
    dlogits_TE = topk_softmax_backward(probs_TE, idx_TK, ctx.normalize, dprobs_TE, dweights_TK)
    return dlogits_TE.to(ctx.logits_dtype), None, None


topk_softmax_op.register_autograd(_backward, setup_context=_setup)


def topk_softmax_triton(logits_TE: torch.Tensor, k: int, normalize: bool):
    probs_TE, weights_TK, idx_TK = topk_softmax_op(logits_TE, k, bool(normalize))
    return probs_TE, weights_TK, idx_TK
