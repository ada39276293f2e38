"""parallel.overflow="rerun": grow the static dispatch buffer and re-run the step (Megatron's paged stash).

The padded dispatcher's static buffer holds C = max(1, ceil(f * T * K / E)) rows per (source rank,
expert) and drops the rows past it without any host read (dispatch_padded.py). With overflow="rerun"
the layer still drops and counts (`runtime/overflow_dropped`, a 0-dim device tensor), and the
trainer, which reads that count once per step anyway (with the loss, in its one per-step
all-reduce), re-runs an overflowed step once with a larger f on every rank:

    the step's gradients and everything its forward changed (buffers, RNG streams, generators:
    moesys.step_state) are put back, every MoE layer's f grows to `grown_factor(f, f_needed)`, and
    the micro-batches run again, so the step equals one run with the larger buffer from the start.

f_needed is the smallest factor whose buffer holds the most rows any (source rank, expert) held in
any layer and micro-batch of the step (`runtime/static_factor_needed`, max over the job: one extra
all-reduce, on overflowed steps only); under an expert placement with replicas an expert has a
buffer per holder, so its ceil(rows / holders) counts (docs/placement.md). The growth rule (a choice, documented in docs/expert-parallelism.md):

    f_new = min(ceil(4 * max(MARGIN * f_needed, MIN_GROWTH * f)) / 4, E / K)   (a multiple of 0.25)

capped at E / K, where C = T and no expert can overflow (each token sends one route per expert).
The margin: dropping rows in layer l changes the input of layer l+1, so the re-run's later layers
route a little differently from the overflowed pass; 25% headroom makes a second overflow rare. The
minimum growth (x1.5) bounds the number of re-runs of a slowly growing load. A re-run that still
overflows keeps its drops (counted, the step is not run a third time) and f grows again, from the
re-run's own need, for the later steps. The factor only grows; checkpoints keep it (a resumed run
uses the larger of the checkpoint's and the configured one). Forward-only passes (evaluation) use
the current factor and drop and count like "drop": they train nothing, so there is nothing to re-run.
"""
from __future__ import annotations

import math
from typing import Optional

import torch.nn as nn

from moesys.moe.layer import MoELayer

from .runner import ExpertParallelRunner

GROW_STEP = 0.25  # grown factors are multiples of this
MARGIN = 1.25  # headroom over the observed need
MIN_GROWTH = 1.5  # a re-run grows f by at least this much


def grown_factor(current: float, needed: float, limit: Optional[float] = None) -> float:
    """The static capacity factor after an overflow: a multiple of GROW_STEP, at least MARGIN x
    `needed` (the factor that just fits the observed rows) and MIN_GROWTH x `current`, but at most
    `limit` when given (E / K: then C = T, and no expert can receive more than T rows)."""
    if not (math.isfinite(needed) and needed >= 0 and current > 0):
        raise ValueError(f"grown_factor: needs a finite needed >= 0 and current > 0, got needed={needed}, "
                         f"current={current}")
    target = max(MARGIN * needed, MIN_GROWTH * current)
    # the 1e-9 keeps an exact multiple from being rounded up one step by float error
    grown = math.ceil(target / GROW_STEP - 1e-9) * GROW_STEP
    return grown if limit is None else max(min(grown, limit), needed)


def static_dispatchers(model: nn.Module) -> list:
    """The static-capacity padded dispatchers of every MoE layer of `model` (in module order)."""
    out = []
    for m in model.modules():
        if isinstance(m, MoELayer) and isinstance(m.runner, ExpertParallelRunner) and m.runner.dispatcher.static:
            out.append(m.runner.dispatcher)
    return out


def static_capacity_factor(model: nn.Module) -> Optional[float]:
    """The factor every static dispatcher of `model` uses (they share one); None without any."""
    fs = {d.static_capacity_factor for d in static_dispatchers(model)}
    if len(fs) > 1:
        raise RuntimeError(f"static_capacity_factor: the MoE layers use different factors {sorted(fs)}")
    return fs.pop() if fs else None


def set_static_capacity_factor(model: nn.Module, factor: float) -> int:
    """Give every static dispatcher of `model` the factor f (a Python float: C stays host integer
    math). Every rank must set the same f at the same step. Returns how many dispatchers changed."""
    if not (math.isfinite(factor) and factor > 0):
        raise ValueError(f"set_static_capacity_factor: the factor must be a finite number > 0, got {factor}")
    ds = static_dispatchers(model)
    for d in ds:
        d.set_static_capacity_factor(float(factor))
    return len(ds)
