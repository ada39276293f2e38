"""EvoMoE's schedule: dense phase, expert diversification, temperature annealing, hard switch.

Timeline (steps are optimizer steps, 0-based; the state for step s is set before its forward):

    0 ........ diversify_step ........ diversify_step + tau_steps ........ hard_step ........
    one dense FFN | E experts, DTS gate, tau: tau_max -> tau_min   | tau_min, soft  | hard top-1

`EvoConfig` is the `evo` Hydra group (configs/evo/*.yaml); `TauSchedule` is the annealing curve.
Nothing here holds state: the phase and tau live in module buffers (EvoMoELayer.phase,
DTSRouter.tau / .hard), so they are checkpointed with the model and equal on every rank.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Optional

from moesys.moe.config import GATE_ACTIVATIONS, TAU_SCHEDULES, MoEConfig

SPAWN_METHODS = ("mask", "drop_upcycle", "copy")
MASK_FILLS = ("zero", "redraw")
OPT_STATE_POLICIES = ("copy", "reset")
GATES = ("dts", "act_dts", "none")


class TauSchedule:
    """Gate temperature as a function of the step.

    linear:      tau(s) = tau_max + (tau_min - tau_max) * u
    exponential: tau(s) = tau_max * (tau_min / tau_max) ** u
    with u = clamp((s - start_step) / steps, 0, 1); steps == 0 jumps to tau_min at start_step.
    """

    def __init__(self, tau_max: float, tau_min: float, steps: int, kind: str = "linear", start_step: int = 0):
        if not 0 < tau_min <= tau_max:
            raise ValueError(f"TauSchedule: need 0 < tau_min ({tau_min}) <= tau_max ({tau_max})")
        if steps < 0:
            raise ValueError(f"TauSchedule: steps must be >= 0, got {steps}")
        if kind not in TAU_SCHEDULES:
            raise ValueError(f"TauSchedule: kind={kind!r} is not one of {list(TAU_SCHEDULES)}")
        self.tau_max, self.tau_min, self.steps, self.kind, self.start_step = tau_max, tau_min, steps, kind, start_step

    def progress(self, step: int) -> float:
        if step < self.start_step:
            return 0.0
        if self.steps == 0:
            return 1.0
        return min(1.0, (step - self.start_step) / self.steps)

    def value(self, step: int) -> float:
        u = self.progress(step)
        if self.kind == "linear":
            return self.tau_max + (self.tau_min - self.tau_max) * u
        return self.tau_max * math.exp(u * math.log(self.tau_min / self.tau_max))

    def __repr__(self) -> str:
        return (f"TauSchedule({self.tau_max} -> {self.tau_min} over {self.steps} steps, {self.kind}, "
                f"from step {self.start_step})")


@dataclass
class EvoConfig:
    """evo.*: EvoMoE dense-to-sparse training (Nie et al. 2021) and its relatives.

    enabled=False leaves the model alone. diversify_step=None skips the dense phase (DTS alone, or
    a plain top-k MoE with gate='none'). gate='none' keeps the moe.* router (e.g. sparse upcycling
    with top-k). The gate fields override moe.router / dts_threshold / tau_* / gate_activation.
    """

    enabled: bool = False
    # --- phase 1 -> 2: expert diversification -----------------------------------------------
    diversify_step: Optional[int] = 100  # None: no dense phase
    spawn: str = "mask"  # mask (EvoMoE) | drop_upcycle (Drop-Upcycling) | copy (sparse upcycling)
    mask_ratio: float = 0.2  # spawn=mask: fraction of each weight's entries masked per expert
    mask_fill: str = "zero"  # spawn=mask: masked entries zeroed (EvoMoE: W*M) or re-drawn
    reinit_fraction: float = 0.5  # spawn=drop_upcycle: fraction of the F hidden units re-drawn
    optimizer_state: str = "copy"  # copy (dense Adam moments tiled to each expert) | reset
    router_std: float = 0.02  # the fresh router: N(0, router_std^2)
    seed: Optional[int] = None  # spawn seed; None: the trainer's seed
    # --- phase 2: gate sparsification --------------------------------------------------------
    gate: str = "dts"  # dts | act_dts | none (keep moe.router)
    gate_activation: str = "sigmoid"  # act_dts: sigmoid | tanh
    threshold: float = 1e-3  # route to every expert whose gate value exceeds this
    tau_max: float = 2.0
    tau_min: float = 0.3
    tau_steps: int = 200  # D: annealing length, counted from the diversify step (or 0)
    tau_kind: str = "exponential"  # linear | exponential (the released code is exponential)
    hard_step: Optional[int] = None  # from this step on, hard top-1 on argmax g; None: never

    def __post_init__(self) -> None:
        def choice(name, options):
            if getattr(self, name) not in options:
                raise ValueError(f"evo.{name}={getattr(self, name)!r} is not one of {list(options)}")

        choice("spawn", SPAWN_METHODS)
        choice("mask_fill", MASK_FILLS)
        choice("optimizer_state", OPT_STATE_POLICIES)
        choice("gate", GATES)
        choice("gate_activation", GATE_ACTIVATIONS)
        choice("tau_kind", TAU_SCHEDULES)
        for name in ("mask_ratio", "reinit_fraction"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"evo.{name} must be in [0, 1], got {getattr(self, name)}")
        if self.diversify_step is not None and self.diversify_step < 0:
            raise ValueError(f"evo.diversify_step must be >= 0 or None, got {self.diversify_step}")
        if not 0 < self.threshold < 1:
            raise ValueError(f"evo.threshold must be in (0, 1), got {self.threshold}")
        if not 0 < self.tau_min <= self.tau_max:
            raise ValueError(f"evo.tau_min ({self.tau_min}) and evo.tau_max ({self.tau_max}) must satisfy 0 < min <= max")
        if self.tau_steps < 0:
            raise ValueError(f"evo.tau_steps must be >= 0, got {self.tau_steps}")
        if not self.router_std > 0:
            raise ValueError(f"evo.router_std must be > 0, got {self.router_std}")
        if self.hard_step is not None and self.diversify_step is not None and self.hard_step < self.diversify_step:
            raise ValueError(f"evo.hard_step ({self.hard_step}) must be >= evo.diversify_step ({self.diversify_step})")

    @classmethod
    def from_dict(cls, d) -> "EvoConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"evo: unknown keys {sorted(unknown)}")
        return cls(**dict(d))

    @property
    def dense_phase(self) -> bool:
        return self.enabled and self.diversify_step is not None

    def tau_schedule(self) -> TauSchedule:
        start = self.diversify_step if self.diversify_step is not None else 0
        return TauSchedule(self.tau_max, self.tau_min, self.tau_steps, self.tau_kind, start_step=start)

    def gate_state(self, step: int) -> dict:
        """{'tau': float, 'hard': bool} for the gate at `step`."""
        return {"tau": self.tau_schedule().value(step), "hard": self.hard_step is not None and step >= self.hard_step}

    def in_dense_phase(self, step: int) -> bool:
        return self.dense_phase and step < self.diversify_step

    def moe_config(self, base: MoEConfig) -> MoEConfig:
        """The layer config of phase 2: `base` with the gate fields replaced (gate='none' keeps it)."""
        if self.gate == "none":
            return base
        return dataclasses.replace(
            base, router=self.gate, dts_threshold=self.threshold, tau_max=self.tau_max,
            tau_min=self.tau_min, gate_activation=self.gate_activation,
        )
