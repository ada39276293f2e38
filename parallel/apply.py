"""apply_expert_parallel: shard a single-device MoELayer over an expert-parallel group, in place.

    dims = ParallelDims.build(ep=4)
    apply_expert_parallel(layer, dims.ep_group, dims=dims)                 # dropless all-to-all-v, auto mode
    apply_expert_parallel(layer, dims.ep_group, dims=dims, dispatcher="hierarchical", mode="ep", overlap=2)

Adaptive decisions are global: by default every rank of the job takes part in each layer's
decisions (`agree_group`, default the world), so every rank of the world must apply every layer,
in the same order, as it must run its forward.

Rank r of P keeps experts [r*E/P, (r+1)*E/P) as slices of the weights it already holds (so every
rank must start from the same weights, e.g. the same seed); with P > E each expert's F is split
over P/E ranks. The weights become DTensor parameters of the global shape ([E, D, F], Shard(0)
over the ep mesh; `experts.local_weights()` is this rank's part), so FSDP2, DCP and torch's
gradient clipping see where they live. Before any all-to-all the ranks compare the layer's structural config hash and the
options: a mismatch raises naming the fields, rather than hanging in a collective.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Optional, Union

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor

from moesys.moe.experts import FFN_DIM, ExpertSharding, slice_ffn
from moesys.moe.layer import MoELayer

from .comm import GroupRef, comm_device
from .cost_model import DISPATCHERS, PADDED
from .dispatch_allgather import AllGatherDispatcher
from .dispatch_alltoallv import AllToAllVDispatcher
from .dispatch_hierarchical import HierarchicalDispatcher
from .dispatch_hierarchical_padded import HierarchicalPaddedDispatcher
from .dispatch_padded import PaddedDispatcher
from .layout import ExpertLayout
from .mesh import ParallelDims, borrow_groups
from .probe import probe_machine
from .runner import ExpertParallelRunner
from .sharded_dp import ShardedDataParallel
from .timing import clock_for
from .tuner import DEGREES, MODES, Shape, Tuner, TunerSettings


@dataclass
class ExpertParallelConfig:
    """Options of apply_expert_parallel; any field can be pinned by a config file or keyword."""

    dispatcher: str = "alltoallv"
    mode: str = "auto"  # "auto" | "ep" | "sharded_dp"
    overlap: Union[str, int] = "auto"  # "auto" | 1 | 2 | 4 | 8
    timeout_s: float = 300.0
    tuner: TunerSettings = field(default_factory=TunerSettings)
    # expert weights as DTensor parameters over the ep mesh (FSDP2, DCP, torch's clipping see their
    # layout); False keeps the plain local shards, for engines that flatten parameter storage
    # (DeepSpeed ZeRO, Megatron DDP)
    dtensor: bool = True
    # the padded dispatcher with a static buffer of max(1, ceil(f * T * K / E)) rows per (source
    # rank, expert): no agreement collective and no host read on the dispatch (None: C agreed per step)
    static_capacity_factor: Optional[float] = None
    # rows past the static buffer: "drop" (counted in runtime/overflow_dropped) | "error" (one
    # all-reduce after the combine; every rank raises) | "rerun" (the layer drops and counts as
    # "drop"; the caller, moesys' trainer, re-runs the step with a grown factor: parallel/overflow.py)
    overflow: str = "drop"

    def __post_init__(self) -> None:
        if isinstance(self.tuner, dict):
            self.tuner = TunerSettings(**self.tuner)
        if self.dispatcher not in DISPATCHERS:
            raise ValueError(f"ExpertParallelConfig.dispatcher={self.dispatcher!r} is not one of {list(DISPATCHERS)}")
        if self.mode not in ("auto",) + MODES:
            raise ValueError(f"ExpertParallelConfig.mode={self.mode!r} is not one of {['auto', *MODES]}")
        if self.overlap != "auto" and self.overlap not in DEGREES:
            raise ValueError(f"ExpertParallelConfig.overlap={self.overlap!r} is not one of {['auto', *DEGREES]}")
        if not self.timeout_s > 0:
            raise ValueError(f"ExpertParallelConfig.timeout_s must be > 0, got {self.timeout_s}")
        f = self.static_capacity_factor
        if f is not None:
            if isinstance(f, bool) or not isinstance(f, (int, float)) or not math.isfinite(f) or not f > 0:
                raise ValueError(f"ExpertParallelConfig.static_capacity_factor must be a finite number > 0 or None, "
                                 f"got {f!r}")
            if self.dispatcher not in PADDED:
                raise ValueError(f"ExpertParallelConfig.static_capacity_factor={f} needs dispatcher='padded' or "
                                 f"'hierarchical_padded' (a fixed buffer), got dispatcher={self.dispatcher!r}")
        if self.overflow not in ("drop", "error", "rerun"):
            raise ValueError(f"ExpertParallelConfig.overflow={self.overflow!r} is not one of ['drop', 'error', 'rerun']")
        if self.overflow != "drop" and f is None:
            raise ValueError(f"ExpertParallelConfig.overflow={self.overflow!r} applies to a static buffer only: set "
                             "static_capacity_factor too")
        # pins flow into the tuner
        self.tuner.mode = None if self.mode == "auto" else self.mode
        self.tuner.degree = None if self.overlap == "auto" else int(self.overlap)


def _check_agreement(layer, epc: ExpertParallelConfig, group) -> None:
    """Every rank must hold the same layer structure and options, else collectives mismatch."""
    mine = {"cfg_hash": layer.cfg.structural_hash(), "cfg": layer.cfg.to_dict(), "options": asdict(epc)}
    everyone = [None] * dist.get_world_size(group)
    dist.all_gather_object(everyone, mine, group=group)
    for r, other in enumerate(everyone):
        if other["cfg_hash"] != mine["cfg_hash"] or other["options"] != mine["options"]:
            diff = {k: (mine["cfg"][k], other["cfg"][k]) for k in mine["cfg"] if mine["cfg"][k] != other["cfg"].get(k)}
            diff.update({f"option {k}": (mine["options"][k], other["options"][k])
                         for k in mine["options"] if mine["options"][k] != other["options"].get(k)})
            raise ValueError(
                f"apply_expert_parallel: the layer config differs between ep rank {dist.get_rank(group)} and "
                f"ep rank {r} (field: (this rank, that rank)): {diff}"
            )


def _expert_mesh(group, dims: Optional[ParallelDims], layout: ExpertLayout):
    """The DeviceMesh the expert weights become DTensors over (see ParallelDims.expert_mesh)."""
    if dims is not None and dims.mesh is not None:
        if dims.ep != layout.world:
            raise ValueError(f"apply_expert_parallel: dims.ep ({dims.ep}) differs from the ep group's size ({layout.world})")
        return dims.expert_mesh_for(layout.shards)
    if layout.shards > 1:
        if dist.get_world_size(group) != dist.get_world_size():
            raise ValueError("apply_expert_parallel: experts split along F (ep group larger than num_experts) on a "
                             f"sub-world group need dims=ParallelDims.build(ep={layout.world}, "
                             f"num_experts={layout.num_experts})")
        # the world is the ep group: its F-shard mesh (collective, like this call)
        return ParallelDims.build(ep=layout.world, num_experts=layout.num_experts).expert_mesh

    device_type = "cuda" if dist.get_backend(group) == "nccl" else "cpu"
    mesh = DeviceMesh.from_group(group, device_type, mesh_dim_names=("ep",))
    borrow_groups(mesh)
    return mesh


def _shard_experts(experts, layout: ExpertLayout, mesh, dtensor: bool) -> None:
    """Replace w1/w2/w3 by this rank's slices (clones: the full weights can be freed), as DTensor
    parameters of the global shape over `mesh` (or the plain local slices, dtensor=False)."""

    sharding = ExpertSharding(mesh=mesh, first=layout.expert_slice.start, count=layout.local_experts,
                              f_slice=layout.f_slice, shards=layout.shards)
    for name in FFN_DIM:
        w = getattr(experts, name, None)
        if w is None:
            continue
        part = slice_ffn(name, w.detach()[layout.expert_slice], layout.f_slice).clone()
        if dtensor:
            part = DTensor.from_local(part, mesh, sharding.placements_for(name), run_check=False,
                                      shape=w.shape, stride=w.stride())
        setattr(experts, name, nn.Parameter(part, requires_grad=w.requires_grad))
    experts.sharding = sharding


def _hierarchical_groups(group, dims: Optional[ParallelDims], P: int, timeout_s: float):
    """(node_group, cross_group, ranks per node) for the hierarchical dispatcher, from the mesh."""
    if dims is None:
        if dist.get_world_size(group) != dist.get_world_size():
            raise ValueError("hierarchical dispatcher on an ep group smaller than the world needs "
                             "dims=ParallelDims.build(ep=..., local_world_size=...)")
        dims = ParallelDims.build(ep=P, timeout_s=timeout_s)  # collective, like this call
    if dims.ep_node_group is not None:
        return dims.ep_node_group, dims.ep_cross_group, dims.local_world_size // dims.tp
    # one stage is the identity (the ep group fits in a node, or one rank per node): no sub-groups
    return None, None, min(max(dims.local_world_size // dims.tp, 1), P)


def apply_expert_parallel(layer, ep_group=None, *, dims: Optional[ParallelDims] = None,
                          config: Optional[ExpertParallelConfig] = None, agree_group=None, **options):
    """Shard `layer` (a moesys MoELayer) over `ep_group` in place and install the runner; returns layer.

    Args:
        ep_group: the expert-parallel process group (default dims.ep_group, else the world).
        dims: the ParallelDims (needed for the hierarchical dispatcher on a sub-world group).
        agree_group: the ranks that take the adaptive runtime's decisions together: every rank whose
            collectives can meet this layer's (default: the world). It must contain ep_group.
        config: an ExpertParallelConfig; keyword options override its fields:
            dispatcher ("alltoallv" | "padded" | "hierarchical" | "hierarchical_padded" | "allgather"),
            mode ("auto" | "ep" | "sharded_dp"), overlap ("auto" | 1 | 2 | 4 | 8), timeout_s,
            tuner (TunerSettings or dict), dtensor (default True: expert weights become DTensor
            parameters over the ep mesh),
            static_capacity_factor (None | f > 0: the padded dispatchers' static buffer, see
            dispatch_padded.py), overflow ("drop" | "error" | "rerun": rows past that buffer).
    """
    base = asdict(config) if config is not None else {}
    unknown = set(options) - {f.name for f in fields(ExpertParallelConfig)}
    if unknown:
        raise TypeError(f"apply_expert_parallel: unknown options {sorted(unknown)}")
    epc = ExpertParallelConfig(**{**base, **options})
    if not dist.is_initialized():
        raise RuntimeError("apply_expert_parallel: torch.distributed is not initialised")
    group = ep_group if ep_group is not None else (dims.ep_group if dims is not None else dist.group.WORLD)
    P, rank = dist.get_world_size(group), dist.get_rank(group)
    experts = layer.experts
    if experts.sharding is not None:
        raise RuntimeError("apply_expert_parallel: the layer is already sharded")
    cfg = layer.cfg
    layout = ExpertLayout(world=P, rank=rank, num_experts=cfg.num_experts, ffn_size=cfg.ffn_hidden_size)
    if agree_group is not None:
        outside = set(dist.get_process_group_ranks(group)) - set(dist.get_process_group_ranks(agree_group))
        if outside:
            raise ValueError(f"apply_expert_parallel: agree_group must contain the ep group; ranks {sorted(outside)} "
                             "are in the ep group only")
    if epc.static_capacity_factor is not None and cfg.variable_k:
        raise ValueError(f"apply_expert_parallel: static_capacity_factor={epc.static_capacity_factor} needs a fixed "
                         f"number of routes per token (C = f*T*K/E); router={cfg.router!r} routes a variable number")
    _check_agreement(layer, epc, group)

    common = dict(timeout_s=epc.timeout_s)
    if epc.dispatcher in PADDED:
        common.update(static_capacity_factor=epc.static_capacity_factor, top_k=cfg.top_k)
    # dispatcher_for also builds the dispatcher of a placement with replicas (parallel/placement.py),
    # later, from the runner: it holds the groups weakly (GroupRef), as the dispatchers do, so that
    # destroy_process_group() can still destroy them
    ep_ref = GroupRef(group)
    if epc.dispatcher in ("hierarchical", "hierarchical_padded"):
        node, cross, lw = _hierarchical_groups(group, dims, P, epc.timeout_s)
        node_ref, cross_ref = GroupRef(node), GroupRef(cross)
        del node, cross
        cls = HierarchicalDispatcher if epc.dispatcher == "hierarchical" else HierarchicalPaddedDispatcher

        def dispatcher_for(lay: ExpertLayout):
            return cls(lay, ep_ref.get(), node_group=node_ref.get(), cross_group=cross_ref.get(), local_world_size=lw,
                       **common)
    else:
        cls = {"alltoallv": AllToAllVDispatcher, "padded": PaddedDispatcher, "allgather": AllGatherDispatcher}

        def dispatcher_for(lay: ExpertLayout):
            return cls[epc.dispatcher](lay, ep_ref.get(), **common)
    dispatcher = dispatcher_for(layout)

    dtype = experts.w1.dtype
    _shard_experts(experts, layout, _expert_mesh(group, dims, layout), epc.dtensor)
    shape = Shape(world=P, num_experts=cfg.num_experts, hidden=cfg.hidden_size, ffn=cfg.ffn_hidden_size,
                  matrices=3 if cfg.gated else 2, dtype_bytes=torch.empty((), dtype=dtype).element_size())
    agree = agree_group if agree_group is not None else dist.group.WORLD
    # CUDA events on a GPU, the host clock on CPU (meta weights, see materialize: where the group's tensors live)
    clock = clock_for(experts.w1.device if experts.w1.device.type != "meta" else comm_device(group))
    tuner = Tuner(settings=epc.tuner, shape=shape, machine=None, group=agree, dispatcher=epc.dispatcher)
    if not tuner.pinned:
        tuner.machine = probe_machine(group, dtype, agree_group=agree, clock=clock)
    runner = ExpertParallelRunner(layout=layout, group=group, dispatcher=dispatcher,
                                  sharded=ShardedDataParallel(layout, group, epc.timeout_s), tuner=tuner,
                                  agree_group=agree, overflow=epc.overflow, clock=clock, dispatcher_for=dispatcher_for)
    layer.set_runner(runner)
    if not tuner.pinned and experts.w1.device.type != "meta":  # meta weights: materialize() watches them
        runner.watch_params([experts.w1, experts.w2, experts.w3])
    return layer


def materialize(model: nn.Module, device) -> nn.Module:
    """Allocate, uninitialised, on `device` a model built on the meta device and then made parallel
    (apply_expert_parallel, apply_fsdp): every rank allocates only what it holds (a DTensor's local
    shard, DeepSpeed's local experts), never the whole model; fill it afterwards (moesys.hf.load_into).
    Parameters keep their identity (torch's swap_tensors), so tied weights, FSDP2's references and
    the runners' references hold; the runners' backward marks are registered on the new tensors
    (a swap drops autograd hooks, so apply_expert_parallel leaves meta weights unwatched). Returns model.

        with torch.device("meta"):
            model = Decoder(dcfg, moe_cfg)
        for _, layer in model.moe_layers():
            apply_expert_parallel(layer, dims.ep_group, dims=dims)
        materialize(model, "cpu")
        moesys.hf.load_into(model, hf_dir)
    """
    before = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(True)
    try:
        model.to_empty(device=device)
    finally:
        torch.__future__.set_swap_module_params_on_conversion(before)
    for m in model.modules():
        runner = m.runner if isinstance(m, MoELayer) else None
        if isinstance(runner, ExpertParallelRunner) and not runner.tuner.pinned:
            runner.watch_params([m.experts.w1, m.experts.w2, m.experts.w3])
    return model


def localize_experts(model: nn.Module) -> int:
    """Turn every MoE layer's DTensor expert weights into plain Parameters holding this rank's shard
    (for engines that flatten parameter storage: DeepSpeed ZeRO, Megatron DDP); the experts'
    `sharding` keeps their place in the global tensors. Returns how many weights changed. Call
    before building the optimizer."""

    changed = 0
    for m in model.modules():
        if not isinstance(m, MoELayer):
            continue
        ex, here = m.experts, 0
        for name in FFN_DIM:
            w = getattr(ex, name, None)
            if isinstance(w, DTensor):
                setattr(ex, name, nn.Parameter(w.detach().to_local().clone(), requires_grad=w.requires_grad))
                here += 1
        changed += here
        runner = m.runner
        if here and isinstance(runner, ExpertParallelRunner) and not runner.tuner.pinned:
            runner.watch_params([ex.w1, ex.w2, ex.w3])  # the tuner's backward marks, on the new tensors
    return changed
