"""EvoController: wires EvoMoE's schedule into a training loop.

Usage (the trainer calls three things):

    evo = EvoController.prepare(model, EvoConfig(enabled=True, ...), seed=cfg.trainer.seed)
    # ... then apply expert parallelism, then build the optimizer ...
    for step in range(start, steps):
        evo.on_step_start(step, optimizer)     # tau / hard switch; diversify at evo.diversify_step
        loss = ...; loss.backward(); optimizer.step()
        log(evo.metrics(auxes))                # tau, experts per token (mean, max), per-layer load

`prepare` swaps every MoELayer of the model for an EvoMoELayer (keeping its parameters) and must
run before expert parallelism and before the optimizer is built. `on_step_start` is idempotent and
a pure function of the step and the module buffers, so resuming from a checkpoint taken on either
side of the diversify step gives the same state as an uninterrupted run. It also keys the gates'
random noise by (seed, step, data-parallel rank) instead of the global RNG, so a run resumed at
another world size (whose global RNG streams are re-seeded) draws the same noise as an
uninterrupted run at that size. At the diversify step the optimizer state of the spawned experts
and router is set for torch AdamW or DeepSpeed ZeRO-1/2 (optim_state.py).
"""
from __future__ import annotations

from typing import Dict, Iterable, List, Optional

import torch
import torch.nn as nn

from moesys.moe.layer import MoELayer

from .layer import EvoMoELayer
from .optim_state import transfer_optimizer_state
from .schedule import EvoConfig


def _replace_child(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


class EvoController:
    def __init__(self, cfg: EvoConfig, layers: List[EvoMoELayer], *, seed: int, rank: int = 0):
        self.cfg = cfg
        self.layers = layers
        self.seed = cfg.seed if cfg.seed is not None else seed
        self.rank = rank  # the data-parallel rank: keys the gate noise (see EvoMoELayer.set_noise_key)

    # ---- set-up --------------------------------------------------------------------------------
    @classmethod
    def prepare(cls, model: nn.Module, cfg: EvoConfig, *, seed: int) -> "EvoController":
        """Swap the model's MoELayers for EvoMoELayers (same parameters; the phase-2 gate config).

        Call before expert parallelism and before building the optimizer.
        """
        if not cfg.enabled:
            return cls(cfg, [], seed=seed)
        targets = [(n, m) for n, m in model.named_modules() if isinstance(m, MoELayer)]
        if not targets:
            raise ValueError("evo.enabled=true but the model has no MoE layer (model.moe_every=0?)")
        layers = []
        for index, (name, old) in enumerate(targets):
            if isinstance(old, EvoMoELayer):
                layers.append(old)
                continue
            if old.experts.num_local_experts != old.cfg.num_experts:
                raise RuntimeError("EvoController.prepare must run before expert parallelism is applied")
            new = EvoMoELayer(cfg.moe_config(old.cfg), dense_phase=cfg.dense_phase, layer_index=index)
            new.load_state_dict(old.state_dict(), strict=False)  # router / experts; gate buffers stay new
            new.to(device=old.router.weight.device)
            if new.dense is not None:
                # the dense FFN starts as expert 0 of the old layer (already initialised by the model)
                with torch.no_grad():
                    for w in ("w1", "w2", "w3"):
                        if getattr(new.dense, w) is not None:
                            getattr(new.dense, w).copy_(getattr(old.experts, w)[:1])
            new.train(old.training)
            _replace_child(model, name, new)
            layers.append(new)
        ctl = cls(cfg, layers, seed=seed)
        ctl.on_step_start(0, None)
        return ctl

    @classmethod
    def attach(cls, model: nn.Module, cfg: EvoConfig, *, seed: int, rank: int = 0) -> "EvoController":
        """A controller over the EvoMoELayers already in `model` (after `prepare`, EP, resume).

        rank: this process's data-parallel rank (the gate's noise stream is keyed by (seed, step, rank)).
        """
        layers = [m for m in model.modules() if isinstance(m, EvoMoELayer)] if cfg.enabled else []
        if cfg.enabled and not layers:
            raise ValueError("evo.enabled=true but the model has no EvoMoELayer: call EvoController.prepare first")
        return cls(cfg, layers, seed=seed, rank=rank)

    # ---- per step ------------------------------------------------------------------------------
    @torch.no_grad()
    def on_step_start(self, step: int, optimizer: Optional[torch.optim.Optimizer] = None) -> None:
        if not self.layers:
            return
        cfg = self.cfg
        if cfg.dense_phase and step >= cfg.diversify_step:
            spawned = [layer for layer in self.layers if layer.in_dense_phase]
            for layer in spawned:
                layer.diversify(seed=self.seed, method=cfg.spawn, router_std=cfg.router_std, mask_ratio=cfg.mask_ratio,
                                mask_fill=cfg.mask_fill, reinit_fraction=cfg.reinit_fraction)
            if spawned and optimizer is not None:
                transfer_optimizer_state(optimizer, spawned, cfg.optimizer_state)
        state = cfg.gate_state(step)
        for layer in self.layers:
            if hasattr(layer.router, "set_gate_state"):
                layer.router.set_gate_state(**state)
            layer.set_noise_key(seed=self.seed, step=step, rank=self.rank)

    @property
    def phase(self) -> str:
        if not self.layers:
            return "off"
        return "dense" if any(l.in_dense_phase for l in self.layers) else "moe"

    # ---- metrics -------------------------------------------------------------------------------
    @torch.no_grad()
    def metrics(self, auxes: Iterable) -> Dict[str, float]:
        """tau, experts per token (mean over layers, max over layers and tokens), per-layer load.

        `auxes` are the MoEAux of one forward, one per MoE layer in order. `.item()` calls here are
        host syncs: call at the logging interval only.
        """
        out: Dict[str, float] = {}
        auxes = list(auxes)
        if not auxes:
            return out
        ept = [float(a.metrics["experts_per_token"]) for a in auxes]
        out["evo/tau"] = float(self.layers[0].router.tau) if self.layers and hasattr(self.layers[0].router, "tau") else float("nan")
        out["evo/phase"] = 0.0 if self.phase == "dense" else 1.0
        out["evo/experts_per_token_mean"] = sum(ept) / len(ept)
        out["evo/experts_per_token_max"] = max(float(a.metrics.get("max_experts_per_token", e)) for a, e in zip(auxes, ept))
        for i, a in enumerate(auxes):
            load = a.tokens_per_expert.float()
            total = float(load.sum())
            out[f"evo/layer{i}/experts_per_token"] = ept[i]
            out[f"evo/layer{i}/max_over_mean_load"] = float(load.max() / load.mean().clamp_min(1e-9)) if total else 0.0
            for e, v in enumerate((load / max(total, 1.0)).tolist()):
                out[f"evo/layer{i}/load_e{e}"] = v
            for k, v in a.metrics.items():  # the adaptive runtime's decisions (mode, overlap degree)
                if k.startswith("runtime/"):
                    out[f"evo/layer{i}/{k}"] = float(v) if not isinstance(v, str) else v
        return out
