"""The plain engine's gradient sync, flat (one all-reduce per group after the backward) against
overlapped (bucketed all-reduces launched by the backward's gradient hooks, parallel.grad_overlap),
side by side in one run on simulated gloo ranks.

    python benchmarks/grad_overlap.py                         # 4 ranks, ep 2: ~1 min on 2 shared cores (2 under heavy load)
    python benchmarks/grad_overlap.py --ranks 4 --ep 4 --steps 20 --bucket-mb 4

Each rank trains the same GPT-MoE (fp32, ep mode, no dispatch overlap); the two syncs alternate step by
step, so both see the same machine load. Per step and rank: the step (zero_grad, forward, backward,
sync), and the sync's exposed part (flat: the whole all-reduce after the backward; overlapped: the
wait in `finish` for what the backward did not hide); the slowest rank's per step, median over steps.
Then the planner's overlap model (`exposed_grad_sync`) fed with the flat step's measured sync and
backward, and this machine's overlap (an all-reduce of the gradients' size beside GEMMs, as
`moesys-plan --cluster this` probes it), predicts the overlapped step, against its measurement.
The first step's gradients of the two are compared (they must agree: the same math).
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.distributed as dist

from _shapes import RANK_PRELOAD  # benchmarks/ is on sys.path when a script runs
from moesys import MoEConfig
from moesys.model import GPTConfig, GPTMoE, lm_loss
from moesys.parallel import OverlappedGradReducer, ParallelDims, allreduce_gradients, apply_expert_parallel, simulate
from moesys.planner.plan import exposed_grad_sync


def _local(t):
    return t.to_local() if hasattr(t, "to_local") else t


def machine_overlap(numel: int, rounds: int = 5) -> float:
    """Hardware.overlap of this machine, measured as moesys/planner/probe_host.py does: an all-reduce
    of `numel` floats started asynchronously while the rank runs GEMMs of about its length; the
    fraction of the shorter hidden (on CPU gloo's threads share the cores with the GEMMs). Median,
    slowest rank."""
    buf = torch.zeros(numel)
    m = torch.randn(256, 256)

    def timed(fn) -> float:
        dist.barrier()
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0

    comm = timed(lambda: dist.all_reduce(buf))
    one = timed(lambda: m @ m)
    n = max(1, round(comm / max(one, 1e-6)))
    gemms = lambda: [m @ m for _ in range(n)]  # noqa: E731
    fracs = []
    for _ in range(rounds):
        tc, tg = timed(lambda: dist.all_reduce(buf)), timed(gemms)

        def both():
            w = dist.all_reduce(buf, async_op=True)
            gemms()
            w.wait()
        tb = timed(both)
        t = torch.tensor([tc, tg, -tb], dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)  # the slowest rank's times, its least overlap
        tc, tg, tb = t[0].item(), t[1].item(), -t[2].item()
        fracs.append(min(1.0, max(0.0, (tc + tg - tb) / min(tc, tg))))
    return statistics.median(fracs)


def bench_worker(a: dict) -> dict:
    torch.set_num_threads(a["threads"])
    dims = ParallelDims.build(ep=a["ep"], timeout_s=300, num_experts=a["experts"])
    torch.manual_seed(0)
    gcfg = GPTConfig(vocab_size=a["vocab"], n_layers=a["layers"], d_model=a["d_model"], n_heads=a["heads"],
                     ffn_hidden=a["ffn"], seq_len=a["seq"])
    model = GPTMoE(gcfg, MoEConfig(hidden_size=a["d_model"], ffn_hidden_size=a["ffn"], num_experts=a["experts"],
                                   top_k=2))
    for _, layer in model.moe_layers():
        apply_expert_parallel(layer, dims.ep_group, dims=dims, mode="ep", overlap=1)
        layer.set_balance_group(dims.dp_group)
    reducer = OverlappedGradReducer(model, dims, bucket_mb=a["bucket_mb"])
    g = torch.Generator().manual_seed(1 + dims.rank)
    x = torch.randint(0, a["vocab"], (a["batch"], a["seq"]), generator=g)
    y = torch.randint(0, a["vocab"], (a["batch"], a["seq"]), generator=g)
    params = [p for p in model.parameters()]

    def step(kind: str) -> tuple:
        """(step, exposed sync, backward) seconds of one step."""
        for p in params:
            p.grad = None
        t0 = time.perf_counter()
        if kind == "overlap":
            reducer.prepare_backward(sync=True)
        logits, aux, _ = model(x)
        loss = lm_loss(logits, y) + aux
        tb = time.perf_counter()
        loss.backward()
        t1 = time.perf_counter()
        if kind == "overlap":
            reducer.finish()
        else:
            allreduce_gradients(model, dims)
        t2 = time.perf_counter()
        return t2 - t0, t2 - t1, t1 - tb

    grads = {}
    for kind in ("flat", "overlap"):  # the same step's gradients, reduced both ways
        step(kind)
        grads[kind] = [_local(p.grad).clone() for p in params if p.grad is not None]
    # per tensor: the largest difference over the largest entry (an entrywise ratio is noise near zero)
    worst = max(float((f - o).abs().max() / f.abs().max().clamp_min(1e-30)) for f, o in zip(grads["flat"], grads["overlap"]))
    rows = {"flat": [], "overlap": []}
    for i in range(a["warmup"] + a["steps"]):
        for kind in (("flat", "overlap") if i % 2 == 0 else ("overlap", "flat")):
            t = torch.tensor(step(kind), dtype=torch.float64)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)  # the slowest rank sets the job's step
            if i >= a["warmup"]:
                rows[kind].append(t.tolist())
    n_dense = sum(_local(p).numel() for p in reducer.local + [q for gr in reducer.groups if gr.name == "dense"
                                                              for b in gr.buckets for q in b.params])
    # the reduced bytes and each group's last bucket (the planner's tail), for the model check
    total = sum(_local(q).numel() for gr in reducer.groups for b in gr.buckets for q in b.params)
    last = max((sum(_local(q).numel() for q in gr.buckets[-1].params) for gr in reducer.groups), default=0)
    overlap = machine_overlap(total)
    return {"rows": rows, "max_rel_diff": worst, "overlap": overlap, "params": sum(_local(p).numel() for p in params),
            "buckets": {gr.name: len(gr.buckets) for gr in reducer.groups}, "dense_params": n_dense,
            "last_bucket_share": last / max(1, total)}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ranks", type=int, default=4)
    ap.add_argument("--ep", type=int, default=2)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--ffn", type=int, default=512)
    ap.add_argument("--experts", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--batch", type=int, default=4, help="sequences per rank")
    ap.add_argument("--bucket-mb", type=float, default=2.0)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    args = ap.parse_args(argv)
    a = {k: getattr(args, k) for k in ("ep", "layers", "heads", "ffn", "experts", "vocab", "seq", "batch", "steps",
                                       "warmup", "threads")}
    a.update(d_model=args.d_model, bucket_mb=args.bucket_mb)
    res = simulate(bench_worker, args.ranks, a, timeout_s=600, preload=RANK_PRELOAD)[0]
    med = {k: tuple(statistics.median(r[i] for r in v) for i in range(3)) for k, v in res["rows"].items()}
    print(f"{args.ranks} gloo ranks, ep {args.ep}: GPT-MoE {args.layers} layers d={args.d_model} E={args.experts}, "
          f"{res['params'] / 1e6:.2f} M parameters a rank ({res['dense_params'] / 1e6:.2f} M dense), "
          f"{args.batch}x{args.seq} tokens a rank, buckets {res['buckets']} ({args.bucket_mb} MiB)")
    print(f"{'sync':<10}{'step ms':>10}{'exposed sync ms':>17}   (slowest rank, median of {args.steps} steps)")
    for k in ("flat", "overlap"):
        print(f"{k:<10}{med[k][0] * 1e3:>10.1f}{med[k][1] * 1e3:>17.1f}")
    ratio = med["flat"][0] / med["overlap"][0]
    print(f"overlapped step: {ratio:.2f}x the flat one's speed; exposed sync {med['overlap'][1] * 1e3:.1f} ms of "
          f"{med['flat'][1] * 1e3:.1f} ms; gradients agree to {res['max_rel_diff']:.1e} (largest difference / largest entry)")
    # the planner's overlap model (moesys/planner/plan.py: exposed_grad_sync) fed with the flat step's measured
    # sync and backward, the last bucket's share of the bytes; against the measured overlapped step
    step_f, sync_f, bwd_f = med["flat"]
    exposed = exposed_grad_sync(sync_f, bwd_f, sync_f * res["last_bucket_share"], res["overlap"])
    predicted = step_f - sync_f + exposed
    err = predicted / med["overlap"][0] - 1
    print(f"planner's overlap model (this machine's overlap {res['overlap']:.2f}): exposed sync {exposed * 1e3:.1f} ms, "
          f"step {predicted * 1e3:.1f} ms predicted vs {med['overlap'][0] * 1e3:.1f} ms measured ({err:+.0%}); "
          f"flat backward {bwd_f * 1e3:.1f} ms")
    return {"median": med, "ratio": ratio, "predicted_step": predicted, "model_error": err, **res}


if __name__ == "__main__":
    main()
