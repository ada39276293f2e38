"""MoELayer fwd+bwd against the dense FFN of equal active FLOPs and DeepSpeed-MoE, side by side.

    python benchmarks/layer.py                   # full table: T=4096 D=512 F=1024 K=2, E in 8 16 64
    python benchmarks/layer.py --experts 8 --repeats 5
    python benchmarks/layer.py --no-deepspeed --no-memory

Times are medians of interleaved runs in one process (the machine is shared and noisy), reported
as ratios to the dense FFN of width K*F (the same active FLOPs: the limit an MoE layer can reach).
Memory: each variant's fwd+bwd runs in a fresh subprocess; the peak resident-set increase over the
set-up state (parameters and input allocated) is the activation + gradient memory of one step.
Two floors: "expert GEMMs alone" runs only the grouped expert FFN (fwd+bwd) on rows already in
expert order, with the counts a real router gives: what any MoE layer pays for its GEMMs on this
BLAS, so moesys minus it is the cost of routing, permute and combine. "Weight-grad traffic" is
the extra time to write and read the expert weight gradients (E/K times the dense layer's),
measured as a zero-FLOP pass over tensors of that size: a memory-traffic lower bound.
"Buffer cache off" is the same moesys layer with `moesys.kernels.workspace` disabled, so each
large tensor is a fresh glibc mmap whose pages fault in every step: what the cache buys.
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

from moesys.kernels import workspace
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
    if kind in ("moesys", "moesys_nocache"):  # the same layer; timing() turns the cache off for the second
        from moesys import MoEConfig, MoELayer

        m = MoELayer(MoEConfig(hidden_size=D, ffn_hidden_size=Fh, num_experts=E, top_k=K, activation="gelu"))

        def step(m, x):
            y, aux = m(x)
            return y + 0 * aux.loss
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
        return y.squeeze(0) + 0 * l_aux
    return m, step


def fwd_bwd(m, step, x):
    y = step(m, x)
    y.backward(torch.ones_like(y) / y.numel())


def _traffic_time(tensors, repeats: int) -> float:
    """Median seconds to write (zero) and read (sum) every tensor once: no FLOPs, only traffic."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for t in tensors:
            t.zero_()
            t.sum()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def timing(kinds, E, args) -> dict:
    x = torch.randn(args.tokens, args.hidden)
    built = {k: build(k, E, args.tokens, args.hidden, args.ffn, args.top_k) for k in kinds}
    times = {k: [] for k in kinds}
    for k in kinds:  # warm-up
        fwd_bwd(*built[k], x)
    for _ in range(args.repeats):
        for k in kinds:  # interleaved: every variant sees the same machine state
            m, step = built[k]
            m.zero_grad(set_to_none=True)
            workspace.set_enabled(k != "moesys_nocache")
            t0 = time.perf_counter()
            fwd_bwd(m, step, x)
            times[k].append(time.perf_counter() - t0)
    workspace.set_enabled(True)
    # memory-traffic floor of the expert weight gradients: write E*(D*F + F*D) floats, read them back
    moe_grads = [torch.empty(E, args.hidden, args.ffn) for _ in range(2)]
    dense_grads = [torch.empty(args.hidden, args.top_k * args.ffn) for _ in range(2)]
    floor, dense_floor = _traffic_time(moe_grads, args.repeats), _traffic_time(dense_grads, args.repeats)
    out = {k: statistics.median(v) for k, v in times.items()}
    out["grad_traffic_extra"] = floor - dense_floor
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
x = torch.randn({args.tokens}, {args.hidden})
fwd_bwd(m, step, torch.randn(64, {args.hidden}))  # load code paths
m.zero_grad(set_to_none=True)
from moesys.kernels import workspace
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
    kinds = ["dense", "moesys", "moesys_nocache", "experts"] + ([] if args.no_deepspeed else ["deepspeed"])
    print(f"T={args.tokens} D={args.hidden} F={args.ffn} K={args.top_k} fp32, {torch.get_num_threads()} threads, "
          f"median of {args.repeats} interleaved fwd+bwd; dense = FFN of width K*F\n")
    head = ("| E | dense ms | moesys ms | moesys / dense | moesys, buffer cache off / dense "
            "| expert GEMMs alone / dense | weight-grad traffic floor / dense |")
    sep = "|---|---|---|---|---|---|---|"
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
        floor = (d + t["grad_traffic_extra"]) / d
        row = (f"| {E} | {d*1e3:.1f} | {t['moesys']*1e3:.1f} | {t['moesys']/d:.3f} | {t['moesys_nocache']/d:.3f} "
               f"| {t['experts']/d:.3f} | {floor:.3f} |")
        if "deepspeed" in kinds:
            row += f" {t['deepspeed']/d:.3f} |"
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
