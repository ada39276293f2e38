"""Hardware description and collective costs of the cost model (pure functions, no torch).

A job runs on nodes of `gpus_per_node` devices; two classes of link: `intra` (NVLink/NVSwitch,
or shared memory between CPU ranks) and `inter` (the NICs, one per GPU on a DGX). Each link class
is an alpha-beta-gap model (LogGP without the overheads):
    latency    s      end-to-end latency of one message (one step of a ring, a tiny collective)
    gap        s      extra issue cost per additional peer in one collective (messages to many
                      peers are posted together, so they cost a gap each, not a latency each)
    bandwidth  B/s    what one device sends (and receives) over that class of link

Costs of one collective, seconds, for the slowest rank (every rank waits for it):
    alltoall_flat(V, P)   V: bytes one rank exchanges (sends, or receives if more), m = V / P per peer;
        latency + max((Lw-1)(g_i + m/B_i), (P-Lw)(g_e + m/B_e))   (the two link classes run at once)
    alltoall_2d(V, P)     Tutel's 2-D hierarchical all-to-all: first within the node (Lw-1 peers,
        V/Lw each), then across nodes between ranks of the same local index (Nn-1 peers, V/Nn each:
        Lw times fewer, Lw times larger messages), plus two row permutes through memory (4V / B_mem;
        none for the hierarchical dispatcher's counts, which take the same two stages on the host)
    allgather_ring(v, P)  v: bytes each rank contributes; (P-1) steps of (latency + v/B) on the
        ring's slowest link (across nodes once the group spans them), times hw.allgather_factor
    reduce_scatter_ring(v, P)  the same ring (v: bytes each rank ends with), times
        hw.reduce_scatter_factor. Both factors are 1 where the ring runs at the link's rate (NCCL:
        the presets); a probe measures them (gloo here: all-gather 0.9-1.5x, reduce-scatter 1.7-3.5x)
    allreduce(v, P)       the better of a ring (2(P-1) steps of v/P) and a tree (2 log2 P latencies)
Lw = ranks of the group per node (min(gpus_per_node, P); groups are packed into nodes), Nn = P / Lw.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace


@dataclass(frozen=True)
class Link:
    bandwidth: float  # bytes/s per device, one direction
    latency: float  # s per message
    gap: float = 0.0  # s per additional peer of one collective

    def __post_init__(self) -> None:
        if not self.bandwidth > 0:
            raise ValueError(f"Link.bandwidth must be > 0 bytes/s, got {self.bandwidth}")
        if self.latency < 0 or self.gap < 0:
            raise ValueError(f"Link.latency and Link.gap must be >= 0 s, got {self.latency}, {self.gap}")


@dataclass(frozen=True)
class Hardware:
    """What the cost model knows of the machine (a cluster preset, or probed on this machine).

    GEMM throughput depends on rows per expert r: gemm_flops * r / (r + gemm_half_rows) (small
    expert batches leave tiles, or on a CPU the per-call overhead, idle)."""

    name: str
    gpus_per_node: int
    intra: Link
    inter: Link
    gemm_flops: float  # FLOP/s of a large GEMM, in the run's dtype
    gemm_half_rows: float = 0.0  # rows per expert at which a GEMM reaches half of gemm_flops
    mem_bandwidth: float = math.inf  # bytes/s of device memory (row permutes, buffer copies)
    overlap: float = 1.0  # fraction of the shorter of (comm, compute) that chunked pipelining can hide
    layer_overhead_s: float = 0.0  # host time of one MoE layer fwd+bwd outside experts and collectives
    chunk_overhead_s: float = 0.0  # host time of one chunk's expert call fwd+bwd (launches, index math)
    expert_overhead_s: float = 0.0  # and per expert in that call (a CPU's per-GEMM dispatch; ~0 on a GPU)
    memory_bytes: float = math.inf  # device memory per GPU
    allgather_factor: float = 1.0  # a measured all-gather over allgather_ring's estimate (1: at the link's rate)
    reduce_scatter_factor: float = 1.0  # the same for a reduce-scatter (gloo here: 1.7-3.5x)
    # the share of a compute unit each rank has while all compute (1: its own; CPU ranks that outnumber
    # their host's cores: cores / ranks). gemm_flops is the rate at that share; a rank computing alone
    # gets a whole core, so below 1 a layer's GEMMs take the longer of the total work over all ranks
    # (mean rows at gemm_flops) and the busiest rank's rows on a whole core (cost_model.layer_time)
    core_share: float = 1.0
    notes: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        if self.gpus_per_node < 1:
            raise ValueError(f"Hardware.gpus_per_node must be >= 1, got {self.gpus_per_node}")
        if not self.gemm_flops > 0:
            raise ValueError(f"Hardware.gemm_flops must be > 0, got {self.gemm_flops}")
        if not 0.0 <= self.overlap <= 1.0:
            raise ValueError(f"Hardware.overlap must be in [0, 1], got {self.overlap}")
        for name in ("gemm_half_rows", "layer_overhead_s", "chunk_overhead_s", "expert_overhead_s"):
            if getattr(self, name) < 0:
                raise ValueError(f"Hardware.{name} must be >= 0, got {getattr(self, name)}")
        for name in ("allgather_factor", "reduce_scatter_factor"):
            if not 0 < getattr(self, name) < math.inf:
                raise ValueError(f"Hardware.{name} must be a finite number > 0, got {getattr(self, name)}")
        if not self.mem_bandwidth > 0 or not self.memory_bytes > 0:
            raise ValueError("Hardware.mem_bandwidth and Hardware.memory_bytes must be > 0")

    def call_seconds(self, chunks: int, experts: int) -> float:
        """Fixed host cost of `chunks` expert calls of `experts` experts each (fwd + bwd)."""
        return chunks * (self.chunk_overhead_s + experts * self.expert_overhead_s)

    def gemm_seconds(self, flops: float, rows_per_expert: float) -> float:
        """Seconds for `flops` of expert GEMMs whose experts hold `rows_per_expert` rows each."""
        if flops <= 0:
            return 0.0
        r = max(rows_per_expert, 1e-9)
        return flops * (r + self.gemm_half_rows) / (r * self.gemm_flops)

    def with_(self, **changes) -> "Hardware":
        return replace(self, **changes)

    @classmethod
    def field_names(cls) -> tuple:
        return tuple(f.name for f in fields(cls))


def split_nodes(P: int, hw: Hardware) -> tuple:
    """(Lw, Nn): ranks of a P-rank group per node and nodes it spans (groups are packed into nodes)."""
    Lw = min(hw.gpus_per_node, P)
    return Lw, max(1, math.ceil(P / Lw))


def _ring_link(P: int, hw: Hardware) -> Link:
    return hw.inter if split_nodes(P, hw)[1] > 1 else hw.intra


def alltoall_flat(V: float, P: int, hw: Hardware) -> float:
    """One all-to-all(-v) in which the slowest rank exchanges V bytes (its own share included)."""
    if P <= 1:
        return 0.0
    Lw, Nn = split_nodes(P, hw)
    m = V / P
    t_intra = (Lw - 1) * (hw.intra.gap + m / hw.intra.bandwidth)
    t_inter = (P - Lw) * (hw.inter.gap + m / hw.inter.bandwidth)
    return (hw.inter if Nn > 1 else hw.intra).latency + max(t_intra, t_inter)


def alltoall_2d(V: float, P: int, hw: Hardware, permutes: bool = True) -> float:
    """The 2-D hierarchical all-to-all of V bytes per rank (moesys's `hierarchical`, Tutel's 2DH).
    permutes=False: no row permutes through device memory (the counts exchange: host index math)."""
    if P <= 1:
        return 0.0
    Lw, Nn = split_nodes(P, hw)
    t = 4 * V / hw.mem_bandwidth if permutes else 0.0  # two row permutes (read + write each) around the stages
    if Lw > 1:
        t += hw.intra.latency + (Lw - 1) * (hw.intra.gap + V / Lw / hw.intra.bandwidth)
    if Nn > 1:
        t += hw.inter.latency + (Nn - 1) * (hw.inter.gap + V / Nn / hw.inter.bandwidth)
    return t


def _ring(v: float, P: int, hw: Hardware) -> float:
    link = _ring_link(P, hw)
    return (P - 1) * (link.latency + v / link.bandwidth)


def allgather_ring(v: float, P: int, hw: Hardware) -> float:
    """All-gather in which each rank contributes v bytes."""
    return 0.0 if P <= 1 else hw.allgather_factor * _ring(v, P, hw)


def reduce_scatter_ring(v: float, P: int, hw: Hardware) -> float:
    """Reduce-scatter (sum) in which each rank ends with v bytes (of P * v it holds)."""
    return 0.0 if P <= 1 else hw.reduce_scatter_factor * _ring(v, P, hw)


def allreduce(v: float, P: int, hw: Hardware) -> float:
    """All-reduce of v bytes per rank: the better of a ring and a (double binary) tree."""
    if P <= 1:
        return 0.0
    link = _ring_link(P, hw)
    ring = 2 * (P - 1) * (link.latency + v / P / link.bandwidth)
    tree = 2 * math.ceil(math.log2(P)) * link.latency + 2 * v / link.bandwidth
    return min(ring, tree)


def pipelined(comm: float, comp: float, c: int, overlap: float) -> float:
    """comm and comp split into c chunks, chunk i's collectives in flight while chunk i-1 computes:
    max + min / c with perfect overlap (overlap = 1), comm + comp with none (overlap = 0)."""
    short = min(comm, comp)
    return comm + comp - overlap * (short - short / c)
