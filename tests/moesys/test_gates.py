"""Dense-to-sparse gates (router="dts" / "act_dts") against hand computation and a per-token loop.

The Gumbel draw is fixed by monkeypatching `moesys.moe.gates.gumbel_like`, so every expectation is
computed here independently of the router's code.
"""
import pytest
import torch

import moesys.moe.gates as gates
from moesys import MoEConfig, MoELayer
from moesys.moe.routing_plan import make_plan

from moe_reference import ffn


def make(router="dts", E=5, D=6, Fh=10, seed=0, activation="gelu", **kw):
    torch.manual_seed(seed)
    cfg = MoEConfig(hidden_size=D, ffn_hidden_size=Fh, num_experts=E, top_k=1, router=router,
                    activation=activation, **kw)
    layer = MoELayer(cfg)
    with torch.no_grad():
        layer.router.weight.normal_(0, 0.7)
        if router == "act_dts":
            layer.router.gate_bias.normal_(0, 0.3)
    return layer


@pytest.fixture
def fixed_gumbel(monkeypatch):
    """Install a fixed Gumbel draw G [T, E]; returns a setter."""
    holder = {}

    def fake(t):
        assert t.shape == holder["G"].shape
        return holder["G"].to(t)

    monkeypatch.setattr(gates, "gumbel_like", fake)

    def set_(G):
        holder["G"] = G

    return set_


def reference_dts(layer, x_TD, G_TE):
    """[(token, expert, weight, slot)] from the gate definitions, token by token."""
    cfg, r = layer.cfg, layer.router
    tau = float(r.tau)
    routes = []
    for t in range(x_TD.shape[0]):
        z = x_TD[t].float() @ r.weight.float().t()
        if cfg.router == "dts":
            score, probs = z, torch.softmax(z, -1)
            g = torch.softmax((z.detach() + G_TE[t]) / tau, -1)
        else:
            a = torch.sigmoid(z) if cfg.gate_activation == "sigmoid" else torch.tanh(z)
            score, probs = a, torch.softmax(a / tau + r.gate_bias, -1)
            g = torch.softmax((a.detach() + G_TE[t]) / tau + r.gate_bias.detach(), -1)
        order = torch.argsort(g, descending=True).tolist()
        if bool(r.hard):
            chosen = [order[0]]
        else:
            chosen = [e for e in range(cfg.num_experts) if g[e] > cfg.dts_threshold or e == order[0]]
        for e in sorted(chosen):
            routes.append((t, e, probs[e], order.index(e)))
    return routes


def reference_forward(layer, x_TD, routes, capacity=None):
    cfg, ex = layer.cfg, layer.experts
    if capacity is not None:  # positional priority: first choices before second choices
        used, kept = [0] * cfg.num_experts, []
        for rt in sorted(routes, key=lambda r: (r[3], r[0])):
            if used[rt[1]] < capacity:
                used[rt[1]] += 1
                kept.append(rt)
        routes = kept
    rows = [x_TD.new_zeros(cfg.hidden_size) for _ in range(x_TD.shape[0])]
    for t, e, w, _ in routes:
        rows[t] = rows[t] + w * ffn(x_TD[t], cfg, ex.w1, ex.w2, ex.w3, e)
    return torch.stack(rows)


# ---- selection by hand --------------------------------------------------------------------------
def test_threshold_selection_and_per_token_k_by_hand(fixed_gumbel):
    layer = make(E=4, D=2, dts_threshold=0.05)
    with torch.no_grad():
        layer.router.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]]))
    layer.router.set_gate_state(tau=1.0)
    x = torch.tensor([[3.0, 0.0], [0.0, 0.0]])
    # token 0: z = [3, 0, -3, 0]; with G = 0, g = softmax(z) = [.910, .045, .002, .045] -> K=1 at 0.05
    # token 1: z = 0, G = [0, 0, 0, -10]: g ~ [1/3, 1/3, 1/3, 1.5e-5] -> experts 0, 1, 2 (K=3)
    G = torch.tensor([[0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, -10.0]])
    fixed_gumbel(G)
    routing = layer.router(x, seq_len=2)
    got = sorted(zip(routing.token_idx_R.tolist(), routing.expert_idx_R.tolist()))
    assert got == [(0, 0), (1, 0), (1, 1), (1, 2)]
    k = torch.bincount(routing.token_idx_R, minlength=2)
    assert k.tolist() == [1, 3]
    # combine weight = noise-free softmax(z) at the chosen expert
    p0 = torch.softmax(torch.tensor([3.0, 0.0, -3.0, 0.0]), -1)[0]
    torch.testing.assert_close(routing.weight_R[0], p0)
    torch.testing.assert_close(routing.weight_R[1:], torch.full((3,), 0.25))
    # a higher tau flattens g: at tau=2 token 0 also reaches experts 1 and 3
    layer.router.set_gate_state(tau=2.0)
    g = torch.softmax(torch.tensor([3.0, 0.0, -3.0, 0.0]) / 2, -1)
    expect = [e for e in range(4) if g[e] > 0.05]
    routing = layer.router(x, seq_len=2)
    assert sorted(routing.expert_idx_R[routing.token_idx_R == 0].tolist()) == expect


def test_argmax_always_chosen_even_below_threshold(fixed_gumbel):
    # E=2000 uniform logits: every g = 1/2000 < 1e-3, so only the forced argmax remains
    layer = make(E=2000, D=2, Fh=2)
    with torch.no_grad():
        layer.router.weight.zero_()
    G = torch.zeros(3, 2000)
    G[0, 7] = 0.5
    G[1, 1999] = 0.5
    G[2, 0] = 0.5
    fixed_gumbel(G)
    routing = layer.router(torch.randn(3, 2), seq_len=3)
    assert routing.token_idx_R.tolist() == [0, 1, 2]
    assert routing.expert_idx_R.tolist() == [7, 1999, 0]


def test_gumbel_noise_only_in_training(monkeypatch):
    layer = make()
    x = torch.randn(9, 6)

    def boom(t):
        raise AssertionError("Gumbel noise drawn in eval")

    layer.eval()
    monkeypatch.setattr(gates, "gumbel_like", boom)
    y, aux = layer(x)  # eval: top-1 of softmax(z), no noise
    routing = layer.router(x, seq_len=9)
    probs = torch.softmax(x @ layer.router.weight.t(), -1)
    assert routing.expert_idx_R.tolist() == probs.argmax(-1).tolist()
    torch.testing.assert_close(routing.weight_R, probs.max(-1).values)
    ref = torch.stack([probs[t].max() * ffn(x[t], layer.cfg, layer.experts.w1, layer.experts.w2, None,
                                             int(probs[t].argmax())) for t in range(9)])
    torch.testing.assert_close(y, ref, atol=1e-6, rtol=1e-5)
    layer.train()
    with pytest.raises(AssertionError, match="Gumbel noise drawn"):
        layer(x)


@pytest.mark.parametrize("router", ["dts", "act_dts"])
def test_hard_switch_routes_argmax_of_noisy_gate(fixed_gumbel, router):
    layer = make(router, E=6, capacity_factor=1.0)
    x = torch.randn(13, 6)
    G = -torch.log(-torch.log(torch.rand(13, 6)))
    fixed_gumbel(G)
    layer.router.set_gate_state(tau=0.5, hard=True)
    routing = layer.router(x, seq_len=13)
    assert routing.token_idx_R.tolist() == list(range(13))
    expect = [r[1] for r in reference_dts(layer, x, G)]
    assert routing.expert_idx_R.tolist() == expect
    # after the hard switch capacity applies again (training)
    assert layer.capacity(13) == layer.cfg.capacity(13) == 4
    layer.router.set_gate_state(hard=False)
    assert layer.capacity(13) is None  # dense phase: no drops


def test_set_gate_state_rejects_bad_tau():
    with pytest.raises(ValueError, match="tau"):
        make().router.set_gate_state(tau=0.0)


# ---- dynamic K through the whole layer -----------------------------------------------------------
@pytest.mark.parametrize("router,activation,tau", [("dts", "gelu", 2.0), ("dts", "swiglu", 0.7),
                                                   ("act_dts", "relu", 1.0), ("act_dts", "gelu", 0.3)])
def test_dynamic_k_outputs_and_grads_equal_per_token_loop(fixed_gumbel, router, activation, tau):
    layer = make(router, E=7, D=6, Fh=9, activation=activation, gate_activation="tanh" if tau == 0.3 else "sigmoid")
    layer.router.set_gate_state(tau=tau)
    T = 23
    x = torch.randn(T, 6)
    G = -torch.log(-torch.log(torch.rand(T, 7)))
    G[:, 0] -= 8.0  # expert 0 almost never chosen: an (often) empty expert
    fixed_gumbel(G)
    routes = reference_dts(layer, x, G)
    k_T = torch.bincount(torch.tensor([r[0] for r in routes]), minlength=T)
    assert k_T.min() >= 1 and k_T.max() > k_T.min(), "want a variable K per token"
    _compare(layer, x, lambda xx: reference_forward(layer, xx, reference_dts(layer, xx, G)))


def test_dynamic_k_with_capacity_drops_like_reference(fixed_gumbel):
    layer = make("dts", E=4, D=6, Fh=8, capacity_factor=1.0, min_capacity=1)
    layer.router.set_gate_state(tau=1.5)
    T, C = 17, 5
    x = torch.randn(T, 6)
    G = -torch.log(-torch.log(torch.rand(T, 4)))
    fixed_gumbel(G)
    layer.capacity = lambda n: C  # force a capacity in the soft phase to exercise the capacity plan
    routes = reference_dts(layer, x, G)
    assert len(routes) > 4 * C, "some routes must be dropped"
    _compare(layer, x, lambda xx: reference_forward(layer, xx, reference_dts(layer, xx, G), capacity=C))
    routing = layer.router(x, seq_len=T)
    plan = make_plan(routing, 4, C)
    assert int(plan.dropped) == len(routes) - int(plan.counts_E.sum())
    assert plan.counts_E.max() <= C


def _compare(layer, x, ref_fn, atol=2e-5):
    def run(fn):
        layer.zero_grad(set_to_none=True)
        xx = x.detach().clone().requires_grad_(True)
        y = fn(xx)
        w = torch.linspace(-1, 1, y.numel()).reshape(y.shape)
        (y * w).sum().backward()
        ps = {n: p.grad.clone() for n, p in layer.named_parameters() if p.grad is not None}
        return y.detach(), xx.grad.clone(), ps

    y, gx, gp = run(lambda xx: layer(xx)[0])
    y_ref, gx_ref, gp_ref = run(ref_fn)
    torch.testing.assert_close(y, y_ref, atol=atol, rtol=1e-4)
    torch.testing.assert_close(gx, gx_ref, atol=atol, rtol=1e-4)
    assert gp.keys() == gp_ref.keys()
    for k in gp:
        torch.testing.assert_close(gp[k], gp_ref[k], atol=atol, rtol=1e-4, msg=lambda m: f"grad {k}: {m}")


def test_balance_loss_by_hand(fixed_gumbel):
    layer = make("dts", E=3, D=4, dts_balance_coef=0.5)
    x = torch.randn(8, 4)
    G = -torch.log(-torch.log(torch.rand(8, 3)))
    fixed_gumbel(G)
    _, aux = layer(x)
    routes = reference_dts(layer, x, G)
    probs = torch.softmax(x @ layer.router.weight.t(), -1)
    me = probs.mean(0)
    ce = torch.zeros(3)
    for _, e, _, _ in routes:
        ce[e] += 1.0 / 8
    expect = 0.5 * 9 * (me * ce).mean()
    torch.testing.assert_close(aux.loss, expect)
    assert aux.metrics["experts_per_token"].item() == pytest.approx(len(routes) / 8)
