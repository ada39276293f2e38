"""The modern decoder against today's GPT as the main job's model (issue 23 item 1): `moesys-train` at
its defaults (embedded corpus, 2 simulated EP ranks, trainer.steps=300), per seed once with
model.arch=gpt and once with model.arch=decoder (the default since this comparison), validation
loss and wall time side by side.

    python benchmarks/decoder_vs_gpt.py                          # seeds 1 2 3: 6 runs of ~3 min on 2 free cores
    python benchmarks/decoder_vs_gpt.py --seeds 1 --steps 20     # a smoke run
    python benchmarks/decoder_vs_gpt.py --decoder moe.activation=swiglu   # more overrides for the decoder

Each run is what `moesys-train` with those overrides runs (moesys.train.run of the checked config,
from this process: its ranks are processes of their own, forked from a server that imported moesys
once; nothing else changed: same width, depth, experts, batch, schedule and budget of steps); the
validation losses are read from its metrics.jsonl.
"Reaches at least today's validation loss in the same time": per seed, the decoder's seconds to its
first evaluation at or below the GPT's final validation loss (steps x its mean seconds per step)
against the GPT's whole run. The rule for switching the default: every seed does, and the mean
final validation loss is no higher. The figures depend on the machine's load: run it on idle cores,
both models back to back per seed. Exit status 0 either way; the verdict is the last line.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from typing import List, Optional

QUIET = ["trainer.plots=false", "logging.wandb_mode=disabled", "logging.tqdm=false", "trainer.save_final=false"]


def run_once(out_dir: str, overrides: List[str]) -> dict:
    """One `moesys-train` run; returns its wall seconds, its step count and its validation curve."""
    from moesys import train

    cfg = train.check_overrides([f"trainer.out_dir={out_dir}", *QUIET, *overrides])  # a bad one: exit 2, one line
    t0 = time.perf_counter()
    train.run(cfg, out_dir)  # a rank that fails raises, naming it
    seconds = time.perf_counter() - t0
    val, steps, elapsed = [], 0, None
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        for line in f:
            r = json.loads(line)
            if "val/loss" in r:
                val.append((r["step"], r["val/loss"]))
            steps = max(steps, r.get("step", 0) or 0)
            elapsed = r.get("elapsed_s", elapsed)
    return {"seconds": seconds, "train_s": elapsed if elapsed is not None else seconds, "steps": steps, "val": val}


def seconds_to(run: dict, target: float) -> Optional[float]:
    """The run's training seconds to its first evaluation at or below `target` (None: never)."""
    per_step = run["train_s"] / max(run["steps"], 1)
    for step, v in run["val"]:
        if v <= target:
            return step * per_step
    return None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--steps", type=int, default=None, help="trainer.steps (default: the main job's)")
    p.add_argument("--decoder", nargs="*", default=[], help="more overrides for the decoder runs")
    a = p.parse_args()
    common = [] if a.steps is None else [f"trainer.steps={a.steps}"]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in a.seeds:
            runs = {}
            for arch, extra in (("gpt", ["model.arch=gpt"]), ("decoder", ["model.arch=decoder", *a.decoder])):
                runs[arch] = run_once(os.path.join(tmp, f"{arch}_{seed}"), [f"trainer.seed={seed}", *common, *extra])
                print(f"seed {seed} {arch}: val loss {runs[arch]['val'][-1][1]:.4f} in {runs[arch]['train_s']:.1f}s "
                      f"of training ({runs[arch]['seconds']:.1f}s in all)", flush=True)
            rows.append((seed, runs))
    print("| seed | GPT val loss | GPT s | decoder val loss | decoder s | decoder s to GPT's final val loss |")
    print("|---|---|---|---|---|---|")
    ok = True
    for seed, r in rows:
        g, d = r["gpt"], r["decoder"]
        reach = seconds_to(d, g["val"][-1][1])
        ok &= reach is not None and reach <= g["train_s"]
        print(f"| {seed} | {g['val'][-1][1]:.4f} | {g['train_s']:.1f} | {d['val'][-1][1]:.4f} | {d['train_s']:.1f} | "
              f"{'never' if reach is None else f'{reach:.1f}'} |")
    mean = {k: sum(r[k]["val"][-1][1] for _, r in rows) / len(rows) for k in ("gpt", "decoder")}
    print(f"| mean | {mean['gpt']:.4f} | | {mean['decoder']:.4f} | | |")
    ok &= mean["decoder"] <= mean["gpt"]
    print("verdict: the decoder " + ("reaches" if ok else "does not reach") + " the GPT's validation loss in the same "
          f"time on every seed ({len(rows)} seeds): " + ("the decoder" if ok else "the GPT") + " as the default")


if __name__ == "__main__":
    main()
