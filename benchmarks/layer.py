"""MoELayer fwd+bwd against the dense FFN of equal active FLOPs and DeepSpeed-MoE, side by side.

    python benchmarks/layer.py                   # full table: T=4096 D=512 F=1024 K=2, E in 8 16 64
    python benchmarks/layer.py --experts 8 --repeats 5
    python benchmarks/layer.py --no-deepspeed --no-memory

Steps are interleaved in time in rounds (the machine is shared and noisy), each variant in a
process of its own so none sees another's allocator or buffer-cache state. Times are medians;
ratios (to the dense FFN of width K*F, the same active FLOPs: the limit an MoE layer can reach)
are medians over rounds of the per-round ratio.
The input requires grad, as it does inside a model, so every variant computes dX too.
Memory: each variant's fwd+bwd runs in a fresh subprocess; the peak resident-set increase over the
set-up state (parameters and input allocated) is the activation + gradient memory of one step.
Two floors: "expert GEMMs alone" runs only the grouped expert FFN (fwd+bwd) on rows already in
expert order, with the counts a real router gives: what any MoE layer pays for its GEMMs on this
BLAS, so moesys minus it is the cost of routing, permute and combine. "Expert-weight traffic
floor" is the dense time plus the extra time to move the expert weights (E/K times the dense
layer's) as any MoE layer must: read each weight twice (forward and dX GEMMs) and write its
gradient once, measured as zero-FLOP passes over tensors of those sizes, minus the same for the
dense weights, in the same rounds: a memory-traffic lower bound.
"Buffer cache off" is the same moesys layer with `moesys.kernels.workspace` disabled, so each
large tensor is a fresh glibc mmap whose pages fault in every step: what the cache buys. The
plain dense FFN pays those faults on its own activations; "through the same cached FFN" divides
by the dense FFN run through moesys's fused expert FFN with one expert (cache included), so both
sides allocate alike and the ratio is what routing to E experts costs.
"Per-expert GEMM loop" is the same moesys layer with `moesys.kernels.cpu_blas` disabled: one
`torch.mm` per expert and GEMM instead of one MKL batched call (`cblas_sgemm_batch`) each.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from moesys.kernels import cpu_blas, workspace
from _shapes import add_shape_args  # benchmarks/ is on sys.path when a script runs


class DenseFFN(nn.Module):
    def __init__(self, D: int, Fw: int):
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(D, Fw) * 0.02)
        self.w2 = nn.Parameter(torch.randn(Fw, D) * 0.02)

    def forward(self, x):
        return F.gelu(x @ self.w1) @ self.w2


def build(kind: str, E: int, T: int, D: int, Fh: int, K: int):
    torch.manual_seed(0)
    if kind == "dense":
        return DenseFFN(D, K * Fh), (lambda m, x: m(x))
    if kind == "dense_cached":
        # the same dense FFN run through moesys's fused expert FFN with one expert: the cache and the
        # in-place activation backward, so the ratio to it isolates what routing to E experts costs
        from moesys.kernels.expert_ffn import expert_ffn_torch

        m = DenseFFN(D, K * Fh)
        one = torch.tensor([T])
        return m, (lambda m, x: expert_ffn_torch(x, m.w1.unsqueeze(0), m.w2.unsqueeze(0), None, one, "gelu"))
    if kind in ("moesys", "moesys_nocache", "moesys_loop"):  # the same layer; the worker turns the cache / batched GEMM off
        from moesys import MoEConfig, MoELayer

        m = MoELayer(MoEConfig(hidden_size=D, ffn_hidden_size=Fh, num_experts=E, top_k=K, activation="gelu"))

        def step(m, x):
            y, aux = m(x)
            return y, aux.loss
        return m, step
    if kind == "experts":
        # the floor: only the expert GEMMs + activation, on rows already in expert order, with the
        # counts a real router gives (no routing, permute or combine)
        from moesys import MoEConfig, MoELayer

        m = MoELayer(MoEConfig(hidden_size=D, ffn_hidden_size=Fh, num_experts=E, top_k=K, activation="gelu"))
        with torch.no_grad():
            _, plan = m.route(torch.randn(T, D), T)
        counts = plan.counts_E
        x_ND = torch.randn(int(counts.sum()), D, requires_grad=True)  # dX counts too

        def step(m, x):
            x_ND.grad = None  # like the parameters: a fresh gradient each step
            return m.experts(x_ND, counts)
        return m, step
    if kind == "deepspeed":
        return build_deepspeed(E, D, Fh, K)
    raise ValueError(kind)


def build_deepspeed(E, D, Fh, K):
    import deepspeed
    import torch.distributed as dist
    from deepspeed.moe.layer import MoE

    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(29000 + os.getpid() % 1000))
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        os.environ.setdefault("LOCAL_RANK", "0")
        deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    expert = nn.Sequential(nn.Linear(D, Fh, bias=False), nn.GELU(), nn.Linear(Fh, D, bias=False))
    m = MoE(hidden_size=D, expert=expert, num_experts=E, ep_size=1, k=K, capacity_factor=1.25,
            eval_capacity_factor=1.25, min_capacity=4, use_residual=False)

    def step(m, x):
        y, l_aux, _ = m(x.unsqueeze(0))
        return y.squeeze(0), l_aux
    return m, step


def fwd_bwd(m, step, x):
    """One forward and backward: the output's gradient is 1/numel (a mean), plus an MoE layer's aux
    loss (its router gradient) where the variant has one."""
    out = step(m, x)
    y, extra = out if isinstance(out, tuple) else (out, None)
    tensors, grads = [y], [torch.full_like(y, 1.0 / y.numel())]
    if extra is not None:
        tensors.append(extra)
        grads.append(torch.ones_like(extra))
    torch.autograd.backward(tensors, grads)


def _traffic_pass(weights, grads) -> float:
    """Seconds for the weight traffic a layer cannot avoid, with no FLOPs: read every weight twice
    (forward GEMM, dX GEMM) and write every weight gradient once."""
    t0 = time.perf_counter()
    for w in weights:
        w.sum()
        w.sum()
    for g in grads:
        g.zero_()
    return time.perf_counter() - t0


def _traffic_step(E: int, shape: tuple):
    """A "variant" whose step time is the extra weight traffic of E experts over the dense FFN."""
    T, D, Fh, K = shape
    moe = [torch.randn(E, D, Fh), torch.randn(E, Fh, D)]
    dense = [torch.randn(D, K * Fh), torch.randn(K * Fh, D)]
    moe_g, dense_g = [torch.zeros_like(w) for w in moe], [torch.zeros_like(w) for w in dense]
    return lambda: _traffic_pass(moe, moe_g) - _traffic_pass(dense, dense_g)


def _variant_worker(kind: str, E: int, shape: tuple, threads: int, conn) -> None:
    """One variant in its own process: a step each time the coordinator says so, its time sent back."""
    torch.set_num_threads(threads)
    workspace.set_enabled(kind != "moesys_nocache")
    cpu_blas.set_enabled(kind != "moesys_loop")
    T, D, Fh, K = shape[:4]
    if kind == "traffic":
        extra = _traffic_step(E, shape)
        extra()
        conn.send("ready")
        while conn.recv():
            conn.send(extra())
        return
    m, step = build(kind, E, T, D, Fh, K)
    serve(m, step, T, D, conn)


def serve(m, step, T: int, D: int, conn) -> None:
    """The worker's loop: a warm-up step, then one timed fwd+bwd each time the coordinator asks."""
    torch.manual_seed(1)
    x = torch.randn(T, D, requires_grad=True)  # as inside a model: dX is computed
    fwd_bwd(m, step, x)  # warm-up
    conn.send("ready")
    while conn.recv():
        m.zero_grad(set_to_none=True)
        x.grad = None
        t0 = time.perf_counter()
        fwd_bwd(m, step, x)
        conn.send(time.perf_counter() - t0)


def timing(kinds, E, args, worker=None, extra_shape=()) -> dict:
    """Median step time of each variant. Each variant lives in its own process (its own allocator
    and buffer-cache state, as one layer in a training loop would see), and the steps are
    interleaved in time: one variant runs at a time, round-robin, so all see the same machine.
    The processes are forked from a server that imported this script's modules once (where the
    platform has one), not each a fresh interpreter: what is timed is the steps, not their start."""
    import multiprocessing as mp

    from moesys.parallel.spawn import forkserver_available

    if forkserver_available():
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(["__main__"])  # the running script's imports (not its main())
    else:
        ctx = mp.get_context("spawn")
    shape = (args.tokens, args.hidden, args.ffn, args.top_k, *extra_shape)
    workers = {}
    for k in kinds:
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=worker or _variant_worker, args=(k, E, shape, torch.get_num_threads(), child),
                           daemon=True)
        proc.start()
        workers[k] = (proc, parent)
    try:
        for k, (_, conn) in workers.items():
            if conn.recv() != "ready":
                raise RuntimeError(f"variant {k} did not start")
        times = {k: [] for k in kinds}
        for _ in range(args.repeats):
            for k in kinds:
                conn = workers[k][1]
                conn.send(True)
                times[k].append(conn.recv())
    finally:
        for proc, conn in workers.values():
            try:
                conn.send(False)
            except (BrokenPipeError, OSError):
                pass
            proc.join(timeout=30)
            if proc.is_alive():
                proc.kill()
    out = {k: statistics.median(v) for k, v in times.items()}
    # ratios: the median over rounds of the per-round ratio (a round runs every variant back to
    # back, so a slow spell of the shared machine hits both sides of a ratio alike)
    out["ratio"] = {f"{a}/{b}": statistics.median(x / y for x, y in zip(times[a], times[b]))
                    for a in kinds for b in ("dense", "dense_cached") if a != b and b in times and a != "traffic"}
    if "traffic" in times:
        out["ratio"]["floor/dense"] = statistics.median((d + x) / d for d, x in zip(times["dense"], times["traffic"]))
    return out


def peak_memory(kind: str, E: int, args) -> float:
    """MiB of peak RSS growth for one fwd+bwd, measured in a fresh subprocess.

    ru_maxrss is inherited across fork/exec on Linux, so the peak is read from VmHWM after
    resetting it through /proc/self/clear_refs.
    """
    code = f"""
import sys, torch
sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r})
from layer import build, fwd_bwd
def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) / 1024
torch.set_num_threads({torch.get_num_threads()})
m, step = build({kind!r}, {E}, {args.tokens}, {args.hidden}, {args.ffn}, {args.top_k})
x = torch.randn({args.tokens}, {args.hidden}, requires_grad=True)
fwd_bwd(m, step, torch.randn(64, {args.hidden}, requires_grad=True))  # load code paths
m.zero_grad(set_to_none=True)
from moesys.kernels import cpu_blas, workspace
workspace.release()  # the measured step allocates its cached buffers anew: they count in its peak
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset the peak (VmHWM) to the current RSS
base = status("VmRSS")
fwd_bwd(m, step, x)
print(status("VmHWM") - base)
"""
    # a fixed mmap threshold: every tensor-sized block is mmapped and unmapped when freed, so RSS
    # tracks live memory (glibc's dynamic threshold would keep freed blocks on its heap)
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    return float(out.stdout.strip().splitlines()[-1])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_shape_args(p)
    p.add_argument("--no-deepspeed", action="store_true")
    p.add_argument("--no-memory", action="store_true")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args(argv)
    kinds = ["dense", "dense_cached", "moesys", "moesys_nocache", "moesys_loop", "experts", "traffic"]
    kinds += [] if args.no_deepspeed else ["deepspeed"]
    print(f"T={args.tokens} D={args.hidden} F={args.ffn} K={args.top_k} fp32, {torch.get_num_threads()} threads, "
          f"median of {args.repeats} interleaved fwd+bwd; dense = FFN of width K*F\n")
    head = ("| E | dense ms | moesys ms | moesys / dense | moesys, buffer cache off / dense "
            "| moesys, per-expert GEMM loop / dense "
            "| moesys / dense through the same cached FFN | expert GEMMs alone / dense | expert-weight traffic floor / dense |")
    sep = "|---|---|---|---|---|---|---|---|---|"
    if "deepspeed" in kinds:
        head += " DeepSpeed-MoE / dense |"
        sep += "---|"
    if not args.no_memory:
        head += " peak mem moesys / dense (MiB) | extra params (MiB) |"
        sep += "---|---|"
    print(head)
    print(sep)
    results = []
    for E in args.experts:
        t = timing(kinds, E, args)
        d = t["dense"]
        r = t["ratio"]
        row = (f"| {E} | {d*1e3:.1f} | {t['moesys']*1e3:.1f} | {r['moesys/dense']:.3f} | {r['moesys_nocache/dense']:.3f} "
               f"| {r['moesys_loop/dense']:.3f} "
               f"| {r['moesys/dense_cached']:.3f} | {r['experts/dense']:.3f} | {r['floor/dense']:.3f} |")
        if "deepspeed" in kinds:
            row += f" {r['deepspeed/dense']:.3f} |"
        res = {"E": E, **t}
        if not args.no_memory:
            md, mm = peak_memory("dense", E, args), peak_memory("moesys", E, args)
            extra = 4 * (E - args.top_k) * 2 * args.hidden * args.ffn / 2**20
            ratio = f"{mm / md:.2f}" if md > 0 else "n/a (too small to see in RSS)"
            row += f" {mm:.0f} / {md:.0f} = {ratio} | {extra:.0f} |"
            res.update(mem_dense=md, mem_moesys=mm, extra_params=extra)
        print(row, flush=True)
        results.append(res)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
