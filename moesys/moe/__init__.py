"""moesys.moe: the single-device MoE core.

The bottom layer above the kernels: the layer's config, routing (routers and dense-to-sparse gates),
the routing plan (plain and static), balance losses and metrics, the experts, the layer itself and
the runner protocol with its single-device runner. It imports `moesys.kernels` and nothing above it:
the expert-parallel runtime (`moesys.parallel`) builds on it, the application (`moesys.*`) on both.
"""
from .config import MoEConfig
from .layer import LocalRunner, MoEAux, MoELayer
from .runner import Runner

__all__ = ["MoEConfig", "MoELayer", "MoEAux", "LocalRunner", "Runner"]
