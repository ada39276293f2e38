"""moesys.kernels: grouped GEMM, permute/unpermute and routing kernels (Triton) with torch paths.

Installed as `moesys.kernels` (folder `kernels/`); never importable as a top-level `kernels`.
"""
from .backend import resolve as resolve_backend
from .grouped_gemm import grouped_gemm, grouped_gemm_reference
from .permute import permute, unpermute
from .topk_softmax import topk_softmax, topk_softmax_reference

__all__ = ["grouped_gemm", "grouped_gemm_reference", "permute", "unpermute", "resolve_backend",
           "topk_softmax", "topk_softmax_reference"]
