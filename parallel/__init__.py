"""moesys.parallel: the expert-parallel runtime (installed from the top-level folder parallel/).

    from moesys.parallel import ParallelDims, apply_expert_parallel, simulate
    dims = ParallelDims.build(ep=4)                       # after dist.init_process_group
    apply_expert_parallel(layer, dims.ep_group, dims=dims)   # shard a MoELayer in place

Mesh and groups (mesh.py), differentiable collectives (comm.py), one dispatcher per file
(dispatch_*.py), expert-sharded data parallel (sharded_dp.py), the runner and its tuner
(runner.py, tuner.py), FSDP2 over the same mesh (fsdp.py), the plain engine's gradient reduction
overlapped with the backward (grad_overlap.py), simulated ranks on one machine (simulate.py: one
spawn per call, or a RankPool of ranks kept across calls).
"""
from .apply import DISPATCHERS, ExpertParallelConfig, apply_expert_parallel, localize_experts, materialize
from .dispatch_allgather import AllGatherDispatcher
from .dispatch_alltoallv import AllToAllVDispatcher
from .dispatch_base import Dispatcher
from .dispatch_hierarchical import HierarchicalDispatcher
from .dispatch_hierarchical_padded import HierarchicalPaddedDispatcher
from .dispatch_padded import PaddedDispatcher
from .fsdp import apply_fsdp
from .grad_overlap import OverlappedGradReducer
from .layout import ExpertLayout
from .mesh import (
    ExpertParamGroups,
    ParallelDims,
    allreduce_gradients,
    clip_grad_norm_,
    expert_param_groups,
    expert_parameters,
    mesh_ranks,
)
from .runner import ExpertParallelRunner
from .simulate import RankPool, simulate
from .tuner import Machine, Stats, Tuner, TunerSettings

__all__ = [
    "apply_expert_parallel", "apply_fsdp", "localize_experts", "materialize", "ExpertParallelConfig", "DISPATCHERS",
    "ParallelDims", "mesh_ranks",
    "allreduce_gradients", "OverlappedGradReducer", "clip_grad_norm_", "expert_param_groups", "ExpertParamGroups",
    "expert_parameters", "Dispatcher", "AllToAllVDispatcher", "PaddedDispatcher", "HierarchicalDispatcher",
    "HierarchicalPaddedDispatcher", "AllGatherDispatcher",
    "ExpertLayout", "ExpertParallelRunner", "simulate", "RankPool", "Tuner", "TunerSettings", "Machine", "Stats",
]
