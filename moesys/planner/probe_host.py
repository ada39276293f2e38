"""The cost model's Hardware for "this machine", probed on P gloo ranks (`moesys-plan --cluster this`).

    hw = probe_this_machine(moe_cfg, world=4, tokens_per_rank=256, threads=1)

Every rank measures at once (as in a run, the ranks share the cores), each figure the median of a
few repetitions, then all take the slowest rank's times (all_reduce MAX):
  * collectives in the group: a tiny all-gather ((P-1) ring steps: the per-message latency), a
    tiny all-to-all (latency + (P-1) gaps), a 1 MB all-to-all (bandwidth);
  * overlap: the 1 MB all-to-all started asynchronously while the rank runs GEMMs of about its length;
  * the expert FFN itself (moesys's grouped experts, fwd + bwd, this rank's L experts and F-slice)
    at 16 to 256 rows per expert: a least-squares line t = A + B r gives the GEMM rate
    6 G D F L / B and the rows at which it halves, A / B;
  * the rest of the layer: a MoELayer whose runner returns its rows unchanged, fwd + bwd, at the
    run's tokens per rank (router, plan, permute, unpermute, losses, Python): layer_overhead_s;
  * device memory bandwidth (a copy) and memory (the machine's RAM over P).
The shape of the layer being planned is the probe's shape; no figure of the planned modes or
degrees is measured (those are what the model predicts). Runs in a few seconds.
"""
from __future__ import annotations

import os
import statistics
import time
from typing import Optional

import torch
import torch.distributed as dist

from moesys.config import MoEConfig
from moesys.parallel.cost_network import Hardware, Link
from moesys.parallel.probe import hidden_fraction

EXPERT_ROWS = (16, 32, 64, 128, 256)


class _IdentityRunner:
    """Stands in for the expert-parallel runner: the layer's own work without experts or collectives."""

    last_metrics: dict = {}

    def __call__(self, x_ND, plan, experts):
        return x_ND * 1.0


def _line(xs, ys) -> tuple:
    """Least-squares (intercept, slope) of y = a + b x, with a >= 0 and b > 0 (a noisy probe can
    make a smaller GEMM look slower: then the line goes through the origin and the largest point)."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
    a = my - b * mx
    if b <= 0 or a < 0:
        b, a = max(ys[-1] / xs[-1], 1e-15), 0.0
    return a, b


def _probe_rank(cfg_dict: dict, tokens_per_rank: int, threads: int, reps: int, ep: int) -> dict:
    """One rank's part: every probe once per round, `reps` rounds, medians, then the slowest rank's."""
    from moesys import MoELayer
    from moesys.experts import GroupedExperts
    from moesys.parallel import ParallelDims

    torch.set_num_threads(threads)
    group = ParallelDims.build(ep=ep, timeout_s=120).ep_group  # every ep group measures at once, as in a run
    P = ep
    cfg = MoEConfig(**cfg_dict)
    E, D, F = cfg.num_experts, cfg.hidden_size, cfg.ffn_hidden_size
    L, S = max(1, E // P), max(1, P // E)
    G = 3 if cfg.gated else 2
    torch.manual_seed(dist.get_rank())

    tiny, tiny_out = torch.zeros(P), torch.empty(P)
    one, gathered = torch.zeros(1), torch.empty(P)
    n_big = (1 << 18) // P * P  # 1 MB of fp32
    big, big_out = torch.zeros(n_big), torch.empty(n_big)
    a, b = torch.randn(128, 256), torch.randn(256, 256)
    ecfg = MoEConfig(**{**cfg_dict, "num_experts": L, "ffn_hidden_size": F // S})  # this rank's experts
    experts = GroupedExperts(ecfg)
    layer = MoELayer(cfg)
    layer.set_runner(_IdentityRunner())
    xt = torch.randn(tokens_per_rank, D, requires_grad=True)
    src = torch.randn(1 << 21)
    dst = torch.empty_like(src)

    def expert_step(r):
        x = torch.randn(L * r, D, requires_grad=True)
        counts = torch.full((L,), r, dtype=torch.long)
        return lambda: experts(x, counts).sum().backward()

    def layer_step():
        y, aux = layer(xt)
        (y.square().sum() + aux.loss).backward()

    k = [1]  # GEMMs of about one 1 MB all-to-all's length, set after the first round

    def both():
        work = dist.all_to_all_single(big_out, big, group=group, async_op=True)
        for _ in range(k[0]):
            a @ b
        work.wait()

    def gemms():
        for _ in range(k[0]):
            a @ b

    probes = {
        "allgather": lambda: dist.all_gather_into_tensor(gathered, one, group=group),
        "a2a_tiny": lambda: dist.all_to_all_single(tiny_out, tiny, group=group),
        "a2a_1mb": lambda: dist.all_to_all_single(big_out, big, group=group),
        "gemm": lambda: a @ b,
        "gemms": gemms,
        "both": both,
        "layer": layer_step,
        "copy": lambda: dst.copy_(src),
        **{f"experts_{r}": expert_step(r) for r in EXPERT_ROWS},
    }
    for fn in probes.values():  # warm-up: first-call allocations, connections
        fn()
    layer_step()
    samples = {name: [] for name in probes}
    # rounds, not back-to-back repetitions: a load spike on a shared machine hits every probe alike
    for i in range(reps):
        for name, fn in probes.items():
            t0 = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - t0)
        if i == 0:
            k[0] = max(1, min(256, round(samples["a2a_1mb"][0] / max(samples["gemm"][0], 1e-9))))
    med = {name: statistics.median(v[1:] if len(v) > 2 else v) for name, v in samples.items()}
    t_ag, t_a2a, t_big, t_both, t_layer, t_copy = (med[n] for n in ("allgather", "a2a_tiny", "a2a_1mb", "both",
                                                                     "layer", "copy"))
    t_mm, k = med["gemms"] / k[0], k[0]
    expert_times = [med[f"experts_{r}"] for r in EXPERT_ROWS]

    times = torch.tensor([t_ag, t_a2a, t_big, t_mm * k, t_both, t_layer, t_copy, *expert_times], dtype=torch.float64)
    dist.all_reduce(times, op=dist.ReduceOp.MAX)  # the whole job's slowest rank
    t = times.tolist()
    return {"allgather": t[0], "a2a_tiny": t[1], "a2a_1mb": t[2], "gemms": t[3], "both": t[4], "layer": t[5],
            "copy": t[6], "experts": t[7:], "bytes_1mb": n_big * 4, "copy_bytes": src.numel() * 4 * 2,
            "flops_per_row": 6 * G * D * (F // S) * L}


def hardware_from_probe(m: dict, P: int, threads: int, tokens_per_rank: int, cfg: MoEConfig,
                        world: Optional[int] = None) -> Hardware:
    """Turns the probe's agreed times (P: the ep group's size) into Hardware (pure: tests feed it numbers)."""
    world = P if world is None else world
    latency = m["allgather"] / max(P - 1, 1)
    gap = max(0.0, (m["a2a_tiny"] - latency) / max(P - 1, 1))
    V = m["bytes_1mb"]
    moved = V * (P - 1) / P
    bandwidth = moved / max(m["a2a_1mb"] - m["a2a_tiny"], 0.1 * m["a2a_1mb"], 1e-9)
    A, B = _line([float(r) for r in EXPERT_ROWS], m["experts"])
    B = max(B, 1e-15)
    half_rows = max(0.0, A / B)
    gemm_flops = m["flops_per_row"] / B
    mem_bw = m["copy_bytes"] / max(m["copy"], 1e-9)
    link = Link(bandwidth=bandwidth, latency=latency, gap=gap)
    hw = Hardware(name=f"this machine ({world} gloo rank(s), {threads} thread(s) each)", gpus_per_node=P,
                  intra=link, inter=link, gemm_flops=gemm_flops, gemm_half_rows=half_rows, mem_bandwidth=mem_bw,
                  overlap=hidden_fraction(m["a2a_1mb"], m["gemms"], m["both"]), memory_bytes=_ram_bytes() / world)
    # what the model would add for router and permutes is already inside the measured layer time
    from moesys.parallel.cost_model import Shape, expected_stats, local_seconds

    shape = Shape(world=P, num_experts=cfg.num_experts, hidden=cfg.hidden_size, ffn=cfg.ffn_hidden_size,
                  matrices=3 if cfg.gated else 2, dtype_bytes=4)
    modelled = local_seconds(expected_stats(tokens_per_rank, shape, cfg.top_k), shape, hw, c=0)
    return hw.with_(layer_overhead_s=max(0.0, m["layer"] - modelled),
                    notes=f"probed: {threads} thread(s)/rank, {tokens_per_rank} tokens/rank")


def _ram_bytes() -> float:
    try:
        return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return float("inf")


def probe_this_machine(cfg: MoEConfig, world: int, tokens_per_rank: int, threads: int = 1, reps: int = 9,
                       ep: Optional[int] = None, timeout_s: float = 300.0) -> Hardware:
    """Probe on `world` local gloo ranks (`threads` intra-op threads each) for layers shaped like `cfg`,
    the collectives in ep groups of `ep` ranks (default: the world)."""
    from moesys.parallel import simulate

    ep = world if ep is None else ep
    m = simulate(_probe_rank, world, cfg.to_dict(), tokens_per_rank, threads, reps, ep, timeout_s=timeout_s)[0]
    return hardware_from_probe(m, ep, threads, tokens_per_rank, cfg, world=world)
