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
The rank of a route among its expert's routes is its place in the drop policy's priority order
(module docstring of moesys/moe/routing_plan.py), so the same routes are kept as `make_plan` keeps, in the same
order. The whole placement (histogram, scan, slot per route, keep mask, offsets, counts, drops) is
one op, `moesys.kernels.route_place` (Triton on CUDA); the policy adds at most a sort to rank
tokens or routes. renormalize_after_drop is applied by the combine (kernels/permute_static.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from moesys.kernels.route_place import route_place


@dataclass(frozen=True)
class StaticPlan:
    dest_R: torch.Tensor  # [R] buffer row of each route, M when dropped
    row_route_M: torch.Tensor  # [M] route in each buffer row, R when the row is empty
    offs_E: torch.Tensor  # [E] int32 cumulative row ends of the expert groups (for torch._grouped_mm)
    counts_E: torch.Tensor  # [E] int64 kept routes per expert (device)
    routed_E: torch.Tensor  # [E] int64 routes per expert before capacity (device)
    dropped: torch.Tensor  # 0-dim int64 routes dropped by capacity (device)
    weight_TK: torch.Tensor  # [T, K] fp32 the router's combine weights (drops applied by the combine)
    capacity: Optional[int]  # C, None when dropless
    num_tokens: int  # T
    renormalize: bool = False  # the combine renormalises each token's kept weights

    @property
    def padded(self) -> bool:
        """Whether a route can be dropped or a row empty (then the gathers read a zero row)."""
        return self.capacity is not None


def uniform_offsets(E: int, C: int, device) -> torch.Tensor:
    """[E] int32 group ends of an [E, C] buffer: C, 2C, ..., EC (from the shapes alone)."""
    if C == 0:
        return torch.zeros(E, dtype=torch.int32, device=device)
    return torch.arange(C, E * C + 1, C, dtype=torch.int32, device=device)


def _priority(weight_TK, probs_TE, policy: str, R: int) -> tuple:
    """(route_place priority, its order tensor or None) for a drop policy (moesys/moe/routing_plan.py)."""
    if policy == "position":
        # all first choices (earlier tokens first), then all second choices
        return "choice", None
    if policy == "bpr":
        # choice rank first; within it, tokens by their top-1 probability (highest first, ties: earlier)
        return "tokens_ranked", torch.argsort(probs_TE.detach().max(dim=-1).values, descending=True, stable=True)
    if policy == "probs":
        return "routes_ranked", torch.argsort(weight_TK.detach().reshape(-1), descending=True, stable=True)
    if policy == "random":
        # a random order drawn on the device (the host path draws a CPU randperm: a different stream)
        return "routes_ranked", torch.argsort(torch.rand(R, device=weight_TK.device))
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
        renormalize: divide each token's kept weights by their sum after the drops (DeepSpeed); only
            with a capacity (dropless drops nothing).
    """
    T, K = expert_TK.shape
    E = routed_E.shape[0]
    if capacity is None:
        # within an expert, routes in token order (as make_plan)
        priority, order = "token", None
    else:
        priority, order = _priority(weight_TK, probs_TE, drop_policy, T * K)
    dest_R, row_route_M, offs_E, counts_E, dropped = route_place(expert_TK, E, capacity, priority, order)
    return StaticPlan(dest_R, row_route_M, offs_E, counts_E, routed_E, dropped, weight_TK, capacity, T,
                      renormalize=renormalize and capacity is not None)
