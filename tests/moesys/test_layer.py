"""MoELayer against a per-token reference loop: outputs and every gradient."""
import itertools
import math
import os
import warnings

import pytest
import torch
import torch.nn.functional as F

from moesys import MoEConfig, MoELayer

from moe_reference import reference_forward

ROUTERS = ["topk", "switch", "sigmoid_bias", "expert_choice"]
ACTIVATIONS = ["gelu", "relu", "silu", "swiglu"]


def make(router="topk", activation="gelu", E=7, K=2, D=12, Fh=20, seed=0, **kw):
    torch.manual_seed(seed)
    if router == "switch":
        K = 1
    cfg = MoEConfig(hidden_size=D, ffn_hidden_size=Fh, num_experts=E, top_k=K, router=router,
                    activation=activation, allow_noncausal=True, **kw)
    layer = MoELayer(cfg)
    with torch.no_grad():  # larger router weights: decisive, tie-free routing
        layer.router.weight.normal_(0, 0.5)
    return layer


def params(layer):
    ps = {"router": layer.router.weight, "w1": layer.experts.w1, "w2": layer.experts.w2}
    if layer.experts.w3 is not None:
        ps["w3"] = layer.experts.w3
    return ps


def grads_of(layer, x, fn):
    layer.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    y = fn(x)
    # a non-uniform upstream gradient so every weight position matters
    g = torch.linspace(-1, 1, y.numel()).reshape(y.shape)
    (y * g).sum().backward()
    return y.detach(), x.grad.clone(), {k: p.grad.clone() for k, p in params(layer).items()}


def assert_same(layer, x, atol=2e-5):
    y, gx, gp = grads_of(layer, x, lambda x: layer(x)[0])
    y_ref, gx_ref, gp_ref = grads_of(layer, x, lambda x: reference_forward(layer, x)[0])
    torch.testing.assert_close(y, y_ref, atol=atol, rtol=1e-4)
    torch.testing.assert_close(gx, gx_ref, atol=atol, rtol=1e-4)
    for k in gp:
        torch.testing.assert_close(gp[k], gp_ref[k], atol=atol, rtol=1e-4, msg=lambda m: f"grad {k}: {m}")


@pytest.mark.parametrize("router,activation", list(itertools.product(ROUTERS, ACTIVATIONS)))
def test_matches_per_token_reference(router, activation):
    layer = make(router, activation)
    x = torch.randn(3, 11, 12)
    assert_same(layer, x)


@pytest.mark.parametrize("cf", [None, 1.0, 0.5])
def test_odd_shapes_601_tokens_7_experts(cf):
    layer = make("topk", "swiglu", E=7, K=2, D=12, Fh=20, capacity_factor=cf)
    x = torch.randn(601, 12)
    assert_same(layer, x)


def test_expert_with_no_tokens():
    layer = make("topk", "gelu", E=7, K=2)
    with torch.no_grad():  # expert 3 can never win: a hugely negative logit for every x
        layer.router.weight[3] = 0.0
    layer.router.weight.register_hook(lambda g: g)
    x = torch.randn(50, 12)
    # push expert 3 down through the input: add a constant feature it dislikes
    with torch.no_grad():
        layer.router.weight[3, 0] = -100.0
    x[:, 0] = x[:, 0].abs() + 1.0
    y, aux = layer(x)
    assert aux.tokens_per_expert[3] == 0
    assert_same(layer, x)
    _, _, gp = grads_of(layer, x, lambda x: layer(x)[0])
    assert gp["w1"][3].abs().max() == 0 and gp["w2"][3].abs().max() == 0


def test_one_expert_equals_dense_ffn():
    layer = make("topk", "gelu", E=1, K=1)
    x = torch.randn(37, 12)
    y, _ = layer(x)
    dense = F.gelu(x @ layer.experts.w1[0]) @ layer.experts.w2[0]
    torch.testing.assert_close(y, dense, atol=1e-6, rtol=1e-5)


def test_ample_capacity_equals_dropless():
    a = make("topk", "gelu", capacity_factor=None)
    b = make("topk", "gelu", capacity_factor=100.0)
    x = torch.randn(64, 12)
    ya, auxa = a(x)
    yb, auxb = b(x)
    assert int(auxb.dropped) == 0
    torch.testing.assert_close(ya, yb)


@pytest.mark.parametrize("policy", ["position", "bpr", "probs", "random"])
def test_tight_capacity_drops_exactly_the_overflow(policy):
    E, K, T = 7, 2, 90
    layer = make("topk", "gelu", E=E, K=K, capacity_factor=0.5, drop_policy=policy, min_capacity=1)
    x = torch.randn(T, 12)
    C = math.ceil(0.5 * K * T / E)
    probs = torch.softmax(x @ layer.router.weight.t(), -1)
    routed = torch.bincount(probs.topk(K).indices.reshape(-1), minlength=E)
    _, aux = layer(x)
    assert torch.equal(aux.tokens_per_expert, routed.clamp(max=C))
    assert int(aux.dropped) == int((routed - C).clamp(min=0).sum()) > 0
    if policy == "position":
        _, dropped_ref = reference_forward(layer, x)
        assert int(aux.dropped) == dropped_ref


def test_probs_policy_keeps_highest_weights():
    E, K, T = 4, 1, 40
    layer = make("topk", "gelu", E=E, K=K, capacity_factor=0.5, drop_policy="probs", min_capacity=1)
    x = torch.randn(T, 12)
    routing, plan = layer.route(x, T)
    C = plan.capacity
    for e in range(E):
        mine = routing.expert_idx_R == e
        w_all = routing.weight_R[mine].detach().sort(descending=True).values
        kept = plan.weight_N[plan.expert_idx_N == e].detach().sort(descending=True).values
        torch.testing.assert_close(kept, w_all[:C])


def test_switch_weight_is_pmax():
    layer = make("switch", "relu", K=1)
    x = torch.randn(20, 12)
    routing, _ = layer.route(x, 20)
    p = torch.softmax(x @ layer.router.weight.t(), -1)
    torch.testing.assert_close(routing.weight_R, p.max(-1).values)


def test_topk_without_renormalisation():
    layer = make("topk", "gelu", normalize_topk=False)
    x = torch.randn(30, 12)
    routing, _ = layer.route(x, 30)
    p = torch.softmax(x @ layer.router.weight.t(), -1)
    torch.testing.assert_close(routing.weight_R, p.topk(2).values.reshape(-1))
    assert_same(layer, x)


def test_top1_default_scales_by_pmax_and_router_learns_from_the_task_loss():
    """Issue 15: router="topk", K=1 used to renormalise its one weight to 1, so the task loss gave
    the router (almost) no gradient. By default (normalize_topk=None) K=1 keeps p_max."""
    E, D, T = 7, 12, 37
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the default warns about nothing
        layer = make("topk", "gelu", E=E, K=1, D=D, aux_loss="none")
    assert layer.cfg.normalize_topk is None and not layer.cfg.renormalize_topk
    x = torch.randn(T, D)
    up = torch.linspace(-1, 1, T * D).reshape(T, D)
    y, _ = layer(x)
    (y * up).sum().backward()
    # by hand, one token at a time: y_t = p_max(t) * FFN_e(x_t), e = argmax_e p_te
    w_r = layer.router.weight.detach().clone().requires_grad_(True)
    ex = layer.experts
    rows = []
    for t in range(T):
        p_t = torch.softmax(w_r @ x[t], -1)
        e = int(p_t.detach().argmax())
        rows.append(p_t[e] * (F.gelu(x[t] @ ex.w1[e].detach()) @ ex.w2[e].detach()))
    y_ref = torch.stack(rows)
    (y_ref * up).sum().backward()
    torch.testing.assert_close(y.detach(), y_ref.detach(), rtol=1e-4, atol=2e-5)
    assert layer.router.weight.grad.abs().max() > 1e-3
    torch.testing.assert_close(layer.router.weight.grad, w_r.grad, rtol=1e-4, atol=1e-6)


def test_normalize_topk_true_with_k1_warns_and_starves_the_router():
    with pytest.warns(UserWarning, match=r"MoEConfig.normalize_topk=True with top_k=1"):
        layer = make("topk", "gelu", K=1, normalize_topk=True, aux_loss="none")
    x = torch.randn(20, 12)
    routing, _ = layer.route(x, 20)
    assert torch.equal(routing.weight_R, torch.ones(20))
    y, _ = layer(x)
    y.square().sum().backward()
    assert layer.router.weight.grad.abs().max() < 1e-6  # no task-loss gradient: why it is not the default
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        MoEConfig(hidden_size=12, ffn_hidden_size=20, num_experts=7, top_k=2, normalize_topk=True)
        MoEConfig(hidden_size=12, ffn_hidden_size=20, num_experts=7, top_k=1, normalize_topk=False)
        MoEConfig(hidden_size=12, ffn_hidden_size=20, num_experts=7, top_k=1, router="switch")


def test_normalize_topk_none_decides_by_k_in_hash_and_dict():
    base = dict(hidden_size=12, ffn_hidden_size=20, num_experts=7)
    k2 = MoEConfig(**base, top_k=2)
    assert k2.renormalize_topk and k2.to_dict()["normalize_topk"] is None
    assert MoEConfig(**k2.to_dict()) == k2  # round trip keeps "decide by K"
    # the hash compares behaviour: None at K=2 routes as True does, None at K=1 as False does
    assert k2.structural_hash() == MoEConfig(**base, top_k=2, normalize_topk=True).structural_hash()
    assert k2.structural_hash() != MoEConfig(**base, top_k=2, normalize_topk=False).structural_hash()
    k1 = MoEConfig(**base, top_k=1)
    assert k1.structural_hash() == MoEConfig(**base, top_k=1, normalize_topk=False).structural_hash()
    with pytest.warns(UserWarning):
        assert k1.structural_hash() != MoEConfig(**base, top_k=1, normalize_topk=True).structural_hash()


def test_expert_choice_gives_each_expert_exactly_C():
    E, K, T = 7, 2, 61
    layer = make("expert_choice", "gelu", E=E, K=K, capacity_factor=1.5, min_capacity=1)
    x = torch.randn(T, 12)
    _, aux = layer(x)
    C = math.ceil(1.5 * K * T / E)
    assert aux.tokens_per_expert.tolist() == [C] * E
    assert int(aux.dropped) == 0


def test_jitter_only_in_training():
    layer = make("topk", "gelu", jitter_eps=0.2)
    x = torch.randn(40, 12)
    layer.eval()
    y1, _ = layer(x)
    y2, _ = layer(x)
    torch.testing.assert_close(y1, y2, rtol=0, atol=0)
    layer.train()
    torch.manual_seed(1)
    l1 = layer.router.logits(x)
    torch.manual_seed(2)
    l2 = layer.router.logits(x)
    assert not torch.allclose(l1, l2)
    # the multiplicative noise stays inside [1-eps, 1+eps]
    torch.manual_seed(1)
    noise = torch.empty_like(x).uniform_(0.8, 1.2)
    torch.testing.assert_close(l1, (x * noise) @ layer.router.weight.t())


def test_bad_width_is_a_clear_error():
    layer = make()
    with pytest.raises(ValueError, match=r"width 13 .*hidden_size is 12"):
        layer(torch.randn(4, 13))


@pytest.mark.parametrize("kw,match", [
    (dict(top_k=9), r"top_k \(9\) must be <= num_experts \(7\)"),
    (dict(capacity_factor=0.0), r"capacity_factor must be a finite number > 0"),
    (dict(capacity_factor=-1.0), r"capacity_factor must be a finite number > 0"),
    (dict(router="hash"), r"router='hash' is not one of"),
    (dict(activation="tanh"), r"activation='tanh' is not one of"),
    (dict(num_experts=0), r"num_experts must be a positive integer, got 0"),
    (dict(drop_policy="first"), r"drop_policy='first'"),
    (dict(aux_loss="global"), r"aux_loss='global'"),
    (dict(router="switch", top_k=2), r"router='switch' is top-1"),
    (dict(jitter_eps=-0.1), r"jitter_eps must be >= 0"),
    (dict(normalize_topk="yes"), r"normalize_topk must be True, False or None .*'yes'"),
    (dict(normalize_topk=1), r"normalize_topk must be True, False or None .*got 1"),
    (dict(aux_loss="tutel"), r"aux_loss='tutel' is not one of \['switch', 'gshard', 'seq', 'global_batch', 'none'\]"),
])
def test_bad_config_is_a_clear_error(kw, match):
    base = dict(hidden_size=12, ffn_hidden_size=20, num_experts=7, top_k=2)
    base.update(kw)
    with pytest.raises(ValueError, match=match):
        MoEConfig(**base)


def test_bf16_input_keeps_dtype_and_fp32_router():
    layer = make("topk", "gelu", D=16, Fh=32).to(torch.bfloat16)
    x = torch.randn(24, 16, dtype=torch.bfloat16)
    y, aux = layer(x)
    assert y.dtype == torch.bfloat16 and aux.loss.dtype == torch.float32
    layer.float()
    y32, _ = layer(x.float())
    torch.testing.assert_close(y.float(), y32, atol=3e-2, rtol=3e-2)


def test_grouped_gemm_path_is_not_slower_than_naive_loop():
    """Guards the custom autograd: the expert weight grads come from grouped GEMMs inside one
    expert-FFN node, so each expert's gradient is computed once, not materialised full-size per
    expert."""
    layer = make("topk", "gelu", E=4, K=2, D=16, Fh=32)
    x = torch.randn(64, 16, requires_grad=True)
    y, _ = layer(x)
    fns = set()

    def walk(fn, depth=0):
        if fn is None or fn in fns or depth > 50:
            return
        fns.add(fn)
        for nxt, _ in fn.next_functions:
            walk(nxt, depth + 1)

    walk(y.grad_fn)
    names = {type(f).__name__ for f in fns}
    assert any("ExpertFFN" in n for n in names), names
    assert not any(n.startswith("SliceBackward") or n.startswith("SelectBackward") for n in names), names


@pytest.mark.parametrize("router,activation", [("topk", "gelu"), ("expert_choice", "swiglu")])
@pytest.mark.parametrize("xdtype", [torch.float32, torch.bfloat16])
def test_bf16_autocast_fwd_bwd(router, activation, xdtype, monkeypatch):
    from moesys.kernels import cpu_blas

    layer = make(router, activation, D=16, Fh=32)
    x = torch.randn(40, 16)
    y32, _ = layer(x)
    g32 = torch.autograd.grad(y32.sum(), layer.experts.w1)[0]
    monkeypatch.setattr(cpu_blas, "_checked", None)  # the first CPU GEMM check may come under autocast
    xa = x.to(xdtype).requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, aux = layer(xa)
    assert y.dtype == xdtype
    (y.float().sum() + aux.loss).backward()
    assert layer.experts.w1.grad.dtype == torch.float32 and xa.grad.dtype == xdtype
    torch.testing.assert_close(y.float(), y32, atol=5e-2, rtol=5e-2)
    torch.testing.assert_close(layer.experts.w1.grad, g32, atol=5e-2, rtol=5e-2)


@pytest.mark.parametrize("router", ["topk", "expert_choice", "sigmoid_bias"])
def test_zero_tokens(router):
    layer = make(router, "swiglu")
    x = torch.zeros(0, 12, requires_grad=True)
    y, aux = layer(x)
    assert y.shape == (0, 12) and int(aux.tokens_per_expert.sum()) == 0
    (y.sum() + aux.loss).backward()
    assert x.grad.shape == (0, 12) and layer.experts.w1.grad.abs().sum() == 0


@pytest.mark.parametrize("Fh", [1, 3])
def test_narrow_ffn_widths(Fh):
    layer = make("topk", "gelu", Fh=Fh)
    assert_same(layer, torch.randn(29, 12))


def test_outside_the_kernel_tests_cpu_takes_the_torch_path():
    # tests/conftest.py sets TRITON_INTERPRET only while collecting (tests/kernels sets it per test):
    # here forcing Triton on CPU is the documented error and "auto" is the torch path
    from moesys.kernels import resolve_backend

    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("TRITON_INTERPRET=1 was set by the caller")
    cpu = torch.device("cpu")
    assert resolve_backend("auto", cpu, torch.float32) == "torch"
    with pytest.raises(RuntimeError, match="cannot run on device cpu"):
        resolve_backend("triton", cpu)
