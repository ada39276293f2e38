"""Tutel's published results (arXiv 2206.03382) against the cost model with the A100 preset.

    python benchmarks/plan_tutel.py                    # a few seconds, no GPU: it is the model
    python benchmarks/plan_tutel.py --cluster h100_dgx

Prints four tables the README copies:
  1. flat vs 2-D hierarchical all-to-all (the collectives alone, as Tutel's figure compares them):
     time ratio flat / 2-D by GPU count and bytes per GPU, and the largest size at which 2-D wins;
  2. one MoE layer (Tutel's scaling setting, as we recall its helloworld example: 2 experts and
     8,192 tokens per GPU, D = F = 2048, top-2; bf16) from 16 to 2,048 GPUs: static flat all-to-all
     without overlap, the best overlap degree, moesys's 2-D dispatcher (`hierarchical`: its plan
     sends the counts through the same two stages) and the padded 2-D one (`hierarchical_padded`,
     Tutel's: fixed capacity, no counts exchange), and the best of everything, with the gains;
  3. adaptive pipelining: the best degree's gain over c = 1 across scales, shapes and tokens per GPU;
  4. adaptive parallelism switching: best ep (padded, capacity factor f) over best sharded_dp.
The layer's host overhead (moesys's ~5 ms, preset field layer_overhead_ms) is left out of tables
2-4 (--host-overhead keeps it): Tutel's figures are its own runtime's, without moesys's overhead.
"""
from __future__ import annotations

import argparse
import math

from moesys.parallel.cost_model import DEGREES, Shape, expected_stats, layer_time
from moesys.parallel.cost_network import alltoall_2d, alltoall_flat
from moesys.planner.hardware import load_hardware

GPUS = (16, 32, 64, 128, 256, 512, 1024, 2048)
SIZES_MB = (0.0625, 0.25, 1, 4, 16, 64, 256, 1024)


def a2a_table(hw) -> None:
    print("\n1. all-to-all: flat time / 2-D time (> 1: 2-D faster), by GPUs and MB each GPU sends")
    print("| GPUs | " + " | ".join(f"{s:g} MB" for s in SIZES_MB) + " | 2-D wins up to |")
    print("|---|" + "---|" * (len(SIZES_MB) + 1))
    for P in GPUS:
        ratios = [alltoall_flat(s * 1e6, P, hw) / alltoall_2d(s * 1e6, P, hw) for s in SIZES_MB]
        wins = [s for s, r in zip(SIZES_MB, ratios) if r > 1]
        print(f"| {P} | " + " | ".join(f"{r:.2f}" for r in ratios) + f" | {f'{max(wins):g} MB' if wins else '-'} |")


def layer(hw, P: int, tokens: int, k: float, experts_per_gpu: float = 2, D: int = 2048, F: int = 2048,
          capacity_factor=None, dispatchers=("alltoallv", "hierarchical", "hierarchical_padded", "padded")) -> dict:
    """(mode, dispatcher, degree) -> Breakdown for one layer of Tutel's scaling setting."""
    E = max(1, int(experts_per_gpu * P))
    shape = Shape(world=P, num_experts=E, hidden=D, ffn=F, matrices=2, dtype_bytes=2)
    stats = expected_stats(tokens, shape, k, skew=1.0, capacity_factor=capacity_factor)
    cap = None if capacity_factor is None else max(4, math.ceil(capacity_factor * k * tokens / E))
    return {(m, d, c): layer_time(m, d, c, stats, shape, hw, capacity=cap)
            for m in ("ep", "sharded_dp") for d in (dispatchers if m == "ep" else ("alltoallv",)) for c in DEGREES}


def _best(t: dict, mode=None, dispatcher=None):
    return min((b for (m, d, _), b in t.items() if mode in (None, m) and dispatcher in (None, d)),
               key=lambda b: b.total)


def layer_table(hw) -> None:
    print("\n2. one MoE layer (2 experts and 8,192 tokens per GPU, D = F = 2048, top-2, bf16, dropless), fwd+bwd ms")
    print("| GPUs | static flat c=1 | flat, best c | 2-D c=1 (hierarchical) | of which the 2-D counts exchange | "
          "padded 2-D c=1 (hierarchical_padded, Tutel's) | best (runtime) | gain of 2-D | gain of padded 2-D | "
          "total gain |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for P in GPUS:
        t = layer(hw, P, 8192, 2)
        base = t[("ep", "alltoallv", 1)].total
        flat = _best(t, "ep", "alltoallv")
        h1 = t[("ep", "hierarchical", 1)]
        hp = t[("ep", "hierarchical_padded", 1)]  # capacity: the dropless estimate (padded_capacity)
        best = _best(t)
        name = f"{best.mode}{'/' + best.dispatcher if best.mode == 'ep' else ''} c={best.degree}"
        print(f"| {P} | {base * 1e3:.2f} | {flat.total * 1e3:.2f} (c={flat.degree}) | {h1.total * 1e3:.2f} | "
              f"{h1.plan * 1e3:.2f} | {hp.total * 1e3:.2f} | {best.total * 1e3:.2f} ({name}) | {base / h1.total:.2f}x | "
              f"{base / hp.total:.2f}x | {base / best.total:.2f}x |")


PIPE_SHAPES = ((2048, 2048), (4096, 16384))
PIPE_TOKENS = (1024, 4096, 16384, 65536)


def pipelining_table(hw) -> None:
    print("\n3. adaptive pipelining: best degree's time / c=1's, ep with flat all-to-all-v, 2 experts per GPU")
    print("| GPUs | D, F | " + " | ".join(f"{t} tokens/GPU" for t in PIPE_TOKENS) + " |")
    print("|---|---|" + "---|" * len(PIPE_TOKENS))
    top = (0.0, None)
    for P in (8, 16, 64, 256, 2048):
        for D, F in PIPE_SHAPES:
            cells = []
            for T in PIPE_TOKENS:
                t = layer(hw, P, T, 2, D=D, F=F, dispatchers=("alltoallv",))
                c1, best = t[("ep", "alltoallv", 1)].total, _best(t, "ep", "alltoallv")
                gain = c1 / best.total
                cells.append(f"{gain:.2f}x (c={best.degree})")
                top = max(top, (gain, (P, D, F, T)), key=lambda x: x[0])
            print(f"| {P} | {D}, {F} | " + " | ".join(cells) + " |")
    print(f"largest predicted gain: {top[0]:.2f}x at {top[1][0]} GPUs, D={top[1][1]}, F={top[1][2]}, "
          f"{top[1][3]} tokens/GPU")


def switching_table(hw) -> None:
    print("\n4. adaptive parallelism: best ep (padded, as Tutel: C = f k T / E) / best sharded_dp; > 1: switching pays")
    print("   (8,192 tokens per GPU, top-2, D = F = 2048; f: capacity factor)")
    fs = (1, 2, 4, 8, 16)
    print("| GPUs | experts per GPU | " + " | ".join(f"f={f}" for f in fs) + " |")
    print("|---|---|" + "---|" * len(fs))
    for P in (16, 64, 256, 2048):
        for epg in (1, 2):
            cells = []
            for f in fs:
                t = layer(hw, P, 8192, 2, experts_per_gpu=epg, capacity_factor=f, dispatchers=("padded",))
                cells.append(f"{_best(t, 'ep').total / _best(t, 'sharded_dp').total:.2f}")
            print(f"| {P} | {epg} | " + " | ".join(cells) + " |")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cluster", default="a100_dgx")
    ap.add_argument("--host-overhead", action="store_true", help="keep the preset's per-layer host overhead")
    a = ap.parse_args(argv)
    hw = load_hardware(a.cluster, "bf16")
    if not a.host_overhead:
        hw = hw.with_(layer_overhead_s=0.0, chunk_overhead_s=0.0)
    print(f"cluster: {hw.name}; host overhead per layer {hw.layer_overhead_s * 1e3:g} ms, per chunk "
          f"{hw.chunk_overhead_s * 1e3:g} ms")
    a2a_table(hw)
    layer_table(hw)
    pipelining_table(hw)
    switching_table(hw)


if __name__ == "__main__":
    main()
