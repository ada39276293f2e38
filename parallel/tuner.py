"""Chooses, per layer, the mode ("ep" | "sharded_dp") and overlap degree c from a cost model,
corrected by timing the first steps, and re-decides when the routing statistics shift.

Every decision is global: the whole job (every ep group and its edp replicas, the tuner's `group`)
runs the same (mode, degree) at the same step. Decisions per ep group would be enough for the
layer's own collectives, but not for the job's: the ranks of different ep groups meet in the dp
all-reduces and the metric reductions, and a mode changes what each rank reports and when it
finishes its backward; a job is as slow as its slowest ep group anyway. So every input the tuner
sees is agreed over the whole job (the probe and the step times: the slowest rank's; the routing
statistics: the busiest ep group's, see ExpertParallelRunner), every rank holds the same tuner state
and advances it on the same calls, and the decision is also broadcast from the group's rank 0.
What stays per ep group is the data: each group moves its own tokens with its own collectives.

Cost model: parallel/cost_model.py (shared with `moesys-plan`). The tuner ranks its candidates by
`cost_model.layer_time` for the layer's dispatcher, on a Hardware made from the probed Machine
(one node of P ranks: every link is the probed one), then times the best few and keeps the fastest.
"""
from __future__ import annotations

import collections
import itertools
import operator
import statistics
from dataclasses import dataclass, field
from typing import Iterator, Optional

import torch

from .comm import GroupRef, broadcast_host
from .cost_model import DEGREES, MODES, Shape, Stats, layer_time
from .cost_network import Hardware, Link, pipelined

__all__ = ["DEGREES", "MODES", "Machine", "Shape", "Stats", "Tuner", "TunerSettings", "chunked", "predict"]


@dataclass(frozen=True)
class Machine:
    """Measured once at apply time (agreed: the slowest rank's figures)."""

    bandwidth: float  # bytes/s of an all-to-all per rank
    latency: float  # s per collective (a tiny all-to-all among the ep group)
    flops: float  # FLOP/s of a large GEMM on one rank
    half_rows: float = 0.0  # GEMM rows at which throughput is half of `flops` (0: not probed)
    overlap: float = 1.0  # fraction of the shorter of comm / compute an async collective hides
    core_share: float = 1.0  # of a core each rank has while all compute (Hardware.core_share)

    def hardware(self, world: int) -> Hardware:
        """The cost model's view: one node of `world` ranks whose every link is the probed one."""
        link = Link(bandwidth=self.bandwidth, latency=self.latency)
        return Hardware(name="probed", gpus_per_node=max(1, world), intra=link, inter=link, gemm_flops=self.flops,
                        gemm_half_rows=self.half_rows, overlap=self.overlap, core_share=self.core_share)


def chunked(comm: float, comp: float, c: int, overhead: float) -> float:
    """Perfectly overlapped chunks plus a fixed cost per extra chunk (cost_network.pipelined)."""
    return pipelined(comm, comp, c, 1.0) + (c - 1) * overhead


def predict(mode: str, c: int, s: Stats, shape: Shape, m: Machine, dispatcher: str = "alltoallv") -> float:
    """Predicted fwd+bwd seconds of one layer call (cost_model.layer_time on the probed machine)."""
    return layer_time(mode, dispatcher, c, s, shape, m.hardware(shape.world)).total


@dataclass
class TunerSettings:
    warmup_steps: int = 1  # steps before measuring (first-call allocations distort timing)
    top_candidates: int = 3  # how many candidates to time (at least the hedges: see Tuner._explore)
    trials: int = 3  # timed steps per candidate (the median counts: shared machines are noisy)
    retune_rel_change: float = 0.3  # re-decide when active K / load skew / tokens move this much
    check_every: int = 8  # once decided, look at the routing statistics every this many steps
    mode: Optional[str] = None  # pin the mode
    degree: Optional[int] = None  # pin the overlap degree

    def __post_init__(self) -> None:
        if self.mode is not None and self.mode not in MODES:
            raise ValueError(f"tuner mode {self.mode!r} is not one of {list(MODES)} (or None/'auto')")
        if self.degree is not None and self.degree not in DEGREES:
            raise ValueError(f"overlap degree {self.degree!r} is not one of {list(DEGREES)} (or 'auto')")
        for name in ("warmup_steps", "top_candidates", "trials"):
            if getattr(self, name) < (0 if name == "warmup_steps" else 1):
                raise ValueError(f"tuner {name} must be >= {0 if name == 'warmup_steps' else 1}, got {getattr(self, name)}")


@dataclass
class Tuner:
    """The adaptive decision of one layer. `group`: the ranks that agree on it (the whole job; None
    for a single process). Every rank must call choose/keep on the same calls with the same inputs."""

    settings: TunerSettings
    shape: Shape
    machine: Machine
    group: object = None  # held weakly (comm.GroupRef): the runtime never keeps a group alive
    phase: str = "warmup"
    step: int = 0
    decision: tuple = ("ep", 1)
    queue: list = field(default_factory=list)  # candidates left to time
    measured: dict = field(default_factory=dict)  # candidate -> list of seconds
    ref_stats: Optional[Stats] = None
    decisions_made: int = 0
    dispatcher: str = "alltoallv"  # the layer's dispatcher (the model prices its collectives)

    def __post_init__(self) -> None:
        if not isinstance(self.group, GroupRef):
            self.group = GroupRef(self.group)
        if self.pinned:  # what report() says (runtime/mode_is_ep, degree) is what runs
            self.decision = (self.settings.mode, self.settings.degree)

    @property
    def pinned(self) -> bool:
        return self.settings.mode is not None and self.settings.degree is not None

    def candidates(self) -> list:
        modes = [self.settings.mode] if self.settings.mode else list(MODES)
        degrees = [self.settings.degree] if self.settings.degree else list(DEGREES)
        return [(m, c) for m in modes for c in degrees]

    def ranked(self, stats: Stats) -> list:
        preds = {k: predict(k[0], k[1], stats, self.shape, self.machine, self.dispatcher) for k in self.candidates()}
        return sorted(preds, key=lambda k: (preds[k], k))

    def wants_stats(self) -> bool:
        """False on decided steps between statistics checks: the runner then skips its collective."""
        if self.pinned:
            return False
        self._settle()
        return self.phase != "exploit" or (self.step + 1) % self.settings.check_every == 0

    # -- the lease: decided steps the runner runs without calling here ----------------------------
    def lease(self) -> Iterator[tuple]:
        """The decision, once for each of the next steps that would be plain `keep()` steps (decided,
        no statistics check due; pinned: every step). The runner draws one per training call with
        `next(lease, None)`, a builtin call with no Python frame (its hot path does no tuner
        bookkeeping), and asks the tuner again when the lease runs dry. The steps drawn count as
        `keep()` steps: every method here settles them first (`_settle`), so the tuner's state (its
        checkpoint) is the same as if each step had called `keep()`."""
        self._revoke()
        if self.pinned:
            self._lease, self._lease_left = itertools.repeat(self.decision), None  # endless; counts no steps
        else:
            n = (-(self.step + 1)) % self.settings.check_every if self.phase == "exploit" else 0
            self._lease, self._lease_left = itertools.repeat(self.decision, n), n
        return self._lease

    def _settle(self) -> None:
        """Count the steps drawn from the current lease (itertools.repeat reports what it has left)."""
        if self._lease_left:
            left = operator.length_hint(self._lease)
            self.step += self._lease_left - left
            self._lease_left = left

    def _revoke(self) -> None:
        """End the current lease (its drawn steps counted, the rest drained: a holder's next draw is None)."""
        self._settle()
        if self._lease is not None and self._lease_left is not None:
            collections.deque(self._lease, maxlen=0)
        self._lease, self._lease_left = None, 0

    @property
    def timing_this_step(self) -> bool:
        """Whether the step just chosen is a timed trial (its time is read at the next choose)."""
        return self._timed is not None

    def keep(self) -> tuple:
        """This step's (mode, degree) without new statistics (every rank calls it on the same steps)."""
        self._revoke()
        self.step += 1
        return self.decision

    def choose(self, stats: Stats, last_seconds: Optional[float]) -> tuple:
        """The (mode, degree) for this step. last_seconds: agreed time of the previous step."""
        if self.pinned:
            return (self.settings.mode, self.settings.degree)
        self._revoke()
        self.step += 1
        if last_seconds is not None and self.phase == "explore" and self._timed is not None:
            self.measured.setdefault(self._timed, []).append(last_seconds)
        self._timed = None
        if self.phase == "warmup":
            self.decision = self.ranked(stats)[0]
            if self.step > self.settings.warmup_steps:
                self._explore(stats)
        elif self.phase == "exploit" and self.ref_stats is not None and stats.shifted(self.ref_stats, self.settings.retune_rel_change):
            self._explore(stats)
        if self.phase == "explore":
            if self.queue:
                self._timed = self.queue.pop(0)
                return self._timed
            self._decide(stats)
        return self.decision

    _timed: Optional[tuple] = None
    # lease()'s iterator, while a runner may draw from it, and its steps not yet counted into `step`
    # (None: a pinned tuner's endless lease, which counts no steps and never needs revoking)
    _lease: Optional[Iterator[tuple]] = field(default=None, init=False, repr=False, compare=False)
    _lease_left: Optional[int] = field(default=0, init=False, repr=False, compare=False)

    def _explore(self, stats: Stats) -> None:
        self.phase = "explore"
        self.measured = {}
        self.ref_stats = stats
        ranked = self.ranked(stats)
        picked = ranked[:1]
        if self.settings.top_candidates > 1:
            # hedges against a wrong model, timed whatever their rank: the no-overlap degree of
            # the best-predicted mode (the model counts a chunk's latency but not its smaller,
            # slower GEMMs: on gloo over 16 host cores ep c=1 beat the predicted c=2 by 14%), and
            # the best-predicted candidate of every mode; then the model's order fills the rest
            hedges = [(ranked[0][0], 1)] if (ranked[0][0], 1) in ranked else []
            hedges += [next(k for k in ranked if k[0] == m) for m in dict.fromkeys(m for m, _ in ranked)]
            for k in hedges:
                if k not in picked:
                    picked.append(k)
            for k in ranked:
                if len(picked) >= self.settings.top_candidates:
                    break
                if k not in picked:
                    picked.append(k)
        # round-robin, not back-to-back: a load spike on a shared machine then hits every candidate
        self.queue = [k for _ in range(self.settings.trials) for k in picked]

    def _decide(self, stats: Stats) -> None:
        best = min(self.measured, key=lambda k: (statistics.median(self.measured[k]), k))
        idx = torch.tensor([self.candidates().index(best)], dtype=torch.long)
        group = self.group.get()
        if group is not None:
            idx = broadcast_host(idx, 0, group)
        self.decision = self.candidates()[int(idx)]
        self.phase = "exploit"
        self.ref_stats = stats
        self.decisions_made += 1

    # -- checkpoint: a resumed run continues the same schedule of trials and the same decision ----
    STATE_VERSION = 1

    def state_dict(self) -> dict:
        """The tuner's progress as plain JSON values (the same on every rank: see the module docstring).
        The probed machine is not in it: a resumed job probes its own."""
        self._settle()
        return {"version": self.STATE_VERSION, "candidates": [list(k) for k in self.candidates()],
                "phase": self.phase, "step": self.step, "decision": list(self.decision),
                "queue": [list(k) for k in self.queue],
                "measured": [[list(k), list(v)] for k, v in self.measured.items()],
                "ref_stats": None if self.ref_stats is None else self.ref_stats.as_list(),
                "timed": None if self._timed is None else list(self._timed), "decisions_made": self.decisions_made}

    def load_state_dict(self, state: dict) -> bool:
        """Continue from `state_dict()`'s output; False (and nothing changed) when it was written for
        other candidates (another pinned mode or degree): the tuner then starts afresh."""
        if state.get("version") != self.STATE_VERSION:
            raise ValueError(f"Tuner.load_state_dict: state version {state.get('version')!r}, expected "
                             f"{self.STATE_VERSION}")
        if [tuple(k) for k in state["candidates"]] != self.candidates():
            return False
        if state["phase"] not in ("warmup", "explore", "exploit"):
            raise ValueError(f"Tuner.load_state_dict: unknown phase {state['phase']!r}")
        self._revoke()  # the lease ran the old decision: the runner asks again
        self.phase, self.step = state["phase"], int(state["step"])
        self.decision = (state["decision"][0], int(state["decision"][1]))
        self.queue = [(m, int(c)) for m, c in state["queue"]]
        self.measured = {(k[0], int(k[1])): [float(t) for t in v] for k, v in state["measured"]}
        self.ref_stats = None if state["ref_stats"] is None else Stats.from_list(state["ref_stats"])
        self._timed = None if state["timed"] is None else (state["timed"][0], int(state["timed"][1]))
        self.decisions_made = int(state["decisions_made"])
        return True

    def report(self) -> dict:
        out = {"mode_is_ep": float(self.decision[0] == "ep"), "degree": float(self.decision[1]),
               "tuner_exploring": float(self.phase != "exploit" and not self.pinned),
               "tuner_decisions": float(self.decisions_made)}
        return out
