"""End-of-run figures (rank 0): expert load heatmaps per MoE layer and the loss curve. Agg backend."""
from __future__ import annotations

import os
from typing import Dict, List, Tuple

import numpy as np


def _plt():
    import matplotlib

    matplotlib.use("Agg")  # no display; must precede pyplot
    import matplotlib.pyplot as plt

    return plt


def expert_load_heatmap(path: str, steps: List[int], loads: Dict[int, List[List[float]]]) -> None:
    """loads[block] = one row per logged step: fraction of routes per expert (sums to 1)."""
    if not loads or not steps:
        return
    plt = _plt()
    blocks = sorted(loads)
    fig, axes = plt.subplots(len(blocks), 1, figsize=(8, 1.8 * len(blocks) + 0.6), squeeze=False, sharex=True)
    for ax, b in zip(axes[:, 0], blocks):
        m = np.asarray(loads[b]).T  # [E, n_logged]
        # one cell per logged step, centred on it (a single logged step still gets a width)
        half = (steps[-1] - steps[0]) / (2 * (len(steps) - 1)) if len(steps) > 1 else 0.5
        im = ax.imshow(m, aspect="auto", interpolation="nearest", cmap="viridis",
                       extent=(steps[0] - half, steps[-1] + half, m.shape[0] - 0.5, -0.5))
        ax.set_ylabel(f"block {b}\nexpert")
        fig.colorbar(im, ax=ax, label="load share")
    axes[-1, 0].set_xlabel("step")
    fig.suptitle("expert load per MoE layer (share of routes; 1/E is balanced)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def loss_curve(path: str, train: List[Tuple[int, float]], val: List[Tuple[int, float]]) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), label="train", lw=1)
    if val:
        ax.plot(*zip(*val), "o-", label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_all(out_dir: str, history: dict) -> List[str]:
    os.makedirs(out_dir, exist_ok=True)
    out = []
    p = os.path.join(out_dir, "expert_load.png")
    if history.get("load"):
        expert_load_heatmap(p, history["load_steps"], history["load"])
        out.append(p)
    p = os.path.join(out_dir, "loss.png")
    loss_curve(p, history.get("train", []), history.get("val", []))
    out.append(p)
    return out
