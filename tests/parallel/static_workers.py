"""Rank-side bodies of tests/parallel/test_static_capacity.py (spawned by moesys.parallel.simulate).

The references are computed on every rank, independently of the runtime: the single-process layer
on each source rank's tokens (the static buffer is per (source rank, expert), so each source rank
drops alone), with a test runner that drops, per expert, the rows past C = max(1, ceil(f*T*K/E)),
counted by a Python loop over the plan's counts.
"""
from __future__ import annotations

import copy
import math
import os
import sys
import traceback

import torch
import torch.distributed as dist

from moesys import LocalRunner, MoEConfig, MoELayer
from moesys.parallel import ParallelDims, apply_expert_parallel
from moesys.parallel.placement import Placement, apply_placement

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/: ep_check
from ep_check import check_local_expert_grads, close  # noqa: E402

RNG_SEED = 1234


class DropPastRunner(LocalRunner):
    """Single-process runner that computes every row, then zeroes the rows past C of each expert
    (rows in the plan's order: the first C of an expert are kept). `dropped` is what it zeroed."""

    local = False  # stands in for the expert-parallel runner: the layer keeps its host plan path

    def __init__(self, C: int) -> None:
        super().__init__()
        self.C = C
        self.dropped = 0
        self.last_metrics: dict = {}

    def __call__(self, x_ND, plan, experts, weights, shared=None):
        y_ND = experts.compute(x_ND, plan.counts_E, *weights)
        keep = []
        self.dropped = 0
        for n in plan.counts_E.tolist():
            keep += [1.0] * min(n, self.C) + [0.0] * max(n - self.C, 0)
            self.dropped += max(n - self.C, 0)
        return y_ND * torch.tensor(keep, dtype=y_ND.dtype).unsqueeze(1)


def static_C(f: float, T: int, K: int, E: int) -> int:
    return max(1, math.ceil(f * T * K / E))


def _reference(base, xs, gys, C_of):
    """Per-source-rank outputs, input grads and drops; param grads summed over the sources.
    C_of(T): the capacity, or None for the plain layer (nothing dropped)."""
    ref = copy.deepcopy(base)
    outs, dxs, drops = [], [], []
    for r, (x, gy) in enumerate(zip(xs, gys)):
        C = C_of(x.shape[0])
        runner = DropPastRunner(C) if C is not None else None
        if runner is not None:
            ref.set_runner(runner)
        x = x.clone().requires_grad_(True)
        torch.manual_seed(RNG_SEED + r)
        y, aux = ref(x)
        (y * gy).sum().add(aux.loss).backward()
        outs.append(y.detach())
        dxs.append(x.grad)
        drops.append(runner.dropped if runner is not None else 0)
    grads = {n: p.grad.clone() for n, p in ref.named_parameters() if p.grad is not None}
    return outs, dxs, grads, drops


def _tokens(T, D, seed, unused):
    x = torch.randn(T, D, generator=torch.Generator().manual_seed(seed))
    return x.abs() + 1.0 if unused else x


def equivalence_worker(cases, combos, ep=2):
    """cases: (MoEConfig kwargs, static factor f, ample: compare with the plain layer, unused expert).
    combos: (mode, overlap). Ranks of one ep group hold the same odd T; the ep groups differ."""
    dims = ParallelDims.build(ep=ep, timeout_s=60)
    group = dims.ep_group
    members = dist.get_process_group_ranks(group)
    me = dims.ep_rank
    T = 7 + 2 * min(members)  # odd, equal within the ep group (the static buffer's contract)
    fails, checked = [], 0
    for ci, (cfg_kw, f, ample, unused) in enumerate(cases):
        cfg = MoEConfig(**cfg_kw)
        torch.manual_seed(ci)
        base = MoELayer(cfg)
        with torch.no_grad():  # weights of order one, so a wrong row is far outside atol
            for p in base.experts.parameters():
                p.normal_(0, 0.5)
            if unused:
                base.router.weight[-1] = -1.0  # tokens lean positive: nobody routes to the last expert
        xs = [_tokens(T, cfg.hidden_size, 100 * ci + g, unused) for g in members]
        gys = [torch.randn(T, cfg.hidden_size, generator=torch.Generator().manual_seed(7 + g)) for g in members]
        C_of = (lambda t: None) if ample else (lambda t: static_C(f, t, cfg.top_k, cfg.num_experts))
        outs, dxs, grads, drops = _reference(base, xs, gys, C_of)
        for mode, overlap in combos:
            tag = f"case{ci}(E={cfg.num_experts} K={cfg.top_k} f={f} T={T}) {mode}/c={overlap}"
            try:
                layer = copy.deepcopy(base)
                apply_expert_parallel(layer, group, dims=dims, dispatcher="padded", mode=mode, overlap=overlap,
                                      static_capacity_factor=f, timeout_s=60,
                                      tuner={"warmup_steps": 1, "top_candidates": 3, "trials": 2})
                steps = 4 if mode == "auto" else 1
                for step in range(steps):
                    layer.zero_grad(set_to_none=True)
                    x = xs[me].clone().requires_grad_(True)
                    torch.manual_seed(RNG_SEED + me)
                    y, aux = layer(x)
                    (y * gys[me]).sum().add(aux.loss).backward()
                    stag = f"{tag} step {step}"
                    close("y", y.detach(), outs[me], fails, stag)
                    close("dx", x.grad, dxs[me], fails, stag)
                    rg = layer.router.weight.grad.clone()
                    dist.all_reduce(rg, group=group)
                    close("d router", rg, grads["router.weight"], fails, stag)
                    check_local_expert_grads(layer, grads, fails, stag)
                    got = int(aux.metrics["runtime/overflow_dropped"])
                    if got != drops[me]:
                        fails.append(f"{stag}: overflow_dropped {got} != {drops[me]} (reference)")
                if unused and float(aux.tokens_per_expert[-1]) != 0:
                    fails.append(f"{tag}: the last expert got tokens; the case lost its empty expert")
                checked += 1
            except Exception:  # report, never leave the other ranks in a collective
                fails.append(f"{tag}: {traceback.format_exc()[-600:]}")
    return {"fails": fails, "checked": checked, "drops": drops}


def error_worker():
    """overflow='error': every rank raises together, naming the field, when any rank overflows."""
    dims = ParallelDims.build(ep=dist.get_world_size(), timeout_s=30)
    cfg = MoEConfig(hidden_size=8, ffn_hidden_size=8, num_experts=4, top_k=2)
    torch.manual_seed(0)
    layer = apply_expert_parallel(MoELayer(cfg), dims.ep_group, dims=dims, dispatcher="padded", mode="ep",
                                  overlap=1, static_capacity_factor=0.25, overflow="error", timeout_s=30)
    x = torch.randn(9, 8, generator=torch.Generator().manual_seed(dims.rank))
    try:
        layer(x)
    except ValueError as err:
        return str(err)
    return "no error"


# ---------------------------------------------------------------------------------------------
# host reads on the dispatch path, counted per layer forward
READS = ("item", "tolist", "cpu", "numpy", "__int__", "__index__", "__float__", "__bool__")


class CountingRunner:
    """Wraps the installed runner; counts Python-level host reads of tensors while it runs (its
    call and its prefetch, which the layer makes before the permute)."""

    def __init__(self, runner) -> None:
        self.inner = runner
        self.reads: list = []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def _spied(self, fn, *args, **kwargs):
        saved = {n: getattr(torch.Tensor, n) for n in READS}
        reads = self.reads

        def spy(name):
            orig = saved[name]

            def f(t, *a, **k):
                reads.append(f"{name} {''.join(traceback.format_stack(limit=3)[:1]).strip()}")
                return orig(t, *a, **k)
            return f

        for n in READS:
            setattr(torch.Tensor, n, spy(n))
        try:
            return fn(*args, **kwargs)
        finally:
            for n, fn_ in saved.items():
                setattr(torch.Tensor, n, fn_)

    def prefetch(self, plan):
        return self._spied(self.inner.prefetch, plan)

    def __call__(self, *args, **kwargs):
        return self._spied(self.inner, *args, **kwargs)


def host_reads_worker(setups):
    """setups: (name, apply_expert_parallel options, and "placement": (slots, replicas) to install
    an expert placement); pinned ep mode. Returns, per setup,
    the host reads of each of 2 layer forwards (the runner's, i.e. the dispatch path; the experts
    run on torch._grouped_mm with device offsets, which reads nothing)."""
    dims = ParallelDims.build(ep=dist.get_world_size(), timeout_s=30)
    cfg = MoEConfig(hidden_size=8, ffn_hidden_size=8, num_experts=4, top_k=2, kernel_backend="grouped_mm")
    out = {}
    for name, opts in setups:
        torch.manual_seed(0)
        opts = dict(opts)
        placement = opts.pop("placement", None)  # (slots, replicas): an expert placement, installed first
        layer = apply_expert_parallel(MoELayer(cfg), dims.ep_group, dims=dims, mode="ep", timeout_s=30, **opts)
        if placement is not None:
            apply_placement(layer, Placement(*placement))
        spy = CountingRunner(layer.runner)
        layer.set_runner(spy)
        per_forward = []
        for step in range(2):
            spy.reads.clear()
            x = torch.randn(9, 8, generator=torch.Generator().manual_seed(10 * step + dims.rank), requires_grad=True)
            y, aux = layer(x)
            y.sum().backward()
            per_forward.append(list(spy.reads))
        out[name] = per_forward
    return out


def order_worker(setups):
    """setups: (name, MoEConfig kwargs, overlap degree); the all-to-all-v dispatcher, pinned ep mode.
    Per setup, one training forward's events in issue order: ("exchange", dtype) for each
    all_to_all_single (int64: the counts exchange; float: rows), ("op", name, reads x, out shape)
    for every non-view ATen op (a TorchDispatchMode), ("read", name) for each host read, and the
    runner's own reads (CountingRunner: its prefetch and call)."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    dims = ParallelDims.build(ep=dist.get_world_size(), timeout_s=30)
    out = {}
    for name, kw, c in setups:
        torch.manual_seed(0)
        cfg = MoEConfig(hidden_size=8, ffn_hidden_size=8, num_experts=4, top_k=2, **kw)
        layer = apply_expert_parallel(MoELayer(cfg), dims.ep_group, dims=dims, mode="ep", overlap=c,
                                      dispatcher="alltoallv", timeout_s=30)
        spy = CountingRunner(layer.runner)
        layer.set_runner(spy)
        x = torch.randn(13, 8, generator=torch.Generator().manual_seed(dims.rank), requires_grad=True)
        events, x_ptr = [], x.data_ptr()

        class Order(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                res = func(*args, **(kwargs or {}))
                if not func.is_view:
                    reads_x = any(isinstance(a, torch.Tensor) and a.data_ptr() == x_ptr
                                  for a in tree_leaves((args, kwargs)))
                    shape = tuple(res.shape) if isinstance(res, torch.Tensor) else None
                    events.append(("op", str(func), reads_x, shape))
                return res

        a2a = dist.all_to_all_single

        def logged_a2a(output, input, *a, **k):
            events.append(("exchange", str(input.dtype)))
            return a2a(output, input, *a, **k)

        saved = {n: getattr(torch.Tensor, n) for n in READS}

        def spy_read(n):
            def f(t, *a, **k):
                events.append(("read", n))
                return saved[n](t, *a, **k)
            return f

        dist.all_to_all_single = logged_a2a
        for n in READS:
            setattr(torch.Tensor, n, spy_read(n))
        try:
            with Order():
                y, aux = layer(x)
        finally:
            dist.all_to_all_single = a2a
            for n, fn in saved.items():
                setattr(torch.Tensor, n, fn)
        y.sum().backward()  # the step still completes (and the reverse collectives pair up)
        out[name] = {"events": events, "runner_reads": list(spy.reads), "T": x.shape[0], "K": cfg.top_k,
                     "D": cfg.hidden_size}
    return out


def cuda_plan_worker():
    """One NCCL rank: AllToAllVDispatcher.plan_start/plan_finish against the synchronous plan."""
    from moesys.parallel import AllToAllVDispatcher, ExpertLayout

    torch.cuda.set_device(0)
    d = AllToAllVDispatcher(ExpertLayout(world=1, rank=0, num_experts=4, ffn_size=8), dist.group.WORLD)
    counts = [torch.tensor([3, 0, 5, 2], device="cuda"), torch.tensor([1, 1, 0, 7], device="cuda")]
    flight = d.plan_start(counts)
    pinned = flight.host is not None and flight.host.is_pinned()
    got = d.plan_finish(flight)
    want = [d.plan([c])[0] for c in counts]
    same = all(g.counts_E == w.counts_E and g.in_splits == w.in_splits and g.out_splits == w.out_splits
               and torch.equal(g.recv_counts_PL, w.recv_counts_PL) for g, w in zip(got, want))
    return {"pinned": bool(pinned), "same": bool(same)}
