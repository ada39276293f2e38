"""Load-adaptive expert placement: which physical slot of the ep group holds which expert.

Legend: P ranks in the ep group, E experts, L = E/P slots per rank, slot s = r*L + i is the i-th
local expert row of rank r; N rows of this rank grouped by expert.

A Placement is a permutation `slots` (slot -> logical expert). The identity is the canonical layout
apply_expert_parallel makes (rank r holds experts r*L .. r*L+L-1). Under another placement:
  * the expert weights (and their optimizer moments) hold, in each rank's local rows, the experts of
    that rank's slots: row i of rank r is expert slots[r*L + i];
  * the runner maps the routing plan to slots before dispatch (counts_E[slots], rows reordered
    by a stable sort on the slot of their expert, so every expert's rows keep their order) and the
    combined rows back after; every dispatcher and mode then works in slot space unchanged;
  * a re-placement moves the local rows of every tensor shaped like a local expert weight (weights,
    gradients, optimizer moments) with one all-to-all over the ep group (`apply_placement`); under
    FSDP2, where each rank holds an edp shard of its local experts (rows or columns), over the
    whole (edp, ep) mesh, from the shards each rank holds as DCP sees them.
The math is the same function: every expert sees the same rows, in the same order, with the same
weights; only the rank that computes it changes.

Replicas (Placement.replicas, k slots a rank): the hottest experts are computed on extra ranks too.
In ep mode the runner works over a virtual layout of E + P*k slots (rank r: its L owned slots, then
its k replica slots; a dispatcher for it from apply_expert_parallel's factory): every source rank
splits a replicated expert's rows into equal consecutive parts, one per holder (`replica_plan`),
and the replica slots' weights are the owners' rows fetched each forward with one differentiable
all-to-all (`replica_weights`), so their gradients are summed into the owners' and the optimizer,
which steps the owners only, applies the same update. sharded_dp mode ignores replicas.

A static capacity buffer (the padded dispatchers' static_capacity_factor) holds the layer's C rows
per (source rank, slot): a permutation keeps every expert's C and its rows' order, so the same rows
drop; a replicated expert's holders are filled in turn (`replica_plan(fill=C)`), so it keeps its
first holders*C rows; `static_keep` gives the same rows to the modes that compute every row.

Decisions (placement_control.PlacementController) are taken by every rank of the job together: the per-expert loads
accumulated since the last decision are all-reduced (one collective for all layers) over the agree
group, so every rank feeds the same numbers to the same deterministic balancer and cost gate.
"""
from __future__ import annotations

import dataclasses
import heapq
import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor

from .comm import all_gather_counts, all_to_all, comm_device

PLACEMENTS = ("off", "static", "auto")


@dataclass(frozen=True)
class Placement:
    """slots[s]: the logical expert physical slot s holds (rank-major, L slots per rank).
    replicas[r*k + j]: the expert rank r's j-th replica slot computes too (k per rank; () for none).
    A replica holds no weights of its own: the runner fetches the owner's each step (differentiably,
    so the replica's gradient sums into the owner's) and splits the expert's rows between holders."""

    slots: tuple
    replicas: tuple = ()

    @classmethod
    def identity(cls, num_experts: int) -> Placement:
        return cls(tuple(range(num_experts)))

    def __post_init__(self) -> None:
        if sorted(self.slots) != list(range(len(self.slots))):
            raise ValueError(f"Placement.slots must be a permutation of range({len(self.slots)}), got {self.slots}")

    @property
    def is_identity(self) -> bool:
        return not self.replicas and all(s == e for s, e in enumerate(self.slots))

    def check(self, world: int) -> None:
        """Raise unless the replicas fit `world` ranks: k per rank, none on a rank holding its expert."""
        E, R = len(self.slots), len(self.replicas)
        if R % world:
            raise ValueError(f"Placement.replicas: {R} replica slots for {world} ranks (k per rank)")
        L, k = E // world, R // world
        for r in range(world):
            mine = list(self.slots[r * L:(r + 1) * L]) + list(self.replicas[r * k:(r + 1) * k])
            if len(set(mine)) != len(mine) or not all(0 <= e < E for e in mine):
                raise ValueError(f"Placement: rank {r} holds experts {mine}: a replica must be of a valid expert "
                                 "that rank holds no other copy of")

    def holders(self, world: int) -> list:
        """holders[e]: the virtual slots computing expert e, owner first (virtual layout: rank r's
        L owned slots then its k replica slots, E + world*k in all)."""
        E = len(self.slots)
        L, k = E // world, len(self.replicas) // world
        out: list = [[] for _ in range(E)]
        for s, e in enumerate(self.slots):
            out[e].append((s // L) * (L + k) + s % L)
        for i, e in enumerate(self.replicas):
            out[e].append((i // k) * (L + k) + L + i % k)
        return out

    def position(self) -> list:
        """position[e]: the slot of expert e (the inverse permutation)."""
        pos = [0] * len(self.slots)
        for s, e in enumerate(self.slots):
            pos[e] = s
        return pos

    def rank_loads(self, load_E, world: int) -> list:
        """Rows each rank computes under this placement for per-expert loads `load_E` (a sequence);
        a replicated expert's rows shared evenly by its holders."""
        L = len(self.slots) // world
        hold = self.holders(world)
        out = [0.0] * world
        for e, vs in enumerate(hold):
            for v in vs:
                out[v // (L + len(self.replicas) // world)] += float(load_E[e]) / len(vs)
        return out


def imbalance(loads: list) -> float:
    """Busiest rank's rows over the mean (1.0: perfectly even; 1.0 when nothing was routed)."""
    mean = sum(loads) / max(len(loads), 1)
    return max(loads) / mean if mean > 0 else 1.0


def balanced_placement(load_E, world: int, current: Placement | None = None, replicas_per_rank: int = 0) -> Placement:
    """The experts dealt to `world` ranks, L each, so the busiest rank's load is near the mean.

    Longest-processing-time first: experts by decreasing load (ties: lower id) each to the least
    loaded rank that has a free slot (ties: lower rank). Then the new bins are matched to the
    current ranks greedily by how many experts they already hold (fewest moves), and each rank's
    experts sorted by id. Pure Python on the agreed loads: every rank gets the same answer."""
    E = len(load_E)
    L = E // world
    order = sorted(range(E), key=lambda e: (-float(load_E[e]), e))
    bins: list = [[] for _ in range(world)]
    totals = [0.0] * world
    for e in order:
        r = min((r for r in range(world) if len(bins[r]) < L), key=lambda r: (totals[r], r))
        bins[r].append(e)
        totals[r] += float(load_E[e])
    cur = current if current is not None else Placement.identity(E)
    held = [set(cur.slots[r * L:(r + 1) * L]) for r in range(world)]
    pairs = sorted(((-len(held[r] & set(b)), i, r) for i, b in enumerate(bins) for r in range(world)))
    rank_of, taken = {}, set()
    for _, i, r in pairs:
        if i not in rank_of and r not in taken:
            rank_of[i] = r
            taken.add(r)
    slots = [0] * E
    for i, b in enumerate(bins):
        r = rank_of[i]
        slots[r * L:(r + 1) * L] = sorted(b)
    return Placement(tuple(slots), _replicas(load_E, world, slots, replicas_per_rank))


def with_replicas(load_E, world: int, placement: Placement, replicas_per_rank: int) -> Placement:
    """`placement`'s slots kept (no expert moves) and its replicas chosen afresh for `load_E`."""
    return Placement(placement.slots, _replicas(load_E, world, list(placement.slots), replicas_per_rank))


def static_drops(load_E, world: int, placement: Placement, capacity: int) -> float:
    """Rows a static buffer of `capacity` (C) rows per (source rank, slot) drops for per-expert rows
    `load_E` of one source rank: expert e keeps holders(e) * C of them."""
    hold = placement.holders(world)
    return sum(max(0.0, float(n) - len(h) * capacity) for n, h in zip(load_E, hold))


def _replicas(load_E, world: int, slots: list, k: int) -> tuple:
    """k replica slots a rank, filled greedily: the expert with the most rows per holder gets one
    more holder, on the least loaded rank with a free replica slot and no copy of it (ties: lower
    expert, lower rank). A rank sends its experts' weights to their replicas every step, so it feeds
    at most k*L replicas (its sends stay within L times its k receives); slots left empty hold a
    replica of the coldest expert the rank does not hold (it gets its share of that expert's rows)."""
    if k == 0:
        return ()
    E = len(slots)
    L = E // world
    loads = [float(x) for x in load_E]
    holders = {e: [s // L] for s, e in enumerate(slots)}
    t = [0.0] * world  # rows per rank, a replicated expert's shared evenly
    for e, (r,) in holders.items():
        t[r] += loads[e]
    free = [k] * world
    feeds = [k * L] * world  # replicas a rank may still feed
    heap = [(-loads[e], e) for e in range(E)]
    heapq.heapify(heap)
    placed = 0
    while placed < world * k and heap:
        _, e = heapq.heappop(heap)
        owner = holders[e][0]
        ranks = [r for r in range(world) if free[r] and r not in holders[e]] if feeds[owner] else []
        if not ranks:
            continue  # no rank can take it (or its owner feeds enough replicas): the next expert
        r = min(ranks, key=lambda q: (t[q], q))
        n = len(holders[e])
        for q in holders[e]:
            t[q] -= loads[e] / n - loads[e] / (n + 1)
        t[r] += loads[e] / (n + 1)
        holders[e].append(r)
        free[r] -= 1
        feeds[owner] -= 1
        placed += 1
        heapq.heappush(heap, (-loads[e] / (n + 1), e))
    for r in range(world):  # fill what the caps left: the coldest experts whose owner can still feed
        while free[r]:
            cands = [e for e in sorted(range(E), key=lambda e: (loads[e], e))
                     if r not in holders[e] and feeds[holders[e][0]]]
            if not cands:
                raise ValueError(f"balanced_placement: rank {r} cannot take another replica ({k} a rank, {E} experts)")
            e = cands[0]
            holders[e].append(r)
            free[r] -= 1
            feeds[holders[e][0]] -= 1
    reps: list = [[] for _ in range(world)]
    for e, hs in holders.items():
        for r in hs[1:]:
            reps[r].append(e)
    return tuple(e for r in range(world) for e in sorted(reps[r]))


def replica_feeds(placement: Placement, world: int) -> list:
    """Replicas each rank feeds (sends its experts' weights to, and receives gradients from) every step."""
    L = len(placement.slots) // world
    pos = placement.position()
    out = [0] * world
    for e in placement.replicas:
        out[pos[e] // L] += 1
    return out


def moved_experts(old: Placement, new: Placement, world: int) -> list:
    """Experts each rank receives from another rank when going from `old` to `new`."""
    L = len(old.slots) // world
    pos = old.position()
    return [sum(1 for e in new.slots[r * L:(r + 1) * L] if pos[e] // L != r) for r in range(world)]


def _layout_holdings(world: int, L: int) -> list:
    """Per rank of the ep group: (first slot, slots, key) it holds when every rank holds its whole L
    local experts (the plain engine; edp replicas each run the same move in their own ep group)."""
    return [(r * L, L, ()) for r in range(world)]


def _shard_holdings(w, group) -> list:
    """Per rank of `group` (the ranks of the DTensor `w`'s mesh): (first slot, slots, key) of its
    shard, as DCP sees it (`__create_chunk_list__`), with one small all-gather. Under FSDP2 an expert
    weight is a DTensor over (edp, ep): Shard(0) over ep, and over edp either rows (a _StridedShard
    of dim 0: L/edp whole experts a rank, or fewer in a padded last shard) or a column block (Shard(1):
    all L experts, D/edp or F/edp of each). key: the offsets of the other dims, so a row only ever
    travels between ranks that hold the same columns of it."""
    chunks = w.__create_chunk_list__()
    ndim = w.dim()
    if chunks:
        c = chunks[0]
        mine = [c.offsets[0], c.sizes[0], *c.offsets[1:]]
    else:  # an empty (padded) shard: it sends and receives nothing
        mine = [0, 0] + [-1] * (ndim - 1)
    every = all_gather_counts(torch.tensor(mine, dtype=torch.float64), group).to(torch.long).tolist()
    return [(row[0], row[1], tuple(row[2:])) for row in every]


def _move_rows(tensors: list, old: Placement, new: Placement, held: list, me: int, group) -> tuple:
    """Each tensor's local rows re-dealt from `old` to `new` with one all-to-all over `group` (all
    tensors' rows travel together, flattened and concatenated). held[q] = (first slot, slots, key):
    the slots rank q of `group` holds (the same for each of the tensors); the rows of new slot s on
    rank q come from the rank that holds the old slot of expert new.slots[s] with q's key.
    Returns (the new local tensors, the rows this rank received from another rank)."""
    pos = old.position()
    first, count, key = held[me]
    # (key, old slot) -> (rank, local row): where each row is now
    where = {(k, f + i): (p, i) for p, (f, n, k) in enumerate(held) for i in range(n)}
    widths = [math.prod(t.shape[1:]) for t in tensors]
    dev, dtype = tensors[0].device, tensors[0].dtype
    if any(t.dtype != dtype for t in tensors):  # moments of a low-precision weight may be fp32
        flat = torch.cat([t.reshape(count, w).to(torch.float64) for t, w in zip(tensors, widths)], 1)
    else:
        flat = torch.cat([t.reshape(count, w) for t, w in zip(tensors, widths)], 1)
    send_idx, in_splits = [], []
    for f, n, k in held:  # what rank q needs that I hold now, in q's slot order
        mine = [i for p, i in (where[(k, pos[e])] for e in new.slots[f:f + n]) if p == me]
        send_idx += mine
        in_splits.append(len(mine))
    src = [where[(key, pos[e])][0] for e in new.slots[first:first + count]]
    out_splits = [src.count(p) for p in range(len(held))]
    cdev = comm_device(group)
    send = flat.index_select(0, torch.tensor(send_idx, dtype=torch.long, device=flat.device)).to(cdev)
    recv = send.new_empty((count, flat.shape[1]))
    dist.all_to_all_single(recv, send.contiguous(), out_splits, in_splits, group=group)
    recv = recv.to(dev)
    # rows arrive source-major, each source in my slot order: put them in slot order
    arrival = sorted(range(count), key=lambda i: (src[i], i))
    rows = torch.empty_like(recv)
    rows[torch.tensor(arrival, dtype=torch.long, device=recv.device)] = recv
    out, at = [], 0
    for t, w in zip(tensors, widths):
        out.append(rows[:, at:at + w].to(t.dtype).reshape(t.shape))
        at += w
    return out, sum(1 for p in src if p != me)


# -- the runner's side: the plan in slot space, the replicas' rows and weights ----------------------
def slot_plan(plan, slots_E: torch.Tensor, pos_E: torch.Tensor):
    """(the layer's Plan in slot space, x_ND's rows in slot order): counts_E[slots], and the rows
    sorted stably by their expert's slot (every expert's rows keep their order). Device ops only."""
    slot_N = pos_E.to(plan.expert_idx_N.device).index_select(0, plan.expert_idx_N)
    rows_N = torch.argsort(slot_N, stable=True)
    splan = dataclasses.replace(plan, counts_E=plan.counts_E.index_select(0, slots_E.to(plan.counts_E.device)),
                                expert_idx_N=slot_N.index_select(0, rows_N))
    return splan, rows_N


def replica_plan(plan, table_EH: torch.Tensor, nh_E: torch.Tensor, num_virtual: int, fill: int | None = None):
    """(the Plan over the virtual slots, x_ND's rows in that order): each expert's rows on this rank
    split into consecutive parts, one per holder (table_EH[e, :nh_E[e]], owner first), by the row's
    index j within the expert's block: equal parts (per-step dispatchers), or with `fill` = C (a
    static buffer of C rows per slot) the holders filled in turn, holder min(j // C, nh - 1), so the
    expert keeps its first nh*C rows and the last holder's buffer drops the rest. Device ops only."""
    dev = plan.counts_E.device
    counts = plan.counts_E.to(torch.long)
    e_N = plan.expert_idx_N.to(dev)
    start_E = torch.cumsum(counts, 0) - counts
    j_N = torch.arange(e_N.shape[0], device=dev) - start_E.index_select(0, e_N)
    nh_N = nh_E.to(dev).index_select(0, e_N)
    if fill is None:
        h_N = torch.div(j_N * nh_N, counts.index_select(0, e_N).clamp_min(1), rounding_mode="floor")
    else:
        h_N = torch.minimum(torch.div(j_N, fill, rounding_mode="floor"), nh_N - 1)
    v_N = table_EH.to(dev)[e_N, h_N]
    rows_N = torch.argsort(v_N, stable=True)
    splan = dataclasses.replace(plan, counts_E=torch.bincount(v_N, minlength=num_virtual).to(plan.counts_E.dtype),
                                expert_idx_N=v_N.index_select(0, rows_N))
    return splan, rows_N


def static_keep(plan, cap_E: torch.Tensor):
    """(keep_N, dropped) of a Plan whose expert e keeps its first cap_E[e] rows (a static buffer of
    C rows per slot and nh_E[e] slots: cap_E = nh_E * C): the rows the ep mode's virtual dispatch
    keeps, for the modes that compute every row (sharded_dp zeroes the others). Device ops only."""
    dev = plan.counts_E.device
    counts = plan.counts_E.to(torch.long)
    cap = cap_E.to(device=dev, dtype=torch.long)
    e_N = plan.expert_idx_N.to(dev)
    j_N = torch.arange(e_N.shape[0], device=dev) - (torch.cumsum(counts, 0) - counts).index_select(0, e_N)
    return j_N < cap.index_select(0, e_N), (counts - cap).clamp_min(0).sum()


def replica_routes(placement: Placement, layout) -> tuple:
    """The host side of `replica_weights` (Python integers, fixed per placement): (the local rows
    this rank sends, in destination order; out_splits; in_splits; the order that puts the arrived
    rows in my replica slots' order)."""
    P, L, me = layout.world, layout.local_experts, layout.rank
    reps = placement.replicas
    k = len(reps) // P
    pos = placement.position()
    send, in_splits = [], []
    for q in range(P):
        rows = [pos[e] % L for e in reps[q * k:(q + 1) * k] if pos[e] // L == me]
        send += rows
        in_splits.append(len(rows))
    need = reps[me * k:(me + 1) * k]
    out_splits = [sum(1 for e in need if pos[e] // L == p) for p in range(P)]
    arrival = sorted(range(k), key=lambda j: (pos[need[j]] // L, j))  # source-major, then my slot order
    inv = [0] * k
    for i, j in enumerate(arrival):
        inv[j] = i
    return send, out_splits, in_splits, inv


def replica_weights(local: tuple, placement: Placement, layout, group, index: tuple | None = None) -> tuple:
    """(w1, w2, w3) of this rank for the virtual layout: its L own rows (`local`, differentiable into
    the parameters), then its k replicas' rows fetched from their owners with one differentiable
    all-to-all: the backward sends the replicas' gradients back, summed into the owners'.
    index: (send rows, arrival order) as long tensors on the weights' device, out_splits, in_splits
    (the runner keeps them per placement: no host-to-device copy on the step); None: made here."""
    L = layout.local_experts
    k = len(placement.replicas) // layout.world
    ws = [w for w in local if w is not None]
    flat = torch.cat([w.reshape(L, -1) for w in ws], 1)  # [L, W]: every matrix of a row travels together
    if index is None:
        send, out_splits, in_splits, inv = replica_routes(placement, layout)
        index = (torch.tensor(send, dtype=torch.long, device=flat.device),
                 torch.tensor(inv, dtype=torch.long, device=flat.device), out_splits, in_splits)
    send_t, inv_t, out_splits, in_splits = index
    got = all_to_all(flat.index_select(0, send_t), out_splits, in_splits, group).index_select(0, inv_t)
    out, at = [], 0
    for w in ws:
        n = w[0].numel()
        out.append(torch.cat([w, got[:, at:at + n].reshape((k,) + tuple(w.shape[1:]))], 0))
        at += n
    return tuple(out) + (None,) * (3 - len(out))


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def _fsdp_sharded(w) -> bool:
    """Whether the expert weight is sharded over more than the ep mesh (FSDP2: a DTensor over (edp, ep))."""
    return isinstance(w, DTensor) and w.device_mesh.ndim > 1


@torch.no_grad()
def apply_placement(layer, new: Placement, optimizer: torch.optim.Optimizer | None = None) -> int:
    """Collective: move the layer's expert rows (weights, gradients, and the optimizer's
    per-parameter tensors of the weight's local shape) from the runner's placement to `new`, in
    place, and install `new` on the runner. Returns the experts (rows) this rank received.

    Plain engine: over the ep group (every ep group makes the same move). FSDP2 (expert weights
    DTensors over (edp, ep), see parallel/fsdp.py): over the whole mesh, the runner's agree group,
    writing the sharded parameters and their moments (between steps FSDP2 holds only those): a
    slot's rows go to the rank that holds its new slot's shard, whichever edp index that is."""
    runner = layer.runner
    old = runner.placement
    if new.slots == old.slots:  # replicas hold no rows of their own: nothing moves
        runner.set_placement(new)
        return 0
    layout = runner.layout
    ex = layer.experts
    if isinstance(ex, FSDPModule):
        # the sharded parameters registered, and no unsharded copy left to outlive the move (an
        # evaluation forward with reshard_after_forward=False keeps one until the next backward)
        ex.reshard()
    params = [p for p in (ex.w1, ex.w2, ex.w3) if p is not None]
    if _fsdp_sharded(params[0]):
        group = runner.agree_group
        mesh_ranks = sorted(params[0].device_mesh.mesh.flatten().tolist())
        if sorted(dist.get_process_group_ranks(group)) != mesh_ranks:
            raise ValueError(f"apply_placement: the experts' mesh holds ranks {mesh_ranks}, the runner's agree group "
                             f"{sorted(dist.get_process_group_ranks(group))}: under FSDP2 a re-placement is an "
                             "all-to-all over the experts' whole (edp, ep) mesh, which must be the agree group")
        held = _shard_holdings(params[0], group)
        me = dist.get_rank(group)
    else:
        group, me = runner.group, layout.rank
        held = _layout_holdings(layout.world, layout.local_experts)
    tensors = []
    for p in params:
        local = _local(p.detach())
        tensors.append(local)
        if p.grad is not None:
            tensors.append(_local(p.grad))
        state = optimizer.state.get(p, {}) if optimizer is not None else {}
        for k in sorted(state):
            v = state[k]
            if isinstance(v, torch.Tensor) and _local(v).shape == local.shape:
                tensors.append(_local(v))
    moved, received = _move_rows(tensors, old, new, held, me, group)
    for dst, src in zip(tensors, moved):
        dst.copy_(src)
    runner.set_placement(new)
    return received
