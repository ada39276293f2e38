"""What `parallel.placement=auto` is predicted to gain on a plan's layout (`moesys-plan` prints it).

The per-expert loads are a Zipf law over the E experts whose exponent makes the hottest expert
`--skew` times the mean (the routers of benchmarks/placement.py; a skew of 1 is uniform). For the
layout's ep group: the busiest rank's rows under the canonical layout, under the balancer's
permutation (parallel/placement.py: balanced_placement, what the runtime would pick), and under
that permutation with one replica slot a rank; each priced by the cost model as the static
baseline layer (ep mode, flat all-to-all-v, no overlap), the replicas' per-step weight fetch
(weights in, gradients back, over the ep group's link; placement_control's gate) added.
"""
from __future__ import annotations

import dataclasses
import math

from moesys.parallel.cost_model import Stats, layer_time
from moesys.parallel.cost_network import Hardware
from moesys.parallel.placement import (
    Placement,
    balanced_placement,
    imbalance,
    replica_feeds,
)

from .workload import Workload


def zipf_shares(experts: int, exponent: float) -> list:
    """Each expert's share of the routes under Zipf(exponent) (expert 0 the hottest)."""
    w = [1.0 / (i + 1) ** exponent for i in range(experts)]
    return [x / sum(w) for x in w]


def zipf_for_skew(experts: int, skew: float) -> float:
    """The Zipf exponent whose hottest expert is `skew` times the mean load (bisection; the hottest
    expert's share grows with the exponent, towards all of the routes)."""
    lo, hi = 0.0, 64.0
    for _ in range(60):
        mid = (lo + hi) / 2
        if zipf_shares(experts, mid)[0] * experts < skew:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def replica_fetch_s(latency: float, bandwidth: float, expert_bytes: float, placement: Placement, world: int) -> float:
    """Per step: the replicas' weights out (forward) and their gradients back, the busiest rank's rows
    of one all-to-all each way: its receives (k a rank) or its sends to the replicas it feeds."""
    k = len(placement.replicas) // world
    if not k:
        return 0.0
    return 2 * (latency + max([k] + replica_feeds(placement, world)) * expert_bytes / bandwidth)


@dataclasses.dataclass(frozen=True)
class PlacementGain:
    ep: int
    exponent: float  # of the Zipf loads
    imbalance: tuple  # busiest rank's rows / mean: (static, permuted, permuted + replicas)
    layer_s: tuple  # one layer's fwd+bwd seconds, the same three
    replicas: int  # replica slots a rank in the third (0: none possible)

    @property
    def gain_permuted(self) -> float:
        return self.layer_s[0] / self.layer_s[1]

    @property
    def gain_replicas(self) -> float:
        return self.layer_s[0] / self.layer_s[2]


def placement_gain(wl: Workload, hw: Hardware, world: int, ep: int) -> PlacementGain | None:
    """The predicted layer time of the three layouts at `ep` (None: nothing to place, ep = 1 or
    experts split over ranks)."""
    E = wl.moe.num_experts
    if ep < 2 or ep > E:
        return None
    shape = wl.shape(ep)
    tokens = wl.tokens_per_rank(world)
    rows = tokens * ep * wl.active_k  # the ep group's routes of one micro-step
    exponent = zipf_for_skew(E, wl.skew)
    load = [s * rows for s in zipf_shares(E, exponent)]
    L = E // ep
    replicas = min(1, E - L)
    perm = balanced_placement(load, ep)
    layouts = (Placement.identity(E), perm, balanced_placement(load, ep, perm, replicas_per_rank=replicas))
    link = hw.intra if ep <= hw.gpus_per_node else hw.inter
    expert_bytes = shape.matrices * shape.hidden * shape.ffn * shape.dtype_bytes
    ibs, times = [], []
    for p in layouts:
        per_rank = p.rank_loads(load, ep)
        st = Stats(tokens=int(tokens * ep), rows=round(rows), max_rank_rows=math.ceil(max(per_rank)),
                   max_local_rows=math.ceil(tokens * wl.active_k))
        ibs.append(imbalance(per_rank))
        times.append(layer_time("ep", "alltoallv", 1, st, shape, hw).total
                     + replica_fetch_s(link.latency, link.bandwidth, expert_bytes, p, ep))
    return PlacementGain(ep=ep, exponent=exponent, imbalance=tuple(ibs), layer_s=tuple(times), replicas=replicas)


def render_gain(g: PlacementGain | None, skew: float) -> str:
    if g is None:
        return "placement: nothing to place at this layout (parallel.ep=1, or experts split over ranks)"
    static, perm, repl = g.imbalance
    ts, tp, tr = (t * 1e3 for t in g.layer_s)
    head = (f"placement (parallel.placement=auto) at ep={g.ep}, loads Zipf({g.exponent:.3f}) over the experts "
            f"(hottest {skew:g}x the mean), one MoE layer fwd+bwd, ep/alltoallv c=1:")
    row = (f"  static: busiest rank {static:.2f}x the mean rows, {ts:.3f} ms; permuted: {perm:.2f}x, {tp:.3f} ms "
           f"({g.gain_permuted:.2f}x); + {g.replicas} replica slot a rank: {repl:.2f}x, {tr:.3f} ms "
           f"({g.gain_replicas:.2f}x)")
    return head + "\n" + row
