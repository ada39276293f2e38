"""When to re-place experts: the PlacementController (parallel.placement = off | static | auto).

Every `interval` optimizer steps, on every rank at the same step: one all-reduce (sum) over the
agree group (the job) of each layer's per-expert rows since the last decision, so every rank sees
the job's loads; then per layer the balanced placement (placement.balanced_placement) and the cost
gate, pure functions of those agreed numbers and the agreed probed Machine, so every rank takes the
same decision. The gate (cost_model through tuner.predict): the predicted fwd+bwd seconds of the
layer with the busiest rank's rows now minus with the proposed placement, over `payback_steps`
steps, against the predicted seconds of moving the received experts' weights and optimizer
moments once (latency + bytes / bandwidth on the rank that receives the most). policy=static
evaluates and reports (runtime/placement_imbalance) but never moves; auto moves. Under a static
capacity buffer (the padded dispatchers' static_capacity_factor) the gate is the rows the buffer is
expected to drop instead (`_decide_static`, docs/placement.md).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from moesys.moe.layer import MoELayer

from .comm import all_reduce_host
from .cost_model import Stats
from .placement import (
    PLACEMENTS,
    Placement,
    apply_placement,
    balanced_placement,
    imbalance,
    moved_experts,
    replica_feeds,
    static_drops,
    with_replicas,
)
from .runner import ExpertParallelRunner
from .tuner import Machine, predict

# a pinned tuner probes no Machine: then these figures (the gloo CPU ranks of this repo's tests);
# constants, so the decision stays the same on every rank
FALLBACK_MACHINE = Machine(bandwidth=1e9, latency=1e-4, flops=5e10)


@dataclass
class PlacementSettings:
    """parallel.placement and its knobs (see configs/schema.py ParallelConfig)."""

    policy: str = "off"  # "off" | "static" (measure and report, never move) | "auto"
    interval: int = 20  # steps between decisions
    min_gain: float = 0.05  # re-place only when the busiest rank's rows drop by at least this fraction
    # a move must pay for itself within this many steps (a placement holds until the load drifts)
    payback_steps: int = 100
    # replica slots a rank for the hottest experts (0: permutation only); a replica's weights are
    # fetched from the owner every step and its gradient sent back, which the gate counts
    replicas: int = 0

    def __post_init__(self) -> None:
        if self.replicas < 0:
            raise ValueError(f"placement replicas must be >= 0, got {self.replicas}")
        if self.policy not in PLACEMENTS:
            raise ValueError(f"placement policy {self.policy!r} is not one of {list(PLACEMENTS)}")
        if self.interval < 1:
            raise ValueError(f"placement interval must be >= 1, got {self.interval}")
        if self.payback_steps < 1:
            raise ValueError(f"placement payback_steps must be >= 1, got {self.payback_steps}")
        if not 0.0 <= self.min_gain < 1.0:
            raise ValueError(f"placement min_gain must be in [0, 1), got {self.min_gain}")


@dataclass
class Decision:
    """One layer's decision at one evaluation (the same on every rank)."""

    imbalance_before: float  # busiest rank's rows / mean under the current placement
    imbalance_after: float  # ... under the proposed one
    gain_s: float  # predicted seconds saved per step (fwd + bwd of the layer)
    move_s: float  # predicted seconds of moving the weights and moments once
    moved: bool
    slots: tuple
    replicas: tuple = ()
    # a static buffer: rows a source rank's buffer is expected to drop a step, now and proposed
    drops_before: float = 0.0
    drops_after: float = 0.0


@dataclass
class PlacementController:
    """Decides and applies placements for a model's expert-parallel layers every `interval` steps.

    Call `after_step(step, optimizer)` on every rank after each optimizer step (the trainer does);
    the runners accumulate each layer's per-expert rows of the training forwards in between."""

    settings: PlacementSettings
    layers: list  # MoELayers with an ExpertParallelRunner
    group: object = None  # the agree group (None: the world)
    moments: int = 2  # optimizer tensors per weight element that move with it (AdamW: 2)
    history: list = field(default_factory=list)  # (step, layer index, Decision) of every evaluation
    _steps: int = 0

    def __post_init__(self) -> None:
        for layer in self.layers:
            layer.runner.track_load(self.settings.policy != "off")

    def after_step(self, step: int, optimizer: torch.optim.Optimizer | None = None) -> list:
        """Evaluate (every `interval` calls) and, under policy=auto, re-place; returns this
        evaluation's decisions (empty between evaluations)."""
        if self.settings.policy == "off" or not self.layers:
            return []
        self._steps += 1
        if self._steps % self.settings.interval:
            return []
        loads = torch.stack([layer.runner.take_load() for layer in self.layers])
        loads = all_reduce_host(loads, self.group if self.group is not None else dist.group.WORLD)  # job-wide
        out = []
        for i, (layer, load_E) in enumerate(zip(self.layers, loads.tolist())):
            d = self.decide(layer, load_E)
            if d.moved:
                apply_placement(layer, Placement(d.slots, d.replicas), optimizer)
            layer.runner.placement_report = {"placement_imbalance": d.imbalance_before if not d.moved
                                             else d.imbalance_after,
                                             "placement_moves": float(layer.runner.placement_moves)}
            self.history.append((step, i, d))
            out.append(d)
        return out

    def reset(self, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Collective: every layer back to the canonical placement (weights and moments moved)."""
        for layer in self.layers:
            apply_placement(layer, Placement.identity(layer.runner.layout.num_experts), optimizer)

    def restart(self, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Collective: `reset`, and forget the loads and the step count since the last decision, so
        the next decision comes `interval` steps later on loads of the new regime only (the trainer
        calls it at EvoMoE's dense-to-sparse switch: the spawn writes experts by expert index)."""
        self.reset(optimizer)
        for layer in self.layers:
            layer.runner.take_load()
        self._steps = 0

    @contextlib.contextmanager
    def canonical(self, optimizer: torch.optim.Optimizer | None = None):
        """Collective: the canonical placement inside the block (a checkpoint is saved in expert
        order), the current one again after it."""
        kept = [layer.runner.placement for layer in self.layers]
        moves = [layer.runner.placement_moves for layer in self.layers]
        self.reset(optimizer)
        try:
            yield
        finally:
            for layer, placement, n in zip(self.layers, kept, moves):
                apply_placement(layer, placement, optimizer)
                layer.runner.placement_moves = n  # a save is no re-placement

    def decide(self, layer, load_E: list) -> Decision:
        """The balanced placement for `load_E` (rows per expert since the last decision) and the
        cost gate: move when the predicted gain over `payback_steps` steps beats the move."""
        runner = layer.runner
        P = runner.layout.world
        cur = runner.placement
        if self.settings.replicas > runner.layout.num_experts - runner.layout.local_experts:
            raise ValueError(f"placement replicas ({self.settings.replicas} a rank) > the experts a rank does not "
                             f"hold ({runner.layout.num_experts - runner.layout.local_experts})")
        if runner.dispatcher.static:
            return self._decide_static(runner, load_E)
        new = balanced_placement(load_E, P, cur, self.settings.replicas)
        before, after = cur.rank_loads(load_E, P), new.rank_loads(load_E, P)
        steps = self.settings.interval
        shape = runner.tuner.shape
        machine = self._machine(runner)
        rows = sum(load_E) / steps
        per_step = [x / steps for x in before], [x / steps for x in after]
        c = runner.current[1]
        name = runner.dispatcher.name
        gain = 0.0
        if rows > 0:
            def stats(per_rank):
                return Stats(tokens=int(rows), rows=int(rows), max_rank_rows=round(max(per_rank)),
                             max_local_rows=int(rows / P))
            gain = (predict("ep", c, stats(per_step[0]), shape, machine, name)
                    - predict("ep", c, stats(per_step[1]), shape, machine, name))
        weight_bytes = shape.matrices * shape.hidden * shape.ffn * shape.dtype_bytes

        def fetch_s(p: Placement) -> float:
            """Per step: replica weights out and in (forward), their gradients back; the busiest rank's
            rows of one all-to-all (its receives, k, or its sends to the replicas it feeds)."""
            k = len(p.replicas) // P
            most = max([k] + replica_feeds(p, P))
            return 2 * (machine.latency + most * weight_bytes / machine.bandwidth) if k else 0.0
        gain += fetch_s(cur) - fetch_s(new)
        moved_max = max(moved_experts(cur, new, P))
        expert_bytes = weight_bytes * (1 + self.moments)
        move_s = machine.latency + moved_max * expert_bytes / machine.bandwidth if moved_max else 0.0
        ib, ia = imbalance(before), imbalance(after)
        moved = (self.settings.policy == "auto" and new != cur and ia <= ib * (1 - self.settings.min_gain)
                 and gain * self.settings.payback_steps > move_s)
        return Decision(ib, ia, gain, move_s, moved, new.slots, new.replicas)

    def _decide_static(self, runner, load_E: list) -> Decision:
        """Under a static buffer every rank computes and sends its fixed [L, P*C] rows whatever the
        load, and a (source rank, expert) pair's capacity does not depend on where the expert lives:
        a permutation gains nothing, so the slots stay. Replicas add C rows of capacity each: they
        are chosen afresh for the loads, and taken when they cut the rows a source rank's buffer is
        expected to drop a step (from its mean rows per expert and the current factor's C) by
        `min_gain`; they move no weights (their fetch is per step)."""
        P = runner.layout.world
        cur = runner.placement
        new = with_replicas(load_E, P, cur, self.settings.replicas) if self.settings.replicas else cur
        world = dist.get_world_size(self.group) if self.group is not None else dist.get_world_size()
        per_source = [x / (self.settings.interval * world) for x in load_E]  # one source rank's rows a step
        d = runner.dispatcher
        C = d.static_capacity(max(1, round(sum(per_source) / d.top_k)))
        before, after = static_drops(per_source, P, cur, C), static_drops(per_source, P, new, C)
        moved = (self.settings.policy == "auto" and new != cur and after < before * (1 - self.settings.min_gain))
        ib, ia = imbalance(cur.rank_loads(load_E, P)), imbalance(new.rank_loads(load_E, P))
        return Decision(ib, ia, 0.0, 0.0, moved, new.slots, new.replicas, before, after)

    @staticmethod
    def _machine(runner) -> Machine:
        return runner.tuner.machine if runner.tuner.machine is not None else FALLBACK_MACHINE


def placed_layers(model) -> list:
    """The model's MoE layers with an ExpertParallelRunner (the ones a placement applies to)."""
    return [m for m in model.modules() if isinstance(m, MoELayer) and isinstance(m.runner, ExpertParallelRunner)]
