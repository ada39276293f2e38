"""Training stability of the README's `moesys-train` commands: every command x seed for N steps, then
per run the first training loss, the highest training loss after step 5 and PASS when that is not
above the first (issue 14 item 7).

    python benchmarks/stability.py                                  # all commands, seeds 1 2 3, 60 steps
    python benchmarks/stability.py --only capacity evomoe --seeds 1 --steps 40
    python benchmarks/stability.py --full-default                   # also `moesys-train` as is (300 steps)
    python benchmarks/stability.py --extra schedule.warmup_steps=30 # more overrides for every run (the old warmup)
    python benchmarks/stability.py --list                           # the commands and what each adds

Each run is its own `python -m moesys.train` process with the README's overrides plus
trainer.steps, trainer.seed, trainer.log_interval=1 and quiet outputs; the losses are read from its
metrics.jsonl. The commands that need a user's file get one written here: `data.path=book.txt` a text
file of Python standard-library sources, `data.path=tokens.bin` the embedded corpus as uint16 tokens
(vocabulary 50304, as the README's command). The README's resume and reshard commands train the
default model and are not repeated. Exit status 1 when a run fails the check.
"""
from __future__ import annotations

import argparse
import inspect
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

# name -> the overrides of the README's command (README.md, "Training: `moesys-train`" and "EvoMoE")
COMMANDS = {
    "default": [],
    "tiny": ["preset=tiny"],
    "sigmoid_bias": ["moe.router=sigmoid_bias", "moe.num_experts=16", "parallel.ep=4", "parallel.simulate_ranks=4"],
    "capacity": ["parallel.mode=ep", "parallel.overlap=2", "parallel.dispatcher=padded", "moe.capacity_factor=1.25"],
    "bf16": ["trainer.precision=bf16", "trainer.grad_accum=4", "trainer.clip=1.0"],
    "groups": ["moe.num_groups=2", "moe.topk_groups=1", "moe.aux_loss=global_batch", "parallel.ep=2"],
    "shared": ["moe.num_shared_experts=1", "moe.shared_expert_gate=true", "moe.recompute=true"],
    "book": ["data.path={book}"],
    "tokens": ["data.path={tokens}", "data.dtype=uint16", "data.vocab_size=50304", "model.tie_embeddings=false"],
    "deepspeed": ["trainer.engine=deepspeed", "trainer.zero_stage=2", "trainer.ds_config=configs/deepspeed/zero2.json"],
    "evomoe": ["evo=evomoe"],
}
QUIET = ["trainer.log_interval=1", "trainer.plots=false", "logging.tqdm=false", "logging.wandb_mode=disabled",
         "trainer.save_final=false"]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_data(tmp: str) -> dict:
    """The files the `book` and `tokens` commands read."""
    import argparse as a, textwrap, typing

    from moesys import data

    book = os.path.join(tmp, "book.txt")
    with open(book, "w") as f:
        f.write("\n".join(inspect.getsource(m) for m in (a, textwrap, typing)))
    tokens = os.path.join(tmp, "tokens.bin")
    data.load_tokens(None, "uint16", 256).astype(np.uint16).tofile(tokens)
    return {"book": book, "tokens": tokens}


def run_one(overrides: list, out_dir: str, timeout: float) -> dict:
    """One `moesys-train` process; returns its training losses (by step) and validation losses."""
    cmd = [sys.executable, "-m", "moesys.train", *overrides, f"trainer.out_dir={out_dir}"]
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    train, val = {}, {}
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        for line in f:
            r = json.loads(line)
            if "loss" in r:
                train[r["step"]] = r["loss"]
            if "val/loss" in r:
                val[r["step"]] = r["val/loss"]
    return {"train": [train[s] for s in sorted(train)], "val": val, "seconds": time.time() - t0}


def verdict(losses: list, after: int = 5) -> tuple:
    """(first loss, highest loss after step `after` (1-based steps), its step, PASS/FAIL)."""
    first, rest = losses[0], losses[after:]
    worst = max(rest)
    return first, worst, after + 1 + rest.index(worst), "PASS" if worst <= first else "FAIL"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--only", nargs="+", choices=list(COMMANDS), help="a subset of the commands")
    ap.add_argument("--full-default", action="store_true", help="also run `moesys-train` unchanged (300 steps)")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per run")
    ap.add_argument("--extra", nargs="+", default=[], help="overrides added to every run (after the command's)")
    ap.add_argument("--list", action="store_true")
    args = ap.parse_args()
    names = args.only or list(COMMANDS)
    if args.list:
        for n in names:
            print(f"{n:14s} moesys-train {' '.join(COMMANDS[n]).format(book='book.txt', tokens='tokens.bin')}")
        return 0
    failed = 0
    with tempfile.TemporaryDirectory(prefix="moesys-stability-") as tmp:
        files = write_data(tmp)
        extra = f", with {' '.join(args.extra)}" if args.extra else ""
        print(f"{args.steps} steps each{extra}\n")
        print("| command | seed | initial loss | max loss after step 5 (step) | last loss | |")
        print("|---|---|---|---|---|---|")
        for n in names:
            for seed in args.seeds:
                ov = [o.format(**files) for o in COMMANDS[n]]
                shown = " ".join(COMMANDS[n]).format(book="book.txt", tokens="tokens.bin") or "(none)"
                try:
                    res = run_one([*ov, *args.extra, f"trainer.steps={args.steps}", f"trainer.seed={seed}",
                                   f"trainer.eval_interval={args.steps}", *QUIET],
                                  os.path.join(tmp, f"{n}-{seed}"), args.timeout)
                except RuntimeError as e:  # the run itself failed: a row that says so, its error on stderr
                    print(e, file=sys.stderr)
                    failed += 1
                    print(f"| `{shown}` | {seed} | | | | ERROR |", flush=True)
                    continue
                first, worst, at, ok = verdict(res["train"])
                failed += ok == "FAIL"
                print(f"| `{shown}` | {seed} | {first:.3f} | {worst:.3f} ({at}) | "
                      f"{res['train'][-1]:.3f} | {ok} |", flush=True)
        if args.full_default:
            res = run_one([*args.extra, *QUIET], os.path.join(tmp, "full-default"), args.timeout)
            first, worst, at, ok = verdict(res["train"])
            failed += ok == "FAIL"
            v = res["val"]
            print(f"\nmoesys-train (300 steps, seed 1234): initial {first:.3f}, max after step 5 {worst:.3f} "
                  f"(step {at}) {ok}; val loss {v[min(v)]:.3f} -> {v[max(v)]:.3f}; {res['seconds']:.0f} s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
