"""Dropless all-to-all-v dispatcher (the default).

Counts are exchanged first with one small all_to_all of [P, L] int64, then the rows move with an
uneven all_to_all: no padding, so bytes moved = routed rows x D x dtype size (`bytes_sent`).
Legend as in dispatch_base: x_ND grouped by global expert, x_MD grouped by local expert.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from . import comm
from .dispatch_base import Dispatcher, Flight, row_bytes


@dataclass(frozen=True)
class AllToAllVHandle:
    in_splits: tuple  # rows I sent to each rank
    out_splits: tuple  # rows I received from each rank
    perm: Optional[torch.Tensor]  # source-major -> expert-major (None when L == 1)
    send_idx: Optional[torch.Tensor]  # F-shard replication of rows (None when S == 1)
    n_rows: int  # N
    bytes_sent: int  # dispatch direction; the combine moves the same amount back
    bytes_remote: int  # of which to other ranks (the unavoidable part)


class AllToAllVDispatcher(Dispatcher):
    name = "alltoallv"

    def plan(self, counts_list: list, capacity: Optional[int] = None) -> list:
        P, L = self.layout.world, self.layout.local_experts
        send_PcL = torch.stack([c[self.dest_X].view(P, L) for c in counts_list], 1)
        recv_PcL = comm.exchange_counts(send_PcL, self.group)  # one [P, chunks, L] exchange
        return [recv_PcL[:, i] for i in range(len(counts_list))]

    def dispatch_start(self, x_ND: torch.Tensor, counts_E: torch.Tensor, plan=None) -> Flight:
        self.check(x_ND, counts_E)
        counts_E = counts_E.cpu()  # index math on the host
        P, L, me = self.layout.world, self.layout.local_experts, self.layout.rank
        send_counts_PL = counts_E[self.dest_X].view(P, L)
        recv_counts_PL = self.plan([counts_E])[0] if plan is None else plan
        in_splits = send_counts_PL.sum(1).tolist()  # host sync: splits must be known on the host
        out_splits = recv_counts_PL.sum(1).tolist()
        x_send, send_idx = self.send_rows(x_ND, counts_E)
        token = self.a2a_start(x_send, out_splits, in_splits)
        rb = row_bytes(x_ND)
        state = (recv_counts_PL, tuple(in_splits), tuple(out_splits), send_idx, x_ND.shape[0],
                 sum(in_splits) * rb, (sum(in_splits) - in_splits[me]) * rb)
        return Flight(token, state)

    def dispatch_finish(self, flight: Flight):
        recv_counts_PL, in_splits, out_splits, send_idx, n_rows, nbytes, nremote = flight.state
        x_recv = comm.all_to_all_wait(flight.token)
        x_MD, perm = self.to_expert_major(x_recv, recv_counts_PL)
        handle = AllToAllVHandle(in_splits, out_splits, perm, send_idx, n_rows, nbytes, nremote)
        return x_MD, recv_counts_PL.sum(0).to(x_MD.device), handle

    def combine_start(self, y_MD: torch.Tensor, handle: AllToAllVHandle) -> Flight:
        y_recv = self.to_source_major(y_MD, handle.perm)
        # reverse exchange: send back what I received, receive what I sent
        return Flight(self.a2a_start(y_recv, handle.in_splits, handle.out_splits), handle)

    def combine_finish(self, flight: Flight) -> torch.Tensor:
        y_send = comm.all_to_all_wait(flight.token)
        return self.gather_back(y_send, flight.state.send_idx, flight.state.n_rows)
