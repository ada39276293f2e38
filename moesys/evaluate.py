"""`moesys-eval`: validation loss, perplexity, bits per byte and per-layer expert load of a checkpoint.

    moesys-eval checkpoint=runs/a                                          # its latest checkpoint, EP=1
    moesys-eval checkpoint=runs/a/checkpoints/step_00000100 parallel.ep=2 parallel.simulate_ranks=2
    moesys-eval checkpoint=runs/a trainer.eval_batches=64 out=eval.json    # more batches; JSON too
    torchrun --nproc_per_node=8 -m moesys.evaluate checkpoint=runs/a parallel.ep=8

The model, the data and the validation batches come from the run's config saved in the checkpoint,
and the evaluation is the trainer's own (`Trainer.evaluation`) after `Trainer.load`, so at any EP
size it gives the number the run logged as `val/loss` at that step (the run's final evaluation for
its final checkpoint). Bits per byte = loss / ln 2 for byte-level data (the embedded corpus, text
files: one token is one byte); for a .bin token file the bytes behind a token are unknown here, so
it reports bits per token (loss / ln 2) and says so. Bad input is one line and exit code 2 before
any rank starts (moesys.cli).
"""
from __future__ import annotations

import json
import math
import os
from typing import Tuple

from moesys.configs.apps import EvalConfig, checked, eval_run_config, register, saved_run_config
from moesys.configs.schema import TrainConfig
from moesys.errors import ConfigError

from . import checkpoint as ckpt_mod
from . import cli
from . import data as data_mod
from . import tokens as tokens_mod
from .train import launch, rank_context, rank_preload, under_torchrun, world_size_of
from .trainer import Trainer, structure_of

PROG = "moesys-eval"
register()


def byte_level(data_path, tokenizer=None) -> bool:
    """Whether one token is one byte (moesys.data: the embedded corpus and text files; not *.bin, not
    text through data.tokenizer)."""
    return tokenizer is None and (data_path is None or not str(data_path).endswith(".bin"))


def open_checkpoint(path: str) -> Tuple[str, dict]:
    """The checkpoint `path` names (a checkpoint dir, checkpoints/ or a run dir), verified, and its
    moesys.json. ConfigError naming `checkpoint=` when it is missing or corrupt."""
    try:
        ckpt = ckpt_mod.resolve(path)
        ckpt_mod.verify_checkpoint(ckpt)
        return ckpt, ckpt_mod.read_meta(ckpt)
    except ckpt_mod.CheckpointError as e:
        raise ConfigError(f"checkpoint={path!r}: {e}") from e


def prepare(ecfg: EvalConfig) -> Tuple[TrainConfig, str]:
    """Every local check before any rank: the checkpoint, its config with ecfg's changes, the data.
    Returns (the config to evaluate with, the checkpoint dir)."""

    ckpt, meta = open_checkpoint(ecfg.checkpoint)
    cfg = eval_run_config(ecfg, saved_run_config(ckpt, meta))
    cfg.validate(world_size_of(cfg))
    tokens = data_mod.load_tokens(*tokens_mod.source_of(cfg.data), cfg.data.vocab_size)
    data_mod.train_val_split(tokens, cfg.data.val_fraction, cfg.model.seq_len)
    try:
        ckpt_mod.check_trusted(ckpt, ckpt_mod.check_compatible(ckpt, structure_of(cfg)), cfg.trainer.trust_checkpoint)
    except ckpt_mod.CheckpointError as e:
        raise ConfigError(f"checkpoint={ecfg.checkpoint!r}: {e}") from e
    return cfg, ckpt


def _rank_eval(cfg: TrainConfig, ckpt: str) -> dict:
    """One rank: build the trainer at this layout, load the checkpoint, run the trainer's evaluation."""

    with rank_context(cfg) as (dims, device):
        trainer = Trainer(cfg, dims=dims, out_dir=os.path.dirname(ckpt), device=device)
        trainer.load(ckpt)
        ev = trainer.evaluation()
        return summarize(ev, cfg, ckpt, step=trainer.step, world_size=dims.world_size)


def summarize(ev, cfg: TrainConfig, ckpt: str, *, step: int, world_size: int) -> dict:
    bits = ev.loss / math.log(2)
    load = {}
    for b, routes in ev.load.items():
        total = sum(routes)
        share = [r / total if total else 0.0 for r in routes]
        load[str(b)] = {"routes": [int(r) for r in routes], "share": share,
                        "max_over_mean": max(share) * len(share) if total else float("nan")}
    return {"checkpoint": ckpt, "step": step, "ep": cfg.parallel.ep, "world_size": world_size, "tokens": ev.tokens,
            "val_loss": ev.loss, "perplexity": math.exp(ev.loss),
            "bits_per_byte": bits if byte_level(cfg.data.path, cfg.data.tokenizer) else None,
            "bits_per_token": bits, "byte_level": byte_level(cfg.data.path, cfg.data.tokenizer), "expert_load": load}


def evaluate_checkpoint(ecfg: EvalConfig) -> dict:
    """Evaluate ecfg.checkpoint at ecfg's layout; rank 0's results (None on other torchrun ranks).

    Without torchrun, parallel.simulate_ranks local gloo ranks are spawned (1: this process)."""

    cfg, ckpt = prepare(ecfg)
    if under_torchrun():
        res = _rank_eval(cfg, ckpt)
        return res if os.environ.get("RANK") == "0" else None
    return launch(cfg.parallel.simulate_ranks, _rank_eval, cfg, ckpt, preload=rank_preload(cfg, "moesys.evaluate"))


def report(res: dict) -> str:
    lines = [f"checkpoint {res['checkpoint']} (step {res['step']}), EP={res['ep']} on {res['world_size']} "
             f"rank(s), {res['tokens']} validation tokens",
             f"val loss {res['val_loss']:.4f} nats/token   perplexity {res['perplexity']:.3f}   " +
             (f"bits per byte {res['bits_per_byte']:.4f}" if res["byte_level"] else
              f"bits per token {res['bits_per_token']:.4f} (token data: bits per byte unknown)")]
    if res["expert_load"]:
        E = len(next(iter(res["expert_load"].values()))["share"])
        lines.append(f"expert load (share of routes; balanced = 1/{E} = {1 / E:.3f}):")
        for b, v in res["expert_load"].items():
            if not sum(v["routes"]):
                lines.append(f"  block {b}: no routes (EvoMoE dense phase: one dense FFN)")
                continue
            lines.append(f"  block {b}: " + " ".join(f"{s:.3f}" for s in v["share"]) +
                         f"   max/mean {v['max_over_mean']:.2f}")
    return "\n".join(lines)


# ---- Hydra entry point -----------------------------------------------------------------------------
def _checked(dcfg) -> EvalConfig:
    return checked(dcfg, EvalConfig)


def _hydra_main(dcfg) -> None:
    try:
        ecfg = _checked(dcfg)
        res = evaluate_checkpoint(ecfg)
    except ConfigError as e:  # from the checks and prepare(), in this process, before any rank starts
        cli.exit_bad_input(PROG, str(e), bool(dcfg.debug))
    if res is None:
        return
    print(report(res), flush=True)
    if ecfg.out:
        with open(ecfg.out, "w") as f:
            json.dump(res, f, indent=1)


def main() -> None:
    cli.run_app(PROG, "eval", _checked, _hydra_main)


if __name__ == "__main__":
    main()
