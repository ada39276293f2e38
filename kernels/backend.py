"""Which implementation a kernel call takes: Triton on CUDA, the torch path elsewhere.

`TRITON_INTERPRET=1` makes the Triton path runnable on CPU (slowly) for tests; a config setting
(`MoEConfig.kernel_backend`) can force either path.
"""
from __future__ import annotations

import os

import torch

BACKENDS = ("auto", "torch", "triton")


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


def resolve(backend: str, device: torch.device) -> str:
    """Return "torch" or "triton" for a call on `device`.

    "auto" picks Triton only where it can run: on CUDA, or on CPU under TRITON_INTERPRET=1.
    Forcing "triton" where it cannot run is an error rather than a silent fallback.
    """
    if backend not in BACKENDS:
        raise ValueError(f"kernel backend {backend!r} is not one of {list(BACKENDS)}")
    can_triton = triton_available() and (device.type == "cuda" or (device.type == "cpu" and interpreting()))
    if backend == "torch":
        return "torch"
    if backend == "triton":
        if not can_triton:
            raise RuntimeError(
                f"kernel backend 'triton' was forced but cannot run on device {device}: "
                "Triton needs a CUDA device, or TRITON_INTERPRET=1 on CPU"
            )
        return "triton"
    return "triton" if (can_triton and device.type == "cuda") else "torch"
