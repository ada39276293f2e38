"""Triton route placement (route_place.py's contract): histogram, scan, slot per route, keep mask.

Legend: R routes, P priority positions, E experts, C capacity, M buffer rows, NB blocks of BLOCK_R
priority positions, BE = next_pow2(E).

Three launches, no atomics (so the slots do not depend on timing), each linear in R:
    _place_count_kernel   grid NB: hist[b, e] = routes of expert e among the positions of block b
    _place_scan_kernel    grid E:  hist[:, e] becomes its exclusive prefix over the blocks (in
                          place), total_E[e] the grand total
    _place_routes_kernel  grid NB: pos = prefix[b, e] + rank inside the block (a cumsum of the
                          one-hot [BLOCK_R, BE]); dest and row_route as route_place.py says; with
                          a capacity, block b also marks the empty rows of its share of the
                          buffer; block 0 writes offs_E, counts_E and dropped.
The one-hot is BLOCK_R x BE int32 in registers, so BLOCK_R shrinks as E grows.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from . import launch_triton as L
from .route_place import check_route_place_args

_PRIORITY_CODE = {"token": 0, "choice": 1, "tokens_ranked": 2, "routes_ranked": 3}


@triton.jit
def _route_at(p, ok, order_ptr, T, K: tl.constexpr, PRIORITY: tl.constexpr):
    """Route r(p) at priority positions p (route_place.py's table)."""
    p = p.to(tl.int64)
    if PRIORITY == 0:
        r = p
    elif PRIORITY == 1:
        r = (p % T) * K + p // T
    elif PRIORITY == 2:
        r = tl.load(order_ptr + p % T, mask=ok, other=0) * K + p // T
    else:
        r = tl.load(order_ptr + p, mask=ok, other=0)
    return r


@triton.jit
def _place_count_kernel(
    # pointers
    expert_ptr, order_ptr, hist_ptr,
    # sizes
    T, R, E,
    # meta-parameters
    K: tl.constexpr, PRIORITY: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_E: tl.constexpr,
):
    b = tl.program_id(0)
    p = b * BLOCK_R + tl.arange(0, BLOCK_R)
    ok = p < R
    cols = tl.arange(0, BLOCK_E)
    r = _route_at(p, ok, order_ptr, T, K, PRIORITY)
    e = tl.load(expert_ptr + r, mask=ok, other=-1)  # -1 matches no expert
    hit = (e[:, None] == cols[None, :]).to(tl.int32)
    tl.store(hist_ptr + b * E + cols, tl.sum(hit, 0), mask=cols < E)


@triton.jit
def _place_scan_kernel(
    # pointers
    hist_ptr, total_ptr,
    # sizes
    E, NB,
    # meta-parameters
    BLOCK_NB: tl.constexpr,
):
    e = tl.program_id(0)
    running = tl.sum(tl.zeros((BLOCK_NB,), dtype=tl.int32), 0)  # a 0-d int32 carried through the loop
    for j0 in range(0, NB, BLOCK_NB):
        js = j0 + tl.arange(0, BLOCK_NB)
        ok = js < NB
        h = tl.load(hist_ptr + js * E + e, mask=ok, other=0)
        tl.store(hist_ptr + js * E + e, running + tl.cumsum(h, 0) - h, mask=ok)
        running += tl.sum(h, 0)
    tl.store(total_ptr + e, running)


@triton.jit
def _place_routes_kernel(
    # pointers
    expert_ptr, order_ptr, prefix_ptr, total_ptr, dest_ptr, row_route_ptr, offs_ptr, counts_ptr, dropped_ptr,
    # sizes
    T, R, E, C, M, ROWS_PER_BLOCK,
    # meta-parameters
    K: tl.constexpr, PRIORITY: tl.constexpr, DROPLESS: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_E: tl.constexpr,
):
    b = tl.program_id(0)
    cols = tl.arange(0, BLOCK_E)
    col_ok = cols < E
    # routes of each expert in earlier blocks (prefix) and in all blocks (total)
    prefix = tl.load(prefix_ptr + b * E + cols, mask=col_ok, other=0)
    total = tl.load(total_ptr + cols, mask=col_ok, other=0)

    p = b * BLOCK_R + tl.arange(0, BLOCK_R)
    ok = p < R
    r = _route_at(p, ok, order_ptr, T, K, PRIORITY)
    e = tl.load(expert_ptr + r, mask=ok, other=-1)
    hit = (e[:, None] == cols[None, :]).to(tl.int32)
    before = tl.cumsum(hit, 0) - hit  # routes of the same expert earlier in this block
    pos = tl.sum(hit * (before + prefix[None, :]), 1)
    e64 = e.to(tl.int64)
    if DROPLESS:
        starts = tl.cumsum(total, 0) - total
        dest = tl.sum(hit * starts[None, :], 1).to(tl.int64) + pos
        keep = ok
    else:
        keep = ok & (pos < C)
        dest = tl.where(keep, e64 * C + pos, M)
    tl.store(dest_ptr + r, dest, mask=ok)
    tl.store(row_route_ptr + dest, r, mask=keep)

    if DROPLESS:
        kept = total
    else:
        kept = tl.minimum(total, C)
        # rows nobody fills: slot j of expert e with j >= kept_e (disjoint from the rows written above)
        lo = b * ROWS_PER_BLOCK
        for m0 in range(lo, lo + ROWS_PER_BLOCK, BLOCK_R):
            m = m0 + tl.arange(0, BLOCK_R)
            m_ok = (m < lo + ROWS_PER_BLOCK) & (m < M)
            em = m // C
            kept_m = tl.sum(tl.where(em[:, None] == cols[None, :], kept[None, :], 0), 1)
            tl.store(row_route_ptr + m, tl.zeros((BLOCK_R,), dtype=tl.int64) + R, mask=m_ok & (m % C >= kept_m))
    if b == 0:
        if DROPLESS:
            offs = tl.cumsum(total, 0)
        else:
            offs = (cols + 1) * C
        tl.store(offs_ptr + cols, offs.to(tl.int32), mask=col_ok)
        tl.store(counts_ptr + cols, kept.to(tl.int64), mask=col_ok)
        tl.store(dropped_ptr, (R - tl.sum(tl.where(col_ok, kept, 0), 0)).to(tl.int64))


def _block_r(E: int) -> int:
    """Priority positions per program: the one-hot [BLOCK_R, BE] stays near 16K int32 elements."""
    be = triton.next_power_of_2(E)
    return max(16, min(1024, 16384 // be))


def launch_route_place(expert_TK: torch.Tensor, order: Optional[torch.Tensor], num_experts: int,
                       capacity: Optional[int], priority: str, block_r: Optional[int] = None,
                       scan_block: int = 1024):
    """route_place.py's contract on Triton. block_r: positions per program, scan_block: blocks per
    step of the scan (powers of 2; tests pass small ones so blocks and scan steps meet at odd
    boundaries)."""
    check_route_place_args(expert_TK, order, num_experts, capacity, priority)
    L.check_contiguous("route_place", "expert_TK", expert_TK)
    if order is not None:
        L.check_contiguous("route_place", "order", order)
        L.check_same_device("route_place", expert_TK=expert_TK, order=order)
    T, K = expert_TK.shape
    R, E = T * K, num_experts
    M = R if capacity is None else E * capacity
    dev = expert_TK.device
    dest_R = torch.empty(R, dtype=torch.int64, device=dev)
    row_route_M = torch.empty(M, dtype=torch.int64, device=dev)
    offs_E = torch.empty(E, dtype=torch.int32, device=dev)
    counts_E = torch.empty(E, dtype=torch.int64, device=dev)
    dropped = torch.empty((), dtype=torch.int64, device=dev)
    if R == 0:  # no route: every row empty, nothing kept
        row_route_M.fill_(0)
        offs_E.fill_(0) if capacity is None else offs_E.copy_(torch.arange(1, E + 1, device=dev) * capacity)
        counts_E.fill_(0)
        dropped.fill_(0)
        return dest_R, row_route_M, offs_E, counts_E, dropped
    BLOCK_R = block_r or _block_r(E)
    if BLOCK_R & (BLOCK_R - 1):
        raise ValueError(f"route_place: block_r must be a power of 2, got {BLOCK_R}")
    BLOCK_E = triton.next_power_of_2(E)
    NB = triton.cdiv(R, BLOCK_R)
    hist = torch.empty(NB, E, dtype=torch.int32, device=dev)
    total_E = torch.empty(E, dtype=torch.int32, device=dev)
    meta = dict(K=K, PRIORITY=_PRIORITY_CODE[priority], BLOCK_R=BLOCK_R, BLOCK_E=BLOCK_E)
    order_arg = order if order is not None else expert_TK  # never read without an order
    _place_count_kernel[(NB,)](expert_TK, order_arg, hist, T, R, E, **meta)
    _place_scan_kernel[(E,)](hist, total_E, E, NB, BLOCK_NB=min(scan_block, triton.next_power_of_2(NB)))
    C = capacity if capacity is not None else 0
    _place_routes_kernel[(NB,)](
        expert_TK, order_arg, hist, total_E, dest_R, row_route_M, offs_E, counts_E, dropped,
        T, R, E, C, M, triton.cdiv(M, NB),
        DROPLESS=capacity is None, **meta,
    )
    return dest_R, row_route_M, offs_E, counts_E, dropped
