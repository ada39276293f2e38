"""apply_fsdp: FSDP2 (`fully_shard`, ZeRO-3) over the job's DeviceMesh, composed with expert parallelism.

    dims = ParallelDims.build(ep=2)                      # 4 ranks: edp=2 x ep=2
    for _, layer in model.moe_layers():
        apply_expert_parallel(layer, dims.ep_group, dims=dims)   # experts: DTensors, Shard(0) over ep
    apply_fsdp(model, dims)                               # then: optimizer over model.parameters()

Layout (torchtitan's): every MoE layer's `experts` module is its own FSDP unit over the edp mesh
(the ranks that hold the same experts), so an expert weight ends up a DTensor over (edp, ep):
sharded over ep by expert parallelism and over edp by FSDP. Each transformer block is a unit over
the dp mesh (attention, norms, routers, shared experts, EvoMoE's dense FFN), and the root takes
the embeddings and the head. Parameters are gathered before a unit's forward and backward and
freed after (`reshard_after_forward`); gradients are reduce-scattered in `reduce_dtype`.

Gradient scaling: a dense gradient is averaged over dp (FSDP's default). An expert's gradient
already sums the tokens of its whole ep group (the all-to-all brought them), so the mean over the
dp ranks' losses is the sum over edp divided by dp, not by edp: the experts' units divide by dp
(`set_gradient_divide_factor`). This is the plain engine's `allreduce_gradients`, done by FSDP.

The MoE layer calls its experts module once per forward, whatever the runtime does inside
(several overlap chunks, or the sharded-DP mode's weight all-gather over ep), so FSDP gathers the
edp shards once per layer and its post-backward fires once.
"""
from __future__ import annotations

from typing import Iterable, Optional

import torch
import torch.distributed as dist
import torch.nn as nn

from moesys.moe.layer import MoELayer

from .mesh import ParallelDims

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, None: None}


def _dtype(name, field: str):
    if isinstance(name, torch.dtype) or name is None:
        return name
    if name not in _DTYPES:
        raise ValueError(f"apply_fsdp: {field}={name!r} is not one of fp32|bf16")
    return _DTYPES[name]


def _moe_layers(model: nn.Module) -> list:
    return [m for m in model.modules() if isinstance(m, MoELayer)]


def _expert_shard_dim(experts, edp: int):
    """FSDP's shard dim for an experts unit: dim 0 (the local experts) when edp divides their number,
    else dim 1 (D for w1/w3, F for w2) when edp divides it (FSDP2 shards other dims only evenly),
    else dim 0 padded (a rank may then hold a padded, partly empty shard)."""
    from torch.distributed.tensor import Shard

    local = experts.num_local_experts
    even_dim1 = all(w is None or w.shape[1] % edp == 0 for w in (experts.w1, experts.w2, experts.w3))
    dim = 0 if local % edp == 0 or not even_dim1 else 1
    return lambda p: Shard(dim)


def apply_fsdp(model: nn.Module, dims: ParallelDims, *, blocks: Optional[Iterable[nn.Module]] = None,
               reshard_after_forward: bool = True, param_dtype=None, reduce_dtype="fp32") -> nn.Module:
    """Shard `model` in place with FSDP2 over `dims`' mesh; returns model.

    Args:
        dims: the job's ParallelDims (its mesh: dp for dense weights, edp for experts).
        blocks: the modules to make units of (default `model.blocks`, e.g. GPTMoE's transformer
            blocks); the root unit takes what they leave.
        reshard_after_forward: free gathered parameters after each unit's forward (ZeRO-3; the
            backward gathers again), or keep them until the backward (ZeRO-2-like, more memory).
        param_dtype: "bf16" to gather and compute in bf16 (FSDP2's MixedPrecisionPolicy); default
            the parameters' own dtype. reduce_dtype: the gradient reduce-scatter's dtype ("fp32").

    Call after apply_expert_parallel (experts must already be DTensors over the ep mesh) and before
    building the optimizer. Every rank calls it (it is collective over the mesh).
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if dims.mesh is None:
        raise ValueError("apply_fsdp: dims has no DeviceMesh (ParallelDims.build makes one; Megatron's groups do not)")
    if dims.tp != 1:
        raise ValueError(f"apply_fsdp: tensor parallelism (tp={dims.tp}) is not supported with FSDP here")
    layers = _moe_layers(model)
    for layer in layers:
        ex = layer.experts
        if dims.ep > 1 and (ex.sharding is None or not hasattr(ex.w1, "device_mesh")):
            raise ValueError("apply_fsdp: with parallel.ep > 1 call apply_expert_parallel(layer, ..., dtensor=True) "
                             "on every MoE layer first (its experts must be DTensors over the ep mesh)")
        if ex.sharding is not None and ex.sharding.shards > 1:
            raise ValueError(
                f"apply_fsdp: ep ({dims.ep}) > num_experts ({ex.num_experts}) splits each expert along F over "
                f"{ex.sharding.shards} ranks (a 2-D DTensor); FSDP2 composes with one expert-parallel dim only. "
                f"Use ep <= num_experts with FSDP (the edp dim then shards the experts)")
    mp = MixedPrecisionPolicy(param_dtype=_dtype(param_dtype, "param_dtype"),
                              reduce_dtype=_dtype(reduce_dtype, "reduce_dtype"))
    common = dict(reshard_after_forward=reshard_after_forward, mp_policy=mp)
    if dims.ep > 1:
        edp_mesh = dims.mesh["edp"]
        for layer in layers:
            unit = fully_shard(layer.experts, mesh=edp_mesh,
                               shard_placement_fn=_expert_shard_dim(layer.experts, dims.edp), **common)
            # experts' grads: summed over edp, divided by dp (see the module docstring); NCCL does it
            # in the reduce-scatter (PREMUL_SUM), gloo has no such op: a sum, then the division.
            # (With edp = 1 there is no collective and FSDP2 divides in its copy; forcing the sum as
            # well would divide twice: torch 2.13, tests/parallel/test_fsdp_units.py's ep=4 cases.)
            unit.set_gradient_divide_factor(float(dims.dp))
            if dims.edp > 1 and dist.get_backend(edp_mesh.get_group()) == "gloo":
                unit.set_force_sum_reduction_for_comms(True)
    if blocks is None:
        blocks = list(getattr(model, "blocks", []))
    for block in blocks:
        fully_shard(block, mesh=dims.dp_mesh, **common)
    # the root: embeddings, final norm, head; it is gathered first and freed last anyway
    fully_shard(model, mesh=dims.dp_mesh, reshard_after_forward=False, mp_policy=mp)
    return model


def is_fsdp(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)
