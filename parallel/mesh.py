"""ParallelDims: the job's DeviceMesh and its process groups, built once and passed explicitly
(never global).

Rank layout (tp innermost, as Megatron): global rank = dp_index * tp + tp_index.
  dp group   : ranks with the same tp_index (size dp = world / tp)
  ep group   : ep consecutive dp indices with the same tp_index; ep_rank = dp_index % ep
  edp group  : ranks holding the same experts: same tp_index and same ep_rank (size edp = dp / ep)
  ep node / cross groups (hierarchical all-to-all): the ep group split by node (LOCAL_WORLD_SIZE)
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.distributed as dist
import torch.nn as nn

from moesys.moe.layer import MoELayer


def mesh_ranks(world_size: int, *, ep: int, tp: int = 1, local_world_size: Optional[int] = None) -> dict:
    """Pure rank arithmetic behind ParallelDims (no process groups; unit-testable).

    Returns lists of rank lists: "dp", "ep", "edp", "ep_node", "ep_cross" (the last two empty when
    the ep group fits in one node or has one rank per node).
    """
    for name, v in (("world_size", world_size), ("ep", ep), ("tp", tp)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"ParallelDims: {name} must be a positive integer, got {v!r}")
    if world_size % tp != 0:
        raise ValueError(f"ParallelDims: tp ({tp}) must divide world_size ({world_size})")
    dp = world_size // tp
    if dp % ep != 0:
        raise ValueError(
            f"ParallelDims: ep ({ep}) must divide dp = world_size / tp = {world_size} / {tp} = {dp}"
        )
    rank_of = lambda d, t: d * tp + t  # noqa: E731
    out: dict = {"dp": [], "ep": [], "edp": [], "ep_node": [], "ep_cross": []}
    for t in range(tp):
        out["dp"].append([rank_of(d, t) for d in range(dp)])
        for b in range(dp // ep):
            out["ep"].append([rank_of(b * ep + i, t) for i in range(ep)])
        for i in range(ep):
            out["edp"].append([rank_of(b * ep + i, t) for b in range(dp // ep)])
    lws = local_world_size
    if lws is not None:
        if lws < 1 or world_size % lws != 0:
            raise ValueError(f"ParallelDims: local_world_size ({lws}) must divide world_size ({world_size})")
        if lws % tp != 0:
            raise ValueError(f"ParallelDims: tp ({tp}) must divide local_world_size ({lws}) (tp stays in a node)")
        per_node = lws // tp  # ep ranks of one group that share a node
        if 1 < per_node < ep:
            if ep % per_node != 0:
                raise ValueError(
                    f"ParallelDims: ep ({ep}) must be a multiple of the ep ranks per node "
                    f"(local_world_size / tp = {lws} / {tp} = {per_node}) for the hierarchical all-to-all"
                )
            for g in out["ep"]:
                nodes = ep // per_node
                out["ep_node"] += [g[n * per_node:(n + 1) * per_node] for n in range(nodes)]
                out["ep_cross"] += [g[l::per_node] for l in range(per_node)]
    return out


def borrow_groups(mesh) -> None:
    """Let `destroy_process_group()` destroy the groups a DeviceMesh uses while the mesh lives on
    (held by DTensor parameters, FSDP2 and the layers of a user's script). torch 2.13's DeviceMesh
    keeps a strong reference to each of its groups (`_pg_registry`, its root mesh's for a sub-mesh),
    used only while torch.compile traces; eager code resolves groups by name. moesys borrows groups,
    never owns them (comm.GroupRef, issue 11): a group kept alive past destroy_process_group() keeps
    its gloo threads into interpreter shutdown, where releasing a finished collective aborts."""
    for m in (mesh, getattr(mesh, "_root_mesh", None)):
        registry = getattr(m, "_pg_registry", None)
        if registry:
            registry.clear()


def _set_timeout(group, timeout: datetime.timedelta) -> None:
    """Give a mesh-made group the job's collective timeout (DeviceMesh creates its groups with the
    backend's default, 30 min on gloo). `_set_pg_timeout` is torch's own setter (private)."""
    from torch.distributed import distributed_c10d as c10d

    setter = getattr(c10d, "_set_pg_timeout", None)
    if setter is not None:
        setter(timeout, group)


@dataclass
class ParallelDims:
    """The job's layout, one DeviceMesh `mesh` with dims ("edp", "ep", "tp") (tp innermost, as
    Megatron) and the groups every part of moesys uses, all made from it in `build`:

        dp      mesh["edp", "ep"] flattened ("dp"): dense gradients, losses, metrics
        ep      mesh["ep"]: tokens move inside it; edp = mesh["edp"]: replicas of the same experts
        ep_node / ep_cross: "ep" unflattened into ("ep_inter", "ep_intra") when a node holds
                1 < ranks per node < ep ranks of one ep group (the hierarchical all-to-all)
        ffn_shard_mesh: "ep" unflattened into ("ep_expert", "fshard") when ep > num_experts: the
                S = ep / num_experts ranks that hold F-slices of one expert
        expert_mesh: the mesh the expert weights are DTensors over: mesh["ep"] (Shard(0)), or the
                2-D ("ep_expert", "fshard") one when experts are split along F (Shard(0), Shard(F dim))

    Nothing else in moesys creates a process group. Megatron's integration fills the group fields
    from Megatron's own parallel_state instead (mesh None).
    """

    world_size: int
    rank: int
    tp: int
    dp: int
    ep: int
    edp: int
    ep_rank: int
    local_world_size: int
    timeout_s: float
    dp_group: Any = field(repr=False, default=None)
    ep_group: Any = field(repr=False, default=None)
    edp_group: Any = field(repr=False, default=None)
    ep_node_group: Any = field(repr=False, default=None)  # None: no hierarchical split
    ep_cross_group: Any = field(repr=False, default=None)
    mesh: Any = field(repr=False, default=None)  # DeviceMesh ("edp", "ep", "tp")
    dp_mesh: Any = field(repr=False, default=None)  # DeviceMesh ("dp",)
    ffn_shard_mesh: Any = field(repr=False, default=None)  # DeviceMesh ("fshard",) when ep > num_experts
    ffn_shards: int = 1  # S: ranks sharing one expert's F (1: experts are whole)
    # what expert weights are DTensors over: mesh["ep"], or ("ep_expert", "fshard") when ep > num_experts
    expert_mesh: Any = field(repr=False, default=None)

    @classmethod
    def build(cls, *, ep: int, tp: int = 1, timeout_s: float = 300.0,
              local_world_size: Optional[int] = None, num_experts: Optional[int] = None) -> "ParallelDims":
        """Create the mesh and every group once, after dist.init_process_group (all ranks must call it).

        local_world_size defaults to the LOCAL_WORLD_SIZE environment variable (torchrun sets it).
        num_experts: needed when ep > num_experts (experts split along F), for the F-shard mesh.
        """
        from torch.distributed.device_mesh import init_device_mesh

        if not dist.is_initialized():
            raise RuntimeError("ParallelDims.build: call torch.distributed.init_process_group first")
        world, rank = dist.get_world_size(), dist.get_rank()
        if local_world_size is None:
            local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", world))
        ranks = mesh_ranks(world, ep=ep, tp=tp, local_world_size=local_world_size)  # validates the sizes
        S = 1
        if num_experts is not None and ep > num_experts:
            if ep % num_experts:
                raise ValueError(f"ParallelDims: ep ({ep}) > num_experts ({num_experts}) must be a multiple of it")
            S = ep // num_experts
        timeout = datetime.timedelta(seconds=timeout_s)
        dp = world // tp
        device_type = "cuda" if dist.get_backend() == "nccl" else "cpu"
        # every mesh below is collective over the world: every rank makes each one, in this order
        mesh = init_device_mesh(device_type, (dp // ep, ep, tp), mesh_dim_names=("edp", "ep", "tp"))
        dp_mesh = mesh["edp", "ep"]._flatten("dp")
        node = cross = None
        if ranks["ep_node"]:
            per_node = len(ranks["ep_node"][0])
            split = mesh._unflatten("ep", (ep // per_node, per_node), ("ep_inter", "ep_intra"))
            node, cross = split.get_group("ep_intra"), split.get_group("ep_inter")
        fshard = None
        expert_mesh = mesh["ep"]
        if S > 1:
            split = mesh._unflatten("ep", (ep // S, S), ("ep_expert", "fshard"))
            fshard, expert_mesh = split["fshard"], split["ep_expert", "fshard"]
        groups = [mesh.get_group(d) for d in ("edp", "ep", "tp")] + [dp_mesh.get_group()]
        groups += [g for g in (node, cross) if g is not None]
        groups += [fshard.get_group()] if fshard is not None else []
        for g in groups:
            _set_timeout(g, timeout)
        borrow_groups(mesh)
        return cls(world_size=world, rank=rank, tp=tp, dp=dp, ep=ep, edp=dp // ep,
                   ep_rank=(rank // tp) % ep, local_world_size=local_world_size, timeout_s=timeout_s,
                   dp_group=dp_mesh.get_group(), ep_group=mesh.get_group("ep"), edp_group=mesh.get_group("edp"),
                   ep_node_group=node, ep_cross_group=cross, mesh=mesh, dp_mesh=dp_mesh,
                   ffn_shard_mesh=fshard, ffn_shards=S, expert_mesh=expert_mesh)

    def expert_mesh_for(self, shards: int):
        """The mesh expert weights are DTensors over when each expert's F is split over `shards` ranks
        of the ep group: mesh["ep"] (1), or "ep" unflattened into ("ep_expert", "fshard"). Collective
        the first time for a new `shards` (every rank calls it, as apply_expert_parallel does)."""
        if shards == self.ffn_shards and self.expert_mesh is not None:
            return self.expert_mesh
        if shards == 1:
            return self.mesh["ep"]
        if self.ep % shards:
            raise ValueError(f"ParallelDims: {shards} F-shards do not divide ep ({self.ep})")
        cache = self.__dict__.setdefault("_fshard_meshes", {})
        if shards not in cache:
            split = self.mesh._unflatten("ep", (self.ep // shards, shards), ("ep_expert", "fshard"))
            for g in (split.get_group("ep_expert"), split.get_group("fshard")):
                _set_timeout(g, datetime.timedelta(seconds=self.timeout_s))
            cache[shards] = split["ep_expert", "fshard"]
            borrow_groups(self.mesh)
        return cache[shards]


# ---------------------------------------------------------------------------------------------
# expert parameters: found from the model's structure, never from a tag on the tensor
def expert_parameters(model: nn.Module) -> list:
    """The routed experts' weights of every MoE layer in `model` (each once, module order).

    An expert parameter is a parameter of a `MoELayer`'s `experts` module, sharded (DTensor over the
    ep mesh, or the local shard under DeepSpeed/Megatron) or not. Other `GroupedExperts` modules are
    not experts: EvoMoE's replicated dense FFN (`layer.dense`) is one, and its grads reduce over the
    whole data-parallel group. The one helper every engine and integration uses.
    """

    seen, out = set(), []
    for m in model.modules():
        if isinstance(m, MoELayer):
            for p in m.experts.parameters():
                if id(p) not in seen:
                    seen.add(id(p))
                    out.append(p)
    return out


@dataclass(frozen=True)
class ExpertParamGroups:
    expert: list
    non_expert: list

    def optimizer_groups(self, **expert_overrides) -> list[dict]:
        """Two torch.optim param groups; the expert one is tagged `moe=True` (DeepSpeed's convention)."""
        groups = []
        if self.non_expert:
            groups.append({"params": self.non_expert, "name": "non_expert"})
        if self.expert:
            groups.append({"params": self.expert, "name": "expert", "moe": True, **expert_overrides})
        return groups


def expert_param_groups(model: nn.Module) -> ExpertParamGroups:
    """model.parameters() split into the experts' (`expert_parameters`) and the rest."""
    experts = expert_parameters(model)
    ids = {id(p) for p in experts}
    return ExpertParamGroups(expert=experts, non_expert=[p for p in model.parameters() if id(p) not in ids])


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


@torch.no_grad()
def allreduce_gradients(model: nn.Module, dims: ParallelDims) -> None:
    """Gradient sync of the plain (replicated) engine: expert grads over edp, the rest over dp.

    Both end up as the gradient of the mean loss over the dp ranks: a non-expert grad is the mean
    over dp; an expert grad already sums the tokens of the whole ep group (the all-to-all brought
    them), so summing over edp covers all dp ranks and the same 1/dp applies. Expert grads are
    DTensors (Shard over ep): their local shards are what the edp replicas share.
    """
    groups = expert_param_groups(model)
    for params, group in ((groups.non_expert, dims.dp_group), (groups.expert, dims.edp_group)):
        grads = [_local(p.grad) for p in params if p.grad is not None]
        if not grads:
            continue
        flat = torch.cat([g.reshape(-1) for g in grads])  # one collective per group, not per tensor
        dist.all_reduce(flat, group=group)
        flat.div_(dims.dp)
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()


def clip_grad_norm_(parameters, max_norm: float, norm_type: float = 2.0) -> torch.Tensor:
    """Clip by the global norm over every shard; returns the norm before clipping (a plain tensor).

    torch's own pieces (`get_total_norm`, `clip_grads_with_norm_`), grouped by where the gradients
    live: DTensor gradients on one mesh give a DTensor norm whose `full_tensor()` reduces over that
    mesh (experts over ep or (edp, ep), FSDP-sharded dense weights over dp); plain (replicated)
    gradients count once. max_norm <= 0 only measures.
    """
    params = [p for p in parameters if p.grad is not None]
    by_mesh: dict = {}
    for p in params:
        mesh = getattr(p.grad, "device_mesh", None)
        key = None if mesh is None else (id(mesh), tuple(str(x) for x in p.grad.placements))
        by_mesh.setdefault(key, []).append(p)
    norms = []
    for group in by_mesh.values():
        n = torch.nn.utils.get_total_norm([p.grad for p in group], norm_type=norm_type, foreach=None)
        norms.append(n.full_tensor() if hasattr(n, "full_tensor") else n)
    if not norms:
        return torch.zeros(())
    total = torch.linalg.vector_norm(torch.stack([n.float().cpu() for n in norms]), norm_type)
    if max_norm > 0:
        for group in by_mesh.values():  # one list per mesh: foreach kernels do not mix DTensors and tensors
            torch.nn.utils.clip_grads_with_norm_(group, max_norm, total, foreach=None)
    return total
