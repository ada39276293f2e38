"""MoELayer fwd+bwd on one CUDA GPU against the dense FFN of equal active FLOPs, side by side.

    python benchmarks/layer_gpu.py                      # bf16: Mixtral-like E=8 and DeepSeek-like E=64
    python benchmarks/layer_gpu.py --dtype float32 --rounds 5
    python benchmarks/layer_gpu.py --small --device cpu # CPU smoke test of this script (tiny shapes)

Variants, each timed with CUDA events, interleaved in rounds (a shared machine hits them alike):
  dense         the dense FFN of width K*F (gelu; or swiglu with K*F gate and up widths): the
                same active FLOPs, the limit an MoE layer can reach;
  moesys        MoELayer with the default backend: expert GEMMs through torch._grouped_mm where it
                supports the dtype on this GPU (bf16 on Hopper), else Triton; Triton permute/top-k;
  moesys-persistent  the same layer with kernel_backend="triton_persistent" (our persistent grouped
                GEMM, TMA loads on sm90+; the host-plan path with Triton permute/top-k);
  moesys-triton the same layer with kernel_backend="triton" (the non-persistent Triton grouped GEMM;
                `--kinds` to include it).
Ratios are medians over rounds of the per-round ratio to dense. Peak memory is the growth of
torch.cuda.max_memory_allocated over the set-up state during one fwd+bwd (activations + grads).

Fixed overhead (CUDA only, `--graph-tokens`, default T=256 at the issue-2 width D=512 E=64 K=2): the
sync-free layer (kernel_backend="grouped_mm") and the dense FFN, each fwd+bwd eager and replayed
from a CUDA graph (torch.cuda.graph, captured after a warm-up); the layer's overhead is its time
minus the dense FFN's, at a T where the GEMMs cost almost nothing. Target (issue 13): < 0.3 ms replayed.
Exit status 2 without a CUDA device unless --device cpu is given.
"""
from __future__ import annotations

import argparse
import statistics
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F

from _shapes import timed  # benchmarks/ is on sys.path when a script runs
from layer import fwd_bwd

SHAPES = [  # (name, E, K, T, D, F, activation)
    ("mixtral-like", 8, 2, 8192, 4096, 14336, "swiglu"),
    ("deepseek-like", 64, 6, 8192, 2048, 1408, "swiglu"),
    ("issue-2 shape", 64, 2, 4096, 512, 1024, "gelu"),
]
SMALL = [("small", 7, 2, 601, 64, 96, "swiglu"), ("small-gelu", 7, 2, 601, 64, 96, "gelu")]


class DenseFFN(nn.Module):
    def __init__(self, D: int, Fw: int, activation: str, dtype, device):
        super().__init__()
        kw = dict(dtype=dtype, device=device)
        self.activation = activation
        self.w1 = nn.Parameter(torch.randn(D, Fw, **kw) * 0.02)
        self.w2 = nn.Parameter(torch.randn(Fw, D, **kw) * 0.02)
        self.w3 = nn.Parameter(torch.randn(D, Fw, **kw) * 0.02) if activation == "swiglu" else None

    def forward(self, x):
        if self.w3 is not None:
            return (F.silu(x @ self.w1) * (x @ self.w3)) @ self.w2
        return F.gelu(x @ self.w1) @ self.w2


def build(kind, E, K, D, Fh, act, dtype, device):
    torch.manual_seed(0)
    if kind == "dense":
        m = DenseFFN(D, K * Fh, act, dtype, device)
        return m, (lambda m, x: m(x))
    from moesys import MoEConfig, MoELayer

    backend = {"moesys-triton": "triton", "moesys-persistent": "triton_persistent"}.get(kind, "auto")
    m = MoELayer(MoEConfig(hidden_size=D, ffn_hidden_size=Fh, num_experts=E, top_k=K, activation=act,
                           kernel_backend=backend)).to(device=device, dtype=dtype)

    def step(m, x):
        y, aux = m(x)
        return y, aux.loss
    return m, step


def run_shape(shape, args, dtype, device) -> None:
    name, E, K, T, D, Fh, act = shape
    kinds = args.kinds if device.type == "cuda" else ["dense", "moesys"]
    models = {k: build(k, E, K, D, Fh, act, dtype, device) for k in kinds}
    x = torch.randn(T, D, dtype=dtype, device=device, requires_grad=True)

    def one(k):
        m, step = models[k]
        m.zero_grad(set_to_none=True)
        x.grad = None
        fwd_bwd(m, step, x)

    mem = {}
    for k in kinds:  # warm-up (Triton compiles and autotunes, cuBLAS picks algorithms), then peak memory
        for _ in range(args.warmup):
            one(k)
        if device.type == "cuda":
            models[k][0].zero_grad(set_to_none=True)
            x.grad = None
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            one(k)
            torch.cuda.synchronize()
            mem[k] = (torch.cuda.max_memory_allocated() - base) / 2**20
    times = {k: [] for k in kinds}
    ratios = {k: [] for k in kinds}
    for _ in range(args.rounds):
        r = {k: statistics.median(timed(lambda: one(k), device) for _ in range(args.steps)) for k in kinds}
        for k in kinds:
            times[k].append(r[k])
            ratios[k].append(r[k] / r["dense"])
    flops = (3 if act == "swiglu" else 2) * 2 * T * K * D * Fh * 3  # fwd + 2x bwd
    print(f"\n== {name}: E={E} K={K} T={T} D={D} F={Fh} {act} {str(dtype).replace('torch.', '')} on {device} ==")
    print(f"{'variant':<14}{'ms':>9}{'/ dense':>9}{'TFLOP/s':>9}{'peak MiB':>10}")
    for k in kinds:
        ms = statistics.median(times[k]) * 1e3
        peak = f"{mem[k]:10.0f}" if k in mem else f"{'-':>10}"
        print(f"{k:<14}{ms:9.2f}{statistics.median(ratios[k]):9.3f}{flops / (ms / 1e3) / 1e12:9.1f}{peak}")
    extra = sum(p.numel() for p in models["moesys"][0].parameters()) - sum(
        p.numel() for p in models["dense"][0].parameters())
    print(f"(extra parameters of the MoE layer over the dense one: {extra * dtype.itemsize / 2**20:.0f} MiB; "
          f"rounds={args.rounds} steps/round={args.steps})")
    del models, x
    if device.type == "cuda":
        torch.cuda.empty_cache()


def graph_overhead(T: int, dtype, device, iters: int = 50) -> None:
    """Eager vs CUDA-graph replay of one fwd+bwd at T tokens: the sync-free layer and the dense FFN."""
    from moesys import MoEConfig, MoELayer

    E, K, D, Fh, act = 64, 2, 512, 1024, "gelu"
    torch.manual_seed(0)
    layer = MoELayer(MoEConfig(hidden_size=D, ffn_hidden_size=Fh, num_experts=E, top_k=K, activation=act,
                               kernel_backend="grouped_mm")).to(device=device, dtype=dtype)
    dense = DenseFFN(D, K * Fh, act, dtype, device)
    x = torch.randn(T, D, dtype=dtype, device=device, requires_grad=True)
    dy = torch.randn(T, D, dtype=dtype, device=device)

    def layer_step():
        y, aux = layer(x)
        torch.autograd.backward([y, aux.loss], [dy, torch.ones_like(aux.loss)])

    def dense_step():
        dense(x).backward(dy)

    def ms(fn) -> float:
        fn()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / iters

    rows = {}
    for name, m, fn in (("dense", dense, dense_step), ("moesys grouped_mm", layer, layer_step)):
        eager = ms(fn)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                fn()
        torch.cuda.current_stream().wait_stream(side)
        m.zero_grad(set_to_none=True)
        x.grad = None
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):  # grads (accumulated by replays into graph-owned buffers) included
            fn()
        rows[name] = (eager, ms(graph.replay))
    print(f"\n== fixed overhead: E={E} K={K} T={T} D={D} F={Fh} {act} {str(dtype).replace('torch.', '')}, "
          f"fwd+bwd ms (eager / CUDA-graph replay) ==")
    for name, (eager, replay) in rows.items():
        print(f"{name:<20}{eager:9.3f}{replay:9.3f}")
    over_e = rows["moesys grouped_mm"][0] - rows["dense"][0]
    over_r = rows["moesys grouped_mm"][1] - rows["dense"][1]
    print(f"overhead over dense: eager {over_e:.3f} ms, replay {over_r:.3f} ms (target < 0.3 ms replayed)")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--device", default="cuda")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=5, help="timed steps per variant and round (median)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--small", action="store_true", help="tiny shapes (smoke test)")
    p.add_argument("--only", nargs="*", help="names of the shapes to run (default: all)")
    p.add_argument("--kinds", nargs="+", default=["dense", "moesys", "moesys-persistent"],
                   choices=["dense", "moesys", "moesys-persistent", "moesys-triton"],
                   help="variants on CUDA (dense first: ratios are to it); CPU runs dense and moesys")
    p.add_argument("--graph-tokens", type=int, default=256,
                   help="T of the fixed-overhead measurement with CUDA-graph replay (CUDA only; 0: skip)")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("benchmarks/layer_gpu.py: no CUDA device found; pass --device cpu for a smoke test.", file=sys.stderr)
        return 2
    dtype = getattr(torch, args.dtype)
    shapes = SMALL if args.small else SHAPES
    if args.only:
        shapes = [s for s in shapes if s[0] in args.only]
    label = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(f"torch {torch.__version__} on {label}")
    for shape in shapes:
        run_shape(shape, args, dtype, device)
    if args.graph_tokens and device.type == "cuda":
        if dtype == torch.bfloat16:
            graph_overhead(args.graph_tokens, dtype, device)
        else:  # the sync-free layer's torch._grouped_mm runs bf16 on CUDA
            print("\n(fixed overhead with CUDA-graph replay: measured in bf16 only)")
    elif args.graph_tokens:
        print("\n(fixed overhead with CUDA-graph replay: needs CUDA, skipped on this device)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
