"""Expert placement, static (the canonical layout) against adaptive (parallel.placement=auto), side by
side in one run on simulated gloo ranks, with routing skewed by a Zipf law over the experts.

    python benchmarks/placement.py --ranks 4 --zipf 1.2          # ~2 min on 2 shared cores
    python benchmarks/placement.py --ranks 4 --zipf 1.2 --experts 16 --steps 12 --replicas 0   # permute only
    python benchmarks/placement.py --ranks 4 --zipf 1.2 --force   # move even where this host says it won't pay
    python benchmarks/placement.py --ranks 4 --zipf 1.2 --static-capacity-factor 1.25 --no-scale   # static buffer

Each rank holds the same MoE layer twice (the same weights: ep = ranks, ep mode, no dispatch overlap),
one left in the canonical layout, one under a PlacementController (policy auto, `--replicas` replica
slots a rank, deciding after the first `--interval` steps on this machine's probed figures). Every token's two experts are drawn from Zipf(s) over the experts (the
router is built so its top-2 are those two), the same tokens for both. Per step and layout: the
busiest rank's rows over the mean, and the step (forward, backward, AdamW) of the slowest rank; the
two layouts alternate step by step, so both see the same machine load; medians after the decision.

Then the cost model (parallel/cost_model.py, as `moesys-plan` and the live tuner use it) predicts the
adaptive step's speed-up from the measured rows (plus the replicas' weight fetch), on this machine's
probed figures, against the measured one; and on the cluster presets at 64 to 1,024 GPUs, the
layer's predicted gain for the same Zipf skew (each rank's rows from the Zipf shares under the
canonical layout, the balancer's permutation, and the permutation with one replica slot a rank).

--static-capacity-factor f: both layers dispatch through the padded dispatcher's static buffer of
C = ceil(f*T*K/E) rows per (source rank, slot), which drops the rows past it: the controller then
keeps the slots and places replicas where they cut the expected drops (docs/placement.md), and the
table adds the rows dropped a step over the job. (Every rank computes its fixed buffers there, so the
busiest rank's rows do not set the step and no cost-model prediction is printed.)
"""
from __future__ import annotations

import argparse
import math
import statistics
import time

import torch
import torch.distributed as dist

from _shapes import RANK_PRELOAD  # benchmarks/ is on sys.path when a script runs
from moesys import MoEConfig, MoELayer
from moesys.parallel import ParallelDims, apply_expert_parallel, simulate
from moesys.parallel.cost_model import Shape, Stats, layer_time
from moesys.parallel.placement import Placement, balanced_placement, imbalance
from moesys.parallel.placement_control import PlacementController, PlacementSettings
from moesys.parallel.probe import probe_machine
from moesys.parallel.tuner import Machine, predict
from moesys.planner.hardware import load_hardware, presets
from moesys.planner.placement import replica_fetch_s, zipf_shares


def skewed_tokens(n: int, d: int, shares: list, gen: torch.Generator) -> torch.Tensor:
    """x [n, d] whose top-2 experts under a router with weight = the first E unit vectors are two
    distinct experts drawn from `shares` (the first twice as strong as the second)."""
    E = len(shares)
    pick = torch.multinomial(torch.tensor(shares).expand(n, E), 2, replacement=False, generator=gen)
    x = 0.1 * torch.randn(n, d, generator=gen)
    rows = torch.arange(n)
    x[rows, pick[:, 0]] += 4.0
    x[rows, pick[:, 1]] += 2.0
    return x


def bench_worker(a: dict) -> dict:
    torch.set_num_threads(a["threads"])
    P = dist.get_world_size()
    dims = ParallelDims.build(ep=P, timeout_s=300)
    torch.manual_seed(0)
    cfg = MoEConfig(hidden_size=a["d_model"], ffn_hidden_size=a["ffn"], num_experts=a["experts"], top_k=2,
                    capacity_factor=None, aux_loss="none")
    static = MoELayer(cfg, balance_group="local")
    with torch.no_grad():  # the router reads the first E features: x decides the experts
        static.router.weight.zero_()
        static.router.weight[:, :a["experts"]] = torch.eye(a["experts"])
    adaptive = MoELayer(cfg, balance_group="local")
    adaptive.load_state_dict(static.state_dict())
    buffer = {} if a["static_capacity_factor"] is None else {"dispatcher": "padded",
                                                             "static_capacity_factor": a["static_capacity_factor"]}
    for layer in (static, adaptive):
        apply_expert_parallel(layer, dims.ep_group, dims=dims, mode="ep", overlap=1, **buffer)
    opts = {"static": torch.optim.AdamW(static.parameters(), lr=1e-4),
            "adaptive": torch.optim.AdamW(adaptive.parameters(), lr=1e-4)}
    layers = {"static": static, "adaptive": adaptive}
    machine = probe_machine(dims.ep_group, torch.float32)
    # the gate on this machine's figures (a pinned tuner probes none); --force: on a compute-bound
    # stand-in, so the balancer's placement is taken whatever this host's figures say
    adaptive.runner.tuner.machine = Machine(bandwidth=1e15, latency=0.0, flops=1e6) if a["force"] else machine
    ctl = PlacementController(PlacementSettings(policy="auto", interval=a["interval"], replicas=a["replicas"]),
                              [adaptive])
    shares = zipf_shares(a["experts"], a["zipf"])
    gen = torch.Generator().manual_seed(1 + dims.rank)

    def step(kind: str, x: torch.Tensor) -> tuple:
        layer, opt = layers[kind], opts[kind]
        dist.barrier()
        t0 = time.perf_counter()
        y, aux = layer(x)
        (y.square().mean() + aux.loss).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        t = time.perf_counter() - t0
        counts = aux.tokens_per_expert.to(torch.float64)
        dropped = float(layer.runner.last_metrics["overflow_dropped"])  # 0 without a static buffer
        return t, counts, dropped

    rows = {"static": [], "adaptive": []}
    decided_at = None
    for i in range(a["interval"] + a["warmup"] + a["steps"]):
        x = skewed_tokens(a["tokens"], a["d_model"], shares, gen)
        for kind in (("static", "adaptive") if i % 2 == 0 else ("adaptive", "static")):
            placement = layers[kind].runner.placement
            t, counts, dropped = step(kind, x)
            dist.all_reduce(counts)  # the job's rows per expert
            loads = placement.rank_loads(counts.tolist(), P)
            tt = torch.tensor([t], dtype=torch.float64)
            dist.all_reduce(tt, op=dist.ReduceOp.MAX)  # the slowest rank sets the step
            dd = torch.tensor([dropped], dtype=torch.float64)
            dist.all_reduce(dd)  # the job's dropped rows
            if i >= a["interval"] + a["warmup"]:
                rows[kind].append((float(tt), imbalance(loads), max(loads), float(dd)))
        if ctl.after_step(i, opts["adaptive"]) and decided_at is None:
            decided_at = i
    return {"rows": rows, "slots": adaptive.runner.placement.slots, "replicas": adaptive.runner.placement.replicas, "moves": adaptive.runner.placement_moves,
            "decided_at": decided_at, "machine": machine, "decisions": [d for _, _, d in ctl.history]}


def predicted_step(machine, shape: Shape, rows_total: float, busiest: float) -> float:
    stats = Stats(tokens=int(rows_total / 2), rows=int(rows_total), max_rank_rows=round(busiest),
                  max_local_rows=int(rows_total / shape.world))
    return predict("ep", 1, stats, shape, machine, "alltoallv")


def at_scale(zipf: float, experts_per_rank: int = 2) -> list:
    """The cost model's layer time, canonical vs balanced layout, for each cluster preset at 64 to 1,024
    GPUs (ep = GPUs, E = experts_per_rank * GPUs, a Mixtral-sized expert, 4,096 tokens a rank, top-2)."""
    out = []
    for name in [n for n in presets() if n != "this"]:
        hw = load_hardware(name)
        for gpus in (64, 256, 1024):
            E = experts_per_rank * gpus
            shares = zipf_shares(E, zipf)
            tokens = 4096
            rows = 2 * tokens * gpus
            load = [s * rows for s in shares]
            shape = Shape(world=gpus, num_experts=E, hidden=4096, ffn=14336, matrices=3, dtype_bytes=2)
            canon = Placement.identity(E).rank_loads(load, gpus)
            perm = balanced_placement(load, gpus)
            repl = balanced_placement(load, gpus, perm, replicas_per_rank=1)
            times = []
            for p in (Placement.identity(E), perm, repl):
                per_rank = p.rank_loads(load, gpus)
                st = Stats(tokens=tokens * gpus, rows=rows, max_rank_rows=int(max(per_rank)), max_local_rows=2 * tokens)
                # the replicas' weight fetch over the inter-node link, not overlapped (pessimistic)
                fetch = replica_fetch_s(hw.inter.latency, hw.inter.bandwidth, 3 * 4096 * 14336 * 2, p, gpus)
                times.append(layer_time("ep", "alltoallv", 1, st, shape, hw).total + fetch)
            out.append((name, gpus, imbalance(canon), imbalance(perm.rank_loads(load, gpus)),
                        imbalance(repl.rank_loads(load, gpus)), *times))
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ranks", type=int, default=4)
    ap.add_argument("--zipf", type=float, default=1.2, help="Zipf exponent of the experts' shares")
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--ffn", type=int, default=1024)
    ap.add_argument("--tokens", type=int, default=512, help="tokens per rank and step")
    ap.add_argument("--interval", type=int, default=2, help="steps before the placement decision")
    ap.add_argument("--steps", type=int, default=8, help="measured steps after the decision")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    ap.add_argument("--replicas", type=int, default=1, help="replica slots a rank for the hottest experts")
    ap.add_argument("--no-scale", action="store_true", help="skip the cluster presets' predictions")
    ap.add_argument("--force", action="store_true", help="take the balancer's placement even where this machine's "
                    "figures say it does not pay (to check the cost model's prediction of a move)")
    ap.add_argument("--static-capacity-factor", type=float, default=None,
                    help="dispatch through a static buffer of this factor (rows past it drop; see the docstring)")
    args = ap.parse_args(argv)
    a = {k: getattr(args, k) for k in ("zipf", "experts", "ffn", "tokens", "interval", "steps", "warmup", "threads",
                                       "replicas", "force", "static_capacity_factor")}
    a["d_model"] = args.d_model
    res = simulate(bench_worker, args.ranks, a, timeout_s=600, preload=RANK_PRELOAD)[0]
    med = {k: tuple(statistics.median(r[i] for r in v) for i in range(4)) for k, v in res["rows"].items()}
    static_buffer = args.static_capacity_factor is not None
    print(f"{args.ranks} gloo ranks, ep {args.ranks}: one MoE layer E={args.experts} d={args.d_model} "
          f"ffn={args.ffn}, top-2 with Zipf({args.zipf}) expert shares, {args.tokens} tokens a rank")
    print(f"adaptive placement decided after step {res['decided_at']}: slots {list(res['slots'])}, replicas "
          f"{list(res['replicas'])} ({res['moves']} move(s))")
    if static_buffer:
        C = max(1, math.ceil(args.static_capacity_factor * args.tokens * 2 / args.experts))
        print(f"static buffer: parallel.static_capacity_factor={args.static_capacity_factor} (C = {C} rows a source "
              "rank and slot)")
        print(f"| layout   | busiest/mean rows | step ms | dropped rows |   (median of {args.steps} steps; rows "
              f"dropped over the job, of {2 * args.tokens * args.ranks})")
        for k in ("static", "adaptive"):
            print(f"| {k:<8} | {med[k][1]:>17.2f} | {med[k][0] * 1e3:>7.1f} | {med[k][3]:>12.0f} |")
    else:
        print(f"| layout   | busiest/mean rows | step ms |   (slowest rank, median of {args.steps} steps)")
        for k in ("static", "adaptive"):
            print(f"| {k:<8} | {med[k][1]:>17.2f} | {med[k][0] * 1e3:>7.1f} |")
    speedup = med["static"][0] / med["adaptive"][0]
    if static_buffer:
        print(f"adaptive step: {speedup:.2f}x the static one's speed measured")
        return {"median": med, "speedup": speedup, **{k: res[k] for k in ("slots", "replicas", "moves", "decided_at")}}
    shape = Shape(world=args.ranks, num_experts=args.experts, hidden=args.d_model, ffn=args.ffn, matrices=2,
                  dtype_bytes=4)
    rows_total = 2 * args.tokens * args.ranks
    p_static = predicted_step(res["machine"], shape, rows_total, med["static"][2])
    m = res["machine"]
    placed = Placement(tuple(res["slots"]), tuple(res["replicas"]))
    p_adapt = (predicted_step(m, shape, rows_total, med["adaptive"][2])
               + replica_fetch_s(m.latency, m.bandwidth, 2 * args.d_model * args.ffn * 4, placed, args.ranks))
    predicted = p_static / p_adapt
    err = predicted / speedup - 1
    print(f"adaptive step: {speedup:.2f}x the static one's speed measured; the cost model predicts {predicted:.2f}x "
          f"({err:+.0%}) from the busiest rank's rows on this machine's probed figures "
          f"({res['machine'].flops / 1e9:.1f} GFLOP/s a rank, {res['machine'].bandwidth / 1e9:.2f} GB/s)")
    scale = [] if args.no_scale else at_scale(args.zipf)
    if scale:
        print(f"cost model at scale (Zipf({args.zipf}), 2 experts a GPU, 4,096 tokens a GPU, d=4096 ffn=14336 "
              "bf16, alltoallv, one layer fwd+bwd):")
        print("busiest rank's rows / mean and the layer's ms: static | permuted | permuted + 1 replica a GPU")
        print("| cluster  | GPUs | static | perm | +repl | static ms | perm ms | +repl ms | gain perm | gain +repl |")
        for name, gpus, ib, ip, ir, ts, tp, tr in scale:
            print(f"| {name:<8} | {gpus:>4} | {ib:>6.1f} | {ip:>4.1f} | {ir:>5.2f} | {ts * 1e3:>9.1f} | {tp * 1e3:>7.1f} "
                  f"| {tr * 1e3:>8.1f} | {ts / tp:>8.2f}x | {ts / tr:>9.2f}x |")
    return {"median": med, "speedup": speedup, "predicted_speedup": predicted, "model_error": err,
            "scale": scale, **{k: res[k] for k in ("slots", "replicas", "moves", "decided_at")}}


if __name__ == "__main__":
    main()
