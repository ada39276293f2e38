"""The runner contract: what an MoELayer calls to run its routed experts, and the single-device runner.

Legend: T tokens, D hidden, N kept routes (rows grouped by expert).
(The single-device runner lives beside the experts it calls, in experts.py: one file less on the hot path.)

    y_ND = runner(x_ND, plan, experts, weights)                  # no shared work
    y_ND, s_TD = runner(x_ND, plan, experts, weights, shared=w)  # a runner with overlaps_shared runs w() too

(weights: experts.local_weights() of the call, (w1, w2, w3 or None), this rank's part; the runner
computes with `experts.compute(x, counts, *weights)`, or gathers them first.)

Everything a runner needs about the tokens (counts, capacity, T) is in the Plan: a runner never calls
back into the layer. `moesys.moe.experts.LocalRunner` (also importable from moesys.moe.layer) computes every expert here; `moesys.parallel`'s
ExpertParallelRunner moves rows between ranks (installed by `apply_expert_parallel`, the one way to
make a layer expert-parallel). The layer touches a runner only through the members of `Runner`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Protocol

import torch
import torch.nn as nn

from .routing_plan import Plan


@dataclass(frozen=True)
class SharedWork:
    """The shared experts' work of one forward, handed to a runner so it can overlap communication:
    `work()` returns s_TD = shared_experts(x_TD)."""

    experts: nn.Module
    x_TD: torch.Tensor

    def __call__(self) -> torch.Tensor:
        return self.experts(self.x_TD)


class Runner(Protocol):
    """Every member MoELayer uses on its runner."""

    # True: every expert computes on this device with no communication, so the layer may take its
    # sync-free path (static shapes, no host read); a runner that moves rows needs host splits
    local: bool
    # True: the runner takes the layer's SharedWork and runs it while its first dispatch is in flight
    # (then it returns (y_ND, s_TD)); False: the layer runs the shared experts itself
    overlaps_shared: bool
    # the latest call's measurements, name -> float or 0-dim tensor (the layer reports them as runtime/*)
    last_metrics: dict

    def prefetch(self, plan: Plan) -> None:
        """Called by the layer as soon as the plan exists, before it permutes the rows: a runner
        that exchanges counts starts that exchange here, so the permute runs while they travel.
        Not called on a `local` runner (it moves nothing, so it has nothing to start)."""

    def __call__(self, x_ND: torch.Tensor, plan: Plan, experts: nn.Module, weights: tuple,
                 shared: Optional[SharedWork] = None):
        """y_ND for the rows x_ND (grouped by global expert, counts in plan.counts_E); with `shared`,
        (y_ND, s_TD). `weights`: experts.local_weights(), taken once by the experts module that calls
        the runner (under FSDP2, where its weights have just been gathered)."""
