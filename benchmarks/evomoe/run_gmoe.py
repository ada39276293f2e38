"""Gaussian mixture of experts: parameter estimation error vs. sample size for two dense-to-sparse gates.

    python benchmarks/evomoe/run_gmoe.py              # ~3-5 min on one CPU core; writes results/gmoe.{json,md,png}
    python benchmarks/evomoe/run_gmoe.py --quick      # seconds (n up to 1e4, 1 repeat)

Model (1-D input x ~ N(0, 1)): y | x ~ sum_i G_i(x) N(a_i x + b_i, nu_i), i = 1..k
    temperature gate (EvoMoE's DTS without noise):  G(x) = softmax((beta1_i x + beta0_i) / tau)
    activation gate (Nguyen, Akbarian & Ho 2024):    G(x) = softmax(sigmoid(beta1_i x) / tau + beta0_i)
tau is learned in both. Data come from a true model with k* = 2 experts of the same gate family; we
fit k = 3 experts (over-specified: the setting where the two gates' rates differ) by full-batch
maximum likelihood (L-BFGS, float64), initialised near the truth with the extra expert split off
the first one, and measure a Voronoi-type loss (Nguyen et al.):
    D = sum_j |sum_{i in V_j} pi_i - pi*_j| + sum_j sum_{i in V_j} pi_i ||theta_i - theta*_j||^r,
V_j the fitted experts nearest to true expert j in theta = (a, b, nu), pi_i = E_x[G_i(x)] the
mixing mass, r = 1 for cells with one fitted expert and r = 2 for cells with several. A second loss
takes the gate's raw parameters over the same cells: sum_j sum_{i in V_j} pi_i (|beta1_i - beta1*_j|
+ |tau - tau*|). For the temperature gate they are not identifiable -- (beta1, beta0, tau) and
(c beta1, c beta0, c tau) give the same gate, and so does a common shift of beta1 -- which is the
parameter interaction the activation gate removes. The fitted slope of log loss against log n is
the empirical rate (n^-1/2 would be parametric).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import time

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
TRUE_EXPERTS = torch.tensor([[-1.0, 0.5, 0.3], [1.5, -0.5, 0.5]], dtype=torch.float64)  # (a, b, nu)
TRUE_GATE = {"beta1": torch.tensor([1.0, -1.0], dtype=torch.float64),
             "beta0": torch.tensor([0.0, 0.0], dtype=torch.float64), "tau": 1.0}


def gate_probs(kind: str, x: torch.Tensor, beta1, beta0, log_tau) -> torch.Tensor:
    tau = torch.exp(log_tau)
    if kind == "temperature":
        z = (x[:, None] * beta1[None] + beta0[None]) / tau
    else:
        z = torch.sigmoid(x[:, None] * beta1[None]) / tau + beta0[None]
    return torch.softmax(z, -1)


def nll(kind, x, y, beta1, beta0, log_tau, a, b, log_nu):
    g = gate_probs(kind, x, beta1, beta0, log_tau)
    nu = torch.exp(log_nu)  # variance
    mu = x[:, None] * a[None] + b[None]
    logp = -0.5 * (y[:, None] - mu) ** 2 / nu[None] - 0.5 * torch.log(2 * math.pi * nu[None])
    return -torch.logsumexp(torch.log(g.clamp_min(1e-300)) + logp, -1).mean()


def sample(kind: str, n: int, gen: torch.Generator):
    x = torch.randn(n, generator=gen, dtype=torch.float64)
    g = gate_probs(kind, x, TRUE_GATE["beta1"], TRUE_GATE["beta0"], torch.tensor(math.log(TRUE_GATE["tau"])))
    comp = torch.multinomial(g, 1, generator=gen).squeeze(1)
    a, b, nu = TRUE_EXPERTS[comp].unbind(-1)
    y = a * x + b + torch.sqrt(nu) * torch.randn(n, generator=gen, dtype=torch.float64)
    return x, y


def fit(kind: str, x, y, k: int, gen: torch.Generator, iters: int = 100):
    """MLE of a k-expert model, initialised near the truth (extra experts split off expert 0)."""
    src = [i if i < 2 else 0 for i in range(k)]
    jitter = lambda *s: 0.05 * torch.randn(*s, generator=gen, dtype=torch.float64)
    beta1 = (TRUE_GATE["beta1"][src] + jitter(k)).requires_grad_()
    # split the mass of a duplicated expert: beta0 - log(copies)
    copies = torch.tensor([src.count(s) for s in src], dtype=torch.float64)
    b0 = TRUE_GATE["beta0"][src] - (torch.log(copies) if kind == "activation" else torch.log(copies) * TRUE_GATE["tau"])
    beta0 = (b0 + jitter(k)).requires_grad_()
    log_tau = torch.tensor(math.log(TRUE_GATE["tau"]), dtype=torch.float64).add(jitter(1)[0]).requires_grad_()
    a = (TRUE_EXPERTS[src, 0] + jitter(k)).requires_grad_()
    b = (TRUE_EXPERTS[src, 1] + jitter(k)).requires_grad_()
    log_nu = (torch.log(TRUE_EXPERTS[src, 2]) + jitter(k)).requires_grad_()
    params = [beta1, beta0, log_tau, a, b, log_nu]
    opt = torch.optim.LBFGS(params, lr=1.0, max_iter=iters, tolerance_grad=1e-10, tolerance_change=1e-13,
                            history_size=50, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = nll(kind, x, y, *params)
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        xs = torch.randn(200_000, generator=gen, dtype=torch.float64)
        pi = gate_probs(kind, xs, beta1, beta0, log_tau).mean(0)
        theta = torch.stack([a, b, torch.exp(log_nu)], -1)
    return pi.detach(), theta.detach(), beta1.detach(), float(torch.exp(log_tau))


def voronoi_loss(kind: str, pi, theta, beta1=None, tau=None) -> tuple:
    xs = torch.randn(200_000, generator=torch.Generator().manual_seed(123), dtype=torch.float64)
    pi_true = gate_probs(kind, xs, TRUE_GATE["beta1"], TRUE_GATE["beta0"],
                         torch.tensor(math.log(TRUE_GATE["tau"]))).mean(0)
    d = torch.cdist(theta, TRUE_EXPERTS)  # [k, k*]
    cell = d.argmin(-1)
    loss, gate = 0.0, 0.0
    for j in range(TRUE_EXPERTS.shape[0]):
        members = (cell == j).nonzero().flatten()
        loss += abs(float(pi[members].sum() - pi_true[j]))
        r = 1 if len(members) == 1 else 2
        loss += float((pi[members] * d[members, j] ** r).sum())
        # the raw gate parameters (beta1, tau) of the same cells
        gate += float((pi[members] * ((beta1[members] - TRUE_GATE["beta1"][j]).abs() + abs(tau - TRUE_GATE["tau"]))).sum())
    return loss, gate


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--repeats", type=int, default=8)
    ap.add_argument("--fit-k", type=int, default=3)
    ap.add_argument("--iters", type=int, default=100, help="L-BFGS iterations per fit")
    a = ap.parse_args()
    torch.set_num_threads(1)
    ns = [1000, 3000, 10000] if a.quick else [1000, 3000, 10000, 30000, 100000]
    repeats = 1 if a.quick else a.repeats
    res = {"ns": ns, "fit_k": a.fit_k, "iters": a.iters, "true_k": 2, "repeats": repeats, "loss": {}, "slope": {},
           "gate_loss": {}, "gate_slope": {}}
    t0 = time.time()
    for kind in ("temperature", "activation"):
        per_n, gate_n = [], []
        for n in ns:
            vals, gvals = [], []
            for r in range(repeats):
                gen = torch.Generator().manual_seed(1000 * r + n)
                x, y = sample(kind, n, gen)
                pi, theta, beta1, tau = fit(kind, x, y, a.fit_k, gen, iters=a.iters)
                v, gv = voronoi_loss(kind, pi, theta, beta1, tau)
                vals.append(v)
                gvals.append(gv)
            per_n.append(vals)
            gate_n.append(gvals)
            print(f"{kind:11s} n={n:6d}: Voronoi loss median {np.median(vals):.4f}  ({time.time() - t0:.0f}s)", flush=True)
        res["loss"][kind] = per_n
        res["gate_loss"][kind] = gate_n
        med = np.array([np.median(v) for v in per_n])
        res["slope"][kind] = float(np.polyfit(np.log(ns), np.log(med), 1)[0])
        gmed = np.array([np.median(v) for v in gate_n])
        res["gate_slope"][kind] = float(np.polyfit(np.log(ns), np.log(gmed), 1)[0])
    res["wall_s"] = time.time() - t0
    out_dir = os.path.join(HERE, "results")
    os.makedirs(out_dir, exist_ok=True)
    suffix = "_quick" if a.quick else ""
    with open(os.path.join(out_dir, f"gmoe{suffix}.json"), "w") as f:
        json.dump(res, f, indent=1)
    write_report(res, out_dir, suffix)


def write_report(res: dict, out_dir: str, suffix: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ns = np.array(res["ns"])
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    head = "| gate | loss | " + " | ".join(f"n={n:g}" for n in ns) + " | fitted slope |"
    lines = [head, "|---" * (len(ns) + 3) + "|"]
    panels = (("loss", "slope", "Voronoi loss: experts (a, b, nu) + mixing masses"),
              ("gate_loss", "gate_slope", "raw gate parameters (beta1, tau), same cells"))
    for ax, (key, skey, title) in zip(axes, panels):
        for kind, mark in (("temperature", "o"), ("activation", "s")):
            vals = res[key][kind]
            med = np.array([np.median(v) for v in vals])
            lo = np.array([np.min(v) for v in vals])
            hi = np.array([np.max(v) for v in vals])
            ax.errorbar(ns, med, yerr=[med - lo, hi - med], marker=mark, capsize=3,
                        label=f"{kind} gate (slope {res[skey][kind]:.2f})")
            lines.append(f"| {kind} | {key.replace('_', ' ')} | " + " | ".join(f"{m:.4f}" for m in med)
                         + f" | {res[skey][kind]:.2f} |")
        ref = np.median(res[key]["activation"][0])
        ax.plot(ns, ref * (ns / ns[0]) ** -0.5, "k:", label="n^-1/2 reference")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("sample size n")
        ax.set_ylabel("median over repeats (bars: min-max)")
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=8)
    fig.suptitle(f"Gaussian MoE, k*={res['true_k']} true experts, k={res['fit_k']} fitted", fontsize=11)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, f"gmoe_rates{suffix}.png"), dpi=120)
    with open(os.path.join(out_dir, f"gmoe{suffix}.md"), "w") as f:
        f.write(f"Median of {res['repeats']} fits per n; k*={res['true_k']} true experts, k={res['fit_k']} fitted; "
                f"L-BFGS {res.get('iters', '?')} iterations; "
                f"{res['wall_s']:.0f} s.\n\n" + "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
