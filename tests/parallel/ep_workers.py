"""Rank-side bodies of the multi-rank tests (spawned by moesys.parallel.simulate).

Each worker loops over many combinations inside one spawn (a spawn costs seconds on 2 cores) and
returns a list of failure strings; the test asserts that list is empty. References are computed on
every rank from the same seeds: the single-process layer applied to each rank's tokens separately
(the per-source-rank capacity makes that the exact reference; dropless it equals feeding all tokens).
"""
from __future__ import annotations

import copy
import itertools
import os
import sys
import time

import torch
import torch.distributed as dist

from moesys import MoEConfig, MoELayer
from moesys.parallel import spawn
from moesys.parallel import (DISPATCHERS, AllGatherDispatcher, AllToAllVDispatcher, ExpertLayout,
                             HierarchicalDispatcher, HierarchicalPaddedDispatcher, PaddedDispatcher, ParallelDims,
                             apply_expert_parallel)

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/: ep_check
from ep_check import check_local_expert_grads, close  # noqa: E402

RNG_SEED = 1234




# ---------------------------------------------------------------------------------------------
# dispatchers on plain tensors: "experts" scale rows by a per-expert factor
def _make_dispatcher(name, layout, group, dims):
    if name in ("hierarchical", "hierarchical_padded"):
        lw = dims.local_world_size if dims.ep_node_group is not None else layout.world
        cls = HierarchicalDispatcher if name == "hierarchical" else HierarchicalPaddedDispatcher
        return cls(layout, group, node_group=dims.ep_node_group, cross_group=dims.ep_cross_group,
                   local_world_size=lw, timeout_s=30)
    cls = {"alltoallv": AllToAllVDispatcher, "padded": PaddedDispatcher, "allgather": AllGatherDispatcher}[name]
    return cls(layout, group, timeout_s=30)


def dispatcher_worker(E_values, D=3, names=DISPATCHERS):
    torch.manual_seed(0)
    dims = ParallelDims.build(ep=dist.get_world_size(), timeout_s=30)
    P, me = dims.ep, dims.ep_rank
    fails = []
    for E, name, n_base in itertools.product(E_values, names, (0, 5)):
        layout = ExpertLayout(world=P, rank=me, num_experts=E, ffn_size=P * 2)
        d = _make_dispatcher(name, layout, dims.ep_group, dims)
        g = torch.Generator().manual_seed(100 + me + 10 * n_base)
        counts_E = torch.randint(0, 4, (E,), generator=g) + (n_base if me % 2 else 0)
        counts_E[E - 1] = 0  # an expert nobody routes to
        if n_base == 0 and me == P - 1:
            counts_E.zero_()  # a rank with zero rows
        n = int(counts_E.sum())
        x_ND = torch.randn(n, D, generator=g, requires_grad=True)
        scale_E = torch.arange(1.0, E + 1)
        S = layout.shards
        x_MD, counts_L, handle = d.dispatch(x_ND, counts_E)
        if int(counts_L.sum()) != x_MD.shape[0]:
            fails.append(f"{name} E={E}: counts_L sums to {int(counts_L.sum())}, x has {x_MD.shape[0]} rows")
            continue
        local_E = layout.dest_experts().view(P, -1)[me]
        y_MD = x_MD * torch.repeat_interleave(scale_E[local_E], counts_L)[:, None] / S
        y_ND = d.combine(y_MD, handle)
        expert_N = torch.repeat_interleave(torch.arange(E), counts_E)
        want = x_ND.detach() * scale_E[expert_N][:, None]
        tag = f"{name} E={E} P={P} n_base={n_base}"
        close("y", y_ND.detach(), want, fails, tag)
        gy = torch.randn(y_ND.shape, generator=g)
        (y_ND * gy).sum().backward()
        close("dx", x_ND.grad, gy * scale_E[expert_N][:, None], fails, tag)
    return fails


# ---------------------------------------------------------------------------------------------
# the layer under every dispatcher x mode x overlap degree
def _tokens(rank, T_of, D, seed):
    g = torch.Generator().manual_seed(seed * 1000 + rank)
    return torch.randn(T_of(rank), D, generator=g)


def _reference(layer, xs, gys):
    """Per-rank outputs/input grads and summed param grads of the single-process layer."""
    ref = copy.deepcopy(layer)
    outs, dxs = [], []
    for r, (x, gy) in enumerate(zip(xs, gys)):
        x = x.clone().requires_grad_(True)
        torch.manual_seed(RNG_SEED + r)  # stochastic routers (Gumbel, jitter) draw the same noise
        y, aux = ref(x)
        (y * gy).sum().add(aux.loss).backward()
        outs.append(y.detach())
        dxs.append(x.grad)
    grads = {n: p.grad.clone() for n, p in ref.named_parameters() if p.grad is not None}
    return outs, dxs, grads



def layer_worker(cases, combos, seed=0):
    """cases: (MoEConfig kwargs, token-count rule, unused-expert flag); combos: (dispatcher, mode, overlap)."""
    world = dist.get_world_size()
    dims = ParallelDims.build(ep=world, timeout_s=60)
    me = dims.ep_rank
    fails, checked = [], 0
    for ci, (cfg_kw, rule, unused) in enumerate(cases):
        cfg = MoEConfig(**cfg_kw)
        torch.manual_seed(seed + ci)
        base = MoELayer(cfg)
        T_of = {"even": lambda r: 6, "uneven": lambda r: 3 + 4 * r, "zero": lambda r: 0 if r == 1 else 5 + r}[rule]
        xs = [_tokens(r, T_of, cfg.hidden_size, seed + ci) for r in range(world)]
        if unused:
            # an expert nobody routes to: tokens lean positive, the last expert's router row negative
            xs = [x.abs() + 1.0 for x in xs]
            with torch.no_grad():
                base.router.weight[-1] = -1.0
        gys = [torch.randn(x.shape, generator=torch.Generator().manual_seed(7 + r)) for r, x in enumerate(xs)]
        outs, dxs, grads = _reference(base, xs, gys)
        for disp, mode, overlap in combos:
            tag = f"case{ci}({rule}, E={cfg.num_experts}, cf={cfg.capacity_factor}) {disp}/{mode}/c={overlap}"
            layer = copy.deepcopy(base)
            apply_expert_parallel(layer, dims.ep_group, dims=dims, dispatcher=disp, mode=mode, overlap=overlap,
                                  timeout_s=60)
            x = xs[me].clone().requires_grad_(True)
            torch.manual_seed(RNG_SEED + me)
            y, aux = layer(x)
            (y * gys[me]).sum().add(aux.loss).backward()
            close("y", y.detach(), outs[me], fails, tag)
            close("dx", x.grad, dxs[me], fails, tag)
            # router grads: each rank holds its own tokens' part; the sum is the reference
            rg = layer.router.weight.grad.clone()
            dist.all_reduce(rg, group=dims.ep_group)
            close("d router", rg, grads["router.weight"], fails, tag)
            lay = layer.runner.layout
            if disp == "alltoallv" and mode == "ep" and lay.shards == 1:
                # dropless all-to-all-v moves exactly the routed rows: N x D x 4 bytes
                want_bytes = float(aux.tokens_per_expert.sum()) * cfg.hidden_size * 4
                if float(aux.metrics["runtime/bytes_sent"]) != want_bytes:
                    fails.append(f"{tag}: bytes_sent {float(aux.metrics['runtime/bytes_sent'])} != {want_bytes}")
            check_local_expert_grads(layer, grads, fails, tag)
            checked += 1
    return {"fails": fails, "checked": checked}



# ---------------------------------------------------------------------------------------------
# sharded data parallel at overlap degrees whose F-chunks do not divide the width
def sharded_dp_worker(cases, degrees, D=5):
    """cases: (num_experts, ffn width F, activation); each rank runs its own rows with every expert.

    The reference is the single-process GroupedExperts on each rank's rows; its weight grads summed
    over ranks are what the all-gather's backward leaves on each owner (its slice of them).
    """
    from moesys.moe.experts import FFN_DIM, GroupedExperts, slice_ffn
    from moesys.parallel.sharded_dp import ShardedDataParallel, f_chunks

    P, me = dist.get_world_size(), dist.get_rank()
    fails, spans = [], {}
    for E, F, act in cases:
        torch.manual_seed(E * 100 + F)
        base = GroupedExperts(MoEConfig(hidden_size=D, ffn_hidden_size=F, num_experts=E, top_k=1, activation=act))
        with torch.no_grad():  # weights of order one: a lost F column moves y far beyond atol
            for w in (base.w1, base.w2, base.w3):
                if w is not None:
                    w.normal_(0, 0.5)
        counts, xs, gys = [], [], []
        for r in range(P):
            g = torch.Generator().manual_seed(10 * F + r)
            c_E = torch.randint(1, 5, (E,), generator=g)
            if E > 1:
                c_E[(r + 1) % E] = 0  # an expert this rank sends nothing to
            counts.append(c_E)
            xs.append(torch.randn(int(c_E.sum()), D, generator=g))
            gys.append(torch.randn(int(c_E.sum()), D, generator=g))
        ref = copy.deepcopy(base)
        for r in range(P):
            x = xs[r].clone().requires_grad_(True)
            y = ref(x, counts[r])
            (y * gys[r]).sum().backward()
            if r == me:
                want_y, want_dx = y.detach(), x.grad
        layout = ExpertLayout(world=P, rank=me, num_experts=E, ffn_size=F)
        for c in degrees:
            tag = f"E={E} F={F} {act} c={c}"
            experts = copy.deepcopy(base)
            for wn in FFN_DIM:  # this rank's experts (and F-slice when P > E), as apply_expert_parallel keeps
                w = getattr(experts, wn)
                if w is not None:
                    part = slice_ffn(wn, w.detach()[layout.expert_slice], layout.f_slice).clone()
                    setattr(experts, wn, torch.nn.Parameter(part))
            sdp = ShardedDataParallel(layout, dist.group.WORLD, timeout_s=30)
            x = xs[me].clone().requires_grad_(True)
            y = sdp(x, counts[me], experts, chunks=c)
            (y * gys[me]).sum().backward()
            spans[tag] = [(s.start, s.stop) for s in f_chunks(experts.local_weights()[0].shape[2], c)]
            if sdp.last_chunks != len(spans[tag]):
                fails.append(f"{tag}: ran {sdp.last_chunks} chunks, f_chunks gives {spans[tag]}")
            close("y", y.detach(), want_y, fails, tag)
            close("dx", x.grad, want_dx, fails, tag)
            for wn in FFN_DIM:
                p = getattr(experts, wn)
                if p is not None:
                    want = slice_ffn(wn, getattr(ref, wn).grad[layout.expert_slice], layout.f_slice)
                    close(f"d {wn}", p.grad, want, fails, tag)
    return {"fails": fails, "spans": spans}

# ---------------------------------------------------------------------------------------------
# the tuner in auto mode: several steps, decisions agreed, every step exact
def auto_worker(cfg_kw, steps=8):
    dims = ParallelDims.build(ep=dist.get_world_size(), timeout_s=60)
    me, world = dims.ep_rank, dims.ep
    torch.manual_seed(3)
    base = MoELayer(MoEConfig(**cfg_kw))
    layer = copy.deepcopy(base)
    apply_expert_parallel(layer, dims.ep_group, dims=dims, tuner={"warmup_steps": 1, "top_candidates": 3, "trials": 2})
    fails, decisions = [], []
    for step in range(steps):
        xs = [_tokens(r, lambda r: 4 + 2 * r + step % 3, cfg_kw["hidden_size"], 50 + step) for r in range(world)]
        gys = [torch.ones_like(x) for x in xs]
        outs, dxs, _ = _reference(base, xs, gys)
        x = xs[me].clone().requires_grad_(True)
        torch.manual_seed(RNG_SEED + me)
        y, aux = layer(x)
        (y * gys[me]).sum().add(aux.loss).backward()
        close("y", y.detach(), outs[me], fails, f"auto step {step}")
        close("dx", x.grad, dxs[me], fails, f"auto step {step}")
        m = aux.metrics
        decisions.append((float(m["runtime/mode_is_ep"]), float(m["runtime/degree"])))
    everyone = [None] * world
    dist.all_gather_object(everyone, decisions, group=dims.ep_group)
    if any(d != decisions for d in everyone):
        fails.append(f"ranks took different decisions: {everyone}")
    metric_names = sorted(k for k in aux.metrics if k.startswith("runtime/"))
    return {"fails": fails, "decisions": decisions, "metrics": metric_names,
            "tuner_decisions": layer.runner.tuner.decisions_made}


# ---------------------------------------------------------------------------------------------
# allreduce_gradients (ep x edp mesh): equals the mean-loss gradient of one process
def grads_worker():
    from moesys.parallel import allreduce_gradients, expert_param_groups

    world = dist.get_world_size()
    ep = 2
    dims = ParallelDims.build(ep=ep, timeout_s=60)
    cfg = MoEConfig(hidden_size=8, ffn_hidden_size=8, num_experts=4, top_k=2)
    torch.manual_seed(5)
    base = MoELayer(cfg)
    with torch.no_grad():  # weights of order one (init_std is 0.02): a grad off by 2x is far outside atol
        for p in base.parameters():
            p.normal_(0, 0.5)
    xs = [_tokens(r, lambda r: 5, 8, 99) for r in range(world)]
    ref = copy.deepcopy(base)
    loss = sum(ref(x)[0].square().sum() for x in xs) / world  # mean over dp ranks
    loss.backward()
    layer = copy.deepcopy(base)
    apply_expert_parallel(layer, dims.ep_group, dims=dims, mode="ep", overlap=1)
    layer(xs[dims.rank])[0].square().sum().backward()
    allreduce_gradients(layer, dims)
    fails = []
    groups = expert_param_groups(layer)
    if [id(p) for p in groups.expert] != [id(layer.experts.w1), id(layer.experts.w2)]:
        fails.append(f"expert_param_groups: {len(groups.expert)} expert params, not w1 and w2")
    if any(hasattr(p, "device_mesh") for p in groups.non_expert):
        fails.append("a non-expert param is a DTensor")
    if not all(hasattr(p, "device_mesh") and p.shape[0] == cfg.num_experts for p in groups.expert):
        fails.append("expert weights are not DTensors of the global shape")
    close("router", layer.router.weight.grad, ref.router.weight.grad, fails, "allreduce_gradients")
    sl = layer.runner.layout.expert_slice
    close("w1", layer.experts.w1.grad, ref.experts.w1.grad[sl], fails, "allreduce_gradients")
    close("w2", layer.experts.w2.grad, ref.experts.w2.grad[sl], fails, "allreduce_gradients")
    facts = dict(dp=dims.dp, ep=dims.ep, edp=dims.edp, ep_rank=dims.ep_rank,
                 edp_size=dist.get_world_size(dims.edp_group), ep_size=dist.get_world_size(dims.ep_group))
    return {"fails": fails, "dims": facts}


# ---------------------------------------------------------------------------------------------
# failures: mismatched configs, a dead peer
def mismatch_worker():
    rank = dist.get_rank()
    cfg = MoEConfig(hidden_size=8, ffn_hidden_size=8, num_experts=4, top_k=2 if rank == 0 else 1)
    try:
        apply_expert_parallel(MoELayer(cfg), dist.group.WORLD, mode="ep", overlap=1, timeout_s=20)
    except ValueError as err:
        return str(err)
    return "no error"


def dead_peer_worker(timeout_s):
    import time

    rank = dist.get_rank()
    cfg = MoEConfig(hidden_size=8, ffn_hidden_size=8, num_experts=2, top_k=1)
    layer = apply_expert_parallel(MoELayer(cfg), dist.group.WORLD, mode="ep", overlap=1, timeout_s=timeout_s)
    if rank == 1:
        return "exited early"
    time.sleep(0.5)
    t0 = time.perf_counter()
    try:
        layer(torch.randn(6, 8))
    except RuntimeError as err:
        return {"error": str(err)[:300], "seconds": time.perf_counter() - t0}
    return {"error": None, "seconds": time.perf_counter() - t0}


def tensor_worker():
    return torch.full((3,), float(dist.get_rank()))


def parent_pid_worker():
    return os.getppid()


def failing_worker():
    if dist.get_rank() == 1:
        raise ValueError("boom on purpose")
    return "ok"


def suite_worker(cases, combos, E_values):
    """Everything one world size checks, in one spawn."""
    return {"dispatchers": dispatcher_worker(E_values), "layer": layer_worker(cases, combos)}


def two_node_worker(cases, combos):
    """The fast 4-rank checks, in one spawn on two simulated nodes (LOCAL_WORLD_SIZE=2): the
    hierarchical dispatcher across nodes (plain tensors and the layer) and gradient sync at
    dp = 4 > ep = 2 > 1."""
    return {"dispatchers": dispatcher_worker((2, 4, 8), names=("hierarchical", "hierarchical_padded")),
            "layer": layer_worker(cases, combos), "grads": grads_worker()}


def ctor_worker():
    """apply_expert_parallel (the one way to shard a layer) is deterministic: two layers built from
    the same seed and sharded the same way hold the same slices and give the same outputs."""
    cfg = MoEConfig(hidden_size=8, ffn_hidden_size=16, num_experts=4, top_k=2)
    torch.manual_seed(0)
    a = apply_expert_parallel(MoELayer(cfg), dist.group.WORLD)
    torch.manual_seed(0)
    b = apply_expert_parallel(MoELayer(cfg), dist.group.WORLD)
    x = torch.randn(6 + dist.get_rank(), 8, generator=torch.Generator().manual_seed(dist.get_rank()))
    ya, yb = a(x)[0], b(x)[0]
    return {"local_experts": a.experts.w1.to_local().shape[0], "offset": a.experts.expert_offset,
            "max_diff": float((ya - yb).abs().max()), "sharded": type(a.runner).__name__}


def borrowed_group_worker():
    """Dispatchers, the sharded-DP mode and the autograd graph borrow a group and never own it:
    destroy_process_group(group) destroys it while they (and a graph through them) are still held,
    and using them afterwards is a clear error (issue 11)."""
    import weakref

    from moesys.parallel import comm
    from moesys.parallel.sharded_dp import ShardedDataParallel

    P, me = dist.get_world_size(), dist.get_rank()
    group = dist.new_group(list(range(P)))
    layout = ExpertLayout(world=P, rank=me, num_experts=2 * P, ffn_size=8)
    E = layout.num_experts
    counts_E = torch.arange(E) % 3 + me  # rows per expert, different on each rank
    x_ND = torch.randn(int(counts_E.sum()), 4, generator=torch.Generator().manual_seed(me), requires_grad=True)
    keep = []  # outputs (with their graphs) and runtime objects, all still held at destroy time
    for name in ("alltoallv", "allgather"):  # all-to-all and all-gather Start/Wait pairs
        d = _make_dispatcher(name, layout, group, None)
        x_MD, counts_L, handle = d.dispatch(x_ND, counts_E)
        y_ND = d.combine(x_MD * 2.0, handle)
        y_ND.sum().backward(retain_graph=True)
        keep += [d, y_ND]
    sharded = ShardedDataParallel(layout, group, timeout_s=30)
    w_LDF = torch.randn(layout.local_experts, 4, 8, requires_grad=True)
    gathered = comm.all_gather(w_LDF, group)  # the sharded mode's weight path
    gathered.sum().backward(retain_graph=True)
    keep += [sharded, gathered]
    alive = weakref.ref(group)
    dist.destroy_process_group(group)
    del group
    fails = []
    if alive() is not None:
        fails.append("the group outlived destroy_process_group while dispatchers and graphs held it")
    try:
        keep[0].dispatch(x_ND, counts_E)
        fails.append("dispatching on a destroyed group raised nothing")
    except RuntimeError as err:
        if "destroyed" not in str(err):
            fails.append(f"dispatching on a destroyed group: unclear error {err}")
    return fails


def slow_join_rank(rank, world_size, port, slow_s, results):
    """A rank whose process group is built `slow_s` late after its own init returns (rank 1), as when
    gloo's full-mesh handshake ends later on one rank than on its peer; reports when its join ended."""
    if rank == 1:
        real_init = dist.init_process_group

        def late_init(*args, **kwargs):
            real_init(*args, **kwargs)
            time.sleep(slow_s)
            results.put(("built", rank, time.monotonic()))

        dist.init_process_group = late_init
    try:
        spawn.join_job(rank, world_size, port, "gloo", 30.0)
        results.put(("joined", rank, time.monotonic()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
