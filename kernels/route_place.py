"""Place T*K routes in a static expert buffer, in one op: histogram + scan + slot per route + keep.

Legend: T tokens, K routes per token (token-major: route r = t*K + k), R = T*K, E experts,
C capacity, M rows of the buffer (M = R dropless, E*C with a capacity), P priority positions.

The routes are visited in priority order (position p = 0 .. R-1 holds route r(p)):
    "token"          r(p) = p                              (dropless: token order within an expert)
    "choice"         p = k*T + t                           (drop policy "position": all first choices,
                                                            earlier tokens first, then second choices)
    "tokens_ranked"  p = k*T + i, t = order[i]             ("bpr": order_T ranks the tokens)
    "routes_ranked"  r(p) = order[p]                       ("probs", "random": order_R ranks the routes)
The slot of a route is its rank among the routes of its expert in that order (pos), then
    dropless:   dest_R[r] = start_e + pos, start_e = sum of the counts of experts before e
    capacity C: dest_R[r] = e*C + pos when pos < C, else M (dropped)
and row_route_M is the inverse map (R for a row nobody fills). Outputs also give the grouped GEMM's
int32 offsets, the kept routes per expert and the number dropped, all on the device.

One custom op (`moesys::route_place`), so the layer's step issues one dispatcher call for its whole
placement: on CUDA it runs three Triton kernels (route_place_triton.py: per-block histograms, their
scan over blocks, slots + empty rows); elsewhere the torch reference below (one stable sort,
sync-free).
"""
from __future__ import annotations

from typing import Optional

import torch

from .backend import fused_on_triton as _use_triton  # a module attribute: tests patch it

PRIORITIES = ("token", "choice", "tokens_ranked", "routes_ranked")


def priority_routes(T: int, K: int, order: Optional[torch.Tensor], priority: str, device) -> torch.Tensor:
    """[R] int64: the route at each priority position (module docstring)."""
    if priority == "token":
        return torch.arange(T * K, device=device)
    if priority == "choice":
        return torch.arange(T * K, device=device).view(T, K).t().reshape(-1)
    if priority == "tokens_ranked":
        return (order.view(1, T) * K + torch.arange(K, device=device).view(K, 1)).reshape(-1)
    if priority == "routes_ranked":
        return order
    raise ValueError(f"route_place: priority {priority!r} is not one of {list(PRIORITIES)}")


def route_place_reference(expert_TK: torch.Tensor, order: Optional[torch.Tensor], num_experts: int,
                          capacity: Optional[int], priority: str):
    """Plain torch, sync-free (no bincount, no boolean indexing): the CPU path of `route_place`."""
    T, K = expert_TK.shape
    R, E = T * K, num_experts
    dev = expert_TK.device
    expert_R = expert_TK.reshape(-1)
    route_P = priority_routes(T, K, order, priority, dev)
    expert_P = expert_R.index_select(0, route_P)
    total_E = expert_P.new_zeros(E).scatter_add_(0, expert_P, expert_P.new_ones(1).expand(R))
    # stable: within an expert the routes keep their priority order
    expert_S, perm_S = torch.sort(expert_P, stable=True)
    route_S = route_P.index_select(0, perm_S)
    ends_E = torch.cumsum(total_E, 0)
    if capacity is None:
        dest_R = torch.empty_like(route_S).scatter_(0, route_S, torch.arange(R, device=dev))
        return dest_R, route_S, ends_E.to(torch.int32), total_E, total_E.new_zeros(())
    C = capacity
    M = E * C
    pos_S = torch.arange(R, device=dev) - (ends_E - total_E).index_select(0, expert_S)
    dest_S = torch.where(pos_S < C, expert_S * C + pos_S, M)
    dest_R = torch.empty_like(dest_S).scatter_(0, route_S, dest_S)
    # every dropped route writes the spare row M (sliced off): which one wins does not matter
    row_route_M = torch.full((M + 1,), R, dtype=torch.int64, device=dev).scatter_(0, dest_S, route_S)[:M]
    offs_E = (torch.arange(1, E + 1, dtype=torch.int32, device=dev) * C)
    counts_E = total_E.clamp_max(C)
    return dest_R, row_route_M, offs_E, counts_E, R - counts_E.sum()



@torch.library.custom_op("moesys::route_place", mutates_args=())
def route_place_op(expert_TK: torch.Tensor, order: Optional[torch.Tensor], num_experts: int, capacity: int,
                   priority: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """capacity < 0: dropless."""
    cap = capacity if capacity >= 0 else None
    if _use_triton(expert_TK):
        from .route_place_triton import launch_route_place

        return launch_route_place(expert_TK, order, num_experts, cap, priority)
    return route_place_reference(expert_TK, order, num_experts, cap, priority)


@route_place_op.register_fake
def _(expert_TK, order, num_experts, capacity, priority):
    R = expert_TK.shape[0] * expert_TK.shape[1]
    M = R if capacity < 0 else num_experts * capacity
    new = expert_TK.new_empty
    return (new(R, dtype=torch.int64), new(M, dtype=torch.int64), new(num_experts, dtype=torch.int32),
            new(num_experts, dtype=torch.int64), new((), dtype=torch.int64))


def check_route_place_args(expert_TK: torch.Tensor, order: Optional[torch.Tensor], num_experts: int,
                           capacity: Optional[int], priority: str) -> None:
    if expert_TK.dim() != 2 or expert_TK.dtype != torch.int64:
        raise ValueError(f"route_place: expert_TK must be a 2-D int64 [T, K] tensor, got {expert_TK.dtype} "
                         f"{tuple(expert_TK.shape)}")
    if num_experts < 1:
        raise ValueError(f"route_place: num_experts must be >= 1, got {num_experts}")
    if capacity is not None and capacity < 0:
        raise ValueError(f"route_place: capacity must be >= 0 or None (dropless), got {capacity}")
    if priority not in PRIORITIES:
        raise ValueError(f"route_place: priority {priority!r} is not one of {list(PRIORITIES)}")
    T, K = expert_TK.shape
    want = {"tokens_ranked": T, "routes_ranked": T * K}.get(priority)
    if (order is None) != (want is None):
        raise ValueError(f"route_place: priority {priority!r} {'needs' if want is not None else 'takes no'} an order")
    if order is not None and (order.shape != (want,) or order.dtype != torch.int64):
        raise ValueError(f"route_place: priority {priority!r} needs an int64 order of shape ({want},), got "
                         f"{order.dtype} {tuple(order.shape)}")


def route_place(expert_TK: torch.Tensor, num_experts: int, capacity: Optional[int], priority: str = "token",
                order: Optional[torch.Tensor] = None):
    """Place every route in the static buffer (module docstring), sync-free.

    Args:
        expert_TK: [T, K] int64 expert of each route (token-major).
        num_experts: E; capacity: C per expert, None for dropless.
        priority: one of PRIORITIES; order: [T] ("tokens_ranked") or [R] ("routes_ranked") int64, a
            permutation (not checked: that would read it on the host).
    Returns:
        (dest_R int64 [R], row_route_M int64 [M], offs_E int32 [E] group ends, counts_E int64 [E]
        kept routes per expert, dropped int64 0-dim).
    """
    check_route_place_args(expert_TK, order, num_experts, capacity, priority)
    return route_place_op(expert_TK.contiguous(), order, num_experts, -1 if capacity is None else capacity, priority)
