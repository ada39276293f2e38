"""EvoMoE at scale, on paper: the runtime's choice before and after the dense-to-sparse switch.

    python benchmarks/plan_evomoe.py                            # A100 preset, 64 and 512 GPUs (seconds)
    python benchmarks/plan_evomoe.py --cluster h100_dgx --gpus 128 1024

The README's schedule (configs/evo/evomoe.yaml): one dense FFN until step 100, then E experts with
the DTS gate, tau annealed 2.0 -> 0.3 over 200 steps (each token goes to every expert whose gate
value exceeds 0.001: at tau = 2 nearly all of them), hard top-1 from step 400. Experts per token
(k) stands for the phase: k = E at the start of the dense gate, k = E/4 and E/16 while tau anneals
(assumed: the anneal's real k depends on the router), k = 1 after the switch.

Model: a GPT-MoE of the EvoMoE paper's class (24 layers, d = 2048, every other FFN an MoE layer of
64 experts, seq 2048), bf16, dropless, 2,048 tokens per GPU per micro-step; experts F = 8192 (4d)
and, for contrast, fine-grained F = 1024. EP: the plan's choice for the top-1 phase (a job is laid
out for its long sparse phase). For each phase and GPU count: the predicted fwd+bwd time of one MoE
layer for the runtime's choice (mode and degree, flat all-to-all-v dispatcher), what keeping the
dense gate's choice instead of re-deciding would cost, and whether the phase fits in memory.
"""
from __future__ import annotations

import argparse

from moesys.planner import plan, plan_ep, workload_from_config
from moesys.planner.cli import compose_train_config
from moesys.planner.hardware import load_hardware

MODEL = ["model.n_layers=24", "model.d_model=2048", "model.n_heads=16", "model.ffn_hidden=8192", "model.seq_len=2048",
         "model.moe_every=2", "moe.num_experts=64", "moe.top_k=1", "trainer.precision=bf16", "data.vocab_size=50304",
         "evo=evomoe", "model.arch=gpt"]  # evo's schedule sets the phases below; the plan reads shapes, not the
# gate; the GPT-MoE of the paper's class (docs/evomoe.md)


def _name(b) -> str:
    return f"{b.mode} c={b.degree}" if b.mode == "sharded_dp" else f"{b.mode}/{b.dispatcher} c={b.degree}"


def phases(E: int) -> tuple:
    return (("dense gate, tau = 2", E), ("annealing", E / 4), ("annealing", E / 16), ("after the switch", 1))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cluster", default="a100_dgx")
    ap.add_argument("--gpus", type=int, nargs="+", default=[64, 512])
    ap.add_argument("--ffn", type=int, nargs="+", default=[8192, 1024], help="expert widths to plan")
    ap.add_argument("--tokens-per-gpu", type=int, default=2048)
    a = ap.parse_args(argv)
    print("| GPUs | F | EP | phase | experts/token | runtime's choice | layer ms | the dense gate's choice kept | "
          "re-deciding is worth | memory GiB | fits |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    hw = None
    for gpus in a.gpus:
        for F in a.ffn:
            cfg = compose_train_config(MODEL + [f"model.ffn_hidden={F}",
                                                f"trainer.batch_size={a.tokens_per_gpu * gpus // 2048}"])
            E = cfg.moe.num_experts
            hw = hw or load_hardware(a.cluster, cfg.trainer.precision)
            # the layout is sized for the long sparse phase: the plan's EP for top-1
            sparse = plan(workload_from_config(cfg, skew=1.25, active_k=1), hw, gpus, dispatchers=("alltoallv",),
                          require_fit=False)
            ep = (sparse.recommended or sparse.plans[-1]).ep
            first = None
            for phase, k in phases(E):
                wl = workload_from_config(cfg, skew=1.25, active_k=k)
                p = plan_ep(wl, hw, gpus, ep, dispatchers=("alltoallv",))
                choice = p.runtime
                kept, worth = "-", "-"
                if first is not None:
                    old = next(b for b in p.ranked if b.key == first.key)
                    kept = f"{_name(old)}: {old.total * 1e3:.1f} ms"
                    worth = f"{old.total / choice.total:.2f}x"
                mem = p.memory[choice.mode]
                print(f"| {gpus} | {F} | {ep} | {phase} | {k:g} | {_name(choice)} | {choice.total * 1e3:.1f} | {kept} | "
                      f"{worth} | {mem.total / 1024 ** 3:.1f} | {'yes' if p.fits[choice.mode] else 'no'} |")
                first = first or choice
    print(f"\n(cluster {hw.name}; {a.tokens_per_gpu} tokens per GPU per micro-step; EP: the plan's choice for the "
          f"top-1 phase; layer times include the preset's host overhead of {hw.layer_overhead_s * 1e3:g} ms)")


if __name__ == "__main__":
    main()
