"""Padded all-to-all dispatcher: fixed-size [E, C, D] buffers, equal splits.

C is the layer's capacity (the Plan's, of local T; per chunk when the runner chunks), passed to
`plan(counts_list, capacity=...)`. Ranks can hold different T, hence different capacities, but
equal-split buffers need one C: the ranks agree on the maximum with a tiny all_reduce (it is >=
every rank's counts). A dropless layer (capacity None) pads to the largest count over all ranks and experts instead.
Rows beyond the real counts are zeros; experts compute on them (fixed shapes, as on GPUs) and
their outputs are discarded by the combine, so they add nothing to any gradient.
"""
from __future__ import annotations

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


class PaddedDispatcher(Dispatcher):
    name = "padded"

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

    def dispatch_start(self, x_ND: torch.Tensor, counts_E: torch.Tensor, plan=None) -> Flight:
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
        state = PaddedHandle(pos_N, C, x_ND.shape[0], P * L * C * rb, (P - 1) * L * C * rb)
        return Flight(token, state)

    def dispatch_finish(self, flight: Flight):
        h: PaddedHandle = flight.state
        P, L, C = self.layout.world, self.layout.local_experts, h.capacity
        x_recv = comm.all_to_all_wait(flight.token)
        D = x_recv.shape[1]
        # [src, local expert, C] -> [local expert, src, C]: each local expert's rows contiguous
        x_MD = x_recv.view(P, L, C, D).transpose(0, 1).reshape(L * P * C, D)
        counts_L = torch.full((L,), P * C, dtype=torch.long, device=x_MD.device)
        return x_MD, counts_L, h

    def combine_start(self, y_MD: torch.Tensor, handle: PaddedHandle) -> Flight:
        P, L, C = self.layout.world, self.layout.local_experts, handle.capacity
        D = y_MD.shape[1]
        y_send = y_MD.view(L, P, C, D).transpose(0, 1).reshape(P * L * C, D)
        splits = [L * C] * P
        return Flight(self.a2a_start(y_send, splits, splits), handle)

    def combine_finish(self, flight: Flight) -> torch.Tensor:
        h: PaddedHandle = flight.state
        E, C = self.layout.num_experts, h.capacity
        y_back = comm.all_to_all_wait(flight.token)
        D = y_back.shape[1]
        if self.layout.shards > 1:
            # sum the partial outputs of the S F-shard ranks of each expert
            y_back = y_back.new_zeros(E * C, D).view(E, C, D).index_add(
                0, self.dest_X.to(y_back.device), y_back.view(self.dest_X.numel(), C, D))
        return y_back.reshape(E * C, D).index_select(0, h.pos_N)
