"""Grouped GEMM fwd+bwd: our Triton kernels (persistent and not) vs dense matmul of equal FLOPs, a
per-expert loop and torch._grouped_mm, for balanced and Zipf-skewed expert loads. bf16 on one GPU.

    python benchmarks/kernels.py                 # one CUDA GPU: E=8 (D=4096, F=14336) and E=64 (D=2048, F=1408), T=16384
    python benchmarks/kernels.py --iters 20      # more timed repeats per cell
    python benchmarks/kernels.py --small         # CPU smoke test: tiny shapes, Triton under TRITON_INTERPRET=1

Legend: T routed rows (tokens x top-k), D input width, F output width, E experts.
One fwd+bwd = y = x@w[e], dx = dy@w[e]^T, dw[e] = x_e^T@dy_e: 3 * 2*T*D*F FLOPs, the same as a
dense [T, D] @ [D, F] matmul with its two backward matmuls, which is the limit a grouped GEMM can
reach ("dense" column). Ratios are measured against that dense run in the same process, side by
side. "persistent" is kernel_backend="triton_persistent" (one program per SM over every expert's
tiles, TMA loads on sm90+); "auto picks" is what `auto` chose for the shape bucket when measured
(kernels/gemm_select.py). Targets of issue 13 on an H200, persistent/dense: >= 0.90x at E=8
balanced, >= 0.80x Zipf-skewed, >= 0.80x at E=64 fine-grained.
Exit status 2 (and a one-line message) when there is no CUDA device and --small is not given.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys

SHAPES = [  # (E, T, D, F)
    (8, 16384, 4096, 14336),   # Mixtral-8x7B-like expert FFN
    (64, 16384, 2048, 1408),   # DeepSeek-MoE-like fine-grained experts
]
SMALL_SHAPES = [(4, 96, 40, 48), (7, 130, 36, 20)]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--small", action="store_true", help="tiny shapes on CPU with TRITON_INTERPRET=1 (smoke test)")
    p.add_argument("--iters", type=int, default=10, help="timed repeats per cell (median reported)")
    p.add_argument("--zipf", type=float, default=1.0, help="Zipf exponent of the skewed load")
    return p.parse_args(argv)


ARGS = parse_args()
# TRITON_INTERPRET is read when the kernels are decorated (on import): set it before any import
if ARGS.small:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

if not ARGS.small and not torch.cuda.is_available():
    print("benchmarks/kernels.py: no CUDA device found; this benchmark measures GPU kernels. "
          "Run it on a GPU, or pass --small for a CPU smoke test under TRITON_INTERPRET=1.", file=sys.stderr)
    sys.exit(2)

from moesys.kernels import gemm_select, grouped_gemm, grouped_gemm_reference  # noqa: E402
from moesys.kernels.backend import grouped_mm_supported  # noqa: E402
from _shapes import timed  # noqa: E402  (benchmarks/ is on sys.path when a script runs)


def loads(E: int, T: int, zipf: float) -> dict:
    """Rows per expert summing to T: balanced, and Zipf (expert i gets a share prop. to 1/(i+1)^s)."""
    balanced = [T // E + (1 if i < T % E else 0) for i in range(E)]
    share = torch.tensor([1.0 / (i + 1) ** zipf for i in range(E)], dtype=torch.float64)
    skewed = torch.floor(share / share.sum() * T).long()
    skewed[0] += T - int(skewed.sum())  # rounding leftovers to the hottest expert
    return {"balanced": balanced, f"zipf{zipf:g}": skewed.tolist()}


def timer(device: torch.device):
    def run(fn, iters: int) -> float:
        fn()  # warm-up: Triton compiles and autotunes here, cuBLAS picks its algorithm
        fn()
        return statistics.median(timed(fn, device) for _ in range(iters))
    return run


def fwd_bwd(fn, x, w, dy):
    """One autograd fwd+bwd of fn(x, w) with the given output grad."""
    def step():
        x.grad = w.grad = None
        fn(x, w).backward(dy)
    return step


def grouped_mm_step(x, w, dy, counts_E):
    # torch._grouped_mm has no autograd formula we rely on here: call the three GEMMs ourselves
    offs = torch.cumsum(counts_E, 0).to(torch.int32)
    wt = w.detach().transpose(1, 2)
    xd = x.detach()

    def step():
        torch._grouped_mm(xd, w.detach(), offs=offs)
        torch._grouped_mm(dy, wt, offs=offs)
        torch._grouped_mm(xd.t(), dy, offs=offs)
    return step


def bench_cell(E, T, D, F, counts, device, dtype, run, iters):
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(T, D, generator=g).to(device, dtype).requires_grad_()
    w = (torch.randn(E, D, F, generator=g) / D**0.5).to(device, dtype).requires_grad_()
    w_dense = w[0].detach().clone().requires_grad_()
    dy = torch.randn(T, F, generator=g).to(device, dtype)
    counts_E = torch.tensor(counts, device=device)
    flops = 3 * 2 * T * D * F
    row = {}
    row["dense"] = run(fwd_bwd(lambda a, b: a @ b, x, w_dense, dy), iters)
    row["persistent"] = run(fwd_bwd(lambda a, b: grouped_gemm(a, b, counts_E, backend="triton_persistent"), x, w, dy),
                            iters)
    row["triton"] = run(fwd_bwd(lambda a, b: grouped_gemm(a, b, counts_E, backend="triton"), x, w, dy), iters)
    row["loop"] = run(fwd_bwd(lambda a, b: grouped_gemm_reference(a, b, counts_E), x, w, dy), iters)
    try:
        row["_grouped_mm"] = run(grouped_mm_step(x, w, dy, counts_E), iters)
    except RuntimeError as err:  # needs sm90+ and bf16 on CUDA; report why instead of a number
        row["_grouped_mm"] = f"n/a: {str(err).splitlines()[0][:60]}"
    # the numbers mean nothing if a kernel is wrong: check both forwards against the loop
    with torch.no_grad():
        ref = grouped_gemm_reference(x, w, counts_E).float()
        rel_err = max(
            ((grouped_gemm(x, w, counts_E, backend=b).float() - ref).abs().max() / ref.abs().max().clamp_min(1e-12)).item()
            for b in ("triton", "triton_persistent"))
        auto = "-"
        if device.type == "cuda" and grouped_mm_supported(device, dtype):
            auto = gemm_select.choose(x, w, torch.cumsum(counts_E, 0, dtype=torch.int32))
    tf = {k: (flops / v / 1e12 if isinstance(v, float) else v) for k, v in row.items()}
    return tf, rel_err, auto


def main() -> int:
    device = torch.device("cuda" if torch.cuda.is_available() and not ARGS.small else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    run = timer(device)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU (TRITON_INTERPRET=1: timings meaningless)"
    import triton
    print(f"# grouped GEMM fwd+bwd, {dtype}, {name}, torch {torch.__version__}, triton {triton.__version__}\n")
    cols = ["dense", "persistent", "triton", "loop", "_grouped_mm"]
    ratios = ["persistent", "triton", "loop", "_grouped_mm"]
    print("| E | T | D | F | load | max/min rows | " + " | ".join(f"{c} TFLOP/s" for c in cols)
          + " | " + " | ".join(f"{c}/dense" for c in ratios) + " | auto picks | fwd rel err (max of ours) |")
    print("|" + "---|" * (6 + len(cols) + len(ratios) + 2))
    for E, T, D, F in (SMALL_SHAPES if ARGS.small else SHAPES):
        for load, counts in loads(E, T, ARGS.zipf).items():
            tf, err, auto = bench_cell(E, T, D, F, counts, device, dtype, run, ARGS.iters)
            fmt = lambda v: f"{v:.3g}" if isinstance(v, float) else v  # noqa: E731
            ratio = lambda k: f"{tf[k] / tf['dense']:.2f}x" if isinstance(tf[k], float) else "n/a"  # noqa: E731
            spread = f"{max(counts)}/{min(counts)}"
            print(f"| {E} | {T} | {D} | {F} | {load} | {spread} | " + " | ".join(fmt(tf[c]) for c in cols)
                  + " | " + " | ".join(ratio(c) for c in ratios) + f" | {auto} | {err:.1e} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
