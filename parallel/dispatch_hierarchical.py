"""Hierarchical 2-D all-to-all dispatcher: gather within a node, then exchange across nodes.

Ranks are (node n, local index l), group rank g = n*Lw + l, Lw ranks per node, Nn nodes.
Stage 1 (intra-node, fast links): rank (n, l) sends to local peer l' every row destined for any
rank (*, l'). Stage 2 (inter-node, one peer per node): rank (n, l') sends to node n'' the rows of
all its local sources destined for (n'', l'). Cross-node messages are Lw times fewer and Lw times
larger than in the flat all-to-all, which is what slow multi-node links want (Tutel's 2-D a2a).
After stage 2 the rows arrive source-major in global rank order, as with the flat all-to-all-v.

The counts travel the same two stages before the rows (`plan`): each rank sends its [P, L] send
counts through an intra-node all-to-all ([Nn, L] to each local peer), then the [Lw, L] blocks it
received through a cross-node all-to-all. A rank so learns only what its two stages need (the
stage-1 counts of its node's sources for its local index, and the [P, L] counts of the rows it
will receive), in latency terms of (Lw - 1) + (Nn - 1) peers, not the P - 1 steps of a ring
all-gather of the whole [P, E] matrix (the plan this dispatcher had before: 19.6 ms of a 42.3 ms
layer at 2,048 GPUs in docs/planning.md).

`alltoall_2d_start/wait` is the same two-stage exchange for equal splits (rows_per_rank rows to
every rank): the padded 2-D dispatcher (dispatch_hierarchical_padded.py) sends its fixed-size
buffers through it.
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


@dataclass(frozen=True)
class HierarchicalPlan:
    """The counts one rank needs for one chunk (host int64 tensors), from the 2-D counts exchange.

    stage1_LNX[l, n'', i]: rows local source (n_me, l) sends to rank (n'', l_me)'s i-th local expert
    (what arrives here in stage 1 and leaves in stage 2); recv_PL[s, i]: rows source rank s sends to
    my i-th local expert (what arrives in stage 2)."""

    stage1_LNX: torch.Tensor  # [Lw, Nn, L]
    recv_PL: torch.Tensor  # [P, L]


def _stage_start(x, out_splits, in_splits, group, timeout):
    if group is None:
        return ("identity", x)
    return ("a2a", comm.all_to_all_start(x, out_splits, in_splits, group, timeout))


def _stage_wait(token):
    kind, t = token
    return t if kind == "identity" else comm.all_to_all_wait(t)


def _exchange(send_PX: torch.Tensor, group) -> torch.Tensor:
    return send_PX if group is None else comm.exchange_counts(send_PX, group)


def alltoall_2d_start(x_RD: torch.Tensor, rows_per_rank: int, lw: int, nodes: int, node_group, cross_group,
                      timeout=None):
    """The 2-D all-to-all of equal splits: x_RD holds rows_per_rank rows for each of the P = nodes*lw
    ranks, dest-major; the result (after `alltoall_2d_wait`) holds rows_per_rank rows from each
    rank, source-major: the flat all-to-all's result. Stage 1 runs here (blocking); stage 2 is left
    in flight. Differentiable: each stage's backward is the reverse all-to-all."""
    X, D = rows_per_rank, x_RD.shape[1]
    # (n'', l') -> (l', n''): the block for local peer l' holds its rows for every node
    x1 = x_RD.view(nodes, lw, X, D).transpose(0, 1).reshape(lw * nodes * X, D)
    x1 = _stage_wait(_stage_start(x1, [nodes * X] * lw, [nodes * X] * lw, node_group, timeout))
    # arrived as (l, n'') from local source l; send block n'' to node n'' as (n'', l)
    x2 = x1.view(lw, nodes, X, D).transpose(0, 1).reshape(nodes * lw * X, D)
    return _stage_start(x2, [lw * X] * nodes, [lw * X] * nodes, cross_group, timeout)


def alltoall_2d_wait(token) -> torch.Tensor:
    return _stage_wait(token)


class HierarchicalDispatcher(Dispatcher):
    name = "hierarchical"

    def __init__(self, layout: ExpertLayout, group, *, node_group, cross_group, local_world_size: int,
                 timeout_s: Optional[float] = None) -> None:
        super().__init__(layout, group, timeout_s)
        self.lw, self.nodes, self._node, self._cross = hierarchical_split(layout, group, node_group, cross_group,
                                                                           local_world_size, self.name)

    @property
    def node_group(self):
        return self._node.get()

    @property
    def cross_group(self):
        return self._cross.get()

    def _stage_start(self, x, out_splits, in_splits, group):
        return _stage_start(x, out_splits, in_splits, group, self.timeout)

    def _stage(self, x, out_splits, in_splits, group):
        return _stage_wait(self._stage_start(x, out_splits, in_splits, group))

    def plan(self, counts_list: list, capacity: Optional[int] = None) -> list:
        """The 2-D counts exchange of every chunk at once: an intra-node all-to-all of [Nn, c, L]
        per local peer, then a cross-node all-to-all of [c, Lw, L] per node (blocking, host)."""
        P, L, Lw, Nn, c = self.layout.world, self.layout.local_experts, self.lw, self.nodes, len(counts_list)
        send_cPL = torch.stack([counts_E.cpu()[self.dest_X] for counts_E in counts_list]).view(c, Nn, Lw, L)
        # stage 1: to local peer l' my counts for ranks (n'', l'), every n''
        r1 = _exchange(send_cPL.permute(2, 0, 1, 3).reshape(Lw, c * Nn * L), self.node_group).view(Lw, c, Nn, L)
        # stage 2: to node n'' what my local sources send to (n'', l_me)
        r2 = _exchange(r1.permute(2, 1, 0, 3).reshape(Nn, c * Lw * L), self.cross_group).view(Nn, c, Lw, L)
        return [HierarchicalPlan(r1[:, i], r2[:, i].reshape(P, L)) for i in range(c)]

    def dispatch_start(self, x_ND: torch.Tensor, counts_E: torch.Tensor, plan=None) -> Flight:
        self.check(x_ND, counts_E)
        counts_E = counts_E.cpu()  # index math on the host
        P, L, Lw, Nn = self.layout.world, self.layout.local_experts, self.lw, self.nodes
        n_me, l_me = divmod(self.layout.rank, Lw)
        p: HierarchicalPlan = self.plan([counts_E])[0] if plan is None else plan
        x_send, send_idx = self.send_rows(x_ND, counts_E)

        # stage 1: my dest-major blocks (n'', l') -> (l', n'') order, send block l' to local peer l'
        # (F-shard ranks each get the expert's rows)
        mine_NL = counts_E[self.dest_X].view(P, L).sum(1).view(Nn, Lw)
        perm1 = block_permutation(mine_NL).to(x_ND.device)
        in1 = mine_NL.sum(0).tolist()
        # from local source (n_me, l) I get its rows for (n'', l_me), all n''
        R1_LN = p.stage1_LNX.sum(-1)  # [l, n'']
        out1 = R1_LN.sum(1).tolist()
        x1 = self._stage(x_send.index_select(0, perm1), out1, in1, self.node_group)

        # stage 2: (l, n'') -> (n'', l); send block n'' to node n'' (same local index)
        perm2 = block_permutation(R1_LN).to(x_ND.device)
        in2 = R1_LN.sum(0).tolist()
        out2 = p.recv_PL.sum(1).view(Nn, Lw).sum(1).tolist()
        token = self._stage_start(x1.index_select(0, perm2), out2, in2, self.cross_group)

        rb = row_bytes(x_ND)
        n_sent = sum(in1)
        # remote bytes: what leaves this rank in stage 1 plus what leaves this node in stage 2
        remote = (n_sent - in1[l_me]) + (sum(in2) - in2[n_me])
        state = ((tuple(out1), tuple(in1)), (tuple(out2), tuple(in2)), perm1, perm2, send_idx,
                 x_ND.shape[0], p.recv_PL, n_sent * rb, remote * rb)
        return Flight(token, state)

    def dispatch_finish(self, flight: Flight):
        s1, s2, perm1, perm2, send_idx, n_rows, recv_counts_PL, nbytes, nremote = flight.state
        x_recv = _stage_wait(flight.token)
        x_MD, perm = self.to_expert_major(x_recv, recv_counts_PL)
        handle = HierarchicalHandle(s1, s2, perm1, perm2, perm, send_idx, n_rows, nbytes, nremote)
        return x_MD, recv_counts_PL.sum(0).to(x_MD.device), handle

    def combine_start(self, y_MD: torch.Tensor, handle: HierarchicalHandle) -> Flight:
        out1, in1 = handle.splits1
        out2, in2 = handle.splits2
        # back to arrival (source-major) order: row i returns to perm[i] (see to_expert_major)
        y2 = y_MD if handle.perm is None else y_MD.new_empty(y_MD.shape).index_copy_(0, handle.perm, y_MD)
        # reverse stage 2 (blocking), then reverse stage 1 is the one left in flight
        y1 = self._stage(y2, in2, out2, self.cross_group).index_select(0, inverse_permutation(handle.perm2))
        return Flight(self._stage_start(y1, in1, out1, self.node_group), handle)

    def combine_finish(self, flight: Flight) -> torch.Tensor:
        h: HierarchicalHandle = flight.state
        y_send = _stage_wait(flight.token).index_select(0, inverse_permutation(h.perm1))
        return self.gather_back(y_send, h.send_idx, h.n_rows)


def hierarchical_split(layout: ExpertLayout, group, node_group, cross_group, local_world_size: int, name: str):
    """(Lw, Nn, node GroupRef, cross GroupRef) of a 2-D dispatcher; a stage that is the identity (one
    rank per node, or one node) holds None."""
    P, Lw = layout.world, local_world_size
    if Lw < 1 or P % Lw != 0:
        raise ValueError(f"{name} dispatcher: local_world_size ({Lw}) must divide the expert-parallel size ({P})")
    if (1 < Lw < P) and (node_group is None or cross_group is None):
        raise ValueError(f"{name} dispatcher: node_group and cross_group are required when 1 < "
                         f"local_world_size ({Lw}) < ep size ({P})")
    node = comm.GroupRef(None if Lw == 1 else (group if Lw == P else node_group))
    cross = comm.GroupRef(None if Lw == P else (group if Lw == 1 else cross_group))
    return Lw, P // Lw, node, cross
