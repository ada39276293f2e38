"""EvoMoE vs. baselines on the embedded corpus with the small GPT-MoE (single process, no EP).

    python benchmarks/evomoe/run_lm.py                      # CPU preset: ~15 min on 1 core, 3 seeds
    python benchmarks/evomoe/run_lm.py --preset smoke       # seconds: checks the script end to end
    python benchmarks/evomoe/run_lm.py --preset gpu         # the same study at a larger scale on one GPU
    python benchmarks/evomoe/report_lm.py                   # table + plots from results/lm_runs.json

Methods (all with E experts of width F, except dense):
    dense    one FFN of width F per block (same active FLOPs as top-1)
    switch   top-1, Switch aux loss
    top2     top-2, renormalised, Switch aux loss
    dts      DTS gate from step 0 (tau annealed, then hard top-1), EvoMoE balance loss
    evomoe   dense FFN first, experts spawned by random masking at diversify_step, then DTS
Every run sees the same batches for a seed (moesys.data is a pure function of (seed, step)).
Training FLOPs are counted from the routes actually taken: a DTS step in the dense phase runs many
experts per token and is charged for all of them.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import torch

from moesys import MoEConfig
from moesys import data as data_mod
from moesys.evo import EvoConfig, EvoController
from moesys.model import GPTConfig, GPTMoE, lm_loss
from moesys.trainer import lr_at

HERE = os.path.dirname(os.path.abspath(__file__))

PRESETS = {
    # ~1 minute per run on one shared CPU core (15 runs)
    "cpu": dict(n_layers=2, d_model=64, n_heads=4, ffn=128, seq=64, experts=8, batch=16, steps=400, lr=3e-3,
                warmup=20, eval_every=25, eval_batches=4, seeds=[0, 1, 2], device="cpu", threads=1,
                diversify=80, tau_steps=200, hard=300),
    "smoke": dict(n_layers=1, d_model=32, n_heads=2, ffn=64, seq=32, experts=4, batch=4, steps=12, lr=3e-3,
                  warmup=2, eval_every=4, eval_batches=1, seeds=[0], device="cpu", threads=1,
                  diversify=3, tau_steps=4, hard=9),
    # one GPU, ~1 h for all runs
    "gpu": dict(n_layers=8, d_model=512, n_heads=8, ffn=1024, seq=256, experts=16, batch=64, steps=5000, lr=1e-3,
                warmup=200, eval_every=250, eval_batches=16, seeds=[0, 1, 2], device="cuda", threads=8,
                diversify=500, tau_steps=2500, hard=3500),
}
METHODS = ("dense", "switch", "top2", "dts", "evomoe")


def build(method: str, p: dict, seed: int):
    torch.manual_seed(seed)
    g = GPTConfig(vocab_size=256, n_layers=p["n_layers"], d_model=p["d_model"], n_heads=p["n_heads"],
                  ffn_hidden=p["ffn"], seq_len=p["seq"], moe_every=0 if method == "dense" else 1)
    base = dict(hidden_size=p["d_model"], ffn_hidden_size=p["ffn"], num_experts=p["experts"], aux_loss_coef=1e-2)
    evo = None
    if method in ("dense", "switch"):
        moe = MoEConfig(top_k=1, router="switch", **base)
    elif method == "top2":
        moe = MoEConfig(top_k=2, router="topk", **base)
    else:
        moe = MoEConfig(top_k=1, router="dts", dts_balance_coef=1e-2, **base)
        evo = EvoConfig(enabled=True, diversify_step=p["diversify"] if method == "evomoe" else None,
                        spawn="mask", mask_ratio=0.2, optimizer_state="copy", gate="dts", tau_max=2.0,
                        tau_min=0.3, tau_steps=p["tau_steps"], tau_kind="exponential", hard_step=p["hard"])
    model = GPTMoE(g, moe)
    ctl = EvoController.prepare(model, evo, seed=seed) if evo is not None else None
    return model, ctl


def flops_per_step(p: dict, tokens: int, routes_per_layer: list, has_router: bool) -> float:
    """fwd+bwd = 6 x multiply-adds per token for each weight; FFN charged per route.
    (report_lm.py recomputes the same count from the logged experts per token.)"""
    D, F, S, L, E = p["d_model"], p["ffn"], p["seq"], p["n_layers"], p["experts"]
    attn = L * tokens * (6 * 4 * D * D + 6 * 2 * S * D)  # qkv+proj, and QK^T / AV over S keys
    head = tokens * 6 * D * 256
    ffn = sum(6 * 2 * D * F * r for r in routes_per_layer)
    router = L * tokens * 6 * D * E if has_router else 0
    return float(attn + head + ffn + router)


@torch.no_grad()
def evaluate(model, val, p) -> float:
    model.eval()
    tot, n = 0.0, 0
    for x, y in data_mod.eval_batches(val, seq_len=p["seq"], batch_size=p["batch"], n_batches=p["eval_batches"],
                                      dp_rank=0, dp_size=1):
        logits, _, _ = model(x.to(p["device"]))
        tot += float(lm_loss(logits, y.to(p["device"]), reduction="sum"))
        n += y.numel()
    model.train()
    return tot / n


def run(method: str, p: dict, seed: int) -> dict:
    dev = p["device"]
    model, ctl = build(method, p, seed)
    model.to(dev)
    tokens = data_mod.load_tokens(None)
    train, val = data_mod.train_val_split(tokens, 0.1, p["seq"])
    batches = data_mod.TrainBatches(train, seq_len=p["seq"], global_batch=p["batch"], grad_accum=1, dp_rank=0,
                                    dp_size=1, seed=seed)
    decay = [q for q in model.parameters() if q.dim() >= 2]
    other = [q for q in model.parameters() if q.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": other, "weight_decay": 0.0}],
                            lr=p["lr"], betas=(0.9, 0.95))
    rec = {"method": method, "seed": seed, "eval_steps": [0], "val": [evaluate(model, val, p)], "flops": [0.0],
           "steps": [], "train": [], "tau": [], "ept_mean": [], "ept_max": [], "max_over_mean_load": []}
    cum = 0.0
    t0 = time.time()
    for step in range(p["steps"]):
        if ctl is not None:
            ctl.on_step_start(step, opt)
        for gr in opt.param_groups:
            gr["lr"] = lr_at(step, lr=p["lr"], warmup=p["warmup"], total=p["steps"], min_ratio=0.1)
        (x, y), = batches.step_batches(step)
        logits, aux_loss, auxes = model(x.to(dev))
        loss = lm_loss(logits, y.to(dev))
        opt.zero_grad(set_to_none=True)
        (loss + aux_loss).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        T = x.numel()
        if auxes:
            # the dense phase of EvoMoE runs one FFN per token (tokens_per_expert is all zeros then)
            routes = [int(a.tokens_per_expert.sum()) or T for a in auxes]
            ept = [r / T for r in routes]
            kmax = max(float(a.metrics.get("max_experts_per_token", r / T)) for a, r in zip(auxes, routes))
            mom = max(float(a.metrics["max_over_mean_load"]) for a in auxes)
        else:
            routes, ept, kmax, mom = [T] * p["n_layers"], [1.0], 1.0, 1.0
        cum += flops_per_step(p, T, routes, has_router=method != "dense")
        rec["steps"].append(step + 1)
        rec["train"].append(float(loss.detach()))
        rec["tau"].append(float(ctl.layers[0].router.tau) if ctl is not None else float("nan"))
        rec["ept_mean"].append(sum(ept) / len(ept))
        rec["ept_max"].append(kmax)
        rec["max_over_mean_load"].append(mom)
        if (step + 1) % p["eval_every"] == 0 or step + 1 == p["steps"]:
            rec["eval_steps"].append(step + 1)
            rec["val"].append(evaluate(model, val, p))
            rec["flops"].append(cum)
    rec["total_flops"] = cum
    rec["wall_s"] = time.time() - t0
    return rec


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="cpu", choices=sorted(PRESETS))
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--out", default=None, help="default: benchmarks/evomoe/results/lm_runs[_<preset>].json")
    a = ap.parse_args()
    p = PRESETS[a.preset]
    torch.set_num_threads(p["threads"])
    out = a.out or os.path.join(HERE, "results", "lm_runs.json" if a.preset == "cpu" else f"lm_runs_{a.preset}.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    runs = []
    for seed in p["seeds"]:
        for m in a.methods.split(","):
            r = run(m, p, seed)
            runs.append(r)
            print(f"{m:7s} seed {seed}: val {r['val'][0]:.3f} -> {r['val'][-1]:.4f}  "
                  f"GFLOPs {r['total_flops'] / 1e9:.1f}  {r['wall_s']:.0f}s", flush=True)
            with open(out, "w") as f:  # rewritten after every run: a partial study is still readable
                json.dump({"preset": a.preset, "config": p, "runs": runs}, f)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
