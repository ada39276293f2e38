"""The sync-free routing plan (MoEConfig.kernel_backend="grouped_mm"): static shapes, all on device.

Legend: T tokens, K routes per token, R = T*K routes (token-major: r = t*K + k), E experts,
C capacity, M rows of the expert buffer.

Where `plan.make_plan` keeps the kept routes in a tensor whose length depends on the data (a
boolean mask), this plan places every route in a buffer whose size is known from the shapes:
    dropless:   M = R rows sorted by expert; group e = rows offs_E[e-1] .. offs_E[e]-1 with
                offs_E = cumsum(routed_E) computed on the device.
    capacity C: M = E*C rows, an [E, C] buffer; group e = rows e*C .. (e+1)*C-1 (offsets from the
                shapes alone); a route whose rank among its expert's routes is >= C is dropped
                (dest M) and a slot nobody fills is an empty row (route R).
The rank of a route among its expert's routes comes from one sort by the key expert*R + priority
(priority: the drop policy's order, module docstring of moesys/plan.py), so the same routes are
kept as `make_plan` keeps, in the same order.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


@dataclass(frozen=True)
class StaticPlan:
    dest_R: torch.Tensor  # [R] buffer row of each route, M when dropped
    row_route_M: torch.Tensor  # [M] route in each buffer row, R when the row is empty
    offs_E: torch.Tensor  # [E] int32 cumulative row ends of the expert groups (for torch._grouped_mm)
    counts_E: torch.Tensor  # [E] int64 kept routes per expert (device)
    routed_E: torch.Tensor  # [E] int64 routes per expert before capacity (device)
    dropped: torch.Tensor  # 0-dim int64 routes dropped by capacity (device)
    weight_TK: torch.Tensor  # [T, K] fp32 combine weights after drops (renormalised when asked)
    capacity: Optional[int]  # C, None when dropless
    num_tokens: int  # T

    @property
    def padded(self) -> bool:
        """Whether a route can be dropped or a row empty (then the gathers read a zero row)."""
        return self.capacity is not None


def uniform_offsets(E: int, C: int, device) -> torch.Tensor:
    """[E] int32 group ends of an [E, C] buffer: C, 2C, ..., EC (from the shapes alone)."""
    if C == 0:
        return torch.zeros(E, dtype=torch.int32, device=device)
    return torch.arange(C, E * C + 1, C, dtype=torch.int32, device=device)


def _priority_rank(expert_TK, weight_TK, probs_TE, policy: str) -> torch.Tensor:
    """[T, K] int64: rank of each route in the drop policy's priority order (0 = kept first)."""
    T, K = expert_TK.shape
    R = T * K
    dev = expert_TK.device
    if policy == "position":
        # all first choices (earlier tokens first), then all second choices: rank k*T + t
        return torch.arange(R, device=dev).view(K, T).t()
    if policy == "bpr":
        # choice rank first; within it, tokens by their top-1 probability (highest first, ties: earlier)
        order_T = torch.argsort(probs_TE.detach().max(dim=-1).values, descending=True, stable=True)
        rank_T = torch.argsort(order_T)
        return torch.arange(K, device=dev).mul_(T).view(1, K) + rank_T.view(T, 1)
    if policy == "probs":
        order_R = torch.argsort(weight_TK.detach().reshape(-1), descending=True, stable=True)
        return torch.argsort(order_R).view(T, K)
    if policy == "random":
        # a random order drawn on the device (the host path draws a CPU randperm: a different stream)
        return torch.argsort(torch.rand(R, device=dev)).view(T, K)
    raise ValueError(f"unknown drop_policy {policy!r}")


def make_static_plan(expert_TK: torch.Tensor, weight_TK: torch.Tensor, routed_E: torch.Tensor,
                     probs_TE: torch.Tensor, capacity: Optional[int], drop_policy: str = "position",
                     renormalize: bool = False) -> StaticPlan:
    """Place T*K token-major routes in a static expert buffer (module docstring).

    Args:
        expert_TK: [T, K] int64 expert of each route; weight_TK: [T, K] fp32 combine weights.
        routed_E: [E] routes per expert (the router's histogram).
        probs_TE: router probabilities (the "bpr" policy ranks tokens by their maximum).
        capacity: C per expert, or None for dropless.
        renormalize: divide each token's kept weights by their sum after the drops (DeepSpeed).
    """
    T, K = expert_TK.shape
    E = routed_E.shape[0]
    R = T * K
    expert_R = expert_TK.reshape(-1)
    if capacity is None:
        # stable: within an expert, routes in token order (as make_plan)
        order_M = torch.sort(expert_R, stable=True).indices
        dest_R = torch.argsort(order_M)  # the inverse permutation
        offs_E = torch.cumsum(routed_E, 0, dtype=torch.int32)
        return StaticPlan(dest_R, order_M, offs_E, routed_E, routed_E, routed_E.new_zeros(()), weight_TK, None, T)
    C = capacity
    M = E * C
    key_R = torch.add(_priority_rank(expert_TK, weight_TK, probs_TE, drop_policy), expert_TK, alpha=R).reshape(-1)
    key_sorted, order_R = torch.sort(key_R)  # keys are distinct: no stability needed
    e_sorted = torch.div(key_sorted, R, rounding_mode="floor")
    starts_E = torch.cumsum(routed_E, 0) - routed_E
    pos_sorted = torch.arange(R, device=expert_R.device) - starts_E[e_sorted]  # rank within the expert
    dest_sorted = torch.where(pos_sorted < C, torch.add(pos_sorted, e_sorted, alpha=C), M)
    dest_R = torch.empty_like(dest_sorted).scatter_(0, order_R, dest_sorted)
    # every dropped route writes the spare slot M (sliced off): which one wins does not matter
    row_route_M = torch.full((M + 1,), R, dtype=torch.int64, device=expert_R.device).scatter_(0, dest_sorted, order_R)[:M]
    offs_E = uniform_offsets(E, C, expert_R.device)
    counts_E = routed_E.clamp_max(C)
    dropped = (routed_E - counts_E).sum()
    if renormalize:
        kept_TK = (dest_R < M).view(T, K)
        kept_w = torch.where(kept_TK, weight_TK, 0.0)
        weight_TK = kept_w / kept_w.sum(-1, keepdim=True).clamp_min(torch.finfo(weight_TK.dtype).eps)
    return StaticPlan(dest_R, row_route_M, offs_E, counts_E, routed_E, dropped, weight_TK, C, T)
