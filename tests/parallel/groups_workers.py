"""Rank-side bodies of tests/parallel/test_groups_ep.py (spawned by moesys.parallel.simulate).

Group-limited routing and the global-batch balance loss under expert parallelism, against ONE
process that holds every rank's tokens: outputs, input grads, the router's and the experts' grads
after the trainer's own gradient sync (allreduce_gradients: mean over dp), and the balance loss.
Each rank also counts, from the routes the runtime dispatches, to how many EP ranks each of its
tokens goes. Failures come back as strings (a worker never raises mid-collective).
"""
from __future__ import annotations

import copy
import os
import sys

import torch
import torch.distributed as dist

from moesys import MoEConfig, MoELayer
from moesys.parallel import ParallelDims, allreduce_gradients, apply_expert_parallel

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/: ep_check
from ep_check import check_local_expert_grads, close  # noqa: E402


def _data(world, T, D, seed):
    xs = [torch.randn(T, D, generator=torch.Generator().manual_seed(seed * 100 + r)) for r in range(world)]
    gys = [torch.randn(T, D, generator=torch.Generator().manual_seed(seed * 100 + 50 + r)) for r in range(world)]
    return xs, gys


def _reference(base, xs, gys, global_batch):
    """One process, every rank's tokens. global_batch: one forward over all of them, its balance
    loss counted once per rank (the ranks' losses sum to world x the loss over all tokens); else
    each rank's tokens alone (the loss is per rank)."""
    ref = copy.deepcopy(base)
    ref.set_balance_group("local")  # a single process that holds every token, inside the multi-rank job
    world = len(xs)
    if global_batch:
        x = torch.cat(xs).requires_grad_(True)
        y, aux = ref(x)
        ((y * torch.cat(gys)).sum() + world * aux.loss).backward()
        outs, dxs, losses = list(y.detach().split(len(xs[0]))), list(x.grad.split(len(xs[0]))), [aux.loss.detach()]
    else:
        outs, dxs, losses = [], [], []
        for x, gy in zip(xs, gys):
            x = x.clone().requires_grad_(True)
            y, aux = ref(x)
            ((y * gy).sum() + aux.loss).backward()
            outs.append(y.detach())
            dxs.append(x.grad)
            losses.append(aux.loss.detach())
    grads = {n: p.grad.clone() for n, p in ref.named_parameters() if p.grad is not None}
    return outs, dxs, grads, losses


def destinations_per_token(layer, x, ranks_per_node=1) -> tuple:
    """([T] how many EP ranks (nodes, with ranks_per_node > 1) receive each token, rows dispatched),
    from the kept routes the runtime dispatches (one row per route, to the rank holding its expert)."""
    routing, plan = layer.route(x, seq_len=x.shape[0])
    lay = layer.runner.layout
    expert_N = torch.repeat_interleave(torch.arange(layer.cfg.num_experts), plan.counts_E.cpu())
    dest_N = expert_N // lay.local_experts // ranks_per_node
    pairs = torch.unique(plan.token_idx_N.cpu() * lay.world + dest_N)
    return torch.bincount(pairs // lay.world, minlength=x.shape[0]), int(plan.counts_E.sum())


COMBOS = (("alltoallv", "ep", 1), ("padded", "ep", 2), ("alltoallv", "sharded_dp", 1))


def _check_one(base, cfg, dims, xs, gys, outs, dxs, grads, losses, gb, fails, tag, dispatcher, mode, overlap):
    me, world = dims.rank, len(xs)
    layer = copy.deepcopy(base)
    apply_expert_parallel(layer, dims.ep_group, dims=dims, dispatcher=dispatcher, mode=mode, overlap=overlap,
                          timeout_s=60)
    layer.set_balance_group(dims.dp_group)
    x = xs[me].clone().requires_grad_(True)
    y, aux = layer(x)
    ((y * gys[me]).sum() + aux.loss).backward()
    close("y", y.detach(), outs[me], fails, tag)
    close("dx", x.grad, dxs[me], fails, tag)
    # the balance loss: global_batch's rank mean is the loss over all tokens; else each rank's own
    loss = aux.loss.detach().reshape(1).clone()
    if gb:
        dist.all_reduce(loss, group=dims.dp_group)
        close("aux loss (mean over ranks)", loss / world, losses[0].reshape(1), fails, tag)
    else:
        close("aux loss", loss, losses[me].reshape(1), fails, tag)
    allreduce_gradients(layer, dims)  # the trainer's sync: mean over dp (experts: over edp)
    close("d router x dp", layer.router.weight.grad * dims.dp, grads["router.weight"], fails, tag)
    for wn in ("w1", "w2", "w3"):
        p = getattr(layer.experts, wn)
        if p is not None:
            p.grad.mul_(dims.dp)
    check_local_expert_grads(layer, grads, fails, tag)
    return layer


def groups_worker(cases, ep, T=9, seed=0, combos=COMBOS):
    """cases: MoEConfig kwargs; combos: (dispatcher, mode, overlap). Returns failures, checks run and,
    per case, the max destinations per token (over all ranks) and the dispatched rows / distinct
    (token, rank) pairs summed over ranks (of the first combo)."""
    world = dist.get_world_size()
    dims = ParallelDims.build(ep=ep, timeout_s=60)
    me = dims.rank
    fails, checked, fanout = [], 0, []
    for ci, kw in enumerate(cases):
        cfg = MoEConfig(**kw)
        torch.manual_seed(seed)  # every case: the same weights and tokens (same sizes), so fan-outs compare
        base = MoELayer(cfg)
        with torch.no_grad():  # decisive routing: no near-ties that reduction order could flip
            base.router.weight.normal_(0, 0.5)
        xs, gys = _data(world, T, cfg.hidden_size, seed)
        gb = cfg.aux_loss == "global_batch"
        outs, dxs, grads, losses = _reference(base, xs, gys, gb)
        for k, (dispatcher, mode, overlap) in enumerate(combos):
            tag = (f"case{ci}({kw.get('router', 'topk')} G={cfg.num_groups} TG={cfg.topk_groups} aux={cfg.aux_loss}) "
                   f"world={world} ep={ep} {dispatcher}/{mode}/c={overlap}")
            layer = _check_one(base, cfg, dims, xs, gys, outs, dxs, grads, losses, gb, fails, tag,
                               dispatcher, mode, overlap)
            checked += 1
            if k == 0:
                # fan-out: to how many EP ranks each token goes, and rows vs distinct (token, rank) pairs
                with torch.no_grad():  # no_grad: the route() below issues no collective
                    dest, rows = destinations_per_token(layer, xs[me])
                    nodes, _ = destinations_per_token(layer, xs[me], dims.local_world_size)
                mx = torch.tensor([float(dest.max()), float(nodes.max())])
                rest = torch.tensor([float(rows), float(dest.sum())])
                dist.all_reduce(mx, op=dist.ReduceOp.MAX, group=dims.ep_group)
                dist.all_reduce(rest, group=dims.ep_group)
                fanout.append({"max_dest": int(mx[0]), "max_nodes": int(mx[1]), "rows": int(rest[0]),
                               "pairs": int(rest[1])})
    return {"fails": fails, "checked": checked, "fanout": fanout}
