"""The sync-free layer path (kernel_backend="grouped_mm") against the default torch path, on CPU:
ATen ops and host reads in one fwd+bwd, and the step time.

    python benchmarks/sync_free.py                       # T=4096, D=512, F=1024, E=8, K=2, fp32
    python benchmarks/sync_free.py --tokens 601 --hidden 16 --ffn 24 --experts 7

Ops: non-view ATen ops seen by a TorchDispatchMode. A custom op counts once: on CUDA its Triton
kernels (1 to 3 launches: kernels/route_place.py, permute_static.py), on CPU a torch body that runs
several ATen kernels the mode does not see. Host
reads: calls of Tensor.item / tolist / __int__ / __bool__ / __float__ / __index__ (on CPU they never
reach the dispatcher as a copy; on CUDA each one waits for the device).
"""
from __future__ import annotations

import argparse
import collections
import statistics
import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from moesys import MoEConfig, MoELayer

HOST_READS = ("item", "tolist", "__int__", "__bool__", "__float__", "__index__")


class _Count(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not func.is_view:
            self.ops[str(func)] += 1
        return func(*args, **(kwargs or {}))


def _step(layer, x, g):
    y, aux = layer(x)
    torch.autograd.backward([y, aux.loss], [g, torch.ones(())])


def count(layer, x, g) -> tuple:
    """(non-view ATen ops, host reads) of one fwd+bwd."""
    reads = collections.Counter()
    saved = {n: getattr(torch.Tensor, n) for n in HOST_READS}

    def spy(name):
        def f(self, *a, **k):
            reads[name] += 1
            return saved[name](self, *a, **k)
        return f

    for n in HOST_READS:
        setattr(torch.Tensor, n, spy(n))
    try:
        with _Count() as c:
            _step(layer, x, g)
    finally:
        for n, f in saved.items():
            setattr(torch.Tensor, n, f)
    return sum(c.ops.values()), sum(reads.values())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--ffn", type=int, default=1024)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=7)
    a = ap.parse_args()
    print(f"T={a.tokens} D={a.hidden} F={a.ffn} E={a.experts} K={a.top_k} fp32, {torch.get_num_threads()} threads")
    print("| backend | capacity | ATen ops fwd+bwd | host reads | step ms (median) |")
    print("|---|---|---|---|---|")
    for cf in (None, 1.25):
        for backend in ("torch", "grouped_mm"):
            torch.manual_seed(0)
            layer = MoELayer(MoEConfig(hidden_size=a.hidden, ffn_hidden_size=a.ffn, num_experts=a.experts,
                                       top_k=a.top_k, capacity_factor=cf, kernel_backend=backend))
            x = torch.randn(a.tokens, a.hidden, requires_grad=True)
            g = torch.randn(a.tokens, a.hidden)
            _step(layer, x, g)  # warm-up
            layer.zero_grad(set_to_none=True)
            x.grad = None
            ops, reads = count(layer, x, g)
            times = []
            for _ in range(a.repeats):
                layer.zero_grad(set_to_none=True)
                x.grad = None
                t0 = time.perf_counter()
                _step(layer, x, g)
                times.append((time.perf_counter() - t0) * 1e3)
            print(f"| {backend} | {cf if cf is not None else 'dropless'} | {ops} | {reads} | "
                  f"{statistics.median(times):.1f} |")


if __name__ == "__main__":
    main()
