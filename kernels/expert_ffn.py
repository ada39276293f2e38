"""Old path of the fused expert FFN: it lives in grouped_gemm.py now, beside the grouped GEMM whose
torch path (`_mm_rows`, `_mm_weight`) it shares. Re-exported here for one release."""
from .grouped_gemm import ACTIVATIONS, expert_ffn_torch

__all__ = ["ACTIVATIONS", "expert_ffn_torch"]
