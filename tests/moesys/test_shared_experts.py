"""Shared experts and MoE recompute against per-token references: outputs and every gradient.

Reference: y[t] = sum_k w_tk FFN_{e_k}(x[t]) + sigmoid(x[t] . g) * sum_s FFN_s(x[t]) (no gate: 1),
each FFN applied token by token to the layer's own parameters (moe_reference.ffn).
"""
import pytest
import torch

from moesys import MoEConfig, MoELayer
from moesys.kernels.expert_ffn import expert_ffn_torch

from moe_reference import ffn, reference_forward


def make(activation="gelu", E=7, K=2, D=12, Fh=20, S=1, Fs=None, gate=False, recompute=False, seed=0, **kw):
    torch.manual_seed(seed)
    cfg = MoEConfig(hidden_size=D, ffn_hidden_size=Fh, num_experts=E, top_k=K, activation=activation,
                    num_shared_experts=S, shared_ffn_hidden_size=Fs, shared_expert_gate=gate, recompute=recompute, **kw)
    layer = MoELayer(cfg)
    with torch.no_grad():  # decisive, tie-free routing; a gate far from constant
        layer.router.weight.normal_(0, 0.5)
        if layer.shared_experts is not None and layer.shared_experts.gate is not None:
            layer.shared_experts.gate.normal_(0, 0.5)
    return layer


def reference(layer, x):
    y, _ = reference_forward(layer, x)
    sh = layer.shared_experts
    if sh is None:
        return y
    cfg = layer.cfg
    x_TD = x.reshape(-1, cfg.hidden_size)
    rows = []
    for t in range(x_TD.shape[0]):
        s = sum(ffn(x_TD[t], cfg, sh.w1, sh.w2, sh.w3, i) for i in range(cfg.num_shared_experts))
        if sh.gate is not None:
            s = s * torch.sigmoid(x_TD[t] @ sh.gate)
        rows.append(s)
    return y + torch.stack(rows).reshape(y.shape)


def run(layer, x, fn):
    layer.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    y = fn(x)
    g = torch.linspace(-1, 1, y.numel()).reshape(y.shape)  # every output position matters
    (y * g).sum().backward()
    grads = {n: p.grad.clone() for n, p in layer.named_parameters() if p.grad is not None}
    return y.detach(), x.grad.clone(), grads


def assert_matches_reference(layer, x, atol=2e-5):
    y, gx, gp = run(layer, x, lambda x: layer(x)[0])
    y_ref, gx_ref, gp_ref = run(layer, x, lambda x: reference(layer, x))
    torch.testing.assert_close(y, y_ref, atol=atol, rtol=1e-4)
    torch.testing.assert_close(gx, gx_ref, atol=atol, rtol=1e-4)
    # every parameter of the layer gets a gradient from both, the shared ones included
    assert set(gp) == set(gp_ref) == {n for n, _ in layer.named_parameters()}
    for k in gp:
        torch.testing.assert_close(gp[k], gp_ref[k], atol=atol, rtol=1e-4, msg=lambda m: f"grad {k}: {m}")


@pytest.mark.parametrize("activation,S,Fs,gate", [
    ("gelu", 1, None, False),
    ("swiglu", 1, None, True),
    ("relu", 2, 6, False),
    ("swiglu", 3, 5, True),
])
@pytest.mark.parametrize("recompute", [False, True])
def test_shared_experts_match_per_token_reference(activation, S, Fs, gate, recompute):
    layer = make(activation, S=S, Fs=Fs, gate=gate, recompute=recompute)
    assert layer.shared_experts.w1.shape == (S, 12, Fs or 20)
    assert layer.shared_experts.w2.shape == (S, Fs or 20, 12)
    assert (layer.shared_experts.w3 is not None) == (activation == "swiglu")
    assert_matches_reference(layer, torch.randn(3, 11, 12))


def test_odd_shapes_601_tokens_7_experts_drops_and_an_empty_expert():
    layer = make("swiglu", E=7, K=2, S=2, Fs=9, gate=True, recompute=True, capacity_factor=0.5)
    x = torch.randn(601, 12).abs() + 0.5
    with torch.no_grad():
        layer.router.weight[3] = -2.0  # expert 3 gets no token
    _, aux = layer(x)
    assert int(aux.tokens_per_expert[3]) == 0 and int(aux.dropped) > 0
    assert_matches_reference(layer, x)


def test_zero_tokens():
    layer = make("gelu", S=2, gate=True)
    x = torch.randn(0, 12, requires_grad=True)
    y, _ = layer(x)
    y.sum().backward()
    assert y.shape == (0, 12)


def test_no_shared_experts_by_default_and_output_adds_them():
    assert MoEConfig(hidden_size=4, ffn_hidden_size=4, num_experts=2).num_shared_experts == 0
    layer = make("gelu", S=1)
    x = torch.randn(17, 12)
    y, _ = layer(x)
    sh = layer.shared_experts
    layer.shared_experts = None  # the routed part alone
    y_routed, _ = layer(x)
    dense = torch.nn.functional.gelu(x @ sh.w1[0]) @ sh.w2[0]
    torch.testing.assert_close(y, y_routed + dense, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("activation", ["gelu", "relu", "silu", "swiglu"])
def test_recompute_gives_identical_outputs_and_gradients(activation):
    """Same weights, recompute off and on: bit-identical (the recomputed GEMMs are the same GEMMs)."""
    outs = []
    for rc in (False, True):
        layer = make(activation, S=2, Fs=6, gate=True, recompute=rc, capacity_factor=1.0)
        outs.append(run(layer, torch.randn(601, 12, generator=torch.Generator().manual_seed(3)),
                        lambda x, layer=layer: layer(x)[0]))
    (y0, gx0, gp0), (y1, gx1, gp1) = outs
    assert torch.equal(y0, y1) and torch.equal(gx0, gx1)
    assert gp0.keys() == gp1.keys()
    for k in gp0:
        assert torch.equal(gp0[k], gp1[k]), k


@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_recompute_keeps_no_intermediate_from_the_forward(activation):
    g = torch.Generator().manual_seed(0)
    E, D, Fh = 3, 8, 16
    counts = torch.tensor([5, 0, 9])
    x = torch.randn(14, D, generator=g, requires_grad=True)
    ws = [torch.randn(E, D, Fh, generator=g, requires_grad=True), torch.randn(E, Fh, D, generator=g, requires_grad=True)]
    w3 = torch.randn(E, D, Fh, generator=g, requires_grad=True) if activation == "swiglu" else None
    kept = expert_ffn_torch(x, ws[0], ws[1], w3, counts, activation)
    dropped = expert_ffn_torch(x, ws[0], ws[1], w3, counts, activation, recompute=True)
    # the Function's node is its ctx: without recompute it holds h and a ([N, F]) until backward
    assert kept.grad_fn.h is not None and kept.grad_fn.a is not None
    assert dropped.grad_fn.h is None and dropped.grad_fn.a is None and dropped.grad_fn.g is None
    grads = [torch.autograd.grad(y.square().sum(), [x, *ws] + ([w3] if w3 is not None else [])) for y in (kept, dropped)]
    for a, b in zip(*grads):
        assert torch.equal(a, b)


@pytest.mark.parametrize("kw,match", [
    (dict(num_shared_experts=-1), r"num_shared_experts must be an integer >= 0, got -1"),
    (dict(num_shared_experts=1.5), r"num_shared_experts must be an integer >= 0, got 1.5"),
    (dict(num_shared_experts=True), r"num_shared_experts must be an integer >= 0, got True"),
    (dict(num_shared_experts=1, shared_ffn_hidden_size=0), r"shared_ffn_hidden_size must be a positive integer or None"),
    (dict(shared_ffn_hidden_size=8), r"num_shared_experts is 0 but MoEConfig.shared_ffn_hidden_size=8"),
    (dict(shared_expert_gate=True), r"num_shared_experts is 0 but .*MoEConfig.shared_expert_gate=True"),
    (dict(num_shared_experts=1, shared_expert_gate="yes"), r"shared_expert_gate must be True or False, got 'yes'"),
    (dict(recompute=1), r"recompute must be True or False, got 1"),
])
def test_bad_values_are_clear_errors(kw, match):
    with pytest.raises(ValueError, match=match):
        MoEConfig(hidden_size=12, ffn_hidden_size=20, num_experts=7, top_k=2, **kw)


def test_evomoe_and_upcycling_refuse_shared_experts():
    from moesys.evo.layer import EvoMoELayer
    from moesys.evo.upcycle import upcycle_model
    from moesys.model import GPTConfig, GPTMoE

    cfg = MoEConfig(hidden_size=8, ffn_hidden_size=16, num_experts=4, num_shared_experts=1)
    with pytest.raises(ValueError, match=r"EvoMoELayer does not support shared experts .*num_shared_experts=1"):
        EvoMoELayer(cfg)
    dense = GPTMoE(GPTConfig(vocab_size=16, n_layers=1, d_model=8, n_heads=2, ffn_hidden=16, seq_len=8, moe_every=0),
                   cfg)
    with pytest.raises(ValueError, match=r"upcycle: MoEConfig.num_shared_experts=1 is not supported"):
        upcycle_model(dense, cfg, seed=0)
