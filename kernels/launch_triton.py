"""Helpers shared by the Triton launchers: argument checks and interpreter-aware kernel settings.

Every `*_triton.py` file checks its arguments here before launching, so a bad call raises a
Python error naming the argument and the values instead of a Triton compile error or a bad read.
"""
from __future__ import annotations

import torch

from .backend import interpreting

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
INDEX_DTYPES = (torch.int32, torch.int64)


def check_dim(op: str, name: str, t: torch.Tensor, dims: int, layout: str) -> None:
    if t.dim() != dims:
        raise ValueError(f"{op}: {name} must be {dims}-D {layout}, got shape {tuple(t.shape)}")


def check_dtype(op: str, name: str, t: torch.Tensor, allowed: tuple) -> None:
    if t.dtype not in allowed:
        names = ", ".join(str(d).replace("torch.", "") for d in allowed)
        raise TypeError(f"{op}: {name} has dtype {t.dtype}; expected one of {names}")


def check_contiguous(op: str, name: str, t: torch.Tensor) -> None:
    if not t.is_contiguous():
        raise ValueError(f"{op}: {name} must be contiguous, got shape {tuple(t.shape)} strides {t.stride()}")


def check_unit_last_stride(op: str, name: str, t: torch.Tensor) -> None:
    # row kernels load whole row chunks as one vector: the last dim must be dense
    if t.shape[-1] > 1 and t.stride(-1) != 1:
        raise ValueError(f"{op}: {name} must have unit stride in its last dim, got strides {t.stride()}")


def check_same_device(op: str, **tensors: torch.Tensor) -> None:
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    if len(set(devices.values())) > 1:
        where = ", ".join(f"{n} on {d}" for n, d in devices.items())
        raise ValueError(f"{op}: all tensors must be on one device, got {where}")


def upcast_operands() -> bool:
    """True under TRITON_INTERPRET=1: the interpreter's tl.dot on bf16 operands runs numpy
    integer arithmetic on the raw bits (garbage), so interpreted kernels upcast to fp32 first.
    On GPU the operands stay 16-bit so tl.dot uses the tensor cores."""
    return interpreting()


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot input precision. fp32 follows torch's matmul TF32 switch so the Triton path gives
    the same numbers as torch.mm; 16-bit inputs ignore the setting (fp32 accumulate either way)."""
    if interpreting():
        return "ieee"
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def tile_configs(rows) -> list:
    """Autotune configs from (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) rows."""
    import triton

    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
            for bm, bn, bk, w, s in rows]
