"""The cost model's Hardware for "this machine", probed on P gloo ranks (`moesys-plan --cluster this`).

    hw = probe_this_machine(moe_cfg, world=4, tokens_per_rank=256, threads=1)

Every rank measures at once (as in a run, the ranks share the cores), each figure the median of
repetitions (collectives in rounds, after a barrier; local work one shape at a time, after two
untimed calls, as the mean call of blocks of >= 30 ms that all ranks start together: with more
ranks than cores a short call timed alone often has a core to itself, a step never does),
then all take the slowest rank's times (all_reduce MAX):
  * collectives in the group: a tiny all-gather ((P-1) ring steps: the per-message latency), a
    tiny all-to-all (latency + (P-1) gaps), a 1 MB all-to-all (bandwidth); a 1 MB all-gather and
    reduce-scatter (their times over the ring the link predicts: `allgather_factor`,
    `reduce_scatter_factor`; what sharded_dp's weights and their gradients move);
  * overlap: the 1 MB all-to-all started asynchronously while the rank runs GEMMs of about its length
    (the fraction of the shorter hidden, per round; the median);
  * the expert FFN itself (moesys's grouped experts, fwd + bwd): this rank's L experts (F/S each) at
    16, 64 and 256 rows per expert in one call (the slope: the GEMM rate 6 G D F L / slope), and the
    256 rows in 8 calls of 32 (ep's row chunks); all E experts on the rank's own rows in 1 and in 8
    F-chunks (sharded_dp's chunks). An extra call's cost in each gives `chunk_overhead_s` and the
    per-expert `expert_overhead_s` (a CPU dispatches every expert's GEMMs; gemm_half_rows stays 0);
  * the rest of the layer: a MoELayer whose runner returns its rows unchanged, fwd + bwd, at the
    run's tokens per rank (router, plan, permute, unpermute, losses, Python): layer_overhead_s;
  * device memory bandwidth (a copy) and memory (the machine's RAM over P).
The shape of the layer being planned is the probe's shape; no figure of the planned modes or
degrees is measured (those are what the model predicts). Runs in a few seconds.
"""
from __future__ import annotations

import math
import os
import statistics
import time
from typing import Optional

import torch
import torch.distributed as dist

from moesys import LocalRunner, MoELayer
from moesys.moe.config import MoEConfig
from moesys.moe.experts import GroupedExperts
from moesys.parallel import ParallelDims, simulate
from moesys.parallel.cost_model import Shape, expected_stats, local_seconds
from moesys.parallel.cost_network import Hardware, Link, allgather_ring
from moesys.parallel.probe import hidden_fraction
from moesys.parallel.sharded_dp import f_chunks  # the F-chunks sharded_dp computes in

EXPERT_ROWS = (16, 64, 256)
BLOCK_S = 0.03  # a timed block of local work lasts at least this (many scheduler slices)


class _IdentityRunner(LocalRunner):
    """Stands in for the expert-parallel runner: the layer's own work without experts or collectives."""

    local = False  # the layer's host-plan path, as under expert parallelism

    def __call__(self, x_ND, plan, experts, weights, shared=None):
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
    """One rank's part: medians of `reps` timings (collectives: 3 x reps, in rounds), then the slowest rank's."""

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
    shard = torch.zeros(n_big // P)  # all-gather in / reduce-scatter out: 1 MB over the group
    a, b = torch.randn(128, 256), torch.randn(256, 256)
    experts = GroupedExperts(MoEConfig(**{**cfg_dict, "num_experts": L, "ffn_hidden_size": F // S}))  # this rank's
    all_experts = GroupedExperts(cfg)  # what sharded_dp computes with (gathered weights)
    r_sdp = max(1, round(tokens_per_rank * cfg.top_k / E))
    x_sdp = torch.randn(E * r_sdp, D, requires_grad=True)
    counts_sdp = torch.full((E,), r_sdp, dtype=torch.long)
    layer = MoELayer(cfg)
    layer.set_runner(_IdentityRunner())
    xt = torch.randn(tokens_per_rank, D, requires_grad=True)
    src = torch.randn(1 << 21)
    dst = torch.empty_like(src)

    def ep_calls(r: int, calls: int):
        """`calls` expert calls of this rank's L experts, r // calls rows each, one backward (ep chunks)."""
        xs = [torch.randn(L * (r // calls), D, requires_grad=True) for _ in range(calls)]
        counts = torch.full((L,), r // calls, dtype=torch.long)
        return lambda: sum(experts(x, counts).sum() for x in xs).backward()

    def sdp_calls(calls: int):
        """All E experts (full F) on this rank's own rows, in `calls` F-chunks (sharded_dp's chunks)."""
        spans = f_chunks(F, calls)
        ws = [all_experts.w1, all_experts.w2, all_experts.w3]
        return lambda: sum(all_experts.compute(x_sdp, counts_sdp, ws[0][:, :, f], ws[1][:, f, :],
                                               None if ws[2] is None else ws[2][:, :, f]).sum()
                           for f in spans).backward()

    def layer_step():
        y, aux = layer(xt)
        (y.square().sum() + aux.loss).backward()

    def timed(fn, sync: bool = False) -> float:
        if sync:  # collectives start together: else the first one absorbs the ranks' skew
            dist.barrier(group=group)
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0

    # 1. collectives and overlap, in rounds (a load spike on a shared machine hits each alike)
    collectives = {"allgather": lambda: dist.all_gather_into_tensor(gathered, one, group=group),
                   "a2a_tiny": lambda: dist.all_to_all_single(tiny_out, tiny, group=group),
                   "a2a_1mb": lambda: dist.all_to_all_single(big_out, big, group=group),
                   "ag_1mb": lambda: dist.all_gather_into_tensor(big_out, shard, group=group),
                   "rs_1mb": lambda: dist.reduce_scatter_tensor(shard, big, group=group)}
    for fn in collectives.values():
        fn()  # connections
    t_mm = statistics.median(timed(lambda: a @ b) for _ in range(9))
    k = max(1, min(256, round(timed(collectives["a2a_1mb"], True) / max(t_mm, 1e-9))))

    def gemms():
        for _ in range(k):
            a @ b

    def both():
        work = dist.all_to_all_single(big_out, big, group=group, async_op=True)
        gemms()
        work.wait()

    samples = {name: [] for name in collectives}
    hidden = []
    for _ in range(3 * reps):
        for name, fn in collectives.items():
            samples[name].append(timed(fn, True))
        t_c, t_g, t_b = timed(collectives["a2a_1mb"], True), timed(gemms), timed(both, True)
        hidden.append(hidden_fraction(t_c, t_g, t_b))

    def block(fn) -> float:
        """Seconds a call, as the mean of a block of calls that all ranks start together (a barrier)
        and that lasts at least BLOCK_S. In a step every rank computes at once and then meets the
        others in a collective: with more ranks than cores they share the cores for the whole
        phase. A single call of a few milliseconds often runs inside one scheduler slice with a core
        to itself, so the median of single calls is optimistic there; a block spans many slices."""
        dist.barrier(group=group)
        n, t0 = 0, time.perf_counter()
        while True:
            fn()
            n += 1
            t = time.perf_counter() - t0
            if n >= 2 and t >= BLOCK_S:
                return t / n

    # 2. local work, one shape at a time, in blocks (2 untimed calls first: the CPU buffer cache then
    #    holds the shape's blocks, as in a run that repeats its shapes every step)
    blocks = max(3, reps // 3)
    local = {"layer": layer_step, "copy": lambda: dst.copy_(src), **{f"ep_{r}": ep_calls(r, 1) for r in EXPERT_ROWS}}
    for name, fn in local.items():
        fn()
        fn()
        samples[name] = [block(fn) for _ in range(blocks)]
    # 1 call vs 8 calls on the same rows, alternated: the median of the pairs' differences is what
    # one more call costs (a difference of two separately noisy figures is noisier)
    extra = {}
    for one_name, one, many_name, many in (("ep_1", ep_calls(EXPERT_ROWS[-1], 1), "ep_x8", ep_calls(EXPERT_ROWS[-1], 8)),
                                           ("sdp_1", sdp_calls(1), "sdp_x8", sdp_calls(8))):
        for fn in (one, many, one, many):
            fn()
        pairs = [(block(one), block(many)) for _ in range(blocks)]
        samples[one_name] = [a for a, _ in pairs]
        extra[many_name] = (one_name, statistics.median(b - a for a, b in pairs))
    names = ["allgather", "a2a_tiny", "a2a_1mb", "layer", "copy", *(f"ep_{r}" for r in EXPERT_ROWS), "ep_1", "ep_x8",
             "sdp_1", "sdp_x8", "ag_1mb", "rs_1mb"]
    out = {}
    for stat, fn in (("median", statistics.median), ("min", min)):
        figure = {name: fn(v) for name, v in samples.items()}
        figure.update({many: figure[one] + d for many, (one, d) in extra.items()})
        times = torch.tensor([figure[n] for n in names] + [-statistics.median(hidden)], dtype=torch.float64)
        dist.all_reduce(times, op=dist.ReduceOp.MAX)  # the whole job's slowest rank (and its least overlap)
        t = dict(zip(names + ["overlap"], times.tolist()))
        out[stat] = {"allgather": t["allgather"], "a2a_tiny": t["a2a_tiny"], "a2a_1mb": t["a2a_1mb"],
                     "overlap": -t["overlap"], "layer": t["layer"], "copy": t["copy"],
                     "experts": [t[n] for n in names[5:-2]], "ag_1mb": t["ag_1mb"], "rs_1mb": t["rs_1mb"],
                     "bytes_1mb": n_big * 4, "copy_bytes": src.numel() * 4 * 2,
                     "flops_per_row": 6 * G * D * (F // S) * L, "local_experts": L}
    return out


def hardware_from_probe(m: dict, P: int, threads: int, tokens_per_rank: int, cfg: MoEConfig,
                        world: Optional[int] = None) -> Hardware:
    """Turns the probe's agreed times (P: the ep group's size) into Hardware (pure: tests feed it numbers)."""
    world = P if world is None else world
    latency = m["allgather"] / max(P - 1, 1)
    gap = max(0.0, (m["a2a_tiny"] - latency) / max(P - 1, 1))
    V = m["bytes_1mb"]
    moved = V * (P - 1) / P
    bandwidth = moved / max(m["a2a_1mb"] - m["a2a_tiny"], 0.1 * m["a2a_1mb"], 1e-9)
    n = len(EXPERT_ROWS)
    _, B = _line([float(r) for r in EXPERT_ROWS], m["experts"][:n])  # seconds per row per expert call
    ep_1, ep_x8, sdp_1, sdp_x8 = m["experts"][n:n + 4]
    gemm_flops = m["flops_per_row"] / B
    # fixed cost of one more expert call: 8 calls vs 1 on the same rows (ep: row chunks; sharded_dp: F-chunks)
    per_call_ep, per_call_sdp = max(0.0, (ep_x8 - ep_1) / 7), max(0.0, (sdp_x8 - sdp_1) / 7)
    L, E = m["local_experts"], cfg.num_experts
    per_expert = max(0.0, (per_call_sdp - per_call_ep) / (E - L)) if E > L else 0.0
    per_chunk = max(0.0, per_call_ep - L * per_expert)
    mem_bw = m["copy_bytes"] / max(m["copy"], 1e-9)
    # an ep group of one rank moves nothing: its collectives are free
    link = Link(bandwidth=bandwidth, latency=latency, gap=gap) if P > 1 else Link(bandwidth=math.inf, latency=0.0)
    hw = Hardware(name=f"this machine ({world} gloo rank(s), {threads} thread(s) each)", gpus_per_node=P,
                  intra=link, inter=link, gemm_flops=gemm_flops, chunk_overhead_s=per_chunk,
                  expert_overhead_s=per_expert, mem_bandwidth=mem_bw,
                  overlap=m["overlap"], memory_bytes=_ram_bytes() / world)
    # all-gather and reduce-scatter against the ring the link predicts (1 MB over the group)
    if P > 1 and "ag_1mb" in m:
        ring = allgather_ring(V / P, P, hw)
        hw = hw.with_(allgather_factor=max(m["ag_1mb"], 1e-9) / ring, reduce_scatter_factor=max(m["rs_1mb"], 1e-9) / ring)
    # what the model would add for router and permutes is already inside the measured layer time

    shape = Shape(world=P, num_experts=cfg.num_experts, hidden=cfg.hidden_size, ffn=cfg.ffn_hidden_size,
                  matrices=3 if cfg.gated else 2, dtype_bytes=4)
    modelled = local_seconds(expected_stats(tokens_per_rank, shape, cfg.top_k), shape, hw)
    return hw.with_(layer_overhead_s=max(0.0, m["layer"] - modelled),
                    notes=f"probed: {threads} thread(s)/rank, {tokens_per_rank} tokens/rank")


def _ram_bytes() -> float:
    try:
        return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return float("inf")


def probe_this_machine(cfg: MoEConfig, world: int, tokens_per_rank: int, threads: int = 1, reps: int = 15,
                       ep: Optional[int] = None, timeout_s: float = 300.0, statistic: str = "median") -> Hardware:
    """Probe on `world` local gloo ranks (`threads` intra-op threads each) for layers shaped like `cfg`,
    the collectives in ep groups of `ep` ranks (default: the world). statistic: "median" (what a
    run on this machine sees now) or "min" (what it does when nothing else runs: the figure to
    compare on a shared machine); `probe_this_machine_both` returns the two."""
    return probe_this_machine_both(cfg, world, tokens_per_rank, threads, reps, ep, timeout_s)[statistic]


def probe_this_machine_both(cfg: MoEConfig, world: int, tokens_per_rank: int, threads: int = 1, reps: int = 15,
                            ep: Optional[int] = None, timeout_s: float = 300.0) -> dict:
    """{"median": Hardware, "min": Hardware} from one probe."""

    ep = world if ep is None else ep
    m = simulate(_probe_rank, world, cfg.to_dict(), tokens_per_rank, threads, reps, ep, timeout_s=timeout_s)[0]
    return {stat: hardware_from_probe(m[stat], ep, threads, tokens_per_rank, cfg, world=world) for stat in m}
