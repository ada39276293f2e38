"""Rank-side bodies of the multi-rank tests (spawned by moesys.parallel.simulate).

Each worker loops over many combinations inside one spawn (a spawn costs seconds on 2 cores) and
returns a list of failure strings; the test asserts that list is empty. References are computed on
every rank from the same seeds: the single-process layer applied to each rank's tokens separately
(the per-source-rank capacity makes that the exact reference; dropless it equals feeding all tokens).
"""
from __future__ import annotations

import copy
import itertools

import torch
import torch.distributed as dist

from moesys import MoEConfig, MoELayer
from moesys.parallel import (DISPATCHERS, AllGatherDispatcher, AllToAllVDispatcher, ExpertLayout,
                             HierarchicalDispatcher, PaddedDispatcher, ParallelDims, apply_expert_parallel)

ATOL = 1e-5


def _close(name, a, b, fails, tag):
    if a.shape != b.shape:
        fails.append(f"{tag}: {name} shape {tuple(a.shape)} != {tuple(b.shape)}")
        return
    if a.numel() and not torch.allclose(a, b, atol=ATOL, rtol=1e-4):
        fails.append(f"{tag}: {name} max err {(a - b).abs().max().item():.3g}")


# ---------------------------------------------------------------------------------------------
# dispatchers on plain tensors: "experts" scale rows by a per-expert factor
def _make_dispatcher(name, layout, group, dims):
    if name == "hierarchical":
        lw = dims.local_world_size if dims.ep_node_group is not None else layout.world
        return HierarchicalDispatcher(layout, group, node_group=dims.ep_node_group, cross_group=dims.ep_cross_group,
                                      local_world_size=lw, timeout_s=30)
    cls = {"alltoallv": AllToAllVDispatcher, "padded": PaddedDispatcher, "allgather": AllGatherDispatcher}[name]
    return cls(layout, group, timeout_s=30)


def dispatcher_worker(E_values, D=3):
    torch.manual_seed(0)
    dims = ParallelDims.build(ep=dist.get_world_size(), timeout_s=30)
    P, me = dims.ep, dims.ep_rank
    fails = []
    for E, name, n_base in itertools.product(E_values, DISPATCHERS, (0, 5)):
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
        _close("y", y_ND.detach(), want, fails, tag)
        gy = torch.randn(y_ND.shape, generator=g)
        (y_ND * gy).sum().backward()
        _close("dx", x_ND.grad, gy * scale_E[expert_N][:, None], fails, tag)
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
    for x, gy in zip(xs, gys):
        x = x.clone().requires_grad_(True)
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
            y, aux = layer(x)
            (y * gys[me]).sum().add(aux.loss).backward()
            _close("y", y.detach(), outs[me], fails, tag)
            _close("dx", x.grad, dxs[me], fails, tag)
            # router grads: each rank holds its own tokens' part; the sum is the reference
            rg = layer.router.weight.grad.clone()
            dist.all_reduce(rg, group=dims.ep_group)
            _close("d router", rg, grads["router.weight"], fails, tag)
            lay = layer.runner.layout
            for wn, f_dim in (("w1", 2), ("w2", 1), ("w3", 2)):
                p = getattr(layer.experts, wn)
                if p is None:
                    continue
                want = grads[f"experts.{wn}"][lay.expert_slice]
                if lay.f_slice is not None:
                    want = want[:, :, lay.f_slice] if f_dim == 2 else want[:, lay.f_slice, :]
                _close(f"d {wn}", p.grad, want, fails, tag)
            checked += 1
    return {"fails": fails, "checked": checked}
