"""End-of-run figures (rank 0, Agg backend), made to be read at a glance:

- expert_load.png: share of routes per expert over steps, one heatmap per MoE layer, all on ONE
  colour scale (a diverging map centred on 1/E: white = balanced, red = overloaded, blue = starved;
  the colour bar marks 1/E); every expert is labelled when E <= 16.
- routing.png: drop rate (% of routes) and router entropy (nats; ln E = uniform routing) over steps,
  one line per MoE layer.
- loss.png: train and validation loss; the EvoMoE switch (dense -> experts) and the hard top-1
  step are marked with vertical lines when the run has them.

The *_figure functions return the matplotlib Figure (tests inspect it); write_all saves and closes.
"""
from __future__ import annotations

import math
import os
from typing import Dict, List, Optional, Tuple

import numpy as np

MAX_LABELLED_EXPERTS = 16


def _plt():
    import matplotlib

    matplotlib.use("Agg")  # no display; must precede pyplot
    import matplotlib.pyplot as plt

    return plt


def expert_load_figure(steps: List[int], loads: Dict[int, List[List[float]]]):
    """loads[block] = one row per logged step: fraction of routes per expert (sums to 1)."""
    from matplotlib.colors import TwoSlopeNorm

    plt = _plt()
    blocks = sorted(loads)
    mats = {b: np.asarray(loads[b], dtype=float).T for b in blocks}  # [E, n_logged]
    E = next(iter(mats.values())).shape[0]
    even = 1.0 / E
    top = max(float(m.max()) for m in mats.values())
    # one norm for every layer: the same colour means the same share in every panel
    norm = TwoSlopeNorm(vmin=0.0, vcenter=even, vmax=max(top, 2 * even))
    fig, axes = plt.subplots(len(blocks), 1, figsize=(8, 1.2 + 0.22 * min(E, 32) * len(blocks) + 0.4 * len(blocks)),
                             squeeze=False, sharex=True, layout="constrained")
    # one cell per logged step, centred on it (a single logged step still gets a width)
    half = (steps[-1] - steps[0]) / (2 * (len(steps) - 1)) if len(steps) > 1 else 0.5
    im = None
    for ax, b in zip(axes[:, 0], blocks):
        im = ax.imshow(mats[b], aspect="auto", interpolation="nearest", cmap="RdBu_r", norm=norm,
                       extent=(steps[0] - half, steps[-1] + half, E - 0.5, -0.5))
        ax.set_ylabel(f"block {b}\nexpert")
        if E <= MAX_LABELLED_EXPERTS:
            ax.set_yticks(range(E), [str(e) for e in range(E)], fontsize=7 if E > 8 else 8)
    axes[-1, 0].set_xlabel("step")
    cbar = fig.colorbar(im, ax=axes[:, 0].tolist(), label="share of routes")
    ticks = sorted({0.0, even, norm.vmax} | {t for t in (0.5 * even, 1.5 * even) if t < norm.vmax})
    cbar.set_ticks(ticks, labels=[f"1/E = {t:.3f}" if t == even else f"{t:.2f}" for t in ticks])
    cbar.ax.axhline(even, color="black", lw=1.5)
    fig.suptitle(f"expert load per MoE layer ({E} experts; white = 1/E, balanced)")
    return fig


def routing_figure(steps: List[int], drop_rate: Dict[int, List[float]], entropy: Dict[int, List[float]],
                   num_experts: int):
    """Drop rate and router entropy per MoE layer over the logged steps."""
    plt = _plt()
    fig, (ax_d, ax_h) = plt.subplots(2, 1, figsize=(7, 5.5), sharex=True, layout="constrained")
    for b in sorted(drop_rate):
        # the last len(v) logged steps (a run resumed from an older checkpoint logged these from then on)
        ax_d.plot(steps[len(steps) - len(drop_rate[b]):], [100 * v for v in drop_rate[b]], label=f"block {b}")
    for b in sorted(entropy):
        ax_h.plot(steps[len(steps) - len(entropy[b]):], entropy[b], label=f"block {b}")
    ax_d.set_ylabel("dropped routes (%)")
    ax_d.set_ylim(bottom=0)
    ax_h.axhline(math.log(num_experts), color="grey", ls="--", lw=1, label=f"ln E = {math.log(num_experts):.2f} (uniform)")
    ax_h.set_ylabel("router entropy (nats)")
    ax_h.set_ylim(0, 1.08 * math.log(max(num_experts, 2)))  # the uniform line stays in view
    ax_h.set_xlabel("step")
    for ax in (ax_d, ax_h):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("routing per MoE layer")
    return fig


def loss_figure(train: List[Tuple[int, float]], val: List[Tuple[int, float]],
                marks: Optional[Dict[str, int]] = None):
    """marks: {label: step} drawn as vertical dashed lines (the EvoMoE switch, the hard top-1 step)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4), layout="constrained")
    if train:
        ax.plot(*zip(*train), label="train", lw=1)
    if val:
        ax.plot(*zip(*val), "o-", label="validation")
    for (label, step), colour in zip(sorted((marks or {}).items(), key=lambda kv: kv[1]), ("C3", "C4", "C5")):
        ax.axvline(step, color=colour, ls="--", lw=1.2, label=f"{label} (step {step})")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.legend()
    ax.grid(alpha=0.3)
    return fig


def evo_marks(evo_cfg, last_step: int) -> Dict[str, int]:
    """The EvoMoE steps worth marking that the run reached: the switch to experts, hard top-1."""
    if evo_cfg is None or not evo_cfg.enabled:
        return {}
    out = {}
    if evo_cfg.dense_phase and evo_cfg.diversify_step is not None and evo_cfg.diversify_step <= last_step:
        out["EvoMoE switch: dense -> experts"] = int(evo_cfg.diversify_step)
    hard = getattr(evo_cfg, "hard_step", None)
    if hard is not None and hard <= last_step:
        out["hard top-1"] = int(hard)
    return out


def _save(fig, path: str) -> str:
    fig.savefig(path, dpi=110)
    _plt().close(fig)
    return path


def write_all(out_dir: str, history: dict, *, num_experts: Optional[int] = None,
              marks: Optional[Dict[str, int]] = None) -> List[str]:
    os.makedirs(out_dir, exist_ok=True)
    out = []
    steps = history.get("load_steps", [])
    if history.get("load") and steps:
        out.append(_save(expert_load_figure(steps, history["load"]), os.path.join(out_dir, "expert_load.png")))
    if history.get("drop_rate") and steps and num_experts:
        out.append(_save(routing_figure(steps, history["drop_rate"], history.get("router_entropy", {}), num_experts),
                         os.path.join(out_dir, "routing.png")))
    out.append(_save(loss_figure(history.get("train", []), history.get("val", []), marks),
                     os.path.join(out_dir, "loss.png")))
    return out
