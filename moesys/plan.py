"""Routing plan: which routes are kept (capacity), in what order the experts see them.

Legend: T tokens, R routes (token, expert) chosen by the router, N kept routes, E experts.

A route's priority decides who is dropped when an expert is over capacity C:
  "position": all first choices before any second choice, earlier tokens first (GShard/Switch);
  "probs":    higher routing weight first (Batch Prioritized Routing);
  "random":   a random order (DeepSpeed's Random Token Selection).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .routing import Routing


@dataclass(frozen=True)
class Plan:
    route_idx_N: torch.Tensor  # [N] index of each kept route in the router's route list
    token_idx_N: torch.Tensor  # [N] token of each kept route, grouped by expert
    weight_N: torch.Tensor  # [N] fp32 combine weight (differentiable)
    expert_idx_N: torch.Tensor  # [N] expert of each kept route (non-decreasing)
    counts_E: torch.Tensor  # [E] kept routes per expert
    routed_E: torch.Tensor  # [E] routes per expert before capacity
    dropped: torch.Tensor  # 0-dim int64: routes dropped by capacity
    capacity: Optional[int]  # per-expert capacity C, None when dropless
    num_tokens: int  # T: the tokens the routes came from (this rank's)


def _priority_order(routing: Routing, policy: str, generator: Optional[torch.Generator]) -> torch.Tensor:
    """Permutation of routes by decreasing priority."""
    T = routing.num_tokens
    if policy == "position":
        key = routing.slot_R * max(T, 1) + routing.token_idx_R
        return torch.argsort(key, stable=True)
    if policy == "probs":
        return torch.argsort(routing.weight_R.detach(), descending=True, stable=True)
    if policy == "random":
        R = routing.token_idx_R.shape[0]
        return torch.randperm(R, generator=generator, device="cpu").to(routing.token_idx_R.device)
    raise ValueError(f"unknown drop_policy {policy!r}")


def make_plan(
    routing: Routing,
    num_experts: int,
    capacity: Optional[int],
    drop_policy: str = "position",
    generator: Optional[torch.Generator] = None,
) -> Plan:
    """Sort routes by expert and apply the per-expert capacity.

    Args:
        routing: the router's routes (any number per token).
        capacity: C, or None for dropless.
    """
    expert_R = routing.expert_idx_R
    routed_E = torch.bincount(expert_R, minlength=num_experts)
    if capacity is None:
        # dropless: stable sort keeps token order within each expert
        order = torch.argsort(expert_R, stable=True)
        dropped = torch.zeros((), dtype=torch.int64, device=expert_R.device)
        counts_E = routed_E
    else:
        prio = _priority_order(routing, drop_policy, generator)
        # stable sort by expert of the priority-ordered routes: within an expert, best first
        order = prio[torch.argsort(expert_R[prio], stable=True)]
        starts_E = torch.cumsum(routed_E, 0) - routed_E
        R = order.shape[0]
        pos_in_expert = torch.arange(R, device=expert_R.device) - starts_E[expert_R[order]]
        keep = pos_in_expert < capacity
        order = order[keep]
        counts_E = torch.clamp(routed_E, max=capacity)
        dropped = (routed_E - counts_E).sum()
    return Plan(
        route_idx_N=order,
        token_idx_N=routing.token_idx_R[order],
        weight_N=routing.weight_R[order],
        expert_idx_N=expert_R[order],
        counts_E=counts_E,
        routed_E=routed_E,
        dropped=dropped,
        capacity=capacity,
        num_tokens=routing.num_tokens,
    )
