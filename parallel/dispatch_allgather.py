"""All-gather dispatcher for small expert-parallel groups (Megatron's allgather dispatcher).

Every rank all-gathers every rank's rows and counts, picks the rows of its own local experts, and
sends the outputs back to their sources with an all-to-all-v. It moves P-1 times more bytes than
the all-to-all-v dispatch but needs no counts exchange before the data moves, which wins when
P is small and latency, not bandwidth, dominates. Ranks hold different N, so rows are padded to
the largest N before the all-gather (backward: reduce-scatter of the padded gradient).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from . import comm
from .dispatch_base import Dispatcher, Flight, row_bytes
from .layout import expand_rows


@dataclass(frozen=True)
class AllGatherHandle:
    back_splits: tuple  # rows I return to each source (my local experts' rows of that source)
    home_splits: tuple  # rows each rank returns to me (dest-major, as x_send)
    perm: Optional[torch.Tensor]
    send_idx: Optional[torch.Tensor]
    n_rows: int
    bytes_sent: int
    bytes_remote: int


class AllGatherDispatcher(Dispatcher):
    name = "allgather"

    def plan(self, counts_list: list, capacity: Optional[int] = None) -> list:
        return self.gather_count_matrix(counts_list)

    def dispatch_start(self, x_ND: torch.Tensor, counts_E: torch.Tensor, plan=None) -> Flight:
        self.check(x_ND, counts_E)
        counts_E = counts_E.cpu()  # index math on the host
        P, L, me = self.layout.world, self.layout.local_experts, self.layout.rank
        counts_PE = self.plan([counts_E])[0] if plan is None else plan
        n_P = counts_PE.sum(1)
        n_max = int(n_P.max())  # host sync
        pad = x_ND.new_zeros(n_max - x_ND.shape[0], x_ND.shape[1])
        token = comm.all_gather_start(torch.cat([x_ND, pad], 0), self.group, self.timeout)
        rb = row_bytes(x_ND)
        return Flight(token, (counts_PE, n_max, x_ND, counts_E, P * n_max * rb, (P - 1) * n_max * rb))

    def dispatch_finish(self, flight: Flight):
        counts_PE, n_max, x_ND, counts_E, nbytes, nremote = flight.state
        P, L, me = self.layout.world, self.layout.local_experts, self.layout.rank
        x_all = comm.all_gather_wait(flight.token)  # [P * n_max, D], source-major
        my_L = self.dest_X.view(P, L)[me]
        # rows of my local experts in every source's block (source-major, expert order inside)
        idx = torch.cat([expand_rows(counts_PE[s], my_L) + s * n_max for s in range(P)]).to(x_all.device)
        recv_counts_PL = counts_PE[:, my_L]
        x_MD, perm = self.to_expert_major(x_all.index_select(0, idx), recv_counts_PL)
        back = recv_counts_PL.sum(1).tolist()
        home = counts_E[self.dest_X].view(P, L).sum(1).tolist()
        # F-sharded experts: each of the S ranks of an expert returns a partial output to sum
        send_idx = expand_rows(counts_E, self.dest_X).to(x_ND.device) if self.layout.shards > 1 else None
        handle = AllGatherHandle(tuple(back), tuple(home), perm, send_idx, x_ND.shape[0], nbytes, nremote)
        return x_MD, recv_counts_PL.sum(0).to(x_MD.device), handle

    def combine_start(self, y_MD: torch.Tensor, handle: AllGatherHandle) -> Flight:
        # back to arrival (source-major) order: row i returns to perm[i] (see to_expert_major)
        y_src = y_MD if handle.perm is None else y_MD.new_empty(y_MD.shape).index_copy_(0, handle.perm, y_MD)
        return Flight(self.a2a_start(y_src, handle.home_splits, handle.back_splits), handle)

    def combine_finish(self, flight: Flight) -> torch.Tensor:
        y_send = comm.all_to_all_wait(flight.token)
        return self.gather_back(y_send, flight.state.send_idx, flight.state.n_rows)
