"""What a loss spike is made of (issue 14 item 7): train one process for N steps, find the step
whose update raised the next loss the most, and take that update apart.

    python benchmarks/spike_probe.py                                       # the dense model, seed 1, 30 steps
    python benchmarks/spike_probe.py --seed 1 --warmup 60                  # the same with the longer warmup
    python benchmarks/spike_probe.py --overrides model.moe_every=1 moe.capacity_factor=1.25

Per step it prints the loss, the gradient norm before clipping, the LR, the update's size against
the weights' (||dθ||/||θ||) and its cosine with the previous update. For the worst update
(θ_k -> θ_k+1, measured on batch k+1) it prints:
- the loss along that update, θ_k + α·dθ for α in 0 … 2: where the line's minimum is against the
  step the optimizer took (a minimum at α ≈ 0.5 means the step was twice the stable one: the
  LR is past the edge of stability for the sharpest direction);
- which parameters carry it: the loss with only one group's update applied, and with every update
  but that group's;
- the share of probability the model gives to tokens that never occur in the training data,
  before and after (with tied embeddings their rows drift together, as one many-fold token).

Model and data: `moesys-train`'s config (the default, plus --overrides), on one process
(`parallel.ep=1`); `model.moe_every=0` (EvoMoE's dense phase: the spike is not MoE-specific) and
`model.arch=gpt` (the model docs/stability.md investigated) unless the overrides set them.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

GROUPS = {  # name -> which parameter names belong to it
    "attention": lambda n: ".attn." in n,
    "block 0 attention": lambda n: n.startswith("blocks.0.attn."),
    "ffn / moe": lambda n: ".ffn." in n or ".moe." in n,
    "token embedding (tied head)": lambda n: n.startswith("tok_emb."),
    "position embedding": lambda n: n.startswith("pos_emb."),
    "layer norms": lambda n: ".ln" in n or n.startswith("ln_f."),
}


def probe_worker(overrides: list, steps: int):
    from moesys import train as T
    from moesys.model import lm_loss
    from moesys.parallel import ParallelDims
    from moesys.trainer import Trainer

    import tempfile

    cfg = T.check_overrides([*overrides, "trainer.log_interval=1", "trainer.plots=false", "logging.tqdm=false",
                             "logging.wandb_mode=disabled", "trainer.save_final=false", "trainer.collapse_share=0"])
    dims = ParallelDims.build(ep=1, tp=1, timeout_s=60, num_experts=cfg.moe.num_experts)
    with tempfile.TemporaryDirectory() as out_dir:
        tr = Trainer(cfg, dims=dims, out_dir=out_dir)
        m = tr.model
        params = dict(m.named_parameters())
        rows, snaps, prev = [], [], None
        for _ in range(steps):
            before = {n: p.detach().clone() for n, p in params.items()}
            out = tr.train_step()
            d = torch.cat([(p.detach() - before[n]).flatten() for n, p in params.items()])
            w = torch.cat([v.flatten() for v in before.values()])
            cos = float(torch.nn.functional.cosine_similarity(d, prev, dim=0)) if prev is not None else float("nan")
            rows.append((tr.step, out["loss"], out["grad_norm"], out["lr"], float(d.norm() / w.norm()), cos))
            snaps.append(before)
            prev = d
        # the worst update: step k's (θ_k -> θ_k+1) raised the loss of step k+1 the most
        jumps = [rows[i + 1][1] - rows[i][1] for i in range(len(rows) - 1)]
        k = max(range(len(jumps)), key=jumps.__getitem__)
        th0, th1 = snaps[k], snaps[k + 1]
        x, y = next(iter(tr.batches.step_batches(k + 1)))
        counts = torch.bincount(torch.as_tensor(tr.train_split.tokens.astype("int64")), minlength=cfg.data.vocab_size)
        unused = counts == 0

        @torch.no_grad()
        def loss_at(update: dict) -> tuple:
            for n, p in params.items():
                p.copy_(th0[n] + update.get(n, 0.0))
            logits, _, _ = m(x)
            mass = logits.float().softmax(-1)[..., unused].sum(-1).mean() if unused.any() else torch.zeros(())
            return float(lm_loss(logits, y)), float(mass)

        full = {n: th1[n] - th0[n] for n in params}
        line = [(a, *loss_at({n: a * v for n, v in full.items()})) for a in (0, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0)]
        parts = []
        for g, member in GROUPS.items():
            only = {n: v for n, v in full.items() if member(n)}
            rest = {n: v for n, v in full.items() if not member(n)}
            if only:
                parts.append((g, loss_at(only)[0], loss_at(rest)[0]))
        return {"rows": rows, "k": k, "line": line, "parts": parts, "unused": int(unused.sum()),
                "vocab": cfg.data.vocab_size}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--warmup", type=int, default=None, help="schedule.warmup_steps (default: the config's)")
    ap.add_argument("--overrides", nargs="*", default=[], help="moesys-train overrides")
    a = ap.parse_args()
    from _shapes import RANK_PRELOAD  # benchmarks/ is on sys.path when a script runs

    from moesys.parallel import simulate

    ov = list(a.overrides)
    if not any(o.startswith("model.moe_every=") for o in ov):
        ov.append("model.moe_every=0")
    if not any(o.startswith("model.arch=") for o in ov):
        ov.append("model.arch=gpt")
    ov += ["parallel.ep=1", "parallel.simulate_ranks=1", f"trainer.seed={a.seed}", f"trainer.steps={a.steps}"]
    if a.warmup is not None:
        ov.append(f"schedule.warmup_steps={a.warmup}")
    r = simulate(probe_worker, 1, ov, a.steps, timeout_s=600, preload=RANK_PRELOAD)[0]
    print(f"moesys-train {' '.join(ov)}\n")
    print("| step | loss | grad norm | lr | ‖dθ‖/‖θ‖ | cos(dθ, previous dθ) |")
    print("|---|---|---|---|---|---|")
    for s, loss, gn, lr, rel, cos in r["rows"]:
        print(f"| {s} | {loss:.3f} | {gn:.2f} | {lr:.2e} | {rel:.4f} | {cos:+.2f} |")
    k = r["k"]
    print(f"\nworst update: step {k + 1}'s (loss {r['rows'][k][1]:.3f} -> {r['rows'][k + 1][1]:.3f}); "
          f"on step {k + 2}'s batch, along θ + α·dθ:\n")
    print("| α | loss | probability on the " + f"{r['unused']} of {r['vocab']} tokens never in the data |")
    print("|---|---|---|")
    for alpha, loss, mass in r["line"]:
        print(f"| {alpha:.2f} | {loss:.3f} | {mass:.3f} |")
    best = min(r["line"], key=lambda t: t[1])
    print(f"\nthe line's minimum is at α = {best[0]:.2f} of the step taken\n")
    print("| parameters | loss with only their update | loss with every update but theirs |")
    print("|---|---|---|")
    for g, only, rest in r["parts"]:
        print(f"| {g} | {only:.3f} | {rest:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
