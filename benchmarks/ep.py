"""Expert-parallel runtime benchmark: modes x overlap degrees on simulated ranks, and the tuner's pick.

    python benchmarks/ep.py                       # 2 and 4 simulated gloo ranks (a few minutes on 2 cores)
    python benchmarks/ep.py --worlds 2 --steps 4  # quicker
    launchers/simulate_ep.sh 4 benchmarks/ep.py   # the same body as 4 launched ranks (one world: 4)
    python benchmarks/ep.py --worlds 4 --experts 16 --top-k 4 --groups 4 --topk-groups 2
                                                  # group-limited routing vs none (ep mode, c=1)

Prints, per world size:
  * fwd+bwd step time of one MoE layer for each (mode, degree), median over steps, slowest rank;
  * bytes moved per forward (dispatch direction) vs the minimum (rows for experts on other ranks);
  * the fraction of the forward all-to-all time hidden by overlap:
        hidden(c) = (fwd(1) - fwd(c)) / wait(1)
    where wait(1) is the time the c=1 forward spends blocked in collectives (all of its comm);
  * the tuner's decision in auto mode and its measured time vs the best measured combination.
With --groups G --topk-groups TG it instead compares one layer routed without and with group-limited
routing (MoEConfig.num_groups / topk_groups; groups aligned to ranks when G is a multiple of the
world), dispatcher alltoallv, ep mode, c=1:
  * fwd+bwd time (median, slowest rank) and bytes sent per forward (dispatch direction);
  * EP ranks per token (mean and max over every rank's tokens), counted from the kept routes;
  * rows sent (one per route) vs distinct (token, rank) pairs: the rows a dispatch that sends a
    token once per destination rank would move (moesys's dispatchers send one row per route, so
    their bytes do not fall with the fan-out; the pair count is what such a dispatch would save).
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist

from _shapes import RANK_PRELOAD  # benchmarks/ is on sys.path when a script runs
from moesys import MoEConfig, MoELayer
from moesys.parallel import ParallelDims, apply_expert_parallel, simulate

COMBOS = [("ep", c) for c in (1, 2, 4, 8)] + [("sharded_dp", c) for c in (1, 2, 4, 8)]


def _slowest(x: float, group) -> float:
    t = torch.tensor([x], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return float(t)


def _step(layer, x):
    t0 = time.perf_counter()
    y, aux = layer(x)
    t1 = time.perf_counter()
    (y.square().sum() + aux.loss).backward()
    return t1 - t0, time.perf_counter() - t0, aux.metrics


def bench_worker(cfg_kw: dict, tokens: int, steps: int, warmup: int, auto_steps: int, rounds: int) -> dict:
    torch.set_num_threads(1)
    dims = ParallelDims.build(ep=dist.get_world_size(), timeout_s=120)
    g = dims.ep_group
    torch.manual_seed(0)
    base = MoELayer(MoEConfig(**cfg_kw))
    x = torch.randn(tokens, cfg_kw["hidden_size"], generator=torch.Generator().manual_seed(dims.rank))
    layers = {}
    for mode, c in COMBOS:
        layers[(mode, c)] = apply_expert_parallel(copy.deepcopy(base), g, dims=dims, mode=mode, overlap=c)
    # auto: the tuner explores, times (fwd+bwd) and decides; then it is timed like the others
    auto = apply_expert_parallel(copy.deepcopy(base), g, dims=dims)
    for _ in range(auto_steps):
        _, _, m = _step(auto, x)
    pick = ("ep" if float(m["runtime/mode_is_ep"]) else "sharded_dp", int(m["runtime/degree"]))
    layers["auto"] = auto
    samples = {k: dict(fwd=[], step=[], wait=[]) for k in layers}
    # rounds interleave the combinations, so the load of a shared machine hits them alike
    for _ in range(rounds):
        for key, layer in layers.items():
            for i in range(warmup + steps):
                f, t, m = _step(layer, x)
                if i >= warmup:
                    samples[key]["fwd"].append(_slowest(f, g))
                    samples[key]["step"].append(_slowest(t, g))
                    samples[key]["wait"].append(_slowest(float(m.get("runtime/wait_s", 0.0)), g))
            if key != "auto":
                samples[key]["bytes"] = _slowest(float(m["runtime/bytes_sent"]), g)
                samples[key]["bytes_min"] = _slowest(float(m["runtime/bytes_min"]), g)
    rows = {k: dict(fwd=statistics.median(v["fwd"]), step=statistics.median(v["step"]), step_min=min(v["step"]),
                    wait=statistics.median(v["wait"]), bytes=v["bytes"], bytes_min=v["bytes_min"])
            for k, v in samples.items() if k != "auto"}
    return {"rows": rows, "pick": pick, "pick_step": statistics.median(samples["auto"]["step"])}


def _fanout(layer, x) -> tuple:
    """(mean and max EP ranks per token, rows, distinct (token, rank) pairs) of this rank's tokens."""
    _, plan = layer.route(x, seq_len=x.shape[0])
    lay = layer.runner.layout
    expert_N = torch.repeat_interleave(torch.arange(layer.cfg.num_experts), plan.counts_E.cpu())
    pairs = torch.unique(plan.token_idx_N.cpu() * lay.world + expert_N // lay.local_experts)
    dest_T = torch.bincount(pairs // lay.world, minlength=x.shape[0])
    return float(dest_T.float().mean()), int(dest_T.max()), int(plan.counts_E.sum()), int(pairs.numel())


def bench_groups_worker(cfg_kw: dict, groups: int, topk_groups: int, tokens: int, steps: int, warmup: int,
                        rounds: int) -> dict:
    torch.set_num_threads(1)
    dims = ParallelDims.build(ep=dist.get_world_size(), timeout_s=120)
    g = dims.ep_group
    x = torch.randn(tokens, cfg_kw["hidden_size"], generator=torch.Generator().manual_seed(dims.rank))
    layers = {}
    for name, kw in (("no groups", {}), (f"{topk_groups} of {groups} groups",
                                         dict(num_groups=groups, topk_groups=topk_groups))):
        torch.manual_seed(0)  # the same weights with and without groups
        layers[name] = apply_expert_parallel(MoELayer(MoEConfig(**cfg_kw, **kw)), g, dims=dims, mode="ep", overlap=1)
    samples = {k: [] for k in layers}
    rows = {}
    for _ in range(rounds):
        for key, layer in layers.items():
            for i in range(warmup + steps):
                _, t, m = _step(layer, x)
                if i >= warmup:
                    samples[key].append(_slowest(t, g))
            rows[key] = {"bytes": _slowest(float(m["runtime/bytes_sent"]), g)}
    for key, layer in layers.items():
        with torch.no_grad():
            mean_d, max_d, n_rows, n_pairs = _fanout(layer, x)
        tot = torch.tensor([mean_d, n_rows, n_pairs], dtype=torch.float64)
        dist.all_reduce(tot, group=g)
        rows[key].update(step=statistics.median(samples[key]), mean_dest=float(tot[0]) / dims.ep,
                         max_dest=int(_slowest(float(max_d), g)), rows=int(tot[1]), pairs=int(tot[2]))
    return rows


def report_groups(world: int, rows: dict, cfg_kw: dict, tokens: int) -> None:
    print(f"\n== {world} ranks | T={tokens}/rank D={cfg_kw['hidden_size']} E={cfg_kw['num_experts']} "
          f"K={cfg_kw['top_k']} | alltoallv, ep, c=1 | times: median, slowest rank ==")
    print(f"{'routing':<18} {'fwd+bwd ms':>11} {'MB sent':>8} {'ranks/token':>12} {'max':>4} {'rows':>7} "
          f"{'(token,rank)':>13} {'MB if once/rank':>16}")
    for key, r in rows.items():
        once = r["bytes"] * r["pairs"] / max(r["rows"], 1)
        print(f"{key:<18} {r['step'] * 1e3:11.2f} {r['bytes'] / 1e6:8.3f} {r['mean_dest']:12.2f} {r['max_dest']:>4} "
              f"{r['rows']:>7} {r['pairs']:>13} {once / 1e6:16.3f}")


def report(world: int, res: dict, cfg_kw: dict, tokens: int) -> None:
    rows = res["rows"]
    print(f"\n== {world} ranks | T={tokens}/rank D={cfg_kw['hidden_size']} F={cfg_kw['ffn_hidden_size']} "
          f"E={cfg_kw['num_experts']} K={cfg_kw['top_k']} | times: median, slowest rank ==")
    print(f"{'mode':<11}{'c':>2} {'fwd+bwd ms':>11} {'fwd ms':>8} {'wait ms':>8} {'MB sent':>8} {'MB min':>7} "
          f"{'hidden':>7}")
    for (mode, c), r in rows.items():
        base = rows[(mode, 1)]
        hidden = "" if c == 1 or base["wait"] <= 0 else f"{(base['fwd'] - r['fwd']) / base['wait']:7.0%}"
        print(f"{mode:<11}{c:>2} {r['step'] * 1e3:11.2f} {r['fwd'] * 1e3:8.2f} {r['wait'] * 1e3:8.2f} "
              f"{r['bytes'] / 1e6:8.3f} {r['bytes_min'] / 1e6:7.3f} {hidden:>7}")
    best = min(rows, key=lambda k: rows[k]["step"])
    pick = tuple(res["pick"])
    print(f"best measured: {best[0]} c={best[1]} {rows[best]['step'] * 1e3:.2f} ms | tuner pick: {pick[0]} c={pick[1]} "
          f"{rows[pick]['step'] * 1e3:.2f} ms in the sweep ({rows[pick]['step'] / rows[best]['step'] - 1:+.1%} vs best); "
          f"the auto layer itself: {res['pick_step'] * 1e3:.2f} ms ({res['pick_step'] / rows[best]['step'] - 1:+.1%})")


def add_sweep_args(ap: argparse.ArgumentParser) -> None:
    """The sweep's shape and schedule (also benchmarks/plan_check.py's, which predicts this sweep)."""
    ap.add_argument("--worlds", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--tokens", type=int, default=256, help="tokens per rank")
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--ffn", type=int, default=256)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--steps", type=int, default=3, help="timed steps per combination and round")
    ap.add_argument("--rounds", type=int, default=4, help="interleaved rounds over all combinations")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--auto-steps", type=int, default=16)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_sweep_args(ap)
    ap.add_argument("--groups", type=int, default=None, help="compare routing without / with this many groups")
    ap.add_argument("--topk-groups", type=int, default=1, help="groups kept per token (with --groups)")
    a = ap.parse_args(argv)
    cfg_kw = dict(hidden_size=a.hidden, ffn_hidden_size=a.ffn, num_experts=a.experts, top_k=a.top_k)
    if a.groups is not None:
        try:
            MoEConfig(**cfg_kw, num_groups=a.groups, topk_groups=a.topk_groups)
        except ValueError as e:  # a bad combination fails here, before any rank starts
            ap.error(str(e))
        t0 = time.time()
        for world in a.worlds:
            rows = simulate(bench_groups_worker, world, cfg_kw, a.groups, a.topk_groups, a.tokens, a.steps,
                            a.warmup, a.rounds, timeout_s=300, preload=RANK_PRELOAD)[0]
            report_groups(world, rows, cfg_kw, a.tokens)
        print(f"\n(total {time.time() - t0:.0f} s; torch {torch.__version__}, {os.cpu_count()} CPUs, gloo)",
              file=sys.stderr)
        return
    args = (cfg_kw, a.tokens, a.steps, a.warmup, a.auto_steps, a.rounds)
    if "RANK" in os.environ and "LOCAL_WORLD_SIZE" in os.environ and not dist.is_initialized():
        # under launchers/simulate_ep.sh or torchrun: this process is one rank
        dist.init_process_group(os.environ.get("MOESYS_BACKEND", "gloo"))
        res = bench_worker(*args)
        if dist.get_rank() == 0:
            report(dist.get_world_size(), res, cfg_kw, a.tokens)
        dist.destroy_process_group()
        return
    t0 = time.time()
    for world in a.worlds:
        res = simulate(bench_worker, world, *args, timeout_s=300, preload=RANK_PRELOAD)[0]
        report(world, res, cfg_kw, a.tokens)
    print(f"\n(total {time.time() - t0:.0f} s; torch {torch.__version__}, {os.cpu_count()} CPUs, gloo)", file=sys.stderr)


if __name__ == "__main__":
    main()
