"""Which implementation a kernel call takes.

"auto": on CUDA, grouped GEMMs take the torch path when `torch._grouped_mm` runs there for their
dtype (bf16 on Hopper: measured 0.94x a dense matmul against 0.65x for our Triton kernel on an
H200, `benchmarks/kernels.py`), and Triton otherwise (fp32, older GPUs); the other kernels
(permute, top-k) take Triton on CUDA. On CPU everything takes the torch path.
"grouped_mm" (and "auto" on CUDA where the `torch._grouped_mm` probe passes for the experts' dtype)
selects the layer's sync-free path (moesys/moe/static_plan.py, `sync_free`); its single kernel calls
(permute, top-k, grouped GEMM) take the torch path.
"triton_persistent": grouped GEMMs through the persistent Triton kernel (grouped_gemm_persistent.py,
TMA loads on sm90+); the other kernels through the ordinary Triton ones (it resolves to "triton").
Under "auto" on CUDA a grouped GEMM that would take `torch._grouped_mm` instead takes whichever of
it and the persistent kernel measured faster for its shape bucket (gemm_select.py).
`TRITON_INTERPRET=1` makes the Triton path runnable on CPU (slowly) for tests; a config setting
(`MoEConfig.kernel_backend`) can force either path.
"""
from __future__ import annotations

import os
from typing import Optional

import torch

BACKENDS = ("auto", "torch", "triton", "triton_persistent", "grouped_mm")


def _probe_triton() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:  # ImportError or a broken install: the torch path still works
        return False
    return True


# probed once at import (a plain value: torch.compile traces through it, unlike an lru_cache)
_TRITON_AVAILABLE = _probe_triton()


def triton_available() -> bool:
    return _TRITON_AVAILABLE


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# (device type, index, dtype) -> whether torch._grouped_mm runs and gives the right answer there
_GROUPED_MM_OK: dict = {}


def _probe_grouped_mm(device: torch.device, dtype: torch.dtype) -> bool:
    """Run both forms moesys uses (rows: 2-D x 3-D; weight grads: 2-D x 2-D over the row groups)
    on a tiny case with an empty group, against per-group matmuls. Any error means unsupported."""
    try:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(24, 16, generator=g).to(device, dtype)
        w = torch.randn(3, 16, 32, generator=g).to(device, dtype)
        dy = torch.randn(24, 32, generator=g).to(device, dtype)
        offs = torch.tensor([8, 8, 24], dtype=torch.int32, device=device)
        y = torch._grouped_mm(x, w, offs=offs).float()
        dw = torch._grouped_mm(x.t(), dy, offs=offs).float()
        want_y = torch.cat([x[:8].float() @ w[0].float(), x[8:].float() @ w[2].float()])
        want_dw = [x[:8].t().float() @ dy[:8].float(), x[8:].t().float() @ dy[8:].float()]
        tol = 1e-4 if dtype == torch.float32 else 5e-2
        ok = torch.allclose(y, want_y, rtol=tol, atol=tol * 16)
        ok = ok and torch.allclose(dw[0], want_dw[0], rtol=tol, atol=tol * 16)
        return bool(ok and torch.allclose(dw[2], want_dw[1], rtol=tol, atol=tol * 16))
    except Exception:  # not built for this device/dtype/architecture: the caller takes another path
        return False


def grouped_mm_supported(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether `torch._grouped_mm` can serve grouped GEMMs of `dtype` on `device`.

    CPU: fp32 and bf16. CUDA: probed once per device and dtype (bf16 on sm90 in the torch releases
    we know; the probe keeps the answer right for others). Never probed while compiling."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    if device.type == "cpu":
        return dtype in (torch.float32, torch.bfloat16)
    if device.type != "cuda":
        return False
    index = device.index if device.index is not None else torch.cuda.current_device()
    key = ("cuda", index, dtype)
    if key not in _GROUPED_MM_OK:
        if torch.compiler.is_compiling():
            return False
        with torch.cuda.device(index):
            _GROUPED_MM_OK[key] = _probe_grouped_mm(torch.device("cuda", index), dtype)
    return _GROUPED_MM_OK[key]


def resolve(backend: str, device: torch.device, dtype: Optional[torch.dtype] = None) -> str:
    """Return "torch" or "triton" for a call on `device`.

    "auto" picks Triton only where it can run: on CUDA, or on CPU under TRITON_INTERPRET=1 when
    forced ("triton" or "triton_persistent", which resolves to "triton": the grouped GEMM tells the
    two apart itself). Given `dtype` (grouped GEMM calls), "auto" on CUDA prefers the torch path when
    `torch._grouped_mm` supports that dtype there. Forcing "triton" where it cannot run is an
    error rather than a silent fallback.
    """
    if backend not in BACKENDS:
        raise ValueError(f"kernel backend {backend!r} is not one of {list(BACKENDS)}")
    can_triton = triton_available() and (device.type == "cuda" or (device.type == "cpu" and interpreting()))
    if backend in ("torch", "grouped_mm"):
        return "torch"
    if backend in ("triton", "triton_persistent"):
        if not can_triton:
            raise RuntimeError(
                f"kernel backend {backend!r} was forced but cannot run on device {device}: "
                "Triton needs a CUDA device, or TRITON_INTERPRET=1 on CPU"
            )
        return "triton"
    if device.type == "cuda" and dtype is not None and grouped_mm_supported(device, dtype):
        return "torch"
    return "triton" if (can_triton and device.type == "cuda") else "torch"


def fused_on_triton(t: torch.Tensor) -> bool:
    """Whether the sync-free path's fused ops (route placement, static dispatch/combine, the router's
    softmax + top-k) run their Triton kernels for a tensor: on CUDA with Triton installed, chosen by
    the op itself. Everywhere else the torch bodies, CPU included whatever TRITON_INTERPRET says (the
    interpreter tests call the launchers, or patch each module's `_use_triton`)."""
    return t.device.type == "cuda" and triton_available()


def sync_free(backend: str, device: torch.device, dtype: torch.dtype) -> bool:
    """Whether the layer takes its sync-free path (static shapes, `torch._grouped_mm` with device
    offsets): forced by "grouped_mm" on any device (CPU included, so CI covers it); chosen by "auto"
    on CUDA where `torch._grouped_mm` runs for `dtype` (the probe above). Never on CPU by "auto": the
    CPU torch path (MKL batched GEMMs, gathers) stays the faster default there."""
    if backend == "grouped_mm":
        return True
    return backend == "auto" and device.type == "cuda" and grouped_mm_supported(device, dtype)
