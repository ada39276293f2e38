"""The router's decision as a flat list of routes, so every router shares one shape.

Legend: T tokens, E experts, R routes (pairs token -> expert). Top-k routers give R = T*K in
token-major order; dense-to-sparse gates give a number of routes that varies per token; expert
choice gives R = E*C. Everything downstream (plan, dispatch, experts) works on routes.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch


@dataclass(frozen=True)
class Routing:
    token_idx_R: torch.Tensor  # [R] int64 token of each route
    expert_idx_R: torch.Tensor  # [R] int64 global expert of each route
    weight_R: torch.Tensor  # [R] fp32 combine weight, differentiable w.r.t. the router
    slot_R: torch.Tensor  # [R] int64 choice rank of the route for its token (0 = first choice)
    num_tokens: int  # T
    probs_TE: torch.Tensor  # [T, E] fp32 router probabilities (used for losses and metrics)
    logits_TE: torch.Tensor  # [T, E] fp32 raw logits
    losses: dict = field(default_factory=dict)  # name -> scalar tensor, already coefficient-weighted
    capacity_applies: bool = True  # False when the router already fixed the per-expert counts
    fixed_k: Optional[int] = None  # K when routes are token-major with exactly K per token

    @property
    def num_routes(self) -> int:
        return int(self.token_idx_R.shape[0])


@dataclass(frozen=True)
class StaticRouting:
    """A fixed-K router's decision kept as [T, K] tensors (the sync-free path, moesys/moe/static_plan.py):
    no route list is built, and nothing here has a data-dependent shape."""

    expert_TK: torch.Tensor  # [T, K] int64 expert of each route (route r = t*K + k)
    weight_TK: torch.Tensor  # [T, K] fp32 combine weight, differentiable w.r.t. the router
    routed_E: torch.Tensor  # [E] int64 routes per expert (device histogram)
    probs_TE: torch.Tensor  # [T, E] fp32 router probabilities
    logits_TE: torch.Tensor  # [T, E] fp32 raw logits
    losses: dict = field(default_factory=dict)  # name -> scalar tensor, already coefficient-weighted
