"""Per-rank training memory of the engines at EP x FSDP layouts: bytes of parameters + gradients +
optimizer state on each rank, against the ideal, with the step time beside it.

    python benchmarks/memory.py                         # 4 ranks; plain / deepspeed ZeRO-2 / fsdp at ep 1, 2
    python benchmarks/memory.py --ranks 4 --ep 1 2 4 --d-model 128 --experts 8 --steps 3

Each (engine, ep) trains the same GPT (moesys-train's model, fp32 AdamW) for a few steps on
simulated gloo ranks, then every rank counts the bytes it holds (each storage once; a DTensor's
local shard):
  params   the model's parameters (FSDP2: the sharded DTensors; DeepSpeed: the model's weights
           plus ZeRO's flat fp32 master partitions)
  grads    the gradients held after the backward (ZeRO-2: its partitioned gradients, one fp32
           partition per param group, the size of the master partition)
  optim    AdamW's exp_avg and exp_avg_sq
Ideal = what a perfect ZeRO-3 layout holds: (dense + experts) / dp ranks for each of params,
grads and the two moments (experts are split over ep by expert parallelism and over edp by FSDP,
ep x edp = dp), i.e. 4 x (dense + experts) / dp x 4 bytes. "x ideal" = max rank / ideal; the
target is within 5% for fsdp. Step time: the median of --steps timed steps after one warm-up,
the same ranks and model; "vs plain" is the ratio to the plain engine at the same ep (one machine,
side by side).
"""
from __future__ import annotations

import argparse
import os
import statistics
import time


ENGINES = ("plain", "deepspeed", "fsdp")


def _local(t):
    return t.to_local() if hasattr(t, "to_local") else t


def _bytes(tensors) -> int:
    """Bytes of distinct storages among `tensors` (a DTensor counts its local shard)."""
    seen, total = set(), 0
    for t in tensors:
        if t is None:
            continue
        t = _local(t)
        key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        if key in seen or key[0] == 0:
            continue
        seen.add(key)
        total += t.untyped_storage().nbytes()
    return total


def rank_bytes(trainer) -> dict:
    """{params, grads, optim} bytes this rank holds (see the module docstring)."""
    params = [p for p in trainer.model.parameters()]
    opt = trainer.optimizer
    if trainer.engine is not None:  # DeepSpeed ZeRO-1/2
        masters = list(opt.single_partition_of_fp32_groups)
        state = [v for st in opt.optimizer.state.values() for k, v in st.items() if k in ("exp_avg", "exp_avg_sq")]
        return {"params": _bytes(params) + _bytes(masters),
                "grads": sum(m.numel() * 4 for m in masters),
                "optim": _bytes(state)}
    state = [v for st in opt.state.values() for k, v in st.items() if k in ("exp_avg", "exp_avg_sq")]
    return {"params": _bytes(params), "grads": _bytes(p.grad for p in params), "optim": _bytes(state)}


def model_bytes(trainer) -> tuple:
    """(dense, experts) bytes of the whole model (global shapes)."""
    from moesys.parallel import expert_parameters

    experts = {id(p) for p in expert_parameters(trainer.model)}
    dense = sum(p.numel() * p.element_size() for p in trainer.model.parameters() if id(p) not in experts)
    ex = sum(p.numel() * p.element_size() for p in trainer.model.parameters() if id(p) in experts)
    return dense, ex


def measure(cfg, out_dir: str, steps: int) -> dict:
    """Rank fn: build the trainer, one warm-up step, `steps` timed steps; every rank's bytes (rank 0)."""
    import torch.distributed as dist

    from moesys.train import rank_context
    from moesys.trainer import Trainer

    with rank_context(cfg) as (dims, device):
        tr = Trainer(cfg, dims=dims, out_dir=out_dir, device=device)
        if tr.engine is None:
            dense, ex = model_bytes(tr)  # FSDP2 keeps the global shapes on its DTensors
        tr.train_step()
        times = []
        for _ in range(steps):
            dist.barrier()
            t0 = time.perf_counter()
            tr.train_step()
            times.append(time.perf_counter() - t0)
        mine = rank_bytes(tr)
        if tr.engine is not None:  # DeepSpeed wrapped the model: shapes are its (local) ones
            dense, ex = None, None
        every = [None] * dims.world_size
        dist.all_gather_object(every, {**mine, "step_s": statistics.median(times), "dense": dense, "experts": ex})
        return every


def make_cfg(*overrides: str):
    """moesys-train's config (preset=tiny, on the GPT: the model docs/scaling.md's figures are of) with
    overrides, composed by Hydra as the CLI does."""
    from hydra import compose, initialize_config_module
    from omegaconf import OmegaConf

    import moesys.train  # noqa: F401  (registers the schema)

    with initialize_config_module("moesys.configs", version_base="1.3"):
        return OmegaConf.to_object(compose("train", overrides=["preset=tiny", "model.arch=gpt", *overrides]))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ranks", type=int, default=4)
    ap.add_argument("--ep", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--engines", nargs="+", default=list(ENGINES), choices=ENGINES)
    ap.add_argument("--d-model", type=int, default=128)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--ffn", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8, help="global sequences per step")
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--steps", type=int, default=3, help="timed steps (after one warm-up)")
    ap.add_argument("--out", default=None, help="scratch directory (default: a temporary one)")
    args = ap.parse_args(argv)
    import importlib.util
    import tempfile

    from moesys.train import launch, rank_preload

    engines = [e for e in args.engines if e != "deepspeed" or importlib.util.find_spec("deepspeed") is not None]
    scratch = args.out or tempfile.mkdtemp(prefix="moesys-memory-")
    rows = []
    for ep in args.ep:
        for eng in engines:
            cfg = make_cfg(f"model.d_model={args.d_model}", f"model.n_layers={args.layers}", "model.n_heads=4",
                           f"model.ffn_hidden={args.ffn}", f"model.seq_len={args.seq_len}",
                           f"moe.num_experts={args.experts}", f"trainer.batch_size={args.batch}",
                           f"parallel.ep={ep}", f"parallel.simulate_ranks={args.ranks}", f"trainer.engine={eng}",
                           "parallel.mode=ep", "parallel.overlap=1", "trainer.save_final=false",
                           *(["trainer.zero_stage=2"] if eng == "deepspeed" else []))
            # the ranks forked from a preloaded server, as moesys-train's (parallel.rank_start=auto): what
            # is counted is the bytes of tensors each rank holds, which a fork does not change
            every = launch(args.ranks, measure, cfg, os.path.join(scratch, f"{eng}_ep{ep}"), args.steps,
                           preload=rank_preload(cfg, "moesys.train"))
            rows.append((eng, ep, every))
    # the model's global sizes from a run that knows them (plain or fsdp)
    sizes = next(((r[0]["dense"], r[0]["experts"]) for _, _, r in rows if r[0]["dense"] is not None), None)
    dp = args.ranks
    print(f"per-rank memory, {args.ranks} ranks, fp32 AdamW (MiB: params + grads + optimizer state)")
    if sizes:
        dense, ex = sizes
        ideal = 4 * (dense + ex) / dp
        print(f"model: dense {dense / 2**20:.2f} MiB, experts {ex / 2**20:.2f} MiB; ideal per rank "
              f"(4 x (dense + experts) / {dp}) = {ideal / 2**20:.2f} MiB")
    print("| engine | ep | edp | params | grads | optim | total | x ideal | step s | vs plain |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    plain_time = {ep: statistics.median(r["step_s"] for r in every) for eng, ep, every in rows if eng == "plain"}
    for eng, ep, every in rows:
        worst = max(every, key=lambda r: r["params"] + r["grads"] + r["optim"])
        tot = worst["params"] + worst["grads"] + worst["optim"]
        step = statistics.median(r["step_s"] for r in every)
        vs = f"{step / plain_time[ep]:.2f}x" if ep in plain_time else "-"
        mib = lambda b: f"{b / 2**20:.2f}"  # noqa: E731
        print(f"| {eng} | {ep} | {dp // ep} | {mib(worst['params'])} | {mib(worst['grads'])} | {mib(worst['optim'])} | "
              f"{mib(tot)} | {(tot / ideal if sizes else float('nan')):.3f} | {step:.3f} | {vs} |")


if __name__ == "__main__":
    main()
