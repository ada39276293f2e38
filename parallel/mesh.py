"""ParallelDims: the process-group mesh, built once and passed explicitly (never global).

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


@dataclass
class ParallelDims:
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

    @classmethod
    def build(cls, *, ep: int, tp: int = 1, timeout_s: float = 300.0,
              local_world_size: Optional[int] = None) -> "ParallelDims":
        """Create every group once, after dist.init_process_group (all ranks must call it).

        local_world_size defaults to the LOCAL_WORLD_SIZE environment variable (torchrun sets it).
        """
        if not dist.is_initialized():
            raise RuntimeError("ParallelDims.build: call torch.distributed.init_process_group first")
        world, rank = dist.get_world_size(), dist.get_rank()
        if local_world_size is None:
            local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", world))
        ranks = mesh_ranks(world, ep=ep, tp=tp, local_world_size=local_world_size)
        timeout = datetime.timedelta(seconds=timeout_s)
        mine = {}
        # new_group is collective over the world: every rank creates every group, in the same order
        for kind in ("dp", "ep", "edp", "ep_node", "ep_cross"):
            for members in ranks[kind]:
                g = dist.new_group(members, timeout=timeout)
                if rank in members:
                    mine[kind] = g
        dp = world // tp
        return cls(world_size=world, rank=rank, tp=tp, dp=dp, ep=ep, edp=dp // ep,
                   ep_rank=(rank // tp) % ep, local_world_size=local_world_size, timeout_s=timeout_s,
                   dp_group=mine["dp"], ep_group=mine["ep"], edp_group=mine["edp"],
                   ep_node_group=mine.get("ep_node"), ep_cross_group=mine.get("ep_cross"))


# ---------------------------------------------------------------------------------------------
# expert parameter tagging
def mark_expert_param(p: nn.Parameter) -> nn.Parameter:
    p._moesys_expert = True
    return p


def is_expert_param(p: torch.Tensor) -> bool:
    """True for parameters sharded over the ep group (their grads reduce over edp, not dp)."""
    return bool(getattr(p, "_moesys_expert", False))


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
    """Split model.parameters() into expert (tagged by apply_expert_parallel) and non-expert lists."""
    expert, other = [], []
    for p in model.parameters():
        (expert if is_expert_param(p) else other).append(p)
    return ExpertParamGroups(expert=expert, non_expert=other)


@torch.no_grad()
def allreduce_gradients(model: nn.Module, dims: ParallelDims) -> None:
    """Gradient sync for plain-DDP users: expert grads over edp, the rest over dp.

    Both end up as the gradient of the mean loss over the dp ranks: a non-expert grad is the mean
    over dp; an expert grad already sums the tokens of the whole ep group (the all-to-all brought
    them), so summing over edp covers all dp ranks and the same 1/dp applies.
    """
    groups = expert_param_groups(model)
    for params, group in ((groups.non_expert, dims.dp_group), (groups.expert, dims.edp_group)):
        grads = [p.grad for p in params if p.grad is not None]
        if not grads:
            continue
        flat = torch.cat([g.reshape(-1) for g in grads])  # one collective per group, not per tensor
        dist.all_reduce(flat, group=group)
        flat.div_(dims.dp)
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()
