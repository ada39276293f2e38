"""Rank-side bodies of tests/parallel/test_shared_experts_ep.py (spawned by moesys.parallel.simulate).

Shared experts and recompute under expert parallelism, with ep <= world (several ep groups when
ep < world). The reference, computed on every rank from the same seeds: the single-process layer
applied to each rank's tokens separately (dropless, and per-source-rank capacity, make that exact),
its parameter gradients summed over all ranks' tokens. After `allreduce_gradients` (experts over
edp, the rest, shared experts included, over dp) every gradient is that sum / dp.
"""
from __future__ import annotations

import copy
import os
import sys

import torch
import torch.distributed as dist

from moesys import MoEConfig, MoELayer
from moesys.parallel import ParallelDims, allreduce_gradients, apply_expert_parallel, comm, expert_parameters

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/: ep_check
from ep_check import check_local_expert_grads, close  # noqa: E402

COMBOS = [("alltoallv", "ep", 1), ("alltoallv", "ep", 2), ("padded", "ep", 1), ("allgather", "ep", 2),
          ("alltoallv", "sharded_dp", 1), ("alltoallv", "sharded_dp", 2)]


def cases(ep: int) -> list:
    """(MoEConfig kwargs, tokens of rank r)."""
    small = dict(hidden_size=8, ffn_hidden_size=8)
    out = [
        (dict(small, num_experts=4, top_k=2, num_shared_experts=1), lambda r: 3 + 4 * r),
        (dict(small, num_experts=4, top_k=1, activation="swiglu", num_shared_experts=2, shared_ffn_hidden_size=4,
              shared_expert_gate=True, recompute=True), lambda r: 0 if r == 1 else 5 + r),  # a rank with no tokens
        (dict(small, num_experts=4, top_k=2, capacity_factor=1.0, min_capacity=1, num_shared_experts=1,
              shared_expert_gate=True, recompute=True), lambda r: 7 + r),  # drops
    ]
    if ep == 4:
        out.append((dict(small, num_experts=2, top_k=1, num_shared_experts=1, recompute=True), lambda r: 5))  # E < P
    return out


def _reference(base, xs, gys):
    ref = copy.deepcopy(base)
    outs, dxs = [], []
    for x, gy in zip(xs, gys):
        x = x.clone().requires_grad_(True)
        y, aux = ref(x)
        (y * gy).sum().add(aux.loss).backward()
        outs.append(y.detach())
        dxs.append(x.grad)
    return outs, dxs, {n: p.grad.clone() for n, p in ref.named_parameters()}


class _BackwardLog:
    """Log, in the autograd engine's order, each all-to-all's backward launch (its Wait node) and
    wait (its Start node), and the start of the shared FFN's backward (`shared_output_hook`)."""

    def __init__(self):
        self.events: list = []
        self._saved = (comm._A2AWait.backward, comm._A2AStart.backward)

    def __enter__(self):
        wait_bwd, start_bwd = self._saved

        def launch(ctx, dy):
            self.events.append("launch")
            return wait_bwd(ctx, dy)

        def wait(ctx, g):
            self.events.append("wait")
            return start_bwd(ctx, g)

        comm._A2AWait.backward, comm._A2AStart.backward = staticmethod(launch), staticmethod(wait)
        return self

    def __exit__(self, *exc):
        comm._A2AWait.backward, comm._A2AStart.backward = (staticmethod(f) for f in self._saved)

    def shared_output_hook(self, module, args, out):
        out.grad_fn.register_prehook(lambda grads: self.events.append("shared"))


def _record_order(layer, events: list) -> None:
    """Log, in call order, each dispatch start/finish and the shared FFN's forward."""
    d = layer.runner.dispatcher
    start, finish = d.dispatch_start, d.dispatch_finish

    def dispatch_start(*a, **k):
        events.append("dispatch_start")
        return start(*a, **k)

    def dispatch_finish(*a, **k):
        events.append("dispatch_finish")
        return finish(*a, **k)

    d.dispatch_start, d.dispatch_finish = dispatch_start, dispatch_finish
    layer.shared_experts.register_forward_pre_hook(lambda m, a: events.append("shared"))


def shared_worker(ep: int):
    world, rank = dist.get_world_size(), dist.get_rank()
    dims = ParallelDims.build(ep=ep, timeout_s=60)
    fails, checked, orders = [], 0, []
    for ci, (cfg_kw, T_of) in enumerate(cases(ep)):
        cfg = MoEConfig(**cfg_kw)
        torch.manual_seed(ci)
        base = MoELayer(cfg)
        with torch.no_grad():
            base.router.weight.normal_(0, 0.5)
            if base.shared_experts.gate is not None:
                base.shared_experts.gate.normal_(0, 0.5)
        xs = [torch.randn(T_of(r), cfg.hidden_size, generator=torch.Generator().manual_seed(100 * ci + r))
              for r in range(world)]
        gys = [torch.randn(x.shape, generator=torch.Generator().manual_seed(7 + r)) for r, x in enumerate(xs)]
        outs, dxs, grads = _reference(base, xs, gys)
        mean = {n: g / dims.dp for n, g in grads.items()}
        for disp, mode, overlap in COMBOS:
            tag = f"ep={ep}/world={world} case{ci} {disp}/{mode}/c={overlap}"
            layer = copy.deepcopy(base)
            apply_expert_parallel(layer, dims.ep_group, dims=dims, dispatcher=disp, mode=mode, overlap=overlap,
                                  timeout_s=60)
            events: list = []
            if mode == "ep":
                _record_order(layer, events)
            bwd = _BackwardLog()
            if disp == "alltoallv" and mode == "ep":
                layer.shared_experts.register_forward_hook(bwd.shared_output_hook)
            x = xs[rank].clone().requires_grad_(True)
            y, aux = layer(x)
            with bwd:
                (y * gys[rank]).sum().add(aux.loss).backward()
            if disp == "alltoallv" and mode == "ep":
                # backward: the shared FFN's runs after the dispatch's reverse all-to-all is launched
                # and before it is waited for (the engine runs later-created ready nodes first)
                ev = bwd.events
                last_launch = len(ev) - 1 - ev[::-1].index("launch") if "launch" in ev else len(ev)
                if "launch" not in ev or ev.count("shared") != 1 or not (last_launch < ev.index("shared") < len(ev) - 1 and ev[-1] == "wait"):
                    fails.append(f"{tag}: backward order {ev}")
            close("y", y.detach(), outs[rank], fails, tag)
            close("dx", x.grad, dxs[rank], fails, tag)
            sh = layer.shared_experts
            if {id(p) for p in sh.parameters()} & {id(p) for p in expert_parameters(layer)}:
                fails.append(f"{tag}: a shared-expert parameter is counted as an expert (sharded) parameter")
            if sh.w1.shape != base.shared_experts.w1.shape:
                fails.append(f"{tag}: shared experts were sliced: {tuple(sh.w1.shape)}")
            allreduce_gradients(layer, dims)
            for n, p in layer.named_parameters():
                if not n.startswith("experts."):
                    close(f"d {n}", p.grad, mean[n], fails, tag)
            check_local_expert_grads(layer, {n: g for n, g in mean.items()}, fails, tag)
            if mode == "ep":
                if float(aux.metrics["runtime/shared_s"]) <= 0:
                    fails.append(f"{tag}: runtime/shared_s is {aux.metrics['runtime/shared_s']}")
                # the shared FFN runs after the first dispatch is issued and before it is waited for
                if events[:3] != ["dispatch_start", "shared", "dispatch_finish"] or events.count("shared") != 1:
                    fails.append(f"{tag}: call order {events}")
                orders.append(events[:3])
            checked += 1
    return {"fails": fails, "checked": checked, "orders": orders}
