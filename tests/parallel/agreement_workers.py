"""Rank-side bodies of the tuner-agreement tests (tests/parallel/test_tuner_agreement.py).

The tuner's trials are timed with the runner's `clock`. A SkewedClock makes time pass at a rate set
by the (mode, degree) the runner runs and by the rank's ep group, so two ep groups prefer different
candidates whatever the machine does: deterministic, where real timings differ only by chance.
"""
from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist

from moesys import MoEConfig, MoELayer
from moesys.parallel import ParallelDims, apply_expert_parallel
from moesys.parallel.tuner import DEGREES, MODES

CANDIDATES = [(m, c) for m in MODES for c in DEGREES]


def skewed_cost(group_index: int, candidate: tuple) -> float:
    """Seconds one clock reading advances: ep group 0 favours ep with overlap, group 1 sharded_dp
    without; each group's favourite is the other's slowest mode."""
    mode, c = candidate
    if group_index % 2 == 0:
        return (1.0 if mode == "ep" else 6.0) + 0.1 * abs(c - 4)
    return (5.0 if mode == "ep" else 2.0) + 0.1 * c


def job_choice(n_groups: int) -> tuple:
    """What a job-wide decision must pick: the candidate whose slowest group is fastest."""
    worst = {k: max(skewed_cost(g, k) for g in range(n_groups)) for k in CANDIDATES}
    return min(worst, key=lambda k: (worst[k], k))


class SkewedClock:
    """A step clock (parallel.timing's mark / seconds) whose time runs at the skewed rate."""

    def __init__(self, runner, group_index: int) -> None:
        self.runner, self.group_index, self.now = runner, group_index, 0.0

    def mark(self) -> float:
        self.now += skewed_cost(self.group_index, self.runner.current)
        return self.now

    def seconds(self, start: float, end: float) -> float:
        return end - start


def _layer(E: int, dims: ParallelDims, dispatcher: str, tuner: dict) -> MoELayer:
    torch.manual_seed(0)
    cfg = MoEConfig(hidden_size=8, ffn_hidden_size=16, num_experts=E, top_k=2)
    layer = MoELayer(cfg)
    return apply_expert_parallel(layer, dims.ep_group, dims=dims, dispatcher=dispatcher, tuner=tuner)


def agreement_worker(ep: int, steps: int, shift_at: int, dispatcher: str = "alltoallv") -> dict:
    """Train-like steps (fwd + bwd, an eval forward now and then) under skewed clocks; routing
    shifts at `shift_at` (twice the tokens, skewed to expert 0), which must trigger a re-decision.
    Returns this rank's trace of (step, mode, degree, phase) and the tuner's final state."""
    dims = ParallelDims.build(ep=ep, timeout_s=60)
    group_index = dims.rank // ep  # which ep group (tp = 1)
    tuner = dict(warmup_steps=1, top_candidates=len(CANDIDATES), trials=1, check_every=2, retune_rel_change=0.3)
    layer = _layer(8, dims, dispatcher, tuner)
    runner = layer.runner
    runner.clock = SkewedClock(runner, group_index)
    g = torch.Generator().manual_seed(100 + dims.rank)
    trace = []
    for step in range(steps):
        shifted = step >= shift_at
        x = torch.randn((23 + 3 * dims.rank) * (2 if shifted else 1), 8, generator=g)  # uneven tokens per rank
        if shifted:  # twice the tokens, and most of them routed to expert 0
            x = x + 4.0 * layer.router.weight[0].detach() / layer.router.weight[0].norm()
        y, aux = layer(x)
        (y.square().mean() + aux.loss).backward()
        trace.append((step, *runner.current, runner.tuner.phase))
        if step % 5 == 4:  # an evaluation forward: must not move the tuner
            with torch.no_grad():
                layer(x)
            trace.append((step, "eval", *runner.current, runner.tuner.phase))
    t = runner.tuner
    return {"trace": trace, "decision": t.decision, "decisions_made": t.decisions_made,
            "group_index": group_index, "metric_keys": sorted(runner.last_metrics)}


# ---------------------------------------------------------------------------------------------
# the trainer
class InstallSkewedClocks:
    """Trainer callback: every MoE layer's runner gets a SkewedClock of this rank's ep group."""

    def on_train_start(self, trainer) -> None:
        group_index = trainer.dims.rank // trainer.dims.ep
        for _, layer in trainer.moe_layers():
            layer.runner.clock = SkewedClock(layer.runner, group_index)


def skewed_callbacks(cfg) -> list:
    return [InstallSkewedClocks()]


def _tiny_cfg(*overrides: str):
    sys_path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "moesys")
    if sys_path not in sys.path:
        sys.path.insert(0, sys_path)
    from train_helpers import make_cfg

    return make_cfg(*overrides)


def trainer_matrix_worker(out_root: str, combos: list, steps: int) -> list:
    """Each (ep, dispatcher, seed) of `combos`: a Trainer in auto mode on this process group for
    `steps` steps (evaluation and metric reductions included). Returns per combo the losses and the
    (mode, degree) each layer ran last, which every rank must share."""
    from moesys.trainer import Trainer

    out = []
    for ep, dispatcher, seed in combos:
        cfg = _tiny_cfg(f"parallel.ep={ep}", f"parallel.simulate_ranks={dist.get_world_size()}",
                        f"parallel.dispatcher={dispatcher}", f"trainer.seed={seed}", f"trainer.steps={steps}",
                        "trainer.eval_interval=4", "trainer.log_interval=1", "trainer.save_final=false",
                        "trainer.plots=false", "logging.wandb_mode=disabled", "logging.tqdm=false")
        dims = ParallelDims.build(ep=ep, timeout_s=60, num_experts=cfg.moe.num_experts)
        run_dir = os.path.join(out_root, f"ep{ep}_{dispatcher}_s{seed}")
        tr = Trainer(cfg, dims=dims, out_dir=run_dir)
        summary = tr.fit(None)
        ran = [getattr(layer.runner, "current", None) for _, layer in tr.moe_layers()]
        out.append({"combo": (ep, dispatcher, seed), "losses": summary["train_losses"], "ran": ran})
    return out
