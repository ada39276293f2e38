"""Hierarchical 2-D all-to-all dispatcher: gather within a node, then exchange across nodes.

Ranks are (node n, local index l), group rank g = n*Lw + l, Lw ranks per node, Nn nodes.
Stage 1 (intra-node, fast links): rank (n, l) sends to local peer l' every row destined for any
rank (*, l'). Stage 2 (inter-node, one peer per node): rank (n, l') sends to node n'' the rows of
all its local sources destined for (n'', l'). Cross-node messages are Lw times fewer and Lw times
larger than in the flat all-to-all, which is what slow multi-node links want (Tutel's 2-D a2a).
After stage 2 the rows arrive source-major in global rank order, as with the flat all-to-all-v.
Every rank all-gathers the full [P, E] count matrix first so it can compute all splits locally.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from . import comm
from .dispatch_base import Dispatcher, Flight, block_permutation, inverse_permutation, row_bytes
from .layout import ExpertLayout


@dataclass(frozen=True)
class HierarchicalHandle:
    splits1: tuple  # (out, in) of stage 1
    splits2: tuple  # (out, in) of stage 2
    perm1: torch.Tensor  # dest-major -> (l', n'') order before stage 1
    perm2: torch.Tensor  # (l, n'') -> (n'', l) order before stage 2
    perm: Optional[torch.Tensor]  # source-major -> expert-major
    send_idx: Optional[torch.Tensor]
    n_rows: int
    bytes_sent: int
    bytes_remote: int


class HierarchicalDispatcher(Dispatcher):
    name = "hierarchical"

    def __init__(self, layout: ExpertLayout, group, *, node_group, cross_group, local_world_size: int,
                 timeout_s: Optional[float] = None) -> None:
        super().__init__(layout, group, timeout_s)
        P, Lw = layout.world, local_world_size
        if Lw < 1 or P % Lw != 0:
            raise ValueError(
                f"hierarchical dispatcher: local_world_size ({Lw}) must divide the expert-parallel size ({P})"
            )
        self.lw, self.nodes = Lw, P // Lw
        # one rank per node: stage 1 is the identity; one node: stage 2 is (None = identity)
        self._node = comm.GroupRef(None if Lw == 1 else (group if Lw == P else node_group))
        self._cross = comm.GroupRef(None if Lw == P else (group if Lw == 1 else cross_group))
        if (1 < Lw < P) and (node_group is None or cross_group is None):
            raise ValueError("hierarchical dispatcher: node_group and cross_group are required when 1 < "
                             f"local_world_size ({Lw}) < ep size ({P})")

    @property
    def node_group(self):
        return self._node.get()

    @property
    def cross_group(self):
        return self._cross.get()

    def _stage_start(self, x, out_splits, in_splits, group):
        if group is None:
            return ("identity", x)
        return ("a2a", self.a2a_start(x, out_splits, in_splits, group))

    @staticmethod
    def _stage_wait(token):
        kind, t = token
        return t if kind == "identity" else comm.all_to_all_wait(t)

    def _stage(self, x, out_splits, in_splits, group):
        return self._stage_wait(self._stage_start(x, out_splits, in_splits, group))

    def plan(self, counts_list: list, capacity: Optional[int] = None) -> list:
        return self.gather_count_matrix(counts_list)

    def dispatch_start(self, x_ND: torch.Tensor, counts_E: torch.Tensor, plan=None) -> Flight:
        self.check(x_ND, counts_E)
        counts_E = counts_E.cpu()  # index math on the host
        P, L, Lw, Nn = self.layout.world, self.layout.local_experts, self.lw, self.nodes
        me = self.layout.rank
        n_me, l_me = divmod(me, Lw)
        counts_PE = self.plan([counts_E])[0] if plan is None else plan
        # M_PP[s, j]: rows source s sends to rank j (F-shard ranks each get the expert's rows)
        M_PP = counts_PE[:, self.dest_X].view(P, P, L).sum(-1)
        x_send, send_idx = self.send_rows(x_ND, counts_E)

        # stage 1: my dest-major blocks (n'', l') -> (l', n'') order, send block l' to local peer l'
        mine_NL = M_PP[me].view(Nn, Lw)
        perm1 = block_permutation(mine_NL).to(x_ND.device)
        in1 = mine_NL.sum(0).tolist()
        # from local source (n_me, l) I get its rows for (n'', l_me), all n''
        node_src = torch.arange(Lw) + n_me * Lw
        R1_LN = M_PP[node_src].view(Lw, Nn, Lw)[:, :, l_me]  # [l, n'']
        out1 = R1_LN.sum(1).tolist()
        x1 = self._stage(x_send.index_select(0, perm1), out1, in1, self.node_group)

        # stage 2: (l, n'') -> (n'', l); send block n'' to node n'' (same local index)
        perm2 = block_permutation(R1_LN).to(x_ND.device)
        in2 = R1_LN.sum(0).tolist()
        out2 = M_PP[:, me].view(Nn, Lw).sum(1).tolist()
        token = self._stage_start(x1.index_select(0, perm2), out2, in2, self.cross_group)

        recv_counts_PL = counts_PE[:, self.dest_X.view(P, L)[me]]
        rb = row_bytes(x_ND)
        n_sent = int(M_PP[me].sum())
        # remote bytes: what leaves this rank in stage 1 plus what leaves this node in stage 2
        remote = (n_sent - in1[l_me]) + (sum(in2) - in2[n_me])
        state = ((tuple(out1), tuple(in1)), (tuple(out2), tuple(in2)), perm1, perm2, send_idx,
                 x_ND.shape[0], recv_counts_PL, n_sent * rb, remote * rb)
        return Flight(token, state)

    def dispatch_finish(self, flight: Flight):
        s1, s2, perm1, perm2, send_idx, n_rows, recv_counts_PL, nbytes, nremote = flight.state
        x_recv = self._stage_wait(flight.token)
        x_MD, perm = self.to_expert_major(x_recv, recv_counts_PL)
        handle = HierarchicalHandle(s1, s2, perm1, perm2, perm, send_idx, n_rows, nbytes, nremote)
        return x_MD, recv_counts_PL.sum(0).to(x_MD.device), handle

    def combine_start(self, y_MD: torch.Tensor, handle: HierarchicalHandle) -> Flight:
        out1, in1 = handle.splits1
        out2, in2 = handle.splits2
        y2 = self.to_source_major(y_MD, handle.perm)
        # reverse stage 2 (blocking), then reverse stage 1 is the one left in flight
        y1 = self._stage(y2, in2, out2, self.cross_group).index_select(0, inverse_permutation(handle.perm2))
        return Flight(self._stage_start(y1, in1, out1, self.node_group), handle)

    def combine_finish(self, flight: Flight) -> torch.Tensor:
        h: HierarchicalHandle = flight.state
        y_send = self._stage_wait(flight.token).index_select(0, inverse_permutation(h.perm1))
        return self.gather_back(y_send, h.send_idx, h.n_rows)
