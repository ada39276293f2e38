"""Routing plan: which routes are kept (capacity), in what order the experts see them.

Legend: T tokens, R routes (token, expert) chosen by the router, N kept routes, E experts.

A route's priority decides who is dropped when an expert is over capacity C:
  "position": all first choices before any second choice, earlier tokens first (GShard/Switch);
  "bpr":      Batch Prioritized Routing as Tutel does it: all first choices before any second
              choice, and within a choice rank the tokens ordered by their top-1 router
              probability max_e p_te, highest first (ties: earlier token first);
  "probs":    higher combine weight first, every choice rank mixed (Megatron's `probs` drop
              policy; at K = 1 with unnormalised weights it ranks as "bpr" does, at K > 1 it is
              not BPR: a confident token's second choice can outrank another token's first);
  "random":   a random order (DeepSpeed's Random Token Selection).

renormalize (MoEConfig.renormalize_after_drop; DeepSpeed's top-2 gate): after the drops each
token's kept weights are divided by their sum, so a token that lost one of its two routes puts
weight 1 on the survivor; a token that lost all its routes gets 0. Without it a dropped route
just contributes nothing (GShard, Megatron, Tutel).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .routing import Routing


@dataclass(frozen=True)
class Plan:
    route_idx_N: torch.Tensor  # [N] index of each kept route in the router's route list
    weight_R: torch.Tensor  # [R] fp32 combine weight of every route after drops (differentiable;
    #                         the router's weights unless renormalised; a dropped route is unused)
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
    if policy == "bpr":
        # rank of each token by its top-1 probability (highest first), then choice rank first
        top1_T = routing.probs_TE.detach().max(dim=-1).values
        rank_T = torch.empty(T, dtype=torch.int64, device=top1_T.device)
        rank_T[torch.argsort(top1_T, descending=True, stable=True)] = torch.arange(T, device=top1_T.device)
        key = routing.slot_R * max(T, 1) + rank_T[routing.token_idx_R]
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
    renormalize: bool = False,
) -> Plan:
    """Sort routes by expert and apply the per-expert capacity.

    Args:
        routing: the router's routes (any number per token).
        capacity: C, or None for dropless.
        drop_policy: "position", "bpr", "probs" or "random" (module docstring).
        renormalize: divide each token's kept weights by their sum after the drops (DeepSpeed).
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
    weight_R = routing.weight_R
    if renormalize and capacity is not None:
        weight_R = _renormalize_kept(routing, order)
    return Plan(
        route_idx_N=order,
        weight_R=weight_R,
        token_idx_N=routing.token_idx_R[order],
        weight_N=weight_R[order],
        expert_idx_N=expert_R[order],
        counts_E=counts_E,
        routed_E=routed_E,
        dropped=dropped,
        capacity=capacity,
        num_tokens=routing.num_tokens,
    )


def _renormalize_kept(routing: Routing, kept_idx_N: torch.Tensor) -> torch.Tensor:
    """[R] weights: w_r / sum of the kept weights of r's token for kept routes, 0 for dropped ones.

    The denominator is clamped at fp32 eps, as DeepSpeed does; a token with no kept route has no
    term to divide, so it gets 0 and no gradient."""
    w_R, token_R = routing.weight_R, routing.token_idx_R
    kept_R = torch.zeros_like(token_R, dtype=torch.bool)
    kept_R[kept_idx_N] = True
    kept_w_R = torch.where(kept_R, w_R, torch.zeros_like(w_R))
    denom_T = torch.zeros(routing.num_tokens, dtype=w_R.dtype, device=w_R.device).index_add(0, token_R, kept_w_R)
    denom_R = denom_T[token_R].clamp_min(torch.finfo(w_R.dtype).eps)
    return torch.where(kept_R, kept_w_R / denom_R, torch.zeros_like(w_R))
