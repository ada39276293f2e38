"""Rank-side bodies of the EvoMoE multi-rank tests (spawned by moesys.parallel.simulate).

The Gumbel noise is fixed by seeding the global generator identically right before the reference's
forward on rank r's tokens and before rank r's expert-parallel forward: the router draws first, so
both see the same noise and therefore the same (variable-K) routes.
"""
from __future__ import annotations

import copy
import itertools
import os
import sys

import torch
import torch.distributed as dist

from moesys import MoEConfig, MoELayer
from moesys.evo import EvoMoELayer
from moesys.moe.experts import FFN_DIM, slice_ffn
from moesys.parallel import DISPATCHERS, ParallelDims, apply_expert_parallel

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/: ep_check
from ep_check import check_local_expert_grads, close  # noqa: E402





def _gate(layer, tau, hard):
    layer.router.set_gate_state(tau=tau, hard=hard)
    return layer


CASES = [  # (MoEConfig kwargs, tau, hard)
    (dict(router="dts", num_experts=4, top_k=1), 2.0, False),  # dense phase: K ~ E, dropless
    (dict(router="dts", num_experts=4, top_k=1, activation="swiglu"), 0.4, False),  # K varies per token
    (dict(router="act_dts", num_experts=4, top_k=1, gate_activation="tanh"), 0.5, False),
    (dict(router="dts", num_experts=4, top_k=1, capacity_factor=1.0, min_capacity=1), 0.5, True),  # hard, drops
    (dict(router="dts", num_experts=1, top_k=1), 1.0, False),  # E < P: F-sharded expert
]


def dts_layer_worker(seed=0):
    world = dist.get_world_size()
    dims = ParallelDims.build(ep=world, timeout_s=60)
    me = dims.ep_rank
    fails, checked, k_mean = [], 0, []
    combos = [(d, "ep", c) for d, c in itertools.product(DISPATCHERS, (1, 2))] + [("alltoallv", "sharded_dp", 1)]
    for ci, (kw, tau, hard) in enumerate(CASES):
        cfg = MoEConfig(hidden_size=8, ffn_hidden_size=8, **kw)
        torch.manual_seed(seed + ci)
        base = _gate(MoELayer(cfg), tau, hard)
        with torch.no_grad():
            base.router.weight.normal_(0, 0.5)
        xs = [torch.randn(3 + 4 * r, 8, generator=torch.Generator().manual_seed(100 * ci + r)) for r in range(world)]
        gys = [torch.randn(x.shape, generator=torch.Generator().manual_seed(7 + r)) for r, x in enumerate(xs)]
        ref = copy.deepcopy(base)
        outs, dxs, ks = [], [], []
        for r, (x, gy) in enumerate(zip(xs, gys)):
            x = x.clone().requires_grad_(True)
            torch.manual_seed(555 + r)
            y, aux = ref(x)
            (y * gy).sum().add(aux.loss).backward()
            outs.append(y.detach())
            dxs.append(x.grad)
            ks.append(float(aux.metrics["experts_per_token"]))
        grads = {n: p.grad.clone() for n, p in ref.named_parameters() if p.grad is not None}
        k_mean.append(sum(ks) / len(ks))
        for disp, mode, overlap in combos:
            tag = f"case{ci}({kw['router']}, E={cfg.num_experts}, tau={tau}, hard={hard}) {disp}/{mode}/c={overlap}"
            layer = copy.deepcopy(base)
            apply_expert_parallel(layer, dims.ep_group, dims=dims, dispatcher=disp, mode=mode, overlap=overlap,
                                  timeout_s=60)
            x = xs[me].clone().requires_grad_(True)
            torch.manual_seed(555 + me)
            y, aux = layer(x)
            (y * gys[me]).sum().add(aux.loss).backward()
            close("y", y.detach(), outs[me], fails, tag)
            close("dx", x.grad, dxs[me], fails, tag)
            for n in ("router.weight", "router.gate_bias"):
                if n in grads:
                    g = layer.get_parameter(n).grad.clone()
                    dist.all_reduce(g, group=dims.ep_group)
                    close(f"d {n}", g, grads[n], fails, tag)
            check_local_expert_grads(layer, grads, fails, tag)
            checked += 1
    return {"fails": fails, "checked": checked, "combos": len(combos), "k_mean": k_mean}


def diversify_worker(num_experts_list=(1, 2, 4)):
    """EvoMoELayer sharded by the real runtime, then diversified on each rank: every rank's slice
    equals the single-process layer's slice; the sharded MoE forward equals the single-process one."""
    world = dist.get_world_size()
    dims = ParallelDims.build(ep=world, timeout_s=60)
    me = dims.ep_rank
    fails = []
    for E in num_experts_list:
        for method in ("mask", "drop_upcycle"):
            cfg = MoEConfig(hidden_size=8, ffn_hidden_size=8, num_experts=E, top_k=1, router="dts", activation="swiglu")
            torch.manual_seed(E)
            base = EvoMoELayer(cfg, dense_phase=True, layer_index=1)
            ref = copy.deepcopy(base)
            ref.diversify(seed=9, method=method)
            layer = copy.deepcopy(base)
            apply_expert_parallel(layer, dims.ep_group, dims=dims, timeout_s=60)
            x = torch.randn(5, 8, generator=torch.Generator().manual_seed(me))
            y_dense, _ = layer(x)  # the dense phase needs no communication
            close("dense phase y", y_dense.detach(), base(x)[0].detach(), fails, f"E={E} {method}")
            layer.diversify(seed=9, method=method)
            lay = layer.runner.layout
            for wn in FFN_DIM:
                want = slice_ffn(wn, getattr(ref.experts, wn).detach()[lay.expert_slice], lay.f_slice)
                close(f"spawned {wn}", getattr(layer.experts, wn).detach(), want, fails, f"E={E} {method} rank {me}")
            close("router", layer.router.weight.detach(), ref.router.weight.detach(), fails, f"E={E} {method}")
            torch.manual_seed(77 + me)
            y, _ = layer(x)
            torch.manual_seed(77 + me)
            y_ref, _ = ref(x)
            close("moe y", y.detach(), y_ref.detach(), fails, f"E={E} {method}")
    return fails


def suite(seed=0):
    return {"layer": dts_layer_worker(seed), "diversify": diversify_worker()}
