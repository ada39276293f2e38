"""MoE recompute (`MoEConfig.recompute`, `moe.recompute=true`): the peak memory it saves and the
time it costs, on a stack of L residual MoE layers (one layer cannot show it: its intermediates
are freed by its own backward either way; a stack holds every layer's until the backward reaches it).

    python benchmarks/recompute.py                        # L=4, E=16, T=4096 D=512 F=1024 K=2, gelu
    python benchmarks/recompute.py --activation swiglu --shared 1 --layers 8
    python benchmarks/recompute.py --device cuda          # GPU: torch.cuda.max_memory_allocated

Variants "off" and "on" (recompute), each in a process of its own, steps interleaved in rounds as
in benchmarks/layer.py; time = median fwd+bwd, "on / off" = the ratio of the medians (on CUDA:
of one timed step each, CUDA events).
Memory on CPU: the steady-state step's peak RSS (third step, VmHWM reset before it) above the
RSS after set-up, as benchmarks/stack_cpu.py (fixed mmap threshold, so RSS tracks live memory);
on CUDA: max_memory_allocated during the third step above the memory allocated before it.
"Expected" is what recompute must save by construction: the [N, F] intermediates each layer keeps
from its forward (h and a; swiglu also g), N = T*K routed rows (plus T rows for each shared
expert's width), for L-1 layers (the last layer's are freed by its own backward at once anyway).
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys

import torch

from _shapes import add_shape_args, timed  # benchmarks/ is on sys.path when a script runs
from layer import fwd_bwd, timing
from stack_cpu import Stack, status_mib

KINDS = ["off", "on"]


def build(kind: str, E: int, T: int, D: int, Fh: int, K: int, L: int, activation: str, shared: int):
    from moesys import MoEConfig, MoELayer

    layers = []
    for i in range(L):
        torch.manual_seed(100 + i)
        layers.append(MoELayer(MoEConfig(hidden_size=D, ffn_hidden_size=Fh, num_experts=E, top_k=K,
                                         activation=activation, num_shared_experts=shared,
                                         recompute=kind == "on")))

    def step(m, x):
        y, aux = m(x)
        return y, aux.loss
    return Stack(layers, step), (lambda m, x: m(x))


def _worker(kind: str, E: int, shape: tuple, threads: int, conn) -> None:
    from layer import serve

    torch.set_num_threads(threads)
    T, D, Fh, K, L, activation, shared = shape
    m, step = build(kind, E, T, D, Fh, K, L, activation, shared)
    serve(m, step, T, D, conn)


def _measure(kind: str, args) -> None:
    """This process: steady-state peak MiB of one fwd+bwd (third step) above the set-up state."""
    dev = torch.device(args.device)
    m, step = build(kind, args.experts[0], args.tokens, args.hidden, args.ffn, args.top_k, args.layers,
                    args.activation, args.shared)
    m = m.to(dev)
    x = torch.randn(args.tokens, args.hidden, device=dev, requires_grad=True)
    fwd_bwd(m, step, torch.randn(64, args.hidden, device=dev, requires_grad=True))  # load code paths
    m.zero_grad(set_to_none=True)
    if dev.type == "cpu":
        from moesys.kernels import workspace

        workspace.release()  # the measured steps map their cached buffers anew: they count
        base = status_mib("VmRSS")
    for i in range(3):
        m.zero_grad(set_to_none=True)
        x.grad = None
        if i == 2:
            if dev.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated() / 2**20
            else:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")  # reset the peak (VmHWM) to the current RSS
        seconds = timed(lambda: fwd_bwd(m, step, x), dev)
    peak = torch.cuda.max_memory_allocated() / 2**20 if dev.type == "cuda" else status_mib("VmHWM")
    print(peak - base, seconds)


def measure(kind: str, args) -> tuple:
    """(peak MiB, step seconds) of `kind`, measured in a fresh process (its own allocator state)."""
    cmd = [sys.executable, os.path.abspath(__file__), "--measure", kind, "--experts", str(args.experts[0]),
           "--layers", str(args.layers), "--tokens", str(args.tokens), "--hidden", str(args.hidden),
           "--ffn", str(args.ffn), "--top-k", str(args.top_k), "--activation", args.activation,
           "--shared", str(args.shared), "--device", args.device]
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
    mib, seconds = out.stdout.strip().splitlines()[-1].split()
    return float(mib), float(seconds)


def expected_mib(args) -> float:
    """[N, F] intermediates kept per layer without recompute, times L-1 layers (fp32)."""
    per_row = 3 if args.activation == "swiglu" else 2  # h, a (+ g)
    rows_f = args.tokens * args.top_k * args.ffn + args.tokens * args.shared * args.ffn
    return per_row * rows_f * 4 * (args.layers - 1) / 2**20


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_shape_args(p)
    p.set_defaults(experts=[16], repeats=5)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--activation", default="gelu", choices=["gelu", "relu", "silu", "swiglu"])
    p.add_argument("--shared", type=int, default=0, help="shared experts per layer (width F)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--measure", choices=KINDS, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.measure:
        _measure(args.measure, args)
        return
    print(f"{args.layers} residual MoE layers, T={args.tokens} D={args.hidden} F={args.ffn} K={args.top_k} "
          f"{args.activation}, {args.shared} shared experts, fp32, {args.device}, {torch.get_num_threads()} threads\n")
    print("| E | off ms | on ms | on / off (time) | peak MiB off | peak MiB on | saved MiB | expected MiB |")
    print("|---|---|---|---|---|---|---|---|")
    for E in args.experts:
        args.experts = [E]
        mem = {k: measure(k, args) for k in KINDS}
        if args.device == "cpu":  # interleaved rounds, each variant in its own process
            t = timing(KINDS, E, args, worker=_worker, extra_shape=(args.layers, args.activation, args.shared))
            t_off, t_on = t["off"], t["on"]
        else:  # one timed step each, from the memory runs
            t_off, t_on = mem["off"][1], mem["on"][1]
        ratio = t_on / t_off
        off, on = mem["off"][0], mem["on"][0]
        print(f"| {E} | {t_off * 1e3:.0f} | {t_on * 1e3:.0f} | {ratio:.3f} | {off:.0f} | {on:.0f} | {off - on:.0f} "
              f"| {expected_mib(args):.0f} |", flush=True)


if __name__ == "__main__":
    main()
