"""Table and plots from run_lm.py's results.

    python benchmarks/evomoe/report_lm.py                          # results/lm_runs.json -> lm_results.md + PNGs
    python benchmarks/evomoe/report_lm.py results/lm_runs_gpu.json

Training FLOPs are recomputed here from the per-step mean experts per token (fwd + bwd = 6 x
multiply-adds per weight and token; each route charges one expert FFN; dense models have no router).
"""
from __future__ import annotations

import json
import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ORDER = ("dense", "switch", "top2", "dts", "evomoe")
LABEL = {"dense": "dense (same active FLOPs)", "switch": "Switch top-1", "top2": "top-2",
         "dts": "DTS gate alone", "evomoe": "EvoMoE (diversify + DTS)"}


def step_flops(p: dict, method: str, ept: np.ndarray) -> np.ndarray:
    D, F, S, L, E = p["d_model"], p["ffn"], p["seq"], p["n_layers"], p["experts"]
    T = p["batch"] * S
    base = L * T * (6 * 4 * D * D + 6 * 2 * S * D) + T * 6 * D * 256
    router = 0 if method == "dense" else L * T * 6 * D * E
    return base + router + 6 * 2 * D * F * ept * T * L


def cum_flops_at_evals(p, r) -> np.ndarray:
    cum = np.concatenate([[0.0], np.cumsum(step_flops(p, r["method"], np.array(r["ept_mean"])))])
    return cum[np.array(r["eval_steps"])]


def first_crossing(x: np.ndarray, v: np.ndarray, thr: float):
    """Smallest x at which the (linearly interpolated) curve v reaches thr; None if never."""
    for i in range(1, len(v)):
        if v[i] <= thr:
            if v[i - 1] <= thr:
                return float(x[i - 1])
            t = (v[i - 1] - thr) / (v[i - 1] - v[i])
            return float(x[i - 1] + t * (x[i] - x[i - 1]))
    return None


def main(path: str) -> None:
    with open(path) as f:
        res = json.load(f)
    p, runs = res["config"], res["runs"]
    tag = "" if res["preset"] == "cpu" else f"_{res['preset']}"
    out_dir = os.path.dirname(os.path.abspath(path))
    by = {m: [r for r in runs if r["method"] == m] for m in ORDER}
    by = {m: rs for m, rs in by.items() if rs}
    seeds = sorted({r["seed"] for r in runs})
    switch = {r["seed"]: r for r in by.get("switch", [])}
    budget = {s: cum_flops_at_evals(p, r)[-1] for s, r in switch.items()}
    rows = []
    for m, rs in by.items():
        final = np.array([r["val"][-1] for r in rs])
        at_flops, steps_to, flops_to, reached, delta = [], [], [], 0, []
        for r in rs:
            fl = cum_flops_at_evals(p, r)
            v = np.array(r["val"])
            if r["seed"] in budget:
                b = budget[r["seed"]]
                if fl[-1] < b <= 1.02 * fl[-1]:  # dense: no router, 1% fewer FLOPs than Switch in all
                    b = fl[-1]
                at_flops.append(float(np.interp(b, fl, v)) if b <= fl[-1] else float("nan"))
                delta.append(r["val"][-1] - switch[r["seed"]]["val"][-1])
                thr = switch[r["seed"]]["val"][-1]
                s = first_crossing(np.array(r["eval_steps"], dtype=float), v, thr)
                f_ = first_crossing(fl, v, thr)
                if s is not None:
                    reached += 1
                    steps_to.append(s)
                    flops_to.append(f_)
        total = np.mean([cum_flops_at_evals(p, r)[-1] for r in rs])
        ept = np.mean([np.mean(r["ept_mean"]) for r in rs])
        rows.append((m, final, delta, at_flops, steps_to, flops_to, reached, len(rs), total, ept))

    sw_steps = p["steps"]
    lines = [
        f"Preset `{res['preset']}`: {p['n_layers']} layers, d_model {p['d_model']}, {p['experts']} experts of F={p['ffn']}, "
        f"seq {p['seq']}, batch {p['batch']}, {p['steps']} steps, seeds {seeds}. Validation: {p['eval_batches']} fixed "
        f"batches, eval-mode routing (DTS: top-1). Mean ± std over seeds; 'reach Switch' = first (interpolated) "
        f"step / training FLOPs at which the run's validation loss reaches Switch's final validation loss of the "
        f"same seed; speed-up = Switch's steps ({sw_steps}) / those steps.",
        "",
        "| method | final val loss | final - Switch (same seed) | val loss at Switch's total FLOPs | steps to reach Switch | speed-up (steps) "
        "| GFLOPs to reach Switch | total train GFLOPs | mean experts/token |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for m, final, delta, at_flops, steps_to, flops_to, reached, n, total, ept in rows:
        af = np.array(at_flops)
        af_s = "n/a (fewer FLOPs in total)" if len(af) and np.isnan(af).all() else (
            f"{np.nanmean(af):.4f} ± {np.nanstd(af):.4f}" if len(af) else "-")
        st = f"{np.mean(steps_to):.0f} ({reached}/{n} seeds)" if steps_to else f"not reached (0/{n})"
        sp = f"{sw_steps / np.mean(steps_to):.2f}x" if steps_to else "-"
        fl = f"{np.mean(flops_to) / 1e9:.0f}" if flops_to else "-"
        dl = " / ".join(f"{d:+.3f}" for d in delta)
        lines.append(f"| {LABEL[m]} | {final.mean():.4f} ± {final.std():.4f} | {dl} | {af_s} | {st} | {sp} | {fl} "
                     f"| {total / 1e9:.0f} | {ept:.2f} |")
    md = os.path.join(out_dir, f"lm_results{tag}.md")
    with open(md, "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    plots(p, by, out_dir, tag)


def plots(p, by, out_dir, tag):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for m, rs in by.items():
        steps = np.array(rs[0]["eval_steps"])
        v = np.array([r["val"] for r in rs])
        fl = np.mean([cum_flops_at_evals(p, r) for r in rs], axis=0) / 1e9
        for ax, x in ((axes[0], steps), (axes[1], fl)):
            ax.plot(x, v.mean(0), label=LABEL[m])
            ax.fill_between(x, v.min(0), v.max(0), alpha=0.15)
    for ax, xl in ((axes[0], "training step"), (axes[1], "training GFLOPs (actual routes)")):
        ax.set_xlabel(xl)
        ax.set_ylabel("validation loss (nats/byte)")
        lo = min(np.min([r["val"][-1] for r in rs]) for rs in by.values())
        ax.set_ylim(lo - 0.05, lo + 1.0)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    axes[0].set_title("validation loss at equal steps (mean, min-max over seeds)")
    axes[1].set_title("validation loss at equal training FLOPs")
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, f"lm_val_loss{tag}.png"), dpi=110)

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for m in ("dts", "evomoe"):
        if m not in by:
            continue
        r = by[m][0]
        s = np.array(r["steps"])
        axes[0].plot(s, r["tau"], label=LABEL[m])
        axes[1].plot(s, r["ept_mean"], label=f"{LABEL[m]} mean")
        axes[1].plot(s, r["ept_max"], "--", label=f"{LABEL[m]} max")
        axes[2].plot(s, r["max_over_mean_load"], label=LABEL[m])
    for m in ("switch", "top2"):
        if m in by:
            axes[2].plot(by[m][0]["steps"], by[m][0]["max_over_mean_load"], alpha=0.6, label=LABEL[m])
    for ax, t in zip(axes, ("gate temperature tau", "experts per token (training)", "max/mean expert load (worst layer)")):
        ax.set_title(t)
        ax.set_xlabel("training step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, f"lm_gate{tag}.png"), dpi=110)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else os.path.join(HERE, "results", "lm_runs.json"))
