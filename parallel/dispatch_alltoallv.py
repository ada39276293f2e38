"""Dropless all-to-all-v dispatcher (the default).

Counts are exchanged first with one small all_to_all of [P, L] int64, then the rows move with an
uneven all_to_all: no padding, so bytes moved = routed rows x D x dtype size (`bytes_sent`).
One host read per layer call (`plan`): the send counts of every chunk and the received counts come
to the host together, once, after the exchange; the splits, the chunks' rows and the metrics are
then Python integers (tests/parallel/test_static_capacity.py counts the reads).

The plan is split in two so the read overlaps device work: `plan_start` issues the counts exchange
asynchronously and, on CUDA, the device-to-host copy of the counts into pinned memory
(non_blocking, followed by an event) behind it on the stream; `plan_finish` waits (the event; on
CPU the exchange itself) and reads. The runner's `prefetch` calls plan_start right after routing,
so the layer's permute (x_TD -> x_ND, which needs no split) runs while the counts travel
(tests/parallel/test_alltoallv_overlap.py checks the order).
Legend as in dispatch_base: x_ND grouped by global expert, x_MD grouped by local expert.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.distributed as dist

from . import comm
from .dispatch_base import Dispatcher, Flight


@dataclass(frozen=True)
class AllToAllVHandle:
    in_splits: tuple  # rows I sent to each rank
    out_splits: tuple  # rows I received from each rank
    perm: Optional[torch.Tensor]  # source-major -> expert-major (None when L == 1)
    send_idx: Optional[torch.Tensor]  # F-shard replication of rows (None when S == 1)
    n_rows: int  # N
    bytes_sent: int  # dispatch direction; the combine moves the same amount back
    bytes_remote: int  # of which to other ranks (the unavoidable part)
    group: Any  # the ep group, for the combine (held for the layer call only; the dispatcher holds it weakly)


@dataclass(frozen=True)
class AllToAllVPlan:
    """One chunk's host-side metadata, from the plan's single host read."""

    counts_E: tuple  # rows per global expert I hold (Python ints)
    recv_counts_PL: torch.Tensor  # [P, L] host tensor: rows each source sends my local experts
    in_splits: tuple  # rows I send to each rank
    out_splits: tuple  # rows I receive from each rank
    group: Any  # the ep group, looked up once per layer call (held for that call only)


@dataclass(frozen=True)
class PlanFlight:
    """A counts exchange in flight (plan_start), and on CUDA the host copy queued behind it."""

    counts_cE: torch.Tensor  # [c, E] what I send per chunk, on the collective's device
    recv_PcL: torch.Tensor  # [P, c, L] what I receive; valid after `work` completes
    work: Any  # gloo: the exchange, waited in plan_finish (CUDA: None, the side stream waited)
    flat: Optional[torch.Tensor]  # CUDA: the copy's device source, alive until the copy is done
    host: Optional[torch.Tensor]  # CUDA: pinned [c*E + P*c*L], filled by a non_blocking copy
    ready: Any  # CUDA: the event recorded after that copy
    chunks: int
    group: Any  # the ep group the exchange runs in


class AllToAllVDispatcher(Dispatcher):
    name = "alltoallv"
    host_counts_in_plan = True  # plan() brings the counts to the host: the runner reads none itself
    prefetches_counts = True  # plan_start() issues the counts exchange; plan_finish() waits and reads
    _copy_stream = None  # CUDA: the side stream of plan_start's exchange wait and host copy (lazy)

    def plan(self, counts_list: list, capacity: Optional[int] = None) -> list:
        """One [P, chunks, L] counts exchange on the collective's device, then the one host read."""
        return self.plan_finish(self.plan_start(counts_list))

    def plan_start(self, counts_list: list) -> PlanFlight:
        """Issue the counts exchange of every chunk (async) and, on CUDA, the copy of the counts to
        pinned host memory behind it on the current stream; nothing here waits or reads."""
        P, L, E = self.P, self.L, self.E
        c = len(counts_list)
        # the layer call's one look-up of the ep group (and its check that the group still exists):
        # the plans and handles carry it to the call's all-to-alls
        group, dev = self._group.get(), self.comm_device
        counts_cE = torch.stack(counts_list).to(device=dev, dtype=torch.long)
        dest = self.dest_X.to(dev)
        send_PcL = counts_cE.index_select(1, dest).view(c, P, L).transpose(0, 1).contiguous()
        recv_PcL = torch.empty_like(send_PcL)
        # the counts exchange, issued: recv_PcL is valid once `work` completes (waited in plan_finish;
        # on CUDA, by the side stream below, so the host does not block)
        work = dist.all_to_all_single(recv_PcL, send_PcL, group=group, async_op=True)
        if dev.type != "cuda":  # gloo: the host waits for the exchange in plan_finish
            return PlanFlight(counts_cE, recv_PcL, work, None, None, None, c, group)
        # on a side stream, so the current stream's next work (the layer's permute) does not queue
        # behind the exchange; the flight holds counts_cE and recv_PcL until plan_finish has waited
        # for `ready`, so their memory is not reused while the side stream reads them
        if self._copy_stream is None:
            self._copy_stream = torch.cuda.Stream(device=dev)
        side = self._copy_stream
        side.wait_stream(torch.cuda.current_stream(dev))  # counts_cE is written on the current stream
        host = torch.empty(c * E + P * c * L, dtype=torch.long, pin_memory=True)
        ready = torch.cuda.Event()
        with torch.cuda.stream(side):
            work.wait()  # NCCL: orders the side stream after the exchange; the host does not block
            flat = torch.cat([counts_cE.reshape(-1), recv_PcL.reshape(-1)])
            host.copy_(flat, non_blocking=True)  # device-to-host, queued: no sync here
            ready.record(side)
        return PlanFlight(counts_cE, recv_PcL, None, flat, host, ready, c, group)

    def plan_finish(self, flight: PlanFlight) -> list:
        """Wait for plan_start's exchange (and copy) and read the counts: the layer call's one host read."""
        P, L, E, c = self.P, self.L, self.E, flight.chunks
        if flight.host is not None:
            flight.ready.synchronize()  # the host waits for the copy only, not for later device work
            flat = flight.host.tolist()  # the one host read (pinned memory, already on the host)
        else:
            flight.work.wait()
            # the one host read of the layer call: what I send (per chunk) and what I receive, together
            flat = torch.cat([flight.counts_cE.reshape(-1), flight.recv_PcL.reshape(-1)]).tolist()
        dest_X = self.dest_list
        out = []
        for i in range(c):
            counts_E = tuple(flat[i * E:(i + 1) * E])
            send = [counts_E[e] for e in dest_X]
            recv = [flat[c * E + (p * c + i) * L + l] for p in range(P) for l in range(L)]
            out.append(AllToAllVPlan(counts_E, torch.tensor(recv, dtype=torch.long).view(P, L),
                                     tuple(sum(send[p * L:(p + 1) * L]) for p in range(P)),
                                     tuple(sum(recv[p * L:(p + 1) * L]) for p in range(P)), flight.group))
        return out

    def dispatch_start(self, x_ND: torch.Tensor, counts_E: torch.Tensor, plan=None) -> Flight:
        E = self.E
        if counts_E.dim() != 1 or counts_E.shape[0] != E:
            raise ValueError(f"{self.name} dispatcher: counts_E must have shape [{E}], got {tuple(counts_E.shape)}")
        p: AllToAllVPlan = self.plan([counts_E])[0] if plan is None else plan
        if sum(p.counts_E) != x_ND.shape[0]:
            raise ValueError(f"{self.name} dispatcher: counts_E sums to {sum(p.counts_E)} but x_ND has "
                             f"{x_ND.shape[0]} rows")
        me = self.layout.rank
        recv_counts_PL, in_splits, out_splits = p.recv_counts_PL, list(p.in_splits), list(p.out_splits)
        if self.S == 1:  # every expert on one rank: the rows go as they are
            x_send, send_idx = x_ND, None
        else:
            x_send, send_idx = self.send_rows(x_ND, torch.tensor(p.counts_E, dtype=torch.long))
        token = comm.all_to_all_start(x_send, out_splits, in_splits, p.group, self.timeout)
        rb = int(x_ND.shape[1]) * x_ND.element_size()  # bytes per row (x_ND is [N, D])
        state = (recv_counts_PL, tuple(in_splits), tuple(out_splits), send_idx, x_ND.shape[0],
                 sum(in_splits) * rb, (sum(in_splits) - in_splits[me]) * rb, p.group)
        return Flight(token, state)

    def dispatch_finish(self, flight: Flight):
        recv_counts_PL, in_splits, out_splits, send_idx, n_rows, nbytes, nremote, group = flight.state
        x_recv = comm.all_to_all_wait(flight.token)
        x_MD, perm = self.to_expert_major(x_recv, recv_counts_PL)
        handle = AllToAllVHandle(in_splits, out_splits, perm, send_idx, n_rows, nbytes, nremote, group)
        return x_MD, recv_counts_PL.sum(0).to(x_MD.device), handle

    def combine_start(self, y_MD: torch.Tensor, handle: AllToAllVHandle) -> Flight:
        # back to arrival (source-major) order: row i returns to perm[i] (see to_expert_major)
        y_recv = y_MD if handle.perm is None else y_MD.new_empty(y_MD.shape).index_copy_(0, handle.perm, y_MD)
        # reverse exchange: send back what I received, receive what I sent
        return Flight(comm.all_to_all_start(y_recv, handle.in_splits, handle.out_splits, handle.group, self.timeout),
                      handle)

    def combine_finish(self, flight: Flight) -> torch.Tensor:
        y_send = comm.all_to_all_wait(flight.token)
        if flight.state.send_idx is None:  # no F-shard copies to sum
            return y_send
        return self.gather_back(y_send, flight.state.send_idx, flight.state.n_rows)
