"""A stack of L residual MoE layers on CPU against the same stack of dense FFNs: what the buffer
cache's policy costs and buys across layers (a single-layer benchmark cannot show it).

    python benchmarks/stack_cpu.py                          # L=4, E=64, T=4096 D=512 F=1024 K=2
    python benchmarks/stack_cpu.py --layers 2 --experts 16 --repeats 5

Variants, each in a process of its own, steps interleaved in rounds as in benchmarks/layer.py:
  dense              L dense FFNs of width K*F (equal active FLOPs);
  moesys             the default cache: idle step buffers are freed when a weight gradient is taken;
  moesys keep        `workspace.set_keep_scratch(True)`: one layer's freed step buffers serve the
                     next layer's backward;
  moesys cache off   every large tensor a fresh glibc mapping.
Memory: the steady-state step's peak RSS (third step, VmHWM reset before it) above the RSS after
set-up (parameters and input allocated, one 64-token step run to load the code paths, its
gradients and cache blocks freed): activations, gradients and whatever the cache holds.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

import torch
import torch.nn as nn

from _shapes import add_shape_args  # benchmarks/ is on sys.path when a script runs
from layer import build, fwd_bwd, serve, timing
from moesys.kernels import workspace

KINDS = ["dense", "moesys", "moesys_keep", "moesys_nocache"]
LABELS = {"dense": "dense", "moesys": "moesys", "moesys_keep": "moesys keep", "moesys_nocache": "moesys cache off"}


class Stack(nn.Module):
    """h = h + layer(h) for each layer; the MoE layers' aux losses are summed."""

    def __init__(self, layers, step):
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.step = step

    def forward(self, x):
        h, extra = x, None
        for m in self.layers:
            out = self.step(m, h)
            y, e = out if isinstance(out, tuple) else (out, None)
            h = h + y
            if e is not None:
                extra = e if extra is None else extra + e
        return (h, extra) if extra is not None else h


def build_stack(kind: str, E: int, T: int, D: int, Fh: int, K: int, L: int):
    workspace.set_enabled(kind != "moesys_nocache")
    workspace.set_keep_scratch(kind == "moesys_keep")
    base = "dense" if kind == "dense" else "moesys"
    layers, step = [], None
    for i in range(L):
        m, step = build(base, E, T, D, Fh, K)  # build() seeds: reseed so the layers differ
        torch.manual_seed(100 + i)
        for p in m.parameters():
            nn.init.normal_(p, std=0.02)
        layers.append(m)
    return Stack(layers, step), (lambda m, x: m(x))


def _stack_worker(kind: str, E: int, shape: tuple, threads: int, conn) -> None:
    torch.set_num_threads(threads)
    T, D, Fh, K, L = shape
    m, step = build_stack(kind, E, T, D, Fh, K, L)
    serve(m, step, T, D, conn)


def steady_peak_mib(kind: str, E: int, args) -> float:
    """Run this script as `--memory-of KIND` in a fresh process (its own allocator state)."""
    cmd = [sys.executable, os.path.abspath(__file__), "--memory-of", kind, "--experts", str(E), "--layers",
           str(args.layers), "--tokens", str(args.tokens), "--hidden", str(args.hidden), "--ffn", str(args.ffn),
           "--top-k", str(args.top_k)]
    # a fixed mmap threshold: every tensor-sized block is mmapped and unmapped when freed, so RSS
    # tracks live memory (glibc's dynamic threshold would keep freed blocks on its heap)
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
    return float(out.stdout.strip().splitlines()[-1])


def status_mib(key: str) -> float:
    """A /proc/self/status figure (VmRSS, VmHWM ...) in MiB."""
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) / 1024
    raise KeyError(key)


def _measure_memory(kind: str, args) -> None:
    m, step = build_stack(kind, args.experts[0], args.tokens, args.hidden, args.ffn, args.top_k, args.layers)
    x = torch.randn(args.tokens, args.hidden, requires_grad=True)
    fwd_bwd(m, step, torch.randn(64, args.hidden, requires_grad=True))  # load code paths and thread pools
    m.zero_grad(set_to_none=True)
    workspace.release()  # the measured steps map their cached buffers anew: they count
    base = status_mib("VmRSS")
    for i in range(3):
        m.zero_grad(set_to_none=True)
        x.grad = None
        if i == 2:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset the peak (VmHWM) to the current RSS
        fwd_bwd(m, step, x)
    print(status_mib("VmHWM") - base)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_shape_args(p)
    p.set_defaults(experts=[64], repeats=5)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--no-memory", action="store_true")
    p.add_argument("--memory-of", choices=KINDS, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.memory_of:
        _measure_memory(args.memory_of, args)
        return
    print(f"{args.layers} residual layers, T={args.tokens} D={args.hidden} F={args.ffn} K={args.top_k} fp32, "
          f"{torch.get_num_threads()} threads, median of {args.repeats} interleaved fwd+bwd\n")
    head = "| E | dense ms | " + " | ".join(f"{LABELS[k]} / dense" for k in KINDS[1:]) + " |"
    if not args.no_memory:
        head += " steady-state peak MiB: " + " / ".join(LABELS[k] for k in KINDS) + " |"
    print(head)
    print("|---" * (head.count("|") - 1) + "|")
    t0 = time.time()
    for E in args.experts:
        t = timing(KINDS, E, args, worker=_stack_worker, extra_shape=(args.layers,))
        row = f"| {E} | {t['dense'] * 1e3:.0f} | " + " | ".join(f"{t['ratio'][k + '/dense']:.3f}" for k in KINDS[1:])
        row += " |"
        if not args.no_memory:
            row += " " + " / ".join(f"{steady_peak_mib(k, E, args):.0f}" for k in KINDS) + " |"
        print(row, flush=True)
    print(f"\n({time.time() - t0:.0f} s)", file=sys.stderr)


if __name__ == "__main__":
    main()
