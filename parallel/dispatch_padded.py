"""Padded all-to-all dispatcher: fixed-size [E, C, D] buffers, equal splits.

C is the layer's capacity (the Plan's, of local T; per chunk when the runner chunks), passed to
`plan(counts_list, capacity=...)`. Ranks can hold different T, hence different capacities, but
equal-split buffers need one C: the ranks agree on the maximum with a tiny all_reduce (it is >=
every rank's counts). A dropless layer (capacity None) pads to the largest count over all ranks and experts instead.
Rows beyond the real counts are zeros; experts compute on them (fixed shapes, as on GPUs) and
their outputs are discarded by the combine, so they add nothing to any gradient.

Static capacity (`static_capacity_factor` f; Megatron's drop-and-pad all-to-all, the idea behind
its "paged stash"): C = max(1, ceil(f * T * K / E)) rows per (source rank, expert), from this call's
T and the config's K, E alone, so no collective agrees on C and nothing is read on the host: the
buffer shapes and splits are Python integers, the row positions are device index math
(`static_plan`). Every rank of the ep group must pass the same T (the trainer's equal micro-batches
do). Rows past C of an expert are not sent and combine to zero (dropped, positional: the Plan's order
within each expert decides); `static_plan` returns their number as a 0-dim device tensor. Overlap
chunks are static too: chunk i carries buffer slots [lo_i, hi_i) of every expert (C split evenly).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from . import comm
from .dispatch_base import Dispatcher, Flight, row_bytes


@dataclass(frozen=True)
class PaddedHandle:
    pos_N: torch.Tensor  # row i of x_ND sits at pos_N[i] of the flattened [E, C] buffer
    capacity: int  # C
    n_rows: int
    bytes_sent: int
    bytes_remote: int


@dataclass(frozen=True)
class StaticChunk:
    """One chunk of a static-capacity dispatch: buffer slots [lo, lo + width) of every expert."""

    dest_N: torch.Tensor  # [N] row i goes to row dest_N[i] of the flattened [E, width] buffer; E*width = not sent
    width: int  # slots of each expert in this chunk


@dataclass(frozen=True)
class StaticHandle:
    dest_N: torch.Tensor
    width: int
    n_rows: int
    bytes_sent: int
    bytes_remote: int


class PaddedDispatcher(Dispatcher):
    """Args (besides Dispatcher's): static_capacity_factor: None (C agreed per step, see the module
    docstring) or f > 0 (static capacity); top_k: K of the capacity formula (static mode)."""

    name = "padded"

    def __init__(self, layout, group, timeout_s=None, static_capacity_factor: Optional[float] = None,
                 top_k: int = 1) -> None:
        super().__init__(layout, group, timeout_s)
        self.static_capacity_factor = static_capacity_factor
        self.top_k = top_k

    @property
    def static(self) -> bool:
        return self.static_capacity_factor is not None

    def set_static_capacity_factor(self, factor: float) -> None:
        """Grow (or set) the static buffer's factor f: parallel/overflow.py's re-run policy. A Python
        float, so C stays host integer math; every rank must set the same f at the same step."""
        if not self.static:
            raise RuntimeError("padded dispatcher: set_static_capacity_factor needs a static buffer "
                               "(built with static_capacity_factor)")
        if isinstance(factor, bool) or not (math.isfinite(factor) and factor > 0):
            raise ValueError(f"padded dispatcher: static_capacity_factor must be a finite number > 0, got {factor!r}")
        self.static_capacity_factor = float(factor)

    def static_capacity(self, num_tokens: int) -> int:
        """C = max(1, ceil(f * T * K / E)) rows per (source rank, expert): host integers only."""
        f, E = self.static_capacity_factor, self.layout.num_experts
        return max(1, math.ceil(f * num_tokens * self.top_k / E))

    def factor_needed(self, counts_E: torch.Tensor, num_tokens: int,
                      holders_E: torch.Tensor | None = None) -> torch.Tensor:
        """The smallest factor whose static buffer holds every row of counts_E [E] (device): the
        largest count x E / (T x K), a 0-dim float64 device tensor (no host read). holders_E [E]
        (expert placement with replicas): expert e has holders_E[e] slots of C rows, so the largest
        ceil(count / holders) counts instead."""
        E = self.layout.num_experts
        if holders_E is not None:
            h = holders_E.to(device=counts_E.device, dtype=counts_E.dtype)
            counts_E = torch.div(counts_E + h - 1, h, rounding_mode="floor")
        most = counts_E.max() if counts_E.numel() else counts_E.new_zeros(())
        return most.to(torch.float64) * E / max(1, num_tokens * self.top_k)

    def static_plan(self, counts_E: torch.Tensor, expert_N: torch.Tensor, num_tokens: int, chunks: int = 1,
                    capacity: int | None = None):
        """Chunks of a static dispatch, with no host read and no collective.

        Args:
            counts_E: [E] rows per expert (on the device); expert_N: [N] expert of each row (non-decreasing).
            num_tokens: T of this call (the same on every rank of the group).
            chunks: the overlap degree c; C is split into c near-equal slot ranges (empty ones skipped).
            capacity: C itself (a host integer), instead of this dispatcher's formula: a placement's
                virtual layout of E + P*k slots keeps the layer's C (of E experts) per slot.
        Returns (list of StaticChunk, keep_N [N] bool: row within C, dropped: 0-dim int64 rows past C, C).
        """
        C = self.static_capacity(num_tokens) if capacity is None else int(capacity)
        E, N = self.layout.num_experts, expert_N.shape[0]
        dev = expert_N.device
        counts_E = counts_E.to(device=dev, dtype=torch.long)
        starts_E = torch.cumsum(counts_E, 0) - counts_E
        slot_N = torch.arange(N, device=dev) - starts_E[expert_N]  # position within its expert
        keep_N = slot_N < C
        dropped = (counts_E - C).clamp_min(0).sum()
        out, lo = [], 0
        for i in range(min(chunks, C)):
            w = C // chunks + (1 if i < C % chunks else 0)
            inside = keep_N & (slot_N >= lo) & (slot_N < lo + w)
            out.append(StaticChunk(torch.where(inside, expert_N * w + (slot_N - lo), E * w), w))
            lo += w
        return out, keep_N, dropped, C

    def plan(self, counts_list: list, capacity: Optional[int] = None) -> list:
        C = self.agree_capacity(torch.stack(counts_list), capacity)  # one C for every chunk
        return [C] * len(counts_list)

    def agree_capacity(self, counts_E: torch.Tensor, capacity: Optional[int] = None) -> int:
        """One C for the ep group: the largest rank's capacity, or with none (dropless) the largest count."""
        mine = torch.tensor([capacity or 0, int(counts_E.max()) if counts_E.numel() else 0])
        mine = comm.all_reduce_host(mine, self.group, op=dist.ReduceOp.MAX)
        cap, most = int(mine[0]), int(mine[1])
        if cap == 0:
            return most  # dropless: pad to the largest count anywhere
        if most > cap:
            raise ValueError(
                f"padded dispatcher: an expert holds {most} rows but the capacity is {cap}; "
                "the layer must drop routes beyond cfg.capacity(T) before dispatch"
            )
        return cap

    def remote_rows(self, per_rank: int) -> int:
        """Rows of one equal-split exchange (per_rank rows to each rank) that leave this rank."""
        return (self.layout.world - 1) * per_rank

    def _static_start(self, x_ND: torch.Tensor, chunk: StaticChunk) -> Flight:
        P, L, E, w = self.layout.world, self.layout.local_experts, self.layout.num_experts, chunk.width
        D = x_ND.shape[1]
        # one spare row takes the rows this chunk does not send; it is cut off before the all-to-all
        buf_ECD = x_ND.new_zeros(E * w + 1, D).index_add(0, chunk.dest_N, x_ND)[: E * w].view(E, w, D)
        if self.layout.shards > 1:
            buf_ECD = buf_ECD.index_select(0, self.dest_X.to(x_ND.device))
        splits = [L * w] * P
        token = self.a2a_start(buf_ECD.reshape(P * L * w, D), splits, splits)
        rb = row_bytes(x_ND)
        state = StaticHandle(chunk.dest_N, w, x_ND.shape[0], P * L * w * rb, self.remote_rows(L * w) * rb)
        return Flight(token, state)

    def dispatch_start(self, x_ND: torch.Tensor, counts_E: torch.Tensor, plan=None) -> Flight:
        if isinstance(plan, StaticChunk):
            return self._static_start(x_ND, plan)  # no check(): it would read counts on the host
        self.check(x_ND, counts_E)
        counts_E = counts_E.cpu()  # index math on the host
        P, L, E = self.layout.world, self.layout.local_experts, self.layout.num_experts
        C = self.agree_capacity(counts_E) if plan is None else plan
        D = x_ND.shape[1]
        expert_N = torch.repeat_interleave(torch.arange(E), counts_E)
        offsets_E = torch.cumsum(counts_E, 0) - counts_E
        pos_N = (torch.arange(x_ND.shape[0]) - offsets_E[expert_N] + expert_N * C).to(x_ND.device)
        buf_ECD = x_ND.new_zeros(E * C, D).index_add(0, pos_N, x_ND).view(E, C, D)
        if self.layout.shards > 1:
            buf_ECD = buf_ECD.index_select(0, self.dest_X.to(x_ND.device))  # [P*L, C, D]: each F-shard rank gets the whole expert
        splits = [L * C] * P
        token = self.a2a_start(buf_ECD.reshape(P * L * C, D), splits, splits)
        rb = row_bytes(x_ND)
        state = PaddedHandle(pos_N, C, x_ND.shape[0], P * L * C * rb, self.remote_rows(L * C) * rb)
        return Flight(token, state)

    def dispatch_finish(self, flight: Flight):
        h = flight.state
        P, L = self.layout.world, self.layout.local_experts
        C = h.width if isinstance(h, StaticHandle) else h.capacity
        x_recv = self.a2a_wait(flight.token)
        D = x_recv.shape[1]
        # [src, local expert, C] -> [local expert, src, C]: each local expert's rows contiguous
        x_MD = x_recv.view(P, L, C, D).transpose(0, 1).reshape(L * P * C, D)
        counts_L = torch.full((L,), P * C, dtype=torch.long, device=x_MD.device)
        return x_MD, counts_L, h

    def combine_start(self, y_MD: torch.Tensor, handle) -> Flight:
        P, L = self.layout.world, self.layout.local_experts
        C = handle.width if isinstance(handle, StaticHandle) else handle.capacity
        D = y_MD.shape[1]
        y_send = y_MD.view(L, P, C, D).transpose(0, 1).reshape(P * L * C, D)
        splits = [L * C] * P
        return Flight(self.a2a_start(y_send, splits, splits), handle)

    def combine_finish(self, flight: Flight) -> torch.Tensor:
        """y_ND in x_ND's rows; in static mode rows not in this chunk (or dropped) are zero."""
        h = flight.state
        E = self.layout.num_experts
        C = h.width if isinstance(h, StaticHandle) else h.capacity
        y_back = self.a2a_wait(flight.token)
        D = y_back.shape[1]
        if self.layout.shards > 1:
            # sum the partial outputs of the S F-shard ranks of each expert
            y_back = y_back.new_zeros(E * C, D).view(E, C, D).index_add(
                0, self.dest_X.to(y_back.device), y_back.view(self.dest_X.numel(), C, D))
        if isinstance(h, StaticHandle):
            y_pad = torch.cat([y_back.reshape(E * C, D), y_back.new_zeros(1, D)])  # the spare row: zeros
            return y_pad.index_select(0, h.dest_N)
        return y_back.reshape(E * C, D).index_select(0, h.pos_N)
