"""Grouped GEMM: y[rows of e] = x[rows of e] @ w[e], rows grouped contiguously by expert.

Legend: N rows (routed tokens), D input width, F output width, E experts.

Torch path (this file): a custom autograd Function whose backward computes dX = dY @ w[e]^T and
dW[e] = x_e^T @ dY_e as grouped GEMMs of their own, so no per-expert slice ever materialises a
full-size weight gradient (the naive per-expert autograd loop does, and is ~4.7x slower than a
dense FFN here). Large CPU outputs (activations, and the expert weight gradients: E/K times the
dense layer's) come from `workspace`, the reusable-buffer cache. fp32 on CPU: one MKL batched
call for small experts (`cpu_blas`), else a per-expert `torch.mm(..., out=)` loop. Elsewhere
`torch._grouped_mm` runs where it supports the device and dtype (CPU bf16; on CUDA, bf16 on
Hopper: probed once, `backend.grouped_mm_supported`) and its 16-byte stride rule holds, and a
per-expert loop otherwise.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch.autograd.function import once_differentiable

from . import backend as _backend
from . import cpu_blas, gemm_select, workspace


def check_grouped_gemm_args(x_ND: torch.Tensor, w_EDF: torch.Tensor, counts_E: torch.Tensor) -> None:
    """Shape/dtype checks shared by every backend; raised before any kernel launch."""
    if x_ND.dim() != 2:
        raise ValueError(f"grouped_gemm: x must be 2-D [N, D], got shape {tuple(x_ND.shape)}")
    if w_EDF.dim() != 3:
        raise ValueError(f"grouped_gemm: w must be 3-D [E, D, F], got shape {tuple(w_EDF.shape)}")
    if counts_E.dim() != 1 or counts_E.shape[0] != w_EDF.shape[0]:
        raise ValueError(
            f"grouped_gemm: counts must be 1-D with one entry per expert ({w_EDF.shape[0]}), "
            f"got shape {tuple(counts_E.shape)}"
        )
    if x_ND.shape[1] != w_EDF.shape[1]:
        raise ValueError(
            f"grouped_gemm: x has width D={x_ND.shape[1]} but w expects D={w_EDF.shape[1]}"
        )
    if counts_E.dtype.is_floating_point or counts_E.dtype == torch.bool:
        raise TypeError(f"grouped_gemm: counts must be an integer tensor, got {counts_E.dtype}")
    if x_ND.dtype != w_EDF.dtype:
        raise TypeError(f"grouped_gemm: x dtype {x_ND.dtype} != w dtype {w_EDF.dtype}")
    if x_ND.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"grouped_gemm: dtype {x_ND.dtype} not supported (fp32, bf16, fp16)")
    if x_ND.device != w_EDF.device or counts_E.device != x_ND.device:
        raise ValueError(
            f"grouped_gemm: x ({x_ND.device}), w ({w_EDF.device}) and counts ({counts_E.device}) "
            "must be on one device"
        )


def check_counts_sum(name: str, x_ND: torch.Tensor, counts_E: torch.Tensor) -> None:
    """The torch paths' check that counts cover x's rows exactly. On CPU it is cheap; on CUDA it is
    a host sync, paid only on the torch path and skipped while compiling."""
    if x_ND.device.type == "cpu" or not torch.compiler.is_compiling():
        total = int(counts_E.sum())
        if total != x_ND.shape[0]:
            raise ValueError(f"{name}: counts sum to {total} but x has N={x_ND.shape[0]} rows")


def _aligned(*tensors: torch.Tensor, widths=()) -> bool:
    # torch._grouped_mm requires every stride (but the unit one) to be a multiple of 16 bytes, the
    # output's rows too (`widths`: the output's last dims), even where a dim has size 1.
    es0 = tensors[0].element_size()
    if any((w * es0) % 16 for w in widths):
        return False
    for t in tensors:
        es = t.element_size()
        for s, n in zip(t.stride(), t.shape):
            if s != 1 and n > 1 and (s * es) % 16 != 0:
                return False
        if t.data_ptr() % 16 != 0:
            return False
    return True


def _grouped_mm_ok(a: torch.Tensor, b: torch.Tensor, widths) -> bool:
    return _backend.grouped_mm_supported(a.device, a.dtype) and _aligned(a, b, widths=widths)


def _mm_rows(x_ND, w_EDF, counts_E, offs_E, blas: Optional[bool] = None):
    """y_NF = grouped x @ w[e]. blas: `cpu_blas.serves(x_ND)` when the caller knows it already."""
    N, F = x_ND.shape[0], w_EDF.shape[2]
    if blas is None:
        blas = cpu_blas.serves(x_ND)
    if blas:  # fp32 on CPU with MKL: batched below (or the loop for large GEMMs), into a workspace
        y = workspace.empty_as((N, F), x_ND)  # buffer when large (else a plain new tensor)
    elif workspace.cacheable((N, F), x_ND.dtype, x_ND.device):  # CPU only
        y = workspace.empty_as((N, F), x_ND)
    elif _grouped_mm_ok(x_ND, w_EDF, widths=(x_ND.shape[1], F)):
        return torch._grouped_mm(x_ND, w_EDF, offs=offs_E)
    else:
        y = x_ND.new_empty(N, F)
    counts = counts_E.tolist()  # host sync: CPU, or the CUDA fallback path
    if cpu_blas.mm_rows(x_ND, w_EDF, counts, y):  # fp32 on CPU with MKL: one batched call
        return y
    start = 0
    for e, n in enumerate(counts):
        if n:
            torch.mm(x_ND[start : start + n], w_EDF[e], out=y[start : start + n])
        start += n
    return y


def _mm_weight(x_ND, dy_NF, counts_E, offs_E):
    """dW_EDF[e] = x_e^T @ dy_e (zero for an expert with no rows)."""
    E, D, F = counts_E.shape[0], x_ND.shape[1], dy_NF.shape[1]
    xt = x_ND.t()
    if workspace.cacheable((E, D, F), x_ND.dtype, x_ND.device):  # CPU only
        dw = workspace.empty_as((E, D, F), x_ND, kind="grad")
    elif cpu_blas.serves(x_ND):
        dw = x_ND.new_empty(E, D, F)
    elif _grouped_mm_ok(xt, dy_NF, widths=(D, F)):
        dw = torch._grouped_mm(xt, dy_NF, offs=offs_E)
        # an expert with no rows gets a zero gradient: zeroed on the device (no host sync), as not
        # every grouped-GEMM build writes the output of an empty group
        return dw.masked_fill_((counts_E == 0).view(E, 1, 1), 0)
    else:
        dw = x_ND.new_empty(E, D, F)
    counts = counts_E.tolist()  # host sync: CPU, or the CUDA fallback path
    if cpu_blas.mm_weight(x_ND, dy_NF, counts, dw):  # fp32 on CPU with MKL: one batched call
        return dw
    start = 0
    for e, n in enumerate(counts):
        if n:
            torch.mm(xt[:, start : start + n], dy_NF[start : start + n], out=dw[e])
        else:
            dw[e].zero_()  # an expert with no rows gets a zero gradient
        start += n
    return dw


class _GroupedGemmTorch(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_ND, w_EDF, counts_E):
        x_ND = x_ND.contiguous()
        w_EDF = w_EDF.contiguous()
        offs_E = torch.cumsum(counts_E, 0).to(torch.int32)
        ctx.save_for_backward(x_ND, w_EDF, counts_E, offs_E)
        return _mm_rows(x_ND, w_EDF, counts_E, offs_E)

    @staticmethod
    def backward(ctx, dy_NF):
        x_ND, w_EDF, counts_E, offs_E = ctx.saved_tensors
        # incoming grads can be zero-stride (expand of a sum): _grouped_mm rejects those
        dy_NF = dy_NF.contiguous()
        dx = dw = None
        if ctx.needs_input_grad[0]:
            dx = _mm_rows(dy_NF, w_EDF.transpose(1, 2), counts_E, offs_E)  # strided view: no copy
        if ctx.needs_input_grad[1]:
            dw = _mm_weight(x_ND, dy_NF, counts_E, offs_E)
        return dx, dw, None


def grouped_gemm_torch(x_ND, w_EDF, counts_E):
    return _GroupedGemmTorch.apply(x_ND, w_EDF, counts_E)


# ---------------------------------------------------------------------------------------------
# The whole expert FFN as one autograd Function on the torch path: memory it owns, freed early
# (it shares `_mm_rows` / `_mm_weight` with the grouped GEMM above: one torch path, one file).
#
#     h = x @ w1[e]; a = act(h)  (swiglu: a = silu(h) * (x @ w3[e]));  y = a @ w2[e]
#
# Composing `grouped_gemm`, an activation and `grouped_gemm` again leaves autograd in charge of the
# [N, F] intermediates: the activation's output and its input-gradient are separate full-size
# tensors, each alive until the engine drops them. Here every intermediate is this Function's own:
# the activation's input-gradient is written into the buffer of the incoming gradient (dA) in place,
# and h, a are dropped as soon as the backward no longer needs them (they are kept on ctx, not
# saved, so they can be freed mid-backward). Large buffers come from `workspace` on CPU. The peak
# of a layer's backward, where the expert weight gradients pile up, is one [N, F] tensor lower.
#
# `recompute=True` keeps none of them from the forward: the backward recomputes h (and g), then a,
# from the saved x and weights (activation recomputation, as Megatron-core's `recompute_modules=
# ["moe"]`). Between forward and backward the Function then holds only what it saves (x, weights,
# counts): 2 (swiglu: 3) [N, F] tensors fewer per layer, for one (two) more x @ w GEMMs in backward.
# Ordinary activation checkpointing (torch.utils.checkpoint) could not do this here: it sees saved
# tensors only, and the intermediates live on ctx.
# ---------------------------------------------------------------------------------------------
ACTIVATIONS = ("gelu", "relu", "silu", "swiglu")


def _act_forward(h: torch.Tensor, activation: str) -> torch.Tensor:
    a = workspace.empty_as(h.shape, h)
    if activation == "gelu":
        return torch.ops.aten.gelu.out(h, out=a)
    if activation == "relu":
        return torch.clamp_min(h, 0, out=a)
    return torch.ops.aten.silu.out(h, out=a)  # silu, and swiglu's gate


def _intermediates(x_ND, w1, w3, counts_E, offs_E, activation: str, blas: Optional[bool] = None) -> tuple:
    """(h, g, a) of the FFN's first layer: h = x @ w1[e], g = x @ w3[e] (swiglu, else None), a = act."""
    h = _mm_rows(x_ND, w1, counts_E, offs_E, blas)
    g = None
    if activation == "swiglu":
        g = _mm_rows(x_ND, w3, counts_E, offs_E, blas)
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
        blas = cpu_blas.serves(x_ND)  # every GEMM here has x's dtype and device: asked once
        h, g, a = _intermediates(x_ND, w1, w3, counts_E, offs_E, activation, blas)
        y = _mm_rows(a, w2, counts_E, offs_E, blas)
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


def grouped_gemm_reference(x_ND, w_EDF, counts_E):
    """Obviously-correct slow reference: a Python loop over experts (autograd through slices)."""
    outs, start = [], 0
    for e, n in enumerate(counts_E.tolist()):
        outs.append(x_ND[start : start + n] @ w_EDF[e])
        start += n
    return torch.cat(outs, 0) if outs else x_ND.new_zeros(0, w_EDF.shape[2])


def grouped_gemm(x_ND: torch.Tensor, w_EDF: torch.Tensor, counts_E: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """Differentiable grouped GEMM.

    Args:
        x_ND: [N, D] rows grouped contiguously by expert, in the order of `counts_E`.
        w_EDF: [E, D, F] expert weights.
        counts_E: [E] integer rows per expert, on x's device, summing to N.
        backend: "auto", "torch", "grouped_mm" (the torch path), "triton" or "triton_persistent"
            (kernels/backend.py). "auto": torch on CPU; on CUDA where `torch._grouped_mm` serves the
            dtype and strides, the faster of it and the persistent kernel for this shape bucket
            (measured once, gemm_select.py); Triton elsewhere on CUDA.
    Returns:
        y_NF: [N, F], y[rows of e] = x[rows of e] @ w[e].
    """
    check_grouped_gemm_args(x_ND, w_EDF, counts_E)
    which = _backend.resolve(backend, x_ND.device, x_ND.dtype)
    if (which == "triton" and backend == "triton_persistent") or _auto_takes_persistent(backend, x_ND, w_EDF, counts_E):
        from .grouped_gemm_persistent import grouped_gemm_persistent

        return grouped_gemm_persistent(x_ND, w_EDF, counts_E)
    if which == "triton":
        from .grouped_gemm_triton import grouped_gemm_triton

        return grouped_gemm_triton(x_ND, w_EDF, counts_E)
    check_counts_sum("grouped_gemm", x_ND, counts_E)
    return grouped_gemm_torch(x_ND, w_EDF, counts_E)


def _auto_takes_persistent(backend: str, x_ND, w_EDF, counts_E) -> bool:
    """"auto" on CUDA, where it would take torch._grouped_mm: whether the persistent kernel measured
    faster for this shape bucket (never on CPU: "auto" there is exactly the torch path)."""
    if backend != "auto" or x_ND.device.type != "cuda" or not _backend.triton_available():
        return False
    if not _grouped_mm_ok(x_ND, w_EDF, widths=(x_ND.shape[1], w_EDF.shape[2])):
        return False
    offs_E = torch.cumsum(counts_E, 0, dtype=torch.int32)
    return gemm_select.choose(x_ND, w_EDF, offs_E) == gemm_select.PERSISTENT
