"""The dispatcher contract shared by every backend.

Legend: N rows on this rank grouped by global expert (x_ND, counts_E [E]); M rows this rank computes,
grouped by local expert (x_MD, counts_L [L]); P ranks; S F-shards per expert.

    x_MD, counts_L, handle = dispatcher.dispatch(x_ND, counts_E)
    y_MD = experts(x_MD, counts_L)
    y_ND = dispatcher.combine(y_MD, handle)           # same rows, same order as x_ND

Both halves are split into start/finish so the runner can pipeline chunks: the collective of one
chunk is in flight while the experts of another compute. `dispatch` = finish(start(...)).
Handles are frozen dataclasses; a dispatcher holds no parameters, so it is not an nn.Module.
"""
from __future__ import annotations

import datetime
from dataclasses import dataclass
from typing import Any, Optional

import torch

from . import comm
from .layout import ExpertLayout, expand_rows


@dataclass(frozen=True)
class Flight:
    """A collective in flight plus what `*_finish` needs to complete it."""

    token: Any
    state: Any


class Dispatcher:
    """Base class: subclasses implement the four start/finish halves."""

    name = "base"
    # What the runner may ask of any dispatcher, declared here; the backends that have a feature say so.
    static = False  # a fixed buffer per (source rank, expert): no host read, no counts collective
    host_counts_in_plan = False  # plan() brings the counts to the host itself: the runner reads none
    prefetches_counts = False  # plan_start/plan_finish: the counts exchange starts before the rows exist

    def __init__(self, layout: ExpertLayout, group, timeout_s: Optional[float] = None) -> None:
        self.layout = layout
        self._group = comm.GroupRef(group)  # borrowed, never owned: see comm.GroupRef
        # where the group's collectives run (NCCL: the current CUDA device; gloo: the CPU): fixed for
        # the group's life, so read once here rather than asked of the group on every layer call
        self.comm_device = comm.comm_device(group)
        self.timeout = None if timeout_s is None else datetime.timedelta(seconds=timeout_s)
        # dest_X[j*L + i]: the i-th global expert rank j holds; the order rows are sent in
        self.dest_X = layout.dest_experts()
        self.dest_list = self.dest_X.tolist()  # the same as Python ints, for host-side split math
        # the layout's sizes as plain ints (its properties compute them): read once, not per call
        self.P, self.L, self.E, self.S = layout.world, layout.local_experts, layout.num_experts, layout.shards

    @property
    def group(self):
        return self._group.get()

    # -- contract ---------------------------------------------------------------------------
    def dispatch(self, x_ND: torch.Tensor, counts_E: torch.Tensor):
        return self.dispatch_finish(self.dispatch_start(x_ND, counts_E))

    def gather_count_matrix(self, counts_list: list) -> list:
        """[P, E] counts of every rank, per chunk, with one all-gather of the stacked chunks."""
        stacked = comm.all_gather_counts(torch.stack(counts_list), self.group)  # [P, c, E]
        return [stacked[:, i] for i in range(len(counts_list))]

    def combine(self, y_MD: torch.Tensor, handle) -> torch.Tensor:
        return self.combine_finish(self.combine_start(y_MD, handle))

    def plan(self, counts_list: list, capacity: Optional[int] = None) -> list:
        """Metadata of several chunks with ONE small collective (the runner plans all chunks up
        front, so a chunk's dispatch costs one data collective, not a counts round-trip too).
        capacity: this rank's per-expert capacity of one chunk (None: dropless); only fixed-size
        buffers (the padded dispatcher) use it.
        Returns one opaque entry per chunk for `dispatch_start(..., plan=entry)`."""
        return [None] * len(counts_list)

    def plan_start(self, counts_list: list) -> Flight:  # pragma: no cover - abstract
        """Issue `plan`'s collective without waiting (dispatchers with prefetches_counts)."""
        raise NotImplementedError(f"{self.name} dispatcher: no prefetchable plan")

    def plan_finish(self, flight) -> list:  # pragma: no cover - abstract
        raise NotImplementedError(f"{self.name} dispatcher: no prefetchable plan")

    def dispatch_start(self, x_ND, counts_E, plan=None) -> Flight:  # pragma: no cover - abstract
        raise NotImplementedError

    def dispatch_finish(self, flight: Flight):  # pragma: no cover - abstract
        raise NotImplementedError

    def combine_start(self, y_MD, handle) -> Flight:  # pragma: no cover - abstract
        raise NotImplementedError

    def combine_finish(self, flight: Flight) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    # -- shared helpers ------------------------------------------------------------------------
    def check(self, x_ND: torch.Tensor, counts_E: torch.Tensor) -> None:
        E = self.layout.num_experts
        if counts_E.dim() != 1 or counts_E.shape[0] != E:
            raise ValueError(f"{self.name} dispatcher: counts_E must have shape [{E}], got {tuple(counts_E.shape)}")
        n = int(counts_E.sum())  # host sync; the dispatch needs the counts on the host anyway
        if n != x_ND.shape[0]:
            raise ValueError(f"{self.name} dispatcher: counts_E sums to {n} but x_ND has {x_ND.shape[0]} rows")

    def send_rows(self, x_ND: torch.Tensor, counts_E: torch.Tensor):
        """Rows in destination order. With S > 1 an expert's rows are repeated for each F-shard rank.

        Returns (x_send, send_idx or None): x_ND itself when every expert lives on one rank.
        """
        if self.S == 1:
            return x_ND, None
        send_idx = expand_rows(counts_E, self.dest_X).to(x_ND.device)
        return x_ND.index_select(0, send_idx), send_idx

    @staticmethod
    def gather_back(y_send: torch.Tensor, send_idx: Optional[torch.Tensor], n_rows: int) -> torch.Tensor:
        """Inverse of send_rows: the S partial outputs of an F-sharded expert are summed."""
        if send_idx is None:
            return y_send
        return y_send.new_zeros((n_rows,) + tuple(y_send.shape[1:])).index_add(0, send_idx, y_send)

    @staticmethod
    def to_expert_major(x_rows: torch.Tensor, recv_counts_PL: torch.Tensor):
        """Rows arrive source-major ([src][local expert]); experts want expert-major ([l][src]).
        recv_counts_PL is a host tensor; x_rows.shape[0] is its sum (so nothing is read here).
        Returns (x_MD, perm): x_MD = x_rows[perm] (perm None: L == 1, already expert-major). The
        combine puts the rows back with the same perm, `y.new_empty(y.shape).index_copy_(0, perm, y)`
        (row i back to perm[i]: one scatter, no inverse permutation to build).

        Row moves use index_select, not x[idx]: the advanced-indexing path is slower on CPU."""
        if recv_counts_PL.shape[1] == 1:
            return x_rows, None
        perm = block_permutation(recv_counts_PL, total=x_rows.shape[0]).to(x_rows.device)
        return x_rows.index_select(0, perm), perm

    def a2a_start(self, x, out_splits, in_splits, group=None):
        return comm.all_to_all_start(x, out_splits, in_splits, self.group if group is None else group,
                                     self.timeout)

    @staticmethod
    def a2a_wait(token) -> torch.Tensor:
        return comm.all_to_all_wait(token)


# -- row-order index math of the dispatchers (and the runner's chunks) ---------------------------
def block_permutation(sizes_AB: torch.Tensor, total: Optional[int] = None) -> torch.Tensor:
    """Row indices that reorder blocks laid out A-major ([a][b]) into B-major ([b][a]).

    sizes_AB[a, b] is the number of rows in block (a, b). Returns idx so that x[idx] is B-major.
    total: sizes_AB.sum() when the caller knows it as a Python int (then nothing is read here).
    """
    A, B = sizes_AB.shape
    flat = sizes_AB.reshape(-1)
    starts = (torch.cumsum(flat, 0) - flat).reshape(A, B)
    order_starts = starts.t().reshape(-1)
    order_sizes = sizes_AB.t().reshape(-1)
    total = int(order_sizes.sum()) if total is None else total
    if total == 0:
        return torch.zeros(0, dtype=torch.long)
    block_start = torch.cumsum(order_sizes, 0) - order_sizes
    return torch.arange(total) + torch.repeat_interleave(order_starts - block_start, order_sizes, output_size=total)


def inverse_permutation(idx: torch.Tensor) -> torch.Tensor:
    inv = torch.empty_like(idx)
    inv[idx] = torch.arange(idx.numel(), device=idx.device)
    return inv



def row_bytes(x: torch.Tensor) -> int:
    return int(x.shape[1]) * x.element_size() if x.dim() == 2 else 0
