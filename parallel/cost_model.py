"""The runtime's cost model: seconds of one MoE layer's forward + backward on the busiest rank, for
every mode x dispatcher x overlap degree. Pure functions of the shapes, the routing statistics and a
Hardware description (cost_network.py). The live tuner calls it with probed figures (tuner.py,
probe.py); `moesys-plan` with cluster presets; nothing is modelled twice.

Legend: P ranks in the ep group, E experts, L = max(1, E/P) local experts, S = max(1, P/E) F-shards
per expert, D hidden, F ffn, G matrices per expert (2, or 3 gated), b bytes per element, c chunks.
Rows are routes (token, expert); R = rows the busiest rank computes; V = bytes a rank moves.

    ep (move tokens; per chunk, each direction: dispatch + combine)
        alltoallv     counts all-to-all once, then 2 all-to-all-v of V/c
        padded        tiny all-reduce (agree C) once, then 2 all-to-alls of P*L*ceil(C/c) rows;
                      experts compute the padding rows too
        hierarchical  the [c, P, L] send counts through the same two stages once (an intra-node
                      all-to-all, then a cross-node one: (Lw-1) + (Nn-1) peers, not a ring of P-1),
                      then 2 two-stage (2-D) all-to-alls
        hierarchical_padded  padded's plan and rows (fixed capacity: no counts exchange), each
                      all-to-all a two-stage (2-D) one
        allgather     all-gather of the counts once, then an all-gather of every rank's rows
                      (reduce-scatter in the backward) and an all-to-all-v back
        compute       2*G*D*(F/S)*R FLOPs forward at R/(L*c) rows per expert; backward 2x
    sharded_dp (move weights; per chunk: G all-gathers forward, G reduce-scatters backward of
        the rank's L*D*(F/S)/c weights; compute 2*G*D*F*N_max at N_max/E rows per expert)

    total = local + plan + pipelined(comm_fwd, comp_fwd, c) + pipelined(comm_bwd, 2 comp_fwd, c)
    local = hw.layer_overhead_s + router GEMM + row permutes (memory)
            + c * (hw.chunk_overhead_s + experts in one call * hw.expert_overhead_s)   (ep: L, sharded_dp: E)
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

from .cost_network import (Hardware, allgather_ring, alltoall_2d, alltoall_flat, allreduce, pipelined,
                           reduce_scatter_ring)

MODES = ("ep", "sharded_dp")
DEGREES = (1, 2, 4, 8)
DISPATCHERS = ("alltoallv", "padded", "hierarchical", "hierarchical_padded", "allgather")
PADDED = ("padded", "hierarchical_padded")  # fixed-capacity buffers: capacity and drops as `padded`'s
INDEX_BYTES = 8  # counts travel as int64


@dataclass(frozen=True)
class Shape:
    world: int  # P, the ep group
    num_experts: int
    hidden: int
    ffn: int
    matrices: int  # G
    dtype_bytes: int


@dataclass(frozen=True)
class Stats:
    """Routing statistics of one step, summed over an ep group; agreed over the job as the
    field-wise maximum over its ep groups (the busiest group bounds the step, see tuner.py)."""

    tokens: int  # T over all ranks
    rows: int  # N over all ranks (= T * mean active K)
    max_rank_rows: int  # rows the busiest rank computes in ep mode
    max_local_rows: int  # largest N of one rank (what it computes in sharded_dp)

    FIELDS = ("tokens", "rows", "max_rank_rows", "max_local_rows")

    def as_list(self) -> list:
        return [float(getattr(self, f)) for f in self.FIELDS]

    @classmethod
    def from_list(cls, values) -> "Stats":
        return cls(**{f: int(v) for f, v in zip(cls.FIELDS, values)})

    @property
    def active_k(self) -> float:
        return self.rows / max(self.tokens, 1)

    def shifted(self, other: "Stats", rel: float) -> bool:
        def moved(a, b):
            return abs(a - b) > rel * max(abs(b), 1e-9)

        return moved(self.active_k, other.active_k) or moved(
            self.max_rank_rows / max(self.rows, 1), other.max_rank_rows / max(other.rows, 1)
        ) or moved(self.tokens, other.tokens)


def expected_stats(tokens_per_rank: int, shape: Shape, active_k: float, skew: float = 1.0,
                   capacity_factor: Optional[float] = None) -> Stats:
    """The statistics of a step with `tokens_per_rank` tokens on each of P ranks, `active_k` experts
    per token and a hottest expert `skew` times the mean load (1 = balanced). A capacity factor caps
    the skew (routes beyond it are dropped). The hottest expert sits on the busiest rank."""
    if skew < 1:
        raise ValueError(f"skew (hottest expert / mean expert load) must be >= 1, got {skew}")
    P, E = shape.world, shape.num_experts
    L = max(1, E // P)
    if capacity_factor is not None:
        skew = min(skew, max(capacity_factor, 1.0))
    rows = tokens_per_rank * P * active_k
    per_expert = rows / E
    return Stats(tokens=int(tokens_per_rank * P), rows=int(round(rows)),
                 max_rank_rows=int(math.ceil(per_expert * (L - 1 + skew))),
                 max_local_rows=int(math.ceil(tokens_per_rank * active_k)))


def padded_capacity(stats: Stats, shape: Shape) -> int:
    """C of a dropless padded dispatch when the layer's capacity is not known: the busiest source's
    mean rows per expert times the expert skew the statistics show (an estimate)."""
    P, E = shape.world, shape.num_experts
    L = max(1, E // P)
    per_expert = max(stats.rows / E, 1e-9)
    skew = max(1.0, stats.max_rank_rows / per_expert - (L - 1))
    return max(1, int(math.ceil(skew * stats.max_local_rows / E)))


@dataclass(frozen=True)
class Breakdown:
    """One candidate's predicted seconds (forward + backward, busiest rank)."""

    mode: str
    dispatcher: str  # "-" in sharded_dp (no tokens move)
    degree: int
    compute: float  # expert GEMMs
    comm: float  # every collective of the chunks, before overlap
    plan: float  # the dispatcher's metadata collective (before the chunks; not overlapped)
    local: float  # routing, row permutes, host overheads
    total: float
    bytes_fwd: float  # bytes the slowest rank moves in one forward (tokens both ways, or weights)
    collectives: int  # collective calls per forward + backward

    @property
    def key(self) -> tuple:
        return (self.mode, self.dispatcher, self.degree)


def local_seconds(stats: Stats, shape: Shape, hw: Hardware, recv_rows: float = 0.0) -> float:
    """Mode-independent work of the layer (router GEMM, permute/unpermute) and its host overhead;
    `recv_rows`: rows reordered expert-major after an ep dispatch (and back), when L > 1."""
    P, D, b = shape.world, shape.hidden, shape.dtype_bytes
    T = stats.tokens / P
    router = hw.gemm_seconds(3 * 2 * T * D * shape.num_experts, T)  # fwd + bwd (dX, dW)
    rows = stats.max_local_rows + recv_rows
    permutes = 8 * rows * D * b / hw.mem_bandwidth  # gather + scatter-back, fwd and bwd, read + write
    return hw.layer_overhead_s + router + permutes


def layer_time(mode: str, dispatcher: str, c: int, stats: Stats, shape: Shape, hw: Hardware,
               capacity: Optional[int] = None) -> Breakdown:
    """Predicted forward + backward seconds of one layer call. `capacity`: the padded dispatcher's
    per-expert capacity C of one source rank (None: dropless, estimated by `padded_capacity`)."""
    if mode not in MODES:
        raise ValueError(f"mode={mode!r} is not one of {list(MODES)}")
    if dispatcher not in DISPATCHERS:
        raise ValueError(f"dispatcher={dispatcher!r} is not one of {list(DISPATCHERS)}")
    if c < 1:
        raise ValueError(f"overlap degree must be >= 1, got {c}")
    P, E, D, F, G, b = shape.world, shape.num_experts, shape.hidden, shape.ffn, shape.matrices, shape.dtype_bytes
    S, L = max(1, P // E), max(1, E // P)
    if mode == "sharded_dp":
        w_chunk = L * D * (F / S) * b / c  # one matrix's local slice, one F-chunk
        comm = c * G * allgather_ring(w_chunk, P, hw)
        comm_bwd = c * G * reduce_scatter_ring(w_chunk, P, hw)
        n_max = stats.max_local_rows
        comp = hw.gemm_seconds(2 * G * D * F * n_max, n_max / E)
        total_local = local_seconds(stats, shape, hw) + hw.call_seconds(c, E)
        total = total_local + pipelined(comm, comp, c, hw.overlap) + pipelined(comm_bwd, 2 * comp, c, hw.overlap)
        return Breakdown(mode, "-", c, 3 * comp, comm + comm_bwd, 0.0, total_local, total,
                         bytes_fwd=(P - 1) * L * G * D * (F / S) * b, collectives=2 * G * c)

    row_b = D * b
    per_chunk_bwd = None  # the backward's collectives, where they differ from the forward's
    if dispatcher in PADDED:
        C = capacity if capacity is not None else padded_capacity(stats, shape)
        rows_chunk = L * P * math.ceil(C / c)  # padding rows move and compute too
        v_chunk = rows_chunk * row_b
        plan = allreduce(2 * INDEX_BYTES, P, hw)
        a2a = alltoall_flat if dispatcher == "padded" else alltoall_2d
        per_chunk = 2 * a2a(v_chunk, P, hw)
    else:
        rows_chunk = stats.max_rank_rows / c
        # the slowest rank's exchange: what it sends (F-shard copies included) or receives
        v_chunk = max(stats.rows / P * S, stats.max_rank_rows) * row_b / c
        if dispatcher == "alltoallv":
            plan = alltoall_flat(P * c * L * INDEX_BYTES, P, hw)
            per_chunk = 2 * alltoall_flat(v_chunk, P, hw)
        elif dispatcher == "hierarchical":
            plan = hierarchical_counts(c, shape, hw)
            per_chunk = 2 * alltoall_2d(v_chunk, P, hw)
        else:  # allgather: every rank's rows (padded to the largest N) to everyone, outputs back;
            # the backward reduce-scatters the rows' gradients
            plan = allgather_ring(c * E * INDEX_BYTES, P, hw)
            rows_b = stats.max_local_rows / c * row_b
            per_chunk = allgather_ring(rows_b, P, hw) + alltoall_flat(v_chunk, P, hw)
            per_chunk_bwd = reduce_scatter_ring(rows_b, P, hw) + alltoall_flat(v_chunk, P, hw)
    comm = c * per_chunk
    comm_bwd = c * (per_chunk if per_chunk_bwd is None else per_chunk_bwd)
    rows_comp = rows_chunk
    if hw.core_share < 1 and dispatcher not in PADDED:
        # ranks share cores: the busiest rank's GEMMs run on a whole core once the others are done,
        # so the step follows the total work (mean rows at the shared rate) or that rank alone
        rows_comp = max(stats.rows * S / P, stats.max_rank_rows * hw.core_share) / c
    comp = hw.gemm_seconds(2 * G * D * (F / S) * rows_comp * c, rows_chunk / L)
    total_local = (local_seconds(stats, shape, hw, recv_rows=rows_chunk * c if L > 1 else 0.0)
                   + hw.call_seconds(c, L))
    total = total_local + plan + pipelined(comm, comp, c, hw.overlap) + pipelined(comm_bwd, 2 * comp, c, hw.overlap)
    return Breakdown(mode, dispatcher, c, 3 * comp, comm + comm_bwd, plan, total_local, total,
                     bytes_fwd=per_chunk_bytes(dispatcher, v_chunk, stats, row_b, P, c), collectives=1 + 4 * c)


def hierarchical_counts(c: int, shape: Shape, hw: Hardware) -> float:
    """The hierarchical dispatcher's plan: each rank's [c, P, L] int64 send counts through the 2-D
    exchange's two stages, [c, Nn, L] to each of Lw - 1 local peers, then [c, Lw, L] to each of
    Nn - 1 nodes (host index math between them: no device permutes)."""
    P, L = shape.world, max(1, shape.num_experts // shape.world)
    return alltoall_2d(c * P * L * INDEX_BYTES, P, hw, permutes=False)


def per_chunk_bytes(dispatcher: str, v_chunk: float, stats: Stats, row_b: float, P: int, c: int) -> float:
    """Bytes the slowest rank moves in one forward (dispatch and combine, its own share included)."""
    if dispatcher == "allgather":
        return c * (P * stats.max_local_rows / c * row_b + v_chunk)  # every rank's rows (own too), outputs back
    return 2 * c * v_chunk


def candidates(dispatchers=DISPATCHERS, modes=MODES, degrees=DEGREES) -> list:
    """(mode, dispatcher, degree) triples; sharded_dp moves no tokens, so it has one dispatcher: '-'."""
    out = []
    for m in modes:
        for d in (dispatchers if m == "ep" else ("-",)):
            out.extend((m, d, c) for c in degrees)
    return out


def rank(stats: Stats, shape: Shape, hw: Hardware, cands, capacity: Optional[int] = None) -> list:
    """Breakdowns of `cands` (from `candidates`), fastest first (ties: by key)."""
    out = [layer_time(m, d if m == "ep" else "alltoallv", c, stats, shape, hw, capacity) for m, d, c in cands]
    return sorted(out, key=lambda r: (r.total, r.key))
