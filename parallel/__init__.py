"""moesys.parallel: the expert-parallel runtime (installed from the top-level folder parallel/).

    from moesys.parallel import ParallelDims, apply_expert_parallel, simulate
    dims = ParallelDims.build(ep=4)                       # after dist.init_process_group
    apply_expert_parallel(layer, dims.ep_group, dims=dims)   # shard a MoELayer in place

Mesh and groups (mesh.py), differentiable collectives (comm.py), one dispatcher per file
(dispatch_*.py), expert-sharded data parallel (sharded_dp.py), the runner and its tuner
(runner.py, tuner.py), simulated ranks on one machine (simulate.py).
"""
from .apply import DISPATCHERS, ExpertParallelConfig, apply_expert_parallel
from .dispatch_allgather import AllGatherDispatcher
from .dispatch_alltoallv import AllToAllVDispatcher
from .dispatch_base import Dispatcher
from .dispatch_hierarchical import HierarchicalDispatcher
from .dispatch_padded import PaddedDispatcher
from .layout import ExpertLayout
from .mesh import (ExpertParamGroups, ParallelDims, allreduce_gradients, expert_param_groups, is_expert_param,
                   mark_expert_param, mesh_ranks)
from .runner import ExpertParallelRunner
from .simulate import simulate
from .tuner import Machine, Stats, Tuner, TunerSettings

__all__ = [
    "apply_expert_parallel", "ExpertParallelConfig", "DISPATCHERS", "ParallelDims", "mesh_ranks",
    "allreduce_gradients", "expert_param_groups", "ExpertParamGroups", "is_expert_param", "mark_expert_param",
    "Dispatcher", "AllToAllVDispatcher", "PaddedDispatcher", "HierarchicalDispatcher", "AllGatherDispatcher",
    "ExpertLayout", "ExpertParallelRunner", "simulate", "Tuner", "TunerSettings", "Machine", "Stats",
]
