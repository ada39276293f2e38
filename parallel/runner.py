"""ExpertParallelRunner: what the sharded MoELayer calls instead of its LocalRunner.

    y_ND = runner(x_ND, plan, experts, weights)  # x_ND: this rank's rows grouped by global expert;
                                                 # counts, capacity and T come from the layer's Plan;
                                                 # weights: experts.local_weights() (this rank's shards)

Per call it asks the tuner for (mode, overlap degree c), runs
  ep:         rows split into c chunks (each expert's rows split evenly, so every chunk stays
              grouped by expert); chunk i+1's dispatch and chunk i-1's combine are in flight
              while chunk i's experts compute (forward; the backward mirrors it, see comm.py);
  sharded_dp: weights gathered in c F-chunks while the previous chunk computes.
With shared experts the layer hands the runner its shared work (`shared=SharedWork`, dense FFNs on
the layer's own tokens, no communication): it runs after the first dispatch is issued and before
it is waited for (ep), or while the first weight chunk is gathered (sharded_dp), so the dense FFN
hides the dispatch. The call then returns (y_ND, s_TD). The backward overlaps too, by the autograd
engine's order: of the nodes ready, it runs the latest-created first, so the shared FFN's backward
(created between the dispatch's Start and Wait) runs after the Wait node launches the reverse
all-to-all and before the Start node waits for it (tests/parallel/test_shared_experts_ep.py).
Reports timings, bytes and decisions in `last_metrics` (the layer adds the prefix "runtime/";
the keys are the same in every mode, METRICS, so reductions over ranks always line up).

Decisions are global (see tuner.py): the routing statistics and step times go through one small
all-gather in the ep group, then, when the job has several ep groups, one all-reduce (max) over
`agree_group`, so every rank of the job feeds its tuner the same numbers on the same calls.
Forward-only calls (evaluation, `torch.no_grad`) run the current decision and leave the tuner and
its timings alone: every rank makes them at the same points, but a forward-only time is no trial.

Static capacity (the padded dispatcher with `static_capacity_factor`): the ep mode runs with no host
read and no collective but the data all-to-alls (the counts stay on the device; its chunks are slot
ranges of the fixed buffer). Rows past the capacity are dropped in every mode (sharded_dp zeroes
the same rows), so the modes still give the same numbers; `overflow_dropped` (a 0-dim device
tensor) counts them, and `static_factor_needed` (0-dim device tensor) is the smallest factor that
would have held this call's rows. overflow="error" then checks, after the combine, with one
all-reduce over the ep group, and raises on every rank together; overflow="rerun" drops and counts
here, and the trainer re-runs the step with a larger factor (parallel/overflow.py). Under an expert
placement C is per slot (the layer's C): a permutation drops the rows the canonical layout drops;
an expert with h holders keeps its first h*C rows of each source (the replica plan fills the holders
in turn), and the factor needed is per holder (docs/placement.md).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.distributed as dist

from .comm import GroupRef, all_gather_counts, all_reduce_host
from .dispatch_base import Dispatcher, inverse_permutation
from .layout import ExpertLayout, chunk_rows, split_counts
from .placement import Placement, replica_plan, replica_routes, replica_weights, slot_plan, static_keep
from .sharded_dp import ShardedDataParallel
from .timing import HostClock
from .tuner import Stats, Tuner

# every key of last_metrics, in every mode (absent ones are 0): ranks reduce them as one tensor
TIMER_KEYS = ("plan_s", "dispatch_start_s", "shared_s", "wait_s", "compute_s", "combine_start_s")
METRICS = TIMER_KEYS + ("bytes_sent", "bytes_remote", "bytes_min", "chunks", "fwd_s", "prev_fwd_bwd_s",
                        "mode_is_ep", "degree", "tuner_exploring", "tuner_decisions", "overflow_dropped",
                        "static_factor_needed", "placement_imbalance", "placement_moves")


@dataclass
class _Prepared:
    """One layer call's decision, and the plan collective prefetch() issued (None: not issued)."""

    plan: Any
    counts_E: torch.Tensor
    static: bool
    mode: str
    degree: int
    tuning: bool
    chunk_counts: Optional[list]
    flight: Any  # the dispatcher's plan_start(chunk_counts), finished by plan_finish in _run_ep
    issue_s: float
    report: Optional[dict]  # the tuner's report, when the step ran on its lease (else asked after the call)
    source: Any = None  # the layer's plan as given (`plan` is its slot-space copy under a placement)
    rows_N: Optional[torch.Tensor] = None  # x_ND rows in slot order (None: the identity placement)
    dispatcher: Any = None  # the replica layout's dispatcher (None: the runner's own)


class ExpertParallelRunner:
    """Args:
        group: the ep group (tokens move inside it).
        agree_group: the ranks that take every decision together (the whole job; None: `group`).
    """

    local = False  # rows move between ranks: the layer keeps its host plan (see moesys.moe.runner.Runner)
    overlaps_shared = True  # takes the layer's shared-expert work and runs it while tokens travel

    @property
    def group(self):
        return self._group.get()

    @property
    def agree_group(self):
        return self._agree.get()

    def __init__(self, *, layout: ExpertLayout, group, dispatcher: Dispatcher, sharded: ShardedDataParallel,
                 tuner: Tuner, agree_group=None, overflow: str = "drop", clock=None, dispatcher_for=None) -> None:
        self.layout = layout
        # static capacity: "drop" (count) | "error" (raise on every rank) | "rerun" (count here; the
        # trainer re-runs the step with a larger buffer, see parallel/overflow.py)
        self.overflow = overflow
        # borrowed, never owned (GroupRef): destroy_process_group() must be able to destroy them
        self._group, self._agree = GroupRef(group), GroupRef(agree_group)
        # several ep groups: a second, job-wide agreement step (same answer on every rank: sizes agree)
        self._many_groups = agree_group is not None and dist.get_world_size(agree_group) != dist.get_world_size(group)
        # what the tuner's trials are timed with (apply_expert_parallel passes CUDA events on a GPU)
        self.clock = clock if clock is not None else HostClock()
        self._timing = False  # this step is one of the tuner's timed trials: mark its fwd and bwd
        self._fwd_marks: Optional[tuple] = None  # (start, end) marks of the timed forward
        self.current: tuple = tuner.decision  # the (mode, degree) of the latest call
        self.dispatcher = dispatcher
        # the global experts this rank holds (Python ints: host-side metric math)
        self._mine_list = dispatcher.dest_list[layout.rank * layout.local_experts:(layout.rank + 1) * layout.local_experts]
        self.sharded = sharded
        self.tuner = tuner
        self._last_seconds: Optional[float] = None
        self._bwd_marks: list = [None, None]  # marks at the timed backward's start / latest end
        self.last_metrics: dict = {}
        self._prepared: Optional[_Prepared] = None  # prefetch()'s, until __call__ takes it
        # fixed for the runner's life, read once here rather than asked of their owners on every call
        self._num_experts = layout.num_experts
        self._static = dispatcher.static
        self._counts_on_device = dispatcher.static or dispatcher.host_counts_in_plan
        self._prefetches = dispatcher.prefetches_counts
        self._pinned = tuner.pinned
        self._shards = layout.shards
        # the tuner's lease (Tuner.lease): decided steps run with no tuner call; empty until it decides
        self._lease = iter(())
        self._report: dict = {}  # the tuner's report for the steps of the lease
        # expert placement (parallel/placement.py): slot -> expert; the identity is the canonical layout
        self.placement = Placement.identity(layout.num_experts)
        self._placed = False  # not the identity: read once per set_placement, not on every call
        self._slot_maps: dict = {}  # device -> (slots [E], position [E]) tensors of the placement
        self._track = False  # accumulate per-expert rows of training forwards (placement decisions)
        self._load_E: Optional[torch.Tensor] = None
        self.placement_moves = 0  # re-placements applied so far
        self.placement_report = {"placement_imbalance": 0.0, "placement_moves": 0.0}
        # replicas: a dispatcher over the virtual layout of E + P*k slots (dispatcher_for(layout) builds one)
        self._dispatcher_for = dispatcher_for
        # (dispatcher, my virtual slots, holders table [E, H], holders [E], holders by slot [E]): set_placement
        self._rep: Optional[tuple] = None
        self._rep_maps: dict = {}  # device -> the replicas' index tensors there (made once per placement)

    # -- expert placement (see parallel/placement.py) ---------------------------------------------
    def set_placement(self, placement: Placement) -> None:
        """Adopt `placement` (the caller moved the weights: placement.apply_placement)."""
        if len(placement.slots) != self._num_experts:
            raise ValueError(f"ExpertParallelRunner: a placement of {len(placement.slots)} experts for a layer of "
                             f"{self._num_experts}")
        if self.layout.shards > 1 and not placement.is_identity:
            raise ValueError(f"expert placement needs whole experts per rank: the ep size ({self.layout.world}) is "
                             f"larger than num_experts ({self._num_experts}), so experts are split along F")
        placement.check(self.layout.world)
        self._rep, self._rep_maps = None, {}
        if placement.replicas:
            if self._dispatcher_for is None:
                raise ValueError(f"expert replicas need a dispatcher built by apply_expert_parallel; this runner's "
                                 f"{self.dispatcher.name!r} was not")
            P, L, k = self.layout.world, self.layout.local_experts, len(placement.replicas) // self.layout.world
            virtual = ExpertLayout(world=P, rank=self.layout.rank, num_experts=self._num_experts + P * k,
                                   ffn_size=self.layout.ffn_size)
            hold = placement.holders(P)
            H = max(len(h) for h in hold)
            table = torch.tensor([h + [h[-1]] * (H - len(h)) for h in hold], dtype=torch.long)
            mine = list(range(self.layout.rank * (L + k), (self.layout.rank + 1) * (L + k)))
            nh = torch.tensor([len(h) for h in hold])
            # (virtual dispatcher, my virtual slots, holders table [E, H], holders [E], holders by slot [E])
            self._rep = (self._dispatcher_for(virtual), mine, table, nh,
                         nh.index_select(0, torch.tensor(placement.slots, dtype=torch.long)))
        if placement != self.placement:
            self.placement_moves += 1
        self.placement = placement
        self._placed = not placement.is_identity
        self._slot_maps = {}

    def track_load(self, on: bool) -> None:
        self._track = bool(on)
        self._load_E = None

    def step_state(self) -> dict:
        """What a training forward advances besides the tuner (moesys.step_state: a re-run step puts it
        back): the per-expert rows accumulated for the placement decisions."""
        return {"load_E": None if self._load_E is None else self._load_E.clone()}

    def load_step_state(self, state: dict) -> None:
        load = state["load_E"]
        self._load_E = None if load is None else load.clone()

    def take_load(self) -> torch.Tensor:
        """[E] float64 CPU: this rank's kept rows per expert over the training forwards since the
        last take (a host read), then reset."""
        load = self._load_E
        self._load_E = None
        if load is None:
            return torch.zeros(self._num_experts, dtype=torch.float64)
        return load.to(device="cpu", dtype=torch.float64)

    def _rep_on(self, dev) -> tuple:
        """The replicas' index tensors on `dev`, copied there once per placement (a host-to-device
        copy on every step would wait for the device): (holders table [E, H], holders [E], holders
        by slot [E], (replica_weights' index))."""
        maps = self._rep_maps.get(dev)
        if maps is None:
            send, out_splits, in_splits, inv = replica_routes(self.placement, self.layout)
            index = (torch.tensor(send, dtype=torch.long, device=dev), torch.tensor(inv, dtype=torch.long, device=dev),
                     out_splits, in_splits)
            maps = self._rep_maps[dev] = tuple(t.to(dev) for t in self._rep[2:5]) + (index,)
        return maps

    def _replica_plan(self, plan, static: bool):
        """Static buffer: the holders filled in turn, C rows each (the expert keeps its first nh*C)."""
        table, nh = self._rep_on(plan.counts_E.device)[:2]
        fill = self.dispatcher.static_capacity(plan.num_tokens) if static else None
        return replica_plan(plan, table, nh, self._rep[0].E, fill=fill)

    def _replica_weights(self, weights: tuple) -> tuple:
        dev = next(w for w in weights if w is not None).device
        return replica_weights(weights, self.placement, self.layout, self.group, self._rep_on(dev)[3])

    def _slot_plan(self, plan):
        dev = plan.counts_E.device
        maps = self._slot_maps.get(dev)
        if maps is None:
            maps = self._slot_maps[dev] = (torch.tensor(self.placement.slots, dtype=torch.long, device=dev),
                                           torch.tensor(self.placement.position(), dtype=torch.long, device=dev))
        return slot_plan(plan, *maps)

    # -- backward timing: the tuner times forward + backward, since the modes differ in both ----
    def watch_params(self, params) -> None:
        """Post-accumulate hooks on the local expert weights mark the end of this layer's backward."""
        for p in params:
            if p is not None and p.requires_grad:
                p.register_post_accumulate_grad_hook(lambda _p: self._mark_bwd(1))

    def _mark_bwd(self, which: int) -> None:
        # hooks fire in the order the backward runs, so the last end mark is the latest
        if self._timing:
            self._bwd_marks[which] = self.clock.mark()

    def _hook_backward(self, x_ND: torch.Tensor, y_ND: torch.Tensor) -> None:
        self._bwd_marks = [None, None]
        if y_ND.requires_grad:
            y_ND.register_hook(lambda g: self._mark_bwd(0))
        if x_ND.requires_grad:
            x_ND.register_hook(lambda g: self._mark_bwd(1))

    def _previous_step_seconds(self) -> Optional[float]:
        """Forward + backward seconds of the previous call if it was a timed trial, else None."""
        if self._fwd_marks is None:
            return None
        fwd = self.clock.seconds(*self._fwd_marks)
        start, end = self._bwd_marks
        bwd = max(self.clock.seconds(start, end), 0.0) if start is not None and end is not None else 0.0
        self._fwd_marks, self._bwd_marks = None, [None, None]
        return fwd + bwd

    # -- statistics every rank agrees on ------------------------------------------------------
    def _agreed_stats(self, counts_E: torch.Tensor, num_tokens: int) -> tuple:
        """One small all-gather of [counts_E, T, last step seconds]; every rank derives the same stats."""
        L = self.layout.local_experts
        last = self._last_seconds if self._last_seconds is not None else -1.0
        mine = torch.cat([counts_E.to(device="cpu", dtype=torch.float64),
                          torch.tensor([float(num_tokens), last], dtype=torch.float64)])
        every_PX = all_gather_counts(mine, self.group)
        counts_PE = every_PX[:, :-2]
        counts_g = counts_PE.sum(0)
        per_rank = counts_g[self.dispatcher.dest_X].view(self.layout.world, L).sum(1)
        stats = Stats(tokens=int(every_PX[:, -2].sum()), rows=int(counts_g.sum()), max_rank_rows=int(per_rank.max()),
                      max_local_rows=int(counts_PE.sum(1).max()))
        slowest = float(every_PX[:, -1].max())  # the step is as slow as its slowest rank
        if self._many_groups:
            # the job's view: the busiest ep group's statistics, the slowest rank's time (field-wise max)
            job = all_reduce_host(torch.tensor(stats.as_list() + [slowest], dtype=torch.float64),
                                  self.agree_group, op=dist.ReduceOp.MAX).tolist()
            stats, slowest = Stats.from_list(job[:-1]), job[-1]
        return stats, (slowest if slowest >= 0 else None)

    def prefetch(self, plan) -> None:
        """Start what this layer call needs before its rows exist. The layer calls it right after
        routing, before it permutes x_TD into x_ND: the decision (mode, overlap degree) and, in ep
        mode with a dispatcher that has `plan_start` (all-to-all-v), the counts exchange and the
        copy of the splits to the host, so the permute runs while they travel; `__call__` with the
        same plan then waits and reads (its one host read). Without prefetch, `__call__` does both
        at once: the same collectives in the same order either way."""
        self._prepared = self._prepare(plan)  # a stale one (its call raised) is dropped

    def _prepare(self, plan) -> _Prepared:
        if plan.counts_E.shape[0] != self._num_experts:
            raise ValueError(
                f"ExpertParallelRunner: plan.counts_E has {plan.counts_E.shape[0]} experts, "
                f"layout has {self._num_experts}"
            )
        source, rows_N = plan, None
        if self._track and torch.is_grad_enabled():  # device add, no read: taken at the decision
            c = plan.counts_E.detach()
            self._load_E = c.clone() if self._load_E is None else self._load_E + c
        if self._placed:
            plan, rows_N = self._slot_plan(plan)
        static = self._static
        # host copy: splits are host-side integers anyway; a static buffer needs none, and the
        # all-to-all-v dispatcher reads the counts once itself, with the exchanged ones (its plan)
        counts_E = plan.counts_E.to(torch.long) if self._counts_on_device else plan.counts_E.to(torch.long).cpu()
        grad = torch.is_grad_enabled()
        decided = next(self._lease, None) if grad else None
        if decided is not None:
            # the tuner's lease: a decided step with no statistics check due (pinned: every step). No
            # tuner call, no trial timing: the tuner counts the step when it is next asked
            (mode, c), tuning = decided, False
            self._last_seconds = None
        elif not grad:  # forward-only: the current decision, the tuner and its timings left alone
            (mode, c), tuning = self.tuner.decision, False
        else:
            tuner, tuning = self.tuner, not self._pinned
            if tuning:
                self._last_seconds = self._previous_step_seconds()
                if tuner.wants_stats():
                    stats, last = self._agreed_stats(counts_E, plan.num_tokens)
                    mode, c = tuner.choose(stats, last)
                else:
                    mode, c = tuner.keep()
            else:
                mode, c = tuner.choose(None, None)
            # the next decided steps run on the lease; the tuner's report stays as it is until then
            self._lease, self._report = tuner.lease(), tuner.report()
        self.current = (mode, c)
        t0 = time.perf_counter()
        chunk_counts, flight, dispatcher = None, None, None
        if mode == "ep" and self._rep is not None:  # replicas: the virtual layout's slots and dispatcher
            plan, rows_N = self._replica_plan(source, static)
            counts_E = plan.counts_E.to(torch.long) if self._counts_on_device else plan.counts_E.to(torch.long).cpu()
            dispatcher = self._rep[0]
        if mode == "ep" and not static and self._prefetches:
            chunk_counts = [counts_E] if c == 1 else split_counts(counts_E, c)
            flight = (dispatcher or self.dispatcher).plan_start(chunk_counts)  # issued, not waited for
        return _Prepared(plan, counts_E, static, mode, c, tuning, chunk_counts, flight, time.perf_counter() - t0,
                         self._report if decided is not None else None, source, rows_N, dispatcher)

    def __call__(self, x_ND: torch.Tensor, plan, experts, weights: tuple, shared=None):
        """y_ND for x_ND; `plan`: the layer's moesys.moe.routing_plan.Plan (counts_E, capacity, num_tokens);
        `weights`: experts.local_weights() (this rank's shards; DTensor parameters: their local part).

        shared: the layer's SharedWork (a callable returning s_TD) or None; given, returns (y_ND, s_TD)."""
        prep, self._prepared = self._prepared, None
        if prep is None:
            prep = self._prepare(plan)
        elif prep.source is not plan and prep.source.counts_E is not plan.counts_E:
            # (a wrapper may rebuild the plan object around the same tensors: FSDP2 maps the experts
            # module's inputs through its input casting, which copies dataclasses; so the counts decide)
            raise RuntimeError("ExpertParallelRunner: called with another plan than the one prefetch() started")
        counts_E, static, mode, c, tuning = prep.counts_E, prep.static, prep.mode, prep.degree, prep.tuning
        plan, rows_N = prep.plan, prep.rows_N  # under a placement: slot space from here to the end
        if rows_N is not None:
            x_ND = x_ND.index_select(0, rows_N.to(x_ND.device))
        # a trial the tuner will read at its next decision: mark it (the same on every rank)
        self._timing = tuning and self.tuner.timing_this_step
        # host seconds per TIMER_KEYS entry: plain clock reads, accumulated here and in the modes below
        t_s = dict.fromkeys(TIMER_KEYS, 0.0)
        t_s["plan_s"] = prep.issue_s
        t0 = time.perf_counter()
        m0 = self.clock.mark() if self._timing else None
        metrics: dict = dict.fromkeys(METRICS, 0.0)
        out: dict = {}
        if static:
            # under a placement with replicas (self._rep) C is per slot, the layer's C of E experts, and an
            # expert with nh holders keeps its first nh*C rows of this source (docs/placement.md)
            holders = self._rep_on(counts_E.device)[1] if self._rep is not None else None
            if prep.dispatcher is not None:  # ep mode over the virtual slots: the holders filled in turn
                chunks, keep_N, dropped, C = prep.dispatcher.static_plan(
                    counts_E, plan.expert_idx_N, plan.num_tokens, c,
                    capacity=self.dispatcher.static_capacity(plan.num_tokens))
            else:
                chunks, keep_N, dropped, C = self.dispatcher.static_plan(counts_E, plan.expert_idx_N, plan.num_tokens,
                                                                        c if mode == "ep" else 1)
                if holders is not None:  # sharded_dp computes every row: it zeroes those ep mode drops
                    keep_N, dropped = static_keep(plan, self._rep_on(counts_E.device)[2] * C)
            metrics["overflow_dropped"] = dropped.detach()
            metrics["static_factor_needed"] = self.dispatcher.factor_needed(prep.source.counts_E, plan.num_tokens,
                                                                            holders).detach()
        if mode == "ep" and static:
            y_ND = self._run_ep_static(x_ND, counts_E, chunks, experts, weights, t_s, metrics, shared, out,
                                       prep.dispatcher)
        elif mode == "ep":
            y_ND = self._run_ep(x_ND, counts_E, plan.capacity, experts, weights, c, t_s, metrics, shared, out, prep)
        else:
            y_ND = self.sharded(x_ND, counts_E.to(x_ND.device), experts, chunks=c, t_s=t_s, shared=shared,
                                out=out, weights=weights)
            if static:  # the rows the ep mode's static buffer drops: zero here too (modes agree)
                y_ND = y_ND * keep_N.to(y_ND.dtype).unsqueeze(1)
            metrics["bytes_sent"] = float(self.sharded.last_weight_bytes)
            metrics["bytes_min"] = 0.0
            metrics["chunks"] = float(self.sharded.last_chunks)  # F-chunks actually used (<= c)
        if static and self.overflow == "error":
            self._raise_on_overflow(dropped, C, plan.num_tokens)
        if self._timing:
            self._fwd_marks = (m0, self.clock.mark())
            self._hook_backward(x_ND, y_ND)
        metrics.update(t_s)
        metrics["fwd_s"] = time.perf_counter() - t0  # host time (on CUDA: launches)
        if self._last_seconds is not None:
            metrics["prev_fwd_bwd_s"] = self._last_seconds  # what the tuner was fed (this rank)
        metrics.update(prep.report if prep.report is not None else self.tuner.report())
        metrics.update(self.placement_report)
        if rows_N is not None:  # back to the layer's order (grouped by expert)
            y_ND = y_ND.index_select(0, inverse_permutation(rows_N).to(y_ND.device))
        if set(metrics) != set(METRICS):  # a new key must join METRICS, or ranks' reductions split
            raise RuntimeError(f"ExpertParallelRunner: metrics {sorted(set(metrics) ^ set(METRICS))} not in METRICS")
        self.last_metrics = metrics
        return y_ND if shared is None else (y_ND, out["shared"])

    def _raise_on_overflow(self, dropped: torch.Tensor, C: int, num_tokens: int) -> None:
        """overflow="error": one all-reduce (max) of the dropped rows over the ep group, then every
        rank raises together (a host read: this policy is a check, not the sync-free path)."""
        most = all_reduce_host(dropped.detach().reshape(1).to(torch.float64).cpu(), self.group,
                               op=dist.ReduceOp.MAX)
        if most.item() > 0:
            f = self.dispatcher.static_capacity_factor
            raise ValueError(
                f"parallel.static_capacity_factor={f}: the static buffer of C={C} rows per (source rank, expert) "
                f"(T={num_tokens}) overflowed by {int(most.item())} rows on some rank (parallel.overflow='error'); "
                "raise parallel.static_capacity_factor, or use parallel.overflow=drop to drop and count them")

    def _pipeline(self, n: int, start, experts, weights: tuple, t_s: dict, shared=None,
                  out: Optional[dict] = None, d: Optional[Dispatcher] = None) -> tuple:
        """The ep mode's chunk pipeline: chunk i+1's dispatch and chunk i-1's combine in flight while
        chunk i's experts compute; the shared experts run while chunk 0's tokens travel.
        `start(i)` issues chunk i's dispatch. Returns (the chunks' combined outputs, bytes sent, bytes
        sent off this rank)."""
        replicated = d is not None
        d = self.dispatcher if d is None else d
        flight = start(0)
        if replicated:  # with replicas, this rank's shards and the replicas' rows fetched from their owners
            weights = self._replica_weights(weights)
        clock = time.perf_counter
        if shared is not None:
            t = clock()
            out["shared"] = shared()  # the dense shared experts while chunk 0's tokens travel
            t_s["shared_s"] += clock() - t
        combines = []
        nbytes = nremote = 0
        for i in range(n):
            t = clock()
            x_MD, counts_L, handle = d.dispatch_finish(flight)
            t_s["wait_s"] += clock() - t
            nbytes += handle.bytes_sent
            nremote += handle.bytes_remote
            if i + 1 < n:
                flight = start(i + 1)  # in flight while chunk i computes
            t = clock()
            y_MD = experts.compute(x_MD, counts_L, *weights)
            t1 = clock()
            t_s["compute_s"] += t1 - t
            combines.append(d.combine_start(y_MD, handle))
            t_s["combine_start_s"] += clock() - t1
        t = clock()
        ys = [d.combine_finish(f) for f in combines]
        t_s["wait_s"] += clock() - t
        return ys, nbytes, nremote

    def _run_ep_static(self, x_ND, counts_E, chunks: list, experts, weights: tuple, t_s: dict, metrics: dict,
                       shared=None, out: Optional[dict] = None, rep_d: Dispatcher | None = None) -> torch.Tensor:
        """The ep mode over a static buffer: no host read, no collective but the data all-to-alls
        (with replicas, rep_d: the virtual layout's dispatcher, and the replicas' weight fetch).

        Every chunk takes all rows (the rows outside its slots go nowhere and come back as zeros),
        so the chunks' outputs are summed: each row is nonzero in exactly one, the sum is exact."""
        d = self.dispatcher if rep_d is None else rep_d

        def start(i):
            t = time.perf_counter()
            flight = d.dispatch_start(x_ND, counts_E, plan=chunks[i])
            t_s["dispatch_start_s"] += time.perf_counter() - t
            return flight

        ys, nbytes, nremote = self._pipeline(len(chunks), start, experts, weights, t_s, shared, out, rep_d)
        y_ND = ys[0]
        for y in ys[1:]:
            y_ND = y_ND + y
        metrics["bytes_sent"] = float(nbytes)
        metrics["bytes_remote"] = float(nremote)
        metrics["chunks"] = float(len(chunks))
        # the unavoidable minimum (rows for other ranks' experts), kept on the device: no host read
        mine = d.dest_X.view(self.layout.world, -1)[self.layout.rank].to(counts_E.device)
        n_remote_min = counts_E.sum() * self._shards - counts_E.index_select(0, mine).sum()
        metrics["bytes_min"] = (n_remote_min * (x_ND.shape[1] * x_ND.element_size())).detach()
        return y_ND

    def _run_ep(self, x_ND, counts_E, capacity: Optional[int], experts, weights: tuple, c: int, t_s: dict,
                metrics: dict, shared=None, out: Optional[dict] = None, prep: Optional[_Prepared] = None) -> torch.Tensor:
        rep_d = prep.dispatcher if prep is not None else None
        d = self.dispatcher if rep_d is None else rep_d
        mine_list = self._mine_list if rep_d is None else self._rep[1]
        if prep is not None and prep.flight is not None:
            chunk_counts = prep.chunk_counts
            t = time.perf_counter()
            plans = d.plan_finish(prep.flight)  # the exchange prefetch() issued: wait, then the one read
            t_s["plan_s"] += time.perf_counter() - t
        else:
            chunk_counts = [counts_E] if c == 1 else split_counts(counts_E, c)
            # each chunk holds at most ceil(count / c) rows of an expert, so ceil(C / c) suffices
            chunk_capacity = None if capacity is None else -(-capacity // c)
            t = time.perf_counter()
            plans = d.plan(chunk_counts, capacity=chunk_capacity)  # one small collective for all chunks
            t_s["plan_s"] += time.perf_counter() - t
        if d.host_counts_in_plan:
            # the plan read the counts: the rest is Python integers (no further host read)
            host_E = [sum(col) for col in zip(*(p.counts_E for p in plans))]
            totals = [sum(p.counts_E) for p in plans]
            if c > 1:
                idxs = chunk_rows(torch.tensor(host_E), [torch.tensor(p.counts_E) for p in plans], totals)
            n_rows, n_mine = sum(host_E), sum(host_E[e] for e in mine_list)
        else:
            if c > 1:
                idxs = chunk_rows(counts_E, chunk_counts)
            n_rows, n_mine = int(counts_E.sum()), int(counts_E[mine_list].sum())
        if c == 1:
            idxs = [None]

        def start(i):
            x_i = x_ND if idxs[i] is None else x_ND.index_select(0, idxs[i].to(x_ND.device))
            t = time.perf_counter()
            flight = d.dispatch_start(x_i, chunk_counts[i], plan=plans[i])
            t_s["dispatch_start_s"] += time.perf_counter() - t
            return flight

        ys, nbytes, nremote = self._pipeline(len(chunk_counts), start, experts, weights, t_s, shared, out, rep_d)
        metrics["bytes_sent"] = float(nbytes)
        metrics["bytes_remote"] = float(nremote)
        # the unavoidable minimum: rows for experts on other ranks, moved once
        n_remote_min = n_rows * self._shards - n_mine
        metrics["bytes_min"] = float(n_remote_min * x_ND.shape[1] * x_ND.element_size())
        if c == 1:
            return ys[0]
        return torch.cat(ys, 0).index_select(0, inverse_permutation(torch.cat(idxs)).to(x_ND.device))
