"""Where the CPU layer loses to the dense FFN: each of the six expert GEMMs against its dense twin,
for three ways of running a grouped GEMM on CPU.

    python benchmarks/grouped_gemm_cpu.py                 # E in 8 16 64, T=4096 D=512 F=1024 K=2
    python benchmarks/grouped_gemm_cpu.py --experts 64 --repeats 9

Counts come from a random router's top-2 (uneven, as in the layer). For each GEMM of the expert
FFN's forward and backward (fwd1 = x@w1, fwd2 = h@w2, dX2, dW2, dX1, dW1) it prints the median
time of `torch._grouped_mm`, a per-expert `torch.mm` loop into fresh outputs, the same loop into
outputs allocated once (its `workspace` hands moesys the same blocks every step), one MKL
`cblas_sgemm_batch` call into outputs allocated once, and a `bmm` over buffers padded to the
largest expert (padding copies included), each divided by
the same GEMM on the dense FFN of width K*F (equal FLOPs, outputs allocated once). fp32. The gap
between the fresh and the reused loop is the page-fault cost of fresh large outputs (the weight
gradients are E/K times the dense layer's). moesys runs the batched call where experts average
at most `cpu_blas.MAX_MEAN_ROWS` rows (fp32, torch with MKL) and the reused loop above that.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from moesys.kernels import cpu_blas
from _shapes import add_shape_args  # benchmarks/ is on sys.path when a script runs


def median_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def methods(counts_E: torch.Tensor):
    """Three grouped-GEMM implementations of y[rows of e] = a[rows of e] @ b[e] (and the dW form)."""
    E = counts_E.shape[0]
    offs = torch.cumsum(counts_E, 0).to(torch.int32)
    starts = [0] + torch.cumsum(counts_E, 0).tolist()
    C = int(counts_E.max())
    rows = torch.arange(int(counts_E.sum()))
    flat = torch.repeat_interleave(torch.arange(E), counts_E) * C + rows - torch.repeat_interleave(
        torch.tensor(starts[:-1]), counts_E)

    def gmm(a, b):
        return torch._grouped_mm(a, b, offs=offs)

    def loop(a, b):
        out = a.new_empty(a.shape[0], b.shape[2])
        for e in range(E):
            torch.mm(a[starts[e]:starts[e + 1]], b[e], out=out[starts[e]:starts[e + 1]])
        return out

    def padded(a, b):
        buf = a.new_zeros(E * C, a.shape[1])
        buf[flat] = a
        return torch.bmm(buf.view(E, C, -1), b).view(E * C, -1)[flat]

    def gmm_w(a, d):
        return torch._grouped_mm(a.t(), d, offs=offs)

    def loop_w(a, d):
        out = a.new_empty(E, a.shape[1], d.shape[1])
        for e in range(E):
            torch.mm(a[starts[e]:starts[e + 1]].t(), d[starts[e]:starts[e + 1]], out=out[e])
        return out

    def padded_w(a, d):
        ba, bd = a.new_zeros(E * C, a.shape[1]), d.new_zeros(E * C, d.shape[1])
        ba[flat], bd[flat] = a, d
        return torch.bmm(ba.view(E, C, -1).transpose(1, 2), bd.view(E, C, -1))

    reused = {}

    def buffer(key, shape, like):  # allocated once, as moesys's workspace hands them out again
        if key not in reused:
            reused[key] = like.new_empty(shape)
        return reused[key]

    def loop_reused(a, b):
        out = buffer(("rows", a.shape, b.shape), (a.shape[0], b.shape[2]), a)
        for e in range(E):
            torch.mm(a[starts[e]:starts[e + 1]], b[e], out=out[starts[e]:starts[e + 1]])
        return out

    def loop_reused_w(a, d):
        out = buffer(("w", a.shape, d.shape), (E, a.shape[1], d.shape[1]), a)
        for e in range(E):
            torch.mm(a[starts[e]:starts[e + 1]].t(), d[starts[e]:starts[e + 1]], out=out[e])
        return out

    counts_list = counts_E.tolist()

    def forced_batch(fn, a, b, out):  # batched at every size (moesys itself batches small GEMMs only)
        limit, cpu_blas.MAX_MEAN_ROWS = cpu_blas.MAX_MEAN_ROWS, float("inf")
        try:
            if not fn(a, b, counts_list, out):
                raise RuntimeError("MKL's batched GEMM is not available in this torch build")
        finally:
            cpu_blas.MAX_MEAN_ROWS = limit
        return out

    def batched_reused(a, b):
        return forced_batch(cpu_blas.mm_rows, a, b, buffer(("rows", a.shape, b.shape), (a.shape[0], b.shape[2]), a))

    def batched_reused_w(a, d):
        return forced_batch(cpu_blas.mm_weight, a, d, buffer(("w", a.shape, d.shape), (E, a.shape[1], d.shape[1]), a))

    out = {"grouped_mm": (gmm, gmm_w), "loop": (loop, loop_w), "loop, reused outputs": (loop_reused, loop_reused_w),
           "padded bmm": (padded, padded_w)}
    if cpu_blas.available():
        out["MKL batched, reused outputs"] = (batched_reused, batched_reused_w)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_shape_args(p)
    args = p.parse_args(argv)
    T, D, Fh, K = args.tokens, args.hidden, args.ffn, args.top_k
    torch.manual_seed(0)
    # the dense twins: width K*F
    xd, hd = torch.randn(T, D), torch.randn(T, K * Fh)
    dyd, dhd = torch.randn(T, D), torch.randn(T, K * Fh)
    W1, W2 = torch.randn(D, K * Fh), torch.randn(K * Fh, D)
    # the dense GEMMs write into outputs allocated once: the ratios are GEMM time only
    o_TF, o_TD, o_W1, o_W2 = torch.empty(T, K * Fh), torch.empty(T, D), torch.empty_like(W1), torch.empty_like(W2)
    dense = {"fwd1": lambda: torch.mm(xd, W1, out=o_TF), "fwd2": lambda: torch.mm(hd, W2, out=o_TD),
             "dX2": lambda: torch.mm(dyd, W2.t(), out=o_TF), "dW2": lambda: torch.mm(hd.t(), dyd, out=o_W2),
             "dX1": lambda: torch.mm(dhd, W1.t(), out=o_TD), "dW1": lambda: torch.mm(xd.t(), dhd, out=o_W1)}
    dense_ms = {k: median_ms(f, args.repeats) for k, f in dense.items()}
    print(f"T={T} D={D} F={Fh} K={K} fp32, {torch.get_num_threads()} threads; time / dense GEMM of equal FLOPs\n")
    print("| E | rows/expert (mean, max) | method | fwd1 | fwd2 | dX2 | dW2 | dX1 | dW1 | all six |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for E in args.experts:
        logits = torch.randn(T, D) @ (torch.randn(D, E) * 0.02)
        counts = torch.bincount(logits.topk(K, dim=1).indices.reshape(-1), minlength=E)
        N = int(counts.sum())
        x, h, dy, dh = torch.randn(N, D), torch.randn(N, Fh), torch.randn(N, D), torch.randn(N, Fh)
        w1, w2 = torch.randn(E, D, Fh), torch.randn(E, Fh, D)
        for name, (rows, weight) in methods(counts).items():
            ops = {"fwd1": lambda: rows(x, w1), "fwd2": lambda: rows(h, w2),
                   "dX2": lambda: rows(dy, w2.transpose(1, 2)), "dW2": lambda: weight(h, dy),
                   "dX1": lambda: rows(dh, w1.transpose(1, 2)), "dW1": lambda: weight(x, dh)}
            ms = {k: median_ms(f, args.repeats) for k, f in ops.items()}
            cells = " | ".join(f"{ms[k] / dense_ms[k]:.2f}" for k in dense)
            total = sum(ms.values()) / sum(dense_ms.values())
            print(f"| {E} | {N // E}, {int(counts.max())} | {name} | {cells} | {total:.2f} |", flush=True)


if __name__ == "__main__":
    main()
