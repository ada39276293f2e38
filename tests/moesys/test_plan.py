"""Drop policies and DeepSpeed's renormalisation after drops, against per-token references.

Odd shapes throughout: 7 experts, 61 tokens, a capacity that drops, an expert no token picks.
"""
import math
from fractions import Fraction

import pytest
import torch
import torch.nn.functional as F

from moesys import MoEConfig, MoELayer

E, D, Fh, T = 7, 12, 20, 61
EMPTY = 6  # the expert no token picks


def make(K=2, cf=0.6, **kw):
    torch.manual_seed(0)
    cfg = MoEConfig(hidden_size=D, ffn_hidden_size=Fh, num_experts=E, top_k=K, capacity_factor=cf,
                    min_capacity=1, aux_loss="none", **kw)
    layer = MoELayer(cfg)
    with torch.no_grad():
        layer.router.weight.normal_(0, 0.5)
        layer.router.weight[EMPTY] = 0.0
        layer.router.weight[EMPTY, 0] = -8.0  # with x[:, 0] >= 1 below, expert 6 is never in a top-3
    return layer


def tokens(seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, D, generator=g)
    x[:, 0] = x[:, 0].abs() + 1.0
    return x


def by_hand(layer, x_TD, policy, renormalize):
    """One token at a time: choices, priority, capacity, then the combine weights per token.

    Returns ({(t, e): weight tensor}, C); weights are differentiable w.r.t. layer.router.weight."""
    cfg = layer.cfg
    K = cfg.top_k
    C = max(cfg.min_capacity, math.ceil(Fraction(str(cfg.capacity_factor)) * K * T / E))
    choices, weights, top1 = [], {}, []
    for t in range(T):
        p_t = torch.softmax(layer.router.weight @ x_TD[t], -1)
        vals, idx = p_t.topk(K)
        w = vals / vals.sum() if K > 1 else vals  # normalize_topk=None: by K
        top1.append(float(p_t.detach().max()))
        for k in range(K):
            choices.append((t, int(idx[k]), k))
            weights[(t, int(idx[k]))] = w[k]
    if policy == "position":  # all first choices (token order), then all second choices
        ranked = sorted(choices, key=lambda r: (r[2], r[0]))
    elif policy == "bpr":  # Tutel: per choice rank, tokens by their top-1 probability, highest first
        ranked = sorted(choices, key=lambda r: (r[2], -top1[r[0]], r[0]))
    else:
        raise ValueError(policy)
    used, kept = [0] * E, set()
    for t, e, _ in ranked:
        if used[e] < C:
            used[e] += 1
            kept.add((t, e))
    out = {}
    for t in range(T):
        mine = [(tt, e) for (tt, e) in weights if tt == t and (tt, e) in kept]
        total = sum(weights[r] for r in mine) if mine else None
        for r in mine:
            out[r] = weights[r] / total if renormalize else weights[r]
    return out, C


def kept_routes(layer, x):
    routing, plan = layer.route(x, T)
    return {(int(t), int(e)) for t, e in zip(plan.token_idx_N, plan.expert_idx_N)}, routing, plan


def ffn(layer, x_D, e):
    ex = layer.experts
    return F.gelu(x_D @ ex.w1[e]) @ ex.w2[e]


def reference_output(layer, x, policy, renormalize):
    w, _ = by_hand(layer, x, policy, renormalize)
    rows = [x.new_zeros(D) for _ in range(T)]
    for (t, e), w_te in w.items():
        rows[t] = rows[t] + w_te * ffn(layer, x[t], e)
    return torch.stack(rows)


def grads(layer, x, fn):
    layer.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    y = fn(x)
    (y * torch.linspace(-1, 1, y.numel()).reshape(y.shape)).sum().backward()
    return [y.detach(), x.grad] + [p.grad.clone() for p in (layer.router.weight, layer.experts.w1, layer.experts.w2)]


@pytest.mark.parametrize("K", [1, 2, 3])
def test_bpr_keeps_the_routes_tutel_keeps(K):
    layer = make(K=K, drop_policy="bpr")
    x = tokens()
    kept, routing, plan = kept_routes(layer, x)
    want, C = by_hand(layer, x, "bpr", False)
    assert plan.capacity == C and int(plan.dropped) > 0 and int(plan.routed_E[EMPTY]) == 0
    assert kept == set(want)


def test_probs_is_not_bpr_at_top2_but_is_at_top1():
    x = tokens()
    kept_probs, _, _ = kept_routes(make(K=2, drop_policy="probs"), x)
    kept_bpr, _, _ = kept_routes(make(K=2, drop_policy="bpr"), x)
    assert kept_probs != kept_bpr  # a confident token's second choice outranks others' first choices
    kept_probs, _, _ = kept_routes(make(K=1, drop_policy="probs"), x)
    kept_bpr, _, _ = kept_routes(make(K=1, drop_policy="bpr"), x)
    assert kept_probs == kept_bpr


@pytest.mark.parametrize("policy", ["position", "bpr"])
@pytest.mark.parametrize("renormalize", [False, True])
def test_combine_weights_outputs_and_grads_by_hand(policy, renormalize):
    layer = make(K=2, drop_policy=policy, renormalize_after_drop=renormalize)
    x = tokens()
    _, routing, plan = kept_routes(layer, x)
    want, _ = by_hand(layer, x, policy, renormalize)
    got = {(int(t), int(e)): float(w) for t, e, w in zip(plan.token_idx_N, plan.expert_idx_N, plan.weight_N)}
    assert set(got) == set(want)
    for r, w in want.items():
        assert math.isclose(got[r], float(w), rel_tol=1e-5, abs_tol=1e-7), r
    # the cases that matter are there: a token that kept one of its two routes, one that kept none
    kept_per_token = torch.bincount(plan.token_idx_N, minlength=T)
    assert (kept_per_token == 1).any() and (kept_per_token == 0).any()
    for t in (kept_per_token == 1).nonzero().flatten().tolist():
        (w_t,) = [w for (tt, _), w in got.items() if tt == t]
        assert (w_t == pytest.approx(1.0, abs=1e-6)) == renormalize  # DeepSpeed: the survivor takes it all
    ours = grads(layer, x, lambda x: layer(x)[0])
    ref = grads(layer, x, lambda x: reference_output(layer, x, policy, renormalize))
    for name, a, b in zip(("y", "x", "router", "w1", "w2"), ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=2e-5, msg=lambda m: f"{name}: {m}")
    assert ours[3][EMPTY].abs().max() == 0  # the empty expert gets no gradient


def test_renormalize_is_a_no_op_without_drops():
    x = tokens()
    a, b = make(K=2, cf=None), make(K=2, cf=None, renormalize_after_drop=True)
    torch.testing.assert_close(a(x)[0], b(x)[0], rtol=0, atol=0)
    ample_a, ample_b = make(K=2, cf=4.0), make(K=2, cf=4.0, renormalize_after_drop=True)
    torch.testing.assert_close(ample_a(x)[0], ample_b(x)[0], rtol=1e-6, atol=1e-7)


def test_renormalize_with_the_sigmoid_bias_router():
    layer = make(K=2, router="sigmoid_bias", renormalize_after_drop=True)
    x = tokens()
    routing, plan = layer.route(x, T)
    s = torch.sigmoid(x @ layer.router.weight.t())
    for t in range(T):
        mine = plan.token_idx_N == t
        if mine.any():
            e_kept = plan.expert_idx_N[mine]
            torch.testing.assert_close(plan.weight_N[mine], s[t, e_kept] / s[t, e_kept].sum())


@pytest.mark.parametrize("kw,match", [
    (dict(top_k=1), r"renormalize_after_drop=True .* got router='topk', top_k=1, normalize_topk=None"),
    (dict(normalize_topk=False), r"renormalize_after_drop=True .* normalize_topk=False"),
    (dict(router="expert_choice", allow_noncausal=True), r"renormalize_after_drop=True .* router='expert_choice'"),
    (dict(router="dts", top_k=1), r"renormalize_after_drop=True .* router='dts'"),
    (dict(renormalize_after_drop="yes"), r"renormalize_after_drop must be True or False, got 'yes'"),
    (dict(drop_policy="tutel"), r"drop_policy='tutel' is not one of \['position', 'bpr', 'probs', 'random'\]"),
])
def test_bad_settings_name_the_field(kw, match):
    base = dict(hidden_size=D, ffn_hidden_size=Fh, num_experts=E, top_k=2, renormalize_after_drop=True)
    base.update(kw)
    with pytest.raises(ValueError, match=match):
        MoEConfig(**base)
