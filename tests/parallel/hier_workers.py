"""Rank-side bodies of the 2-D dispatcher tests: each 2-D dispatcher against its flat twin (the
`hierarchical` one against all-to-all-v, `hierarchical_padded` against `padded`, dynamic and
static capacity) on the same inputs, outputs and gradients, fp32 rtol 1e-5. Run on 4 gloo ranks as
2 simulated nodes of 2 (LOCAL_WORLD_SIZE=2), so both stages move rows and rank 2's node index is 1.

Shapes are odd on purpose: D = 7, per-rank row counts that differ, an expert no rank routes to,
a rank with no rows (dropless), E = 2 (F-sharded: each expert on 2 ranks), 4 and 8 (2 per rank).
Seven experts cannot be laid out on 4 ranks (ExpertLayout: E divisible by P, or P by E).
"""
from __future__ import annotations

import copy
import itertools

import torch
import torch.distributed as dist

from moesys import MoEConfig, MoELayer
from moesys.parallel import (AllToAllVDispatcher, ExpertLayout, HierarchicalDispatcher, HierarchicalPaddedDispatcher,
                             PaddedDispatcher, ParallelDims, apply_expert_parallel)

RTOL, ATOL = 1e-5, 1e-6


def _close(name, a, b, fails, tag, exact=False):
    a = a.to_local() if hasattr(a, "to_local") else a
    b = b.to_local() if hasattr(b, "to_local") else b
    if a.shape != b.shape:
        fails.append(f"{tag}: {name} shape {tuple(a.shape)} != {tuple(b.shape)}")
    elif exact and not torch.equal(a, b):
        fails.append(f"{tag}: {name} differs (exact)")
    elif a.numel() and not torch.allclose(a, b, rtol=RTOL, atol=ATOL):
        fails.append(f"{tag}: {name} max err {(a - b).abs().max().item():.3g}")


def _pair(kind, layout, dims, f=None, K=1):
    """(flat, 2-D) dispatchers of one kind over the same ep group."""
    two_d = dict(node_group=dims.ep_node_group, cross_group=dims.ep_cross_group, local_world_size=2, timeout_s=30)
    if kind == "dropless":
        return (AllToAllVDispatcher(layout, dims.ep_group, timeout_s=30),
                HierarchicalDispatcher(layout, dims.ep_group, **two_d))
    return (PaddedDispatcher(layout, dims.ep_group, timeout_s=30, static_capacity_factor=f, top_k=K),
            HierarchicalPaddedDispatcher(layout, dims.ep_group, static_capacity_factor=f, top_k=K, **two_d))


def dispatcher_worker(D=7):
    """Plain tensors: a per-local-expert non-linear 'expert' (gradients depend on the rows)."""
    dims = ParallelDims.build(ep=dist.get_world_size(), timeout_s=30)
    P, me = dims.ep, dims.ep_rank
    fails, checked = [], 0
    for E, kind, zero_rank in itertools.product((2, 4, 8), ("dropless", "padded", "static"), (False, True)):
        layout = ExpertLayout(world=P, rank=me, num_experts=E, ffn_size=P * 2)
        L = layout.local_experts
        g = torch.Generator().manual_seed(31 * E + me + (7 if zero_rank else 0))
        counts_E = torch.randint(0, 4, (E,), generator=g) + (2 if me % 2 else 0)
        counts_E[E - 1] = 0  # an expert no rank routes to
        if zero_rank and me == P - 1:
            counts_E.zero_()  # a rank with no rows
        n = int(counts_E.sum())
        x_ND = torch.randn(n, D, generator=g)
        gy = torch.randn(n, D, generator=g)
        w_L = torch.linspace(0.5, 1.5, L) + 0.1 * me  # this rank's "experts" differ from the other ranks'

        def expert_fn(x_MD, counts_L, w_L=w_L):
            w = torch.repeat_interleave(w_L, counts_L.cpu())[:, None]
            return torch.tanh(x_MD * w) + x_MD * x_MD * 0.1

        expert_N = torch.repeat_interleave(torch.arange(E), counts_E)
        for chunks in (1, 2):
            tag = f"{kind} E={E} zero_rank={zero_rank} c={chunks}"
            flat, two_d = _pair(kind, layout, dims, f=1.2 if kind == "static" else None, K=1)
            got = []
            for d in (flat, two_d):
                if kind == "static":  # T = 4 on every rank: C = ceil(1.2 * 4 / E); rows past C drop
                    static, keep_N, dropped, C = d.static_plan(counts_E, expert_N, 4, chunks)
                    plans, idxs = static, [None] * len(static)
                else:  # chunks: each expert's first ceil(n/2) rows, then the rest (the runner's split)
                    split = [counts_E] if chunks == 1 else [(counts_E + 1) // 2, counts_E // 2]
                    idxs = [None] if chunks == 1 else _chunk_rows(split)
                    plans = list(zip(split, d.plan(split, capacity=6 if kind == "padded" else None)))
                    static = None
                got.append(_run_chunks(d, x_ND, plans, idxs, expert_fn, gy, static is not None))
            (y_f, dx_f, seen_f), (y_h, dx_h, seen_h) = got
            _close("y", y_h, y_f, fails, tag)
            _close("dx", dx_h, dx_f, fails, tag)
            for i, ((xf, cf), (xh, ch)) in enumerate(zip(seen_f, seen_h)):
                _close(f"chunk {i} x_MD", xh, xf, fails, tag, exact=True)
                _close(f"chunk {i} counts_L", ch.cpu(), cf.cpu(), fails, tag, exact=True)
            checked += 1
    return {"fails": fails, "checked": checked}


def _chunk_rows(split):
    """Row indices of x_ND (grouped by expert) of each chunk, chunk i holding split[i][e] rows of e."""
    starts, out = torch.cumsum(split[0] + split[1], 0) - split[0] - split[1], []
    for i in range(len(split)):
        lo = starts + sum(split[:i])
        out.append(torch.cat([torch.arange(s, s + n) for s, n in zip(lo.tolist(), split[i].tolist())]))
    return out


def _run_chunks(d, x_ND, plans, idxs, expert_fn, gy, static):
    """_run over chunk plans: static plans are StaticChunk entries; dynamic ones (counts, plan)."""
    x = x_ND.clone().requires_grad_(True)
    ys, seen = [], []
    for p, idx in zip(plans, idxs):
        x_i = x if idx is None else x.index_select(0, idx)
        counts, plan = (None, p) if static else p
        x_MD, counts_L, h = d.dispatch_finish(d.dispatch_start(x_i, counts, plan=plan))
        seen.append((x_MD.detach(), counts_L))
        ys.append(d.combine(expert_fn(x_MD, counts_L), h))
    if static:
        y = sum(ys)  # each row is in at most one chunk's slots (the others combine it to zero)
    elif idxs[0] is None:
        y = ys[0]
    else:
        y = torch.zeros_like(x).index_add(0, torch.cat(idxs), torch.cat(ys))
    (y * gy).sum().backward()
    return y.detach(), x.grad, seen


# (MoEConfig kwargs, dispatcher pair, static capacity factor): the layer through each pair
LAYER_CASES = [
    (dict(hidden_size=7, ffn_hidden_size=6, num_experts=8, top_k=2), ("alltoallv", "hierarchical"), None),
    (dict(hidden_size=7, ffn_hidden_size=6, num_experts=4, top_k=2, capacity_factor=1.0, min_capacity=1),
     ("alltoallv", "hierarchical"), None),
    (dict(hidden_size=7, ffn_hidden_size=6, num_experts=4, top_k=2, capacity_factor=1.0, min_capacity=1),
     ("padded", "hierarchical_padded"), None),
    (dict(hidden_size=7, ffn_hidden_size=6, num_experts=8, top_k=2), ("padded", "hierarchical_padded"), None),
    (dict(hidden_size=7, ffn_hidden_size=6, num_experts=4, top_k=2), ("padded", "hierarchical_padded"), 0.75),
    (dict(hidden_size=7, ffn_hidden_size=6, num_experts=2, top_k=1, activation="swiglu"),
     ("padded", "hierarchical_padded"), 1.5),
]


def layer_worker(cases=LAYER_CASES, degrees=(1, 2)):
    """The layer: a 2-D dispatcher against its flat twin, outputs, input, router and expert grads.
    Tokens lean positive and the last router row is negative: the last expert gets no tokens."""
    dims = ParallelDims.build(ep=dist.get_world_size(), timeout_s=60)
    me = dims.ep_rank
    fails, checked = [], 0
    for ci, (cfg_kw, (flat_name, two_d_name), f) in enumerate(cases):
        cfg = MoEConfig(**cfg_kw)
        torch.manual_seed(100 + ci)
        base = MoELayer(cfg)
        with torch.no_grad():
            for p in base.parameters():  # weights of order one: a lost row is far outside rtol
                p.normal_(0, 0.5)
            base.router.weight[-1] = -3.0
        T = 5 if f is not None else 3 + 2 * me  # a static buffer needs the same T on every rank
        g = torch.Generator().manual_seed(1000 * ci + me)
        x0 = torch.randn(T, cfg.hidden_size, generator=g).abs() + 0.5
        gy = torch.randn(T, cfg.hidden_size, generator=g)
        for c in degrees:
            tag = f"case{ci} E={cfg.num_experts} {two_d_name} vs {flat_name} f={f} c={c}"
            out = []
            for name in (flat_name, two_d_name):
                layer = copy.deepcopy(base)
                apply_expert_parallel(layer, dims.ep_group, dims=dims, dispatcher=name, mode="ep", overlap=c,
                                      timeout_s=60, static_capacity_factor=f)
                x = x0.clone().requires_grad_(True)
                y, aux = layer(x)
                (y * gy).sum().add(aux.loss).backward()
                grads = {n: p.grad for n, p in layer.named_parameters() if p.grad is not None}
                out.append((y.detach(), x.grad, grads, float(aux.metrics["runtime/overflow_dropped"]),
                            int(aux.tokens_per_expert[-1])))
            (y_f, dx_f, g_f, drop_f, last_f), (y_h, dx_h, g_h, drop_h, last_h) = out
            _close("y", y_h, y_f, fails, tag)
            _close("dx", dx_h, dx_f, fails, tag)
            if set(g_f) != set(g_h):
                fails.append(f"{tag}: grads of {sorted(set(g_f) ^ set(g_h))} on one side only")
            for n in g_f:
                _close(f"d {n}", g_h[n], g_f[n], fails, tag)
            if drop_f != drop_h:
                fails.append(f"{tag}: overflow_dropped {drop_h} != {drop_f}")
            if last_f != 0 or last_h != 0:
                fails.append(f"{tag}: the last expert got tokens ({last_f}, {last_h}): the case lost its empty expert")
            checked += 1
    return {"fails": fails, "checked": checked}


def two_node_flat_worker():
    return {"dispatchers": dispatcher_worker(), "layer": layer_worker()}
