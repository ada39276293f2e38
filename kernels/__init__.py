"""moesys.kernels: grouped GEMM, permute/unpermute and routing kernels (Triton) with torch paths.

Installed as `moesys.kernels` (folder `kernels/`); never importable as a top-level `kernels`.
"""
if __name__ == "kernels":
    # A Python started in the repository root (python -c, a REPL, a notebook, pytest) finds this
    # folder first under the top-level name `kernels`, which belongs to Hugging Face's kernel loader
    # (transformers imports it). Hand the import over to the installed package, or fail exactly as
    # if this folder were not there.
    import importlib.machinery as _machinery
    import importlib.util as _util
    import os as _os
    import sys as _sys

    _repo = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
    _path = [p for p in _sys.path if _os.path.abspath(p or _os.curdir) != _repo]
    _spec = _machinery.PathFinder.find_spec("kernels", _path)
    if _spec is None:
        raise ModuleNotFoundError("No module named 'kernels'", name="kernels")
    _sys.modules["kernels"] = _real = _util.module_from_spec(_spec)
    _spec.loader.exec_module(_real)
else:
    from .backend import resolve as resolve_backend
    from .grouped_gemm import grouped_gemm, grouped_gemm_reference
    from .permute import permute, unpermute
    from .topk_softmax import topk_softmax, topk_softmax_reference

    __all__ = ["grouped_gemm", "grouped_gemm_reference", "permute", "unpermute", "resolve_backend",
               "topk_softmax", "topk_softmax_reference"]
