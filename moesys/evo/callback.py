"""The trainer's hook for EvoMoE: `moesys.train.build_callbacks` returns an EvoCallback when
evo.enabled. The model side (swapping MoELayers for EvoMoELayers) happens earlier, in
`moesys.trainer.build_model`, because it must precede expert parallelism and the optimizer.

Logged through the trainer's per-block MoE metrics (the layer puts them in MoEAux.metrics):
tau, experts_per_token (mean), max_experts_per_token, evo_phase, expert_load, and the adaptive
runtime's runtime/* decisions.
"""
from __future__ import annotations

from .controller import EvoController
from .schedule import EvoConfig


class EvoCallback:
    def __init__(self, cfg: EvoConfig, *, seed: int):
        self.cfg, self.seed = cfg, seed
        self.controller: EvoController | None = None
        self.optimizer = None

    def on_train_start(self, trainer) -> None:
        # after a resume (trainer.step may be past the diversify step): the phase buffer came from
        # the checkpoint, and on_step_start is idempotent
        # rank keys the gate noise: the trainer's data-parallel rank (it picks this rank's batches)
        self.controller = EvoController.attach(trainer.model, self.cfg, seed=self.seed, rank=trainer.rank)
        self.optimizer = trainer.optimizer
        self.controller.on_step_start(trainer.step, self.optimizer)

    def on_step_start(self, step: int) -> None:
        self.controller.on_step_start(step, self.optimizer)
