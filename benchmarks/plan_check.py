"""The cost model against this machine: probe, predict benchmarks/ep.py's sweep, measure it, compare.

    python benchmarks/plan_check.py                          # 2 and 4 ranks, ep.py's shape (~5 min on 2 cores)
    python benchmarks/plan_check.py --worlds 2 --rounds 2    # quicker
    python benchmarks/plan_check.py --repeat 3               # probe + sweep three times, medians per cell

Per world size: the "this machine" probe (moesys/planner/probe_host.py: collectives, the expert FFN
at three row counts, the layer without experts; nothing of the modes or degrees), the routing
statistics of the sweep's own inputs (same seeds as ep.py), the model's fwd+bwd time for each
(mode, degree) of the all-to-all-v dispatcher, then ep.py's measured sweep (median, slowest rank).
Two comparisons: medians (the machine as it is now, shared load included) and minima (the machine
when nothing else runs: on a shared machine the reproducible figure; the probe's minima against
the sweep's fastest step). Prints the error per cell (each run's prediction against its own
measurement, median over runs), the best cell measured vs predicted, and the tuner's picks.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import ep  # noqa: E402  (benchmarks/ep.py: the measured sweep)
from _shapes import RANK_PRELOAD  # noqa: E402

from moesys import MoEConfig, MoELayer  # noqa: E402
from moesys.parallel import ExpertLayout, simulate  # noqa: E402
from moesys.parallel.cost_model import Shape, Stats, layer_time  # noqa: E402
from moesys.planner.probe_host import probe_this_machine_both  # noqa: E402


def sweep_stats(cfg: MoEConfig, world: int, tokens: int) -> Stats:
    """The statistics the runner computes for ep.py's inputs (layer seed 0, rank r's x seeded r)."""
    torch.manual_seed(0)
    layer = MoELayer(cfg)
    counts = []
    with torch.no_grad():
        for r in range(world):
            x = torch.randn(tokens, cfg.hidden_size, generator=torch.Generator().manual_seed(r))
            counts.append(layer.route(x, tokens)[1].counts_E.to(torch.long))
    counts_PE = torch.stack(counts)
    dest = ExpertLayout(world=world, rank=0, num_experts=cfg.num_experts, ffn_size=cfg.ffn_hidden_size).dest_experts()
    per_rank = counts_PE.sum(0)[dest].view(world, -1).sum(1)
    return Stats(tokens=world * tokens, rows=int(counts_PE.sum()), max_rank_rows=int(per_rank.max()),
                 max_local_rows=int(counts_PE.sum(1).max()))


def check_world(cfg: MoEConfig, world: int, a) -> dict:
    hws = probe_this_machine_both(cfg, world, a.tokens, threads=1)
    stats = sweep_stats(cfg, world, a.tokens)
    shape = Shape(world=world, num_experts=cfg.num_experts, hidden=cfg.hidden_size, ffn=cfg.ffn_hidden_size,
                  matrices=3 if cfg.gated else 2, dtype_bytes=4)
    predicted = {stat: {k: layer_time(k[0], "alltoallv", k[1], stats, shape, hw) for k in ep.COMBOS}
                 for stat, hw in hws.items()}
    cfg_kw = dict(hidden_size=cfg.hidden_size, ffn_hidden_size=cfg.ffn_hidden_size, num_experts=cfg.num_experts,
                  top_k=cfg.top_k)
    res = simulate(ep.bench_worker, world, cfg_kw, a.tokens, a.steps, a.warmup, a.auto_steps, a.rounds,
                   timeout_s=600, preload=RANK_PRELOAD)[0]
    measured = {"median": {k: v["step"] for k, v in res["rows"].items()},
                "min": {k: v["step_min"] for k, v in res["rows"].items()}}
    return {"hw": hws, "stats": stats, "predicted": predicted, "measured": measured, "pick": tuple(res["pick"])}


def report(world: int, runs: list) -> dict:
    """Per statistic ("median": now, under whatever load; "min": the quiet machine), the error per cell:
    each run's prediction against its own measurement, then the median over runs."""
    print(f"\n== {world} ranks: model vs measured (fwd+bwd of one layer, slowest rank; {len(runs)} run(s)) ==")
    for stat in ("median", "min"):
        hw = runs[-1]["hw"][stat]
        print(f"{stat} probe: latency {hw.intra.latency * 1e6:.0f} us, gap {hw.intra.gap * 1e6:.0f} us, "
              f"bandwidth {hw.intra.bandwidth / 1e9:.2f} GB/s, all-gather x{hw.allgather_factor:.2f}, "
              f"reduce-scatter x{hw.reduce_scatter_factor:.2f}, GEMM {hw.gemm_flops / 1e9:.1f} GFLOP/s, expert call "
              f"{hw.chunk_overhead_s * 1e3:.2f} ms + {hw.expert_overhead_s * 1e3:.2f} ms an expert, overlap "
              f"{hw.overlap:.2f}, layer without experts {hw.layer_overhead_s * 1e3:.2f} ms")
    print(f"{'mode':<11}{'c':>2} | {'median: measured':>16} {'predicted':>9} {'error':>6} | "
          f"{'min: measured':>13} {'predicted':>9} {'error':>6}")
    errors = {"median": [], "min": []}
    cells = {}
    for k in ep.COMBOS:
        line = f"{k[0]:<11}{k[1]:>2}"
        for stat in ("median", "min"):
            meas = statistics.median(r["measured"][stat][k] for r in runs)
            pred = statistics.median(r["predicted"][stat][k].total for r in runs)
            err = statistics.median(r["predicted"][stat][k].total / r["measured"][stat][k] - 1 for r in runs)
            errors[stat].append((k, err))
            cells[(stat, k)] = (meas, pred, err)
            width = 16 if stat == "median" else 13
            line += f" | {meas * 1e3:{width}.2f} {pred * 1e3:9.2f} {err:+6.0%}"
        print(line)
    for stat in ("median", "min"):
        meas = {k: statistics.median(r["measured"][stat][k] for r in runs) for k in ep.COMBOS}
        pred = {k: statistics.median(r["predicted"][stat][k].total for r in runs) for k in ep.COMBOS}
        best_m, best_p = min(meas, key=meas.get), min(pred, key=pred.get)
        within = sum(abs(e) <= 0.25 for _, e in errors[stat])
        print(f"{stat}: cells within 25%: {within}/{len(errors[stat])}; worst {max(abs(e) for _, e in errors[stat]):.0%}; "
              f"best measured {best_m[0]} c={best_m[1]}, best predicted {best_p[0]} c={best_p[1]} "
              f"({'agree' if best_m == best_p else 'DISAGREE'})")
    print(f"tuner picks (after timing): {[r['pick'] for r in runs]}")
    return cells


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ep.add_sweep_args(ap)  # the sweep it predicts and measures
    ap.add_argument("--repeat", type=int, default=1, help="probe + sweep this many times; medians per cell")
    a = ap.parse_args(argv)
    cfg = MoEConfig(hidden_size=a.hidden, ffn_hidden_size=a.ffn, num_experts=a.experts, top_k=a.top_k)
    t0 = time.time()
    for world in a.worlds:
        report(world, [check_world(cfg, world, a) for _ in range(a.repeat)])
    print(f"\n(total {time.time() - t0:.0f} s; torch {torch.__version__}, {os.cpu_count()} CPUs, gloo)", file=sys.stderr)


if __name__ == "__main__":
    main()
