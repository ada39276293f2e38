"""What one training forward/backward changes besides gradients, captured so a step can be re-run.

A step re-run (parallel.overflow=rerun, see moesys/parallel/overflow.py) must give what a run with
the re-run's settings from the start gives, so everything the first pass changed is put back:

    buffers    every module buffer, persistent or not (the sigmoid_bias router's load_since_update
               feeds the aux-loss-free bias update; EvoMoE's tau/phase; anything a layer counts)
    RNG        torch's CPU stream and the training device's CUDA stream (router jitter, dropout),
               Python's and NumPy's global streams, and every torch.Generator a module holds
               (the random drop policy's `_generator`)
    modules    anything else a module keeps in Python attributes, through an optional pair
               `step_state() -> dict` / `load_step_state(dict)` (EvoMoELayer's gate-noise call index),
               on the module or on its `runner` (an MoE layer's expert-parallel runner: the loads
               it accumulates for expert placement)

Parameters and optimizer state are not captured: the optimizer has not stepped when a step is
re-run, and gradients are zeroed by the re-run itself. What runs after the optimizer step
(the bias update, balance and collapse statistics, history) sees only the re-run.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.nn as nn


@dataclass
class StepState:
    buffers: dict  # name -> clone
    generators: dict  # (module name, attribute) -> generator state
    modules: dict  # module name (or (module name, "runner")) -> its step_state()
    cpu_rng: torch.Tensor
    cuda_rng: Optional[torch.Tensor]
    cuda_index: Optional[int]
    python_rng: object
    numpy_rng: object

    @classmethod
    def capture(cls, model: nn.Module, device: torch.device) -> "StepState":
        """Snapshot `model`'s mutable non-parameter state and the RNG streams (before a step)."""
        buffers = {name: b.detach().clone() for name, b in model.named_buffers() if b is not None}
        generators, modules = {}, {}
        for mname, m in model.named_modules():
            for attr, v in vars(m).items():
                if isinstance(v, torch.Generator):
                    generators[(mname, attr)] = v.get_state()
            if hasattr(m, "step_state"):
                modules[mname] = m.step_state()
            runner = getattr(m, "runner", None)
            if hasattr(runner, "step_state"):
                modules[(mname, "runner")] = runner.step_state()
        cuda = device.type == "cuda"
        idx = (device.index if device.index is not None else torch.cuda.current_device()) if cuda else None
        return cls(buffers=buffers, generators=generators, modules=modules, cpu_rng=torch.get_rng_state(),
                   cuda_rng=torch.cuda.get_rng_state(idx) if cuda else None, cuda_index=idx,
                   python_rng=random.getstate(), numpy_rng=np.random.get_state())

    @torch.no_grad()
    def restore(self, model: nn.Module) -> None:
        """Put everything `capture` saw back (in place: buffers keep their storage)."""
        for name, b in model.named_buffers():
            if name in self.buffers:
                b.copy_(self.buffers[name])
        for mname, m in model.named_modules():
            for attr, v in vars(m).items():
                if isinstance(v, torch.Generator) and (mname, attr) in self.generators:
                    v.set_state(self.generators[(mname, attr)])
            if mname in self.modules:
                m.load_step_state(self.modules[mname])
            if (mname, "runner") in self.modules:
                m.runner.load_step_state(self.modules[(mname, "runner")])
        torch.set_rng_state(self.cpu_rng)
        if self.cuda_rng is not None:
            torch.cuda.set_rng_state(self.cuda_rng, self.cuda_index)
        random.setstate(self.python_rng)
        np.random.set_state(self.numpy_rng)
