"""build_router: the router a MoEConfig names (top-k, switch, sigmoid_bias, expert_choice, the
dense-to-sparse gates). Its own file so routers.py and gates.py import one way (gates builds on routers)."""
from __future__ import annotations

from .config import MoEConfig
from .gates import DTSRouter
from .routers import ExpertChoiceRouter, Router, SigmoidBiasRouter, TopKRouter


def build_router(cfg: MoEConfig) -> Router:
    if cfg.router in ("topk", "switch"):
        return TopKRouter(cfg)
    if cfg.router == "sigmoid_bias":
        return SigmoidBiasRouter(cfg)
    if cfg.router == "expert_choice":
        return ExpertChoiceRouter(cfg)
    if cfg.router in ("dts", "act_dts"):
        return DTSRouter(cfg)
    raise ValueError(f"MoEConfig.router={cfg.router!r} has no implementation")
