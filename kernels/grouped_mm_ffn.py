"""The expert FFN on `torch._grouped_mm` with device offsets: no host sync, static shapes.

Legend: M rows of the expert buffer (grouped by expert), D hidden, F ffn hidden, E experts.

    h = x @ w1[e]; a = act(h)  (swiglu: a = silu(h) * (x @ w3[e]));  y = a @ w2[e]

Group e is rows offs_E[e-1] .. offs_E[e]-1 (offs_E: int32 cumulative row ends, on the device).
Unlike `expert_ffn.py` nothing here reads the counts on the host, so the whole call can be
captured in a CUDA graph or compiled with `torch.compile(fullgraph=True)`.

The backward is written out (torch's own `_grouped_mm` backward rejects the zero-stride gradients
a `.sum()` produces): dX = dY @ w[e]^T and dW[e] = x_e^T @ dY_e, both grouped GEMMs over the same
offsets. Rows past offs_E[-1] (padding of a static buffer) are never written by `_grouped_mm`: the
callers never read them, and their gradient rows are undefined too.

`gemm` picks the grouped GEMM under all of them: "grouped_mm" (`torch._grouped_mm`, the default),
"triton_persistent" (our persistent kernel, grouped_gemm_persistent.py: same offsets, same
padding rule), or "auto" (on CUDA, per weight, whichever measured faster for the shape bucket,
gemm_select.py; on CPU "grouped_mm"). The choice is made per weight in the forward and kept for
its three GEMMs (y, dX, dW).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from . import gemm_select
from .grouped_gemm import ACTIVATIONS


# torch._grouped_mm behind custom ops of our own: its meta function accepts bf16 only, so
# torch.compile could not trace the fp32 calls (which run fine eagerly on CPU); these fakes give
# the output shape for any dtype. Each op is one kernel launch.
@torch.library.custom_op("moesys::gmm_offs", mutates_args=())
def gmm_offs(x_MD: torch.Tensor, w_EDF: torch.Tensor, offs_E: torch.Tensor) -> torch.Tensor:
    """y_MF[rows of group e] = x[rows of e] @ w[e]; rows past offs_E[-1] are left unwritten."""
    return torch._grouped_mm(x_MD, w_EDF, offs=offs_E)


@gmm_offs.register_fake
def _(x_MD, w_EDF, offs_E):
    return x_MD.new_empty(x_MD.shape[0], w_EDF.shape[2])


@torch.library.custom_op("moesys::gmm_offs_dw", mutates_args=())
def gmm_offs_dw(x_MD: torch.Tensor, dy_MF: torch.Tensor, offs_E: torch.Tensor) -> torch.Tensor:
    """dW_EDF[e] = x_e^T @ dy_e, zero for an empty group."""
    dw = torch._grouped_mm(x_MD.t(), dy_MF, offs=offs_E)
    if x_MD.device.type != "cpu":
        # not every CUDA build writes an empty group's output: zero it on the device (no sync).
        # CPU writes zeros (checked in tests/kernels/test_grouped_mm_ffn.py)
        starts_E = torch.cat([offs_E.new_zeros(1), offs_E[:-1]])
        dw = dw.masked_fill_((offs_E == starts_E).view(-1, 1, 1), 0)
    return dw


@gmm_offs_dw.register_fake
def _(x_MD, dy_MF, offs_E):
    return x_MD.new_empty(offs_E.shape[0], x_MD.shape[1], dy_MF.shape[1])


GEMMS = ("grouped_mm", "triton_persistent", "auto")


def _pick(gemm: str, x_MD: torch.Tensor, w_EDF: torch.Tensor, offs_E: torch.Tensor) -> str:
    """"grouped_mm" or "triton_persistent" for the GEMMs of weight w_EDF."""
    if gemm != "auto":
        return gemm
    return gemm_select.choose(x_MD, w_EDF, offs_E)


def _mm(x_MD, w_EDF, offs_E, which: str) -> torch.Tensor:
    if which == "triton_persistent":
        from .grouped_gemm_persistent import persistent_mm

        return persistent_mm(x_MD, w_EDF, offs_E, True)
    return gmm_offs(x_MD, w_EDF, offs_E)


def _weight_grad(x_MD, dy_MF, offs_E, which: str = "grouped_mm") -> torch.Tensor:
    if which == "triton_persistent":
        from .grouped_gemm_persistent import persistent_mm_dw

        return persistent_mm_dw(x_MD, dy_MF, offs_E, True)
    return gmm_offs_dw(x_MD, dy_MF, offs_E)


def _act(h: torch.Tensor, activation: str) -> torch.Tensor:
    if activation == "gelu":
        return F.gelu(h)
    if activation == "relu":
        return torch.relu(h)
    return F.silu(h)


class _GroupedMMFFN(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_MD, w1, w2, w3, offs_E, activation, gemm):
        x_MD = x_MD.contiguous()
        g1 = _pick(gemm, x_MD, w1, offs_E)  # w1 and w3 share a shape: one choice
        h = _mm(x_MD, w1, offs_E, g1)
        if activation == "swiglu":
            g = _mm(x_MD, w3, offs_E, g1)
            a = F.silu(h) * g
        else:
            g = None
            a = _act(h, activation)
        g2 = _pick(gemm, a, w2, offs_E)
        y = _mm(a, w2, offs_E, g2)
        ctx.save_for_backward(x_MD, w1, w2, w3, offs_E, h, g, a)
        ctx.activation = activation
        ctx.gemms = (g1, g2)
        return y

    @staticmethod
    def backward(ctx, dy_MD):
        x_MD, w1, w2, w3, offs_E, h, g, a = ctx.saved_tensors
        act = ctx.activation
        g1, g2 = ctx.gemms
        dy_MD = dy_MD.contiguous()  # may be zero-stride (expand of a sum): _grouped_mm needs real strides
        need_x, need_w1, need_w2, need_w3 = ctx.needs_input_grad[:4]
        dx = dw1 = dw2 = dw3 = None
        da = _mm(dy_MD, w2.transpose(1, 2), offs_E, g2)
        dg = None
        if act == "swiglu":
            s = F.silu(h)
            if need_w2:
                dw2 = _weight_grad(a, dy_MD, offs_E, g2)
            dg = da * s
            dh = torch.ops.aten.silu_backward(da * g, h)
        else:
            if need_w2:
                dw2 = _weight_grad(a, dy_MD, offs_E, g2)
            if act == "gelu":
                dh = torch.ops.aten.gelu_backward(da, h)
            elif act == "relu":
                dh = torch.ops.aten.threshold_backward(da, h, 0)
            else:
                dh = torch.ops.aten.silu_backward(da, h)
        if need_w1:
            dw1 = _weight_grad(x_MD, dh, offs_E, g1)
        if need_w3 and dg is not None:
            dw3 = _weight_grad(x_MD, dg, offs_E, g1)
        if need_x:
            dx = _mm(dh, w1.transpose(1, 2), offs_E, g1)
            if dg is not None:
                dx = dx + _mm(dg, w3.transpose(1, 2), offs_E, g1)
        return dx, dw1, dw2, dw3, None, None, None


def check_grouped_mm_shapes(x_MD: torch.Tensor, w1: torch.Tensor) -> None:
    """`torch._grouped_mm` needs every non-unit stride, and the output rows, on 16 bytes: D and F a
    multiple of 16 / element size (4 in fp32, 8 in bf16). A clear error beats the kernel's."""
    per = 16 // x_MD.element_size()
    D, F_ = w1.shape[1], w1.shape[2]
    if D % per or F_ % per:
        raise ValueError(
            f"kernel_backend='grouped_mm': torch._grouped_mm needs hidden_size ({D}) and ffn_hidden_size ({F_}) "
            f"to be multiples of {per} in {x_MD.dtype} (16-byte rows); use kernel_backend='torch' or pad the sizes"
        )


def grouped_mm_aligned(D: int, F_: int, dtype: torch.dtype) -> bool:
    per = 16 // torch.empty((), dtype=dtype).element_size()
    return D % per == 0 and F_ % per == 0


def expert_ffn_grouped_mm(x_MD: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, w3: Optional[torch.Tensor],
                          offs_E: torch.Tensor, activation: str, gemm: str = "grouped_mm") -> torch.Tensor:
    """y_MD = FFN_e(rows of group e) for every expert e, sync-free.

    Args:
        x_MD: [M, D] rows grouped by expert; rows at or past offs_E[-1] are padding (output undefined).
        w1, w3: [E, D, F]; w2: [E, F, D] (w3 for swiglu only).
        offs_E: [E] int32 cumulative row ends on x's device (offs_E[-1] <= M).
        activation: one of gelu, relu, silu, swiglu.
        gemm: "grouped_mm", "triton_persistent" or "auto" (module docstring).
    """
    if gemm not in GEMMS:
        raise ValueError(f"expert_ffn_grouped_mm: gemm {gemm!r} is not one of {list(GEMMS)}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"expert_ffn_grouped_mm: activation {activation!r} is not one of {list(ACTIVATIONS)}")
    if (activation == "swiglu") != (w3 is not None):
        raise ValueError(f"expert_ffn_grouped_mm: activation {activation!r} {'needs' if w3 is None else 'takes no'} w3")
    if offs_E.dtype != torch.int32 or offs_E.dim() != 1 or offs_E.shape[0] != w1.shape[0]:
        raise ValueError(f"expert_ffn_grouped_mm: offs must be int32 [E={w1.shape[0]}], got {offs_E.dtype} "
                         f"{tuple(offs_E.shape)}")
    check_grouped_mm_shapes(x_MD, w1)
    w1, w2 = w1.contiguous(), w2.contiguous()
    w3 = w3.contiguous() if w3 is not None else None
    if gemm == "auto" and x_MD.device.type != "cuda":
        gemm = "grouped_mm"  # CPU: exactly the torch path, nothing measured
    return _GroupedMMFFN.apply(x_MD, w1, w2, w3, offs_E, activation, gemm)
