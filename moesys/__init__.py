"""moesys: an expert-parallel Mixture-of-Experts training system.

Public contract:
    from moesys import MoEConfig, MoELayer
    y, aux = MoELayer(MoEConfig(hidden_size=D, ffn_hidden_size=F, num_experts=E, top_k=K))(x)
    from moesys import parallel, kernels   # folders parallel/ and kernels/, installed under moesys
"""
from .moe import LocalRunner, MoEAux, MoEConfig, MoELayer

__all__ = ["MoEConfig", "MoELayer", "MoEAux", "LocalRunner", "update_expert_biases"]
__version__ = "0.1.0"


def update_expert_biases(model, group=None) -> None:
    """Apply the aux-loss-free bias update to every MoELayer in `model` (after optimizer.step())."""
    for m in model.modules():
        if isinstance(m, MoELayer):
            m.update_expert_bias(group)


def __getattr__(name):
    # `moesys.parallel` / `moesys.kernels` are subpackages; import lazily so `import moesys`
    # stays light and never imports torch.distributed machinery it does not need.
    if name in ("parallel", "kernels"):
        import importlib

        return importlib.import_module(f"moesys.{name}")
    raise AttributeError(f"module 'moesys' has no attribute {name!r}")
