"""Obviously-correct slow references: routing decided per token, experts applied per token."""
from __future__ import annotations

import math
from fractions import Fraction

import torch
import torch.nn.functional as F

ACTS = {"gelu": F.gelu, "relu": F.relu, "silu": F.silu}


def ffn(x_D, cfg, w1, w2, w3, e):
    h = x_D @ w1[e]
    if cfg.activation == "swiglu":
        h = F.silu(h) * (x_D @ w3[e])
    else:
        h = ACTS[cfg.activation](h)
    return h @ w2[e]


def allowed_experts(scores_E, cfg):
    """Group-limited routing, per token in plain Python: the experts of the cfg.topk_groups groups
    whose two best scores sum highest (all experts without groups)."""
    E = cfg.num_experts
    if cfg.num_groups is None:
        return list(range(E))
    n = E // cfg.num_groups
    s = [float(v) for v in scores_E.detach()]
    group_score = [sum(sorted(s[g * n:(g + 1) * n], reverse=True)[:2]) for g in range(cfg.num_groups)]
    best = sorted(range(cfg.num_groups), key=lambda g: -group_score[g])[:cfg.topk_groups]
    return [e for g in best for e in range(g * n, (g + 1) * n)]


def pick(scores_E, K, allowed):
    """The K allowed experts with the highest scores, best first."""
    return sorted(allowed, key=lambda e: -float(scores_E[e].detach()))[:K]


def reference_routes(x_TD, cfg, router_w, expert_bias=None):
    """[(token, expert, weight, slot)] decided independently of moesys's routing code."""
    T, E, K = x_TD.shape[0], cfg.num_experts, cfg.top_k
    logits = x_TD.float() @ router_w.float().t()
    # normalize_topk=None means: renormalise for K > 1 only
    normalize = cfg.normalize_topk if cfg.normalize_topk is not None else K > 1
    routes = []
    if cfg.router in ("topk", "switch"):
        probs = torch.softmax(logits, -1)
        for t in range(T):
            idx = pick(probs[t], K, allowed_experts(probs[t], cfg))
            vals = probs[t][idx]
            if cfg.router == "topk" and normalize:
                vals = vals / vals.sum()
            for k in range(K):
                routes.append((t, int(idx[k]), vals[k], k))
    elif cfg.router == "sigmoid_bias":
        s = torch.sigmoid(logits)
        b = expert_bias if expert_bias is not None else torch.zeros(E)
        for t in range(T):
            choice = s[t].detach() + b
            idx = pick(choice, K, allowed_experts(choice, cfg))
            vals = s[t][idx]
            if normalize:
                vals = vals / vals.sum()
            for k in range(K):
                routes.append((t, int(idx[k]), vals[k], k))
    elif cfg.router == "expert_choice":
        probs = torch.softmax(logits, -1)
        cf = cfg.capacity_factor or 1.0
        C = min(T, max(cfg.min_capacity, math.ceil(Fraction(str(cf)) * K * T / E)))
        for e in range(E):
            vals, toks = probs[:, e].topk(C)
            for c in range(C):
                routes.append((int(toks[c]), e, vals[c], c))
    else:
        raise ValueError(cfg.router)
    return routes


def apply_capacity(routes, cfg, T):
    """Positional priority: all first choices (in token order) before second choices."""
    if cfg.capacity_factor is None or cfg.router == "expert_choice":
        return routes, 0
    C = max(cfg.min_capacity, math.ceil(Fraction(str(cfg.capacity_factor)) * cfg.top_k * T / cfg.num_experts))
    used = [0] * cfg.num_experts
    kept = []
    for r in sorted(routes, key=lambda r: (r[3], r[0])):
        if used[r[1]] < C:
            used[r[1]] += 1
            kept.append(r)
    return kept, len(routes) - len(kept)


def reference_forward(layer, x):
    """Per-token loop over the layer's own parameters: y[t] = sum of weight * FFN_e(x[t])."""
    cfg = layer.cfg
    x_TD = x.reshape(-1, cfg.hidden_size)
    T = x_TD.shape[0]
    bias = getattr(layer.router, "expert_bias", None)
    routes = reference_routes(x_TD, cfg, layer.router.weight, bias)
    routes, dropped = apply_capacity(routes, cfg, T)
    ex = layer.experts
    rows = [x_TD.new_zeros(cfg.hidden_size) for _ in range(T)]
    for t, e, w, _ in routes:
        rows[t] = rows[t] + w * ffn(x_TD[t], cfg, ex.w1, ex.w2, ex.w3, e)
    return torch.stack(rows).reshape(x.shape), dropped
