"""The whole MoE layer on the Triton path equals the layer on the torch path (same weights)."""
from __future__ import annotations

import pytest
import torch

from moesys import MoEConfig, MoELayer


@pytest.mark.parametrize("activation,capacity_factor,extra", [
    ("gelu", None, {}),
    ("swiglu", 1.0, {}),
    # drops with renormalised survivors: the Triton path combines with plan.weight_N, torch with plan.weight_R
    ("gelu", 0.6, dict(drop_policy="bpr", renormalize_after_drop=True, min_capacity=1)),
])
def test_layer_triton_equals_torch(activation, capacity_factor, extra):
    def build(backend):
        torch.manual_seed(1)
        cfg = MoEConfig(hidden_size=24, ffn_hidden_size=40, num_experts=7, top_k=2, activation=activation,
                        capacity_factor=capacity_factor, kernel_backend=backend, **extra)
        return MoELayer(cfg)

    layer_tr, layer_ref = build("triton"), build("torch")
    layer_tr.load_state_dict(layer_ref.state_dict())
    x = torch.randn(2, 30, 24)
    outs = []
    for layer in (layer_tr, layer_ref):
        xb = x.clone().requires_grad_()
        y, aux = layer(xb)
        (y.square().sum() + aux.loss).backward()
        outs.append((y, aux, xb.grad, {n: p.grad for n, p in layer.named_parameters()}))
    (y_tr, aux_tr, dx_tr, g_tr), (y_ref, aux_ref, dx_ref, g_ref) = outs
    torch.testing.assert_close(y_tr, y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(aux_tr.loss, aux_ref.loss)
    assert torch.equal(aux_tr.tokens_per_expert, aux_ref.tokens_per_expert)
    torch.testing.assert_close(dx_tr, dx_ref, rtol=1e-4, atol=1e-5)
    assert g_tr.keys() == g_ref.keys()
    assert g_tr["router.weight"] is not None, "the router gets its gradient through topk_softmax"
    for name in g_ref:
        torch.testing.assert_close(g_tr[name], g_ref[name], rtol=1e-4, atol=1e-5, msg=lambda m: f"d{name}: {m}")


@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_shared_experts_and_recompute_on_triton_equal_torch(activation):
    """Shared experts (gated) and recompute on the Triton path (composed grouped GEMMs under
    activation checkpointing) against the torch path without recompute: outputs and every grad."""
    def build(backend, recompute):
        torch.manual_seed(2)
        cfg = MoEConfig(hidden_size=24, ffn_hidden_size=40, num_experts=7, top_k=2, activation=activation,
                        kernel_backend=backend, num_shared_experts=2, shared_ffn_hidden_size=16,
                        shared_expert_gate=True, recompute=recompute)
        return MoELayer(cfg)

    layer_tr, layer_ref = build("triton", True), build("torch", False)
    layer_tr.load_state_dict(layer_ref.state_dict())
    x = torch.randn(2, 30, 24)
    outs = []
    for layer in (layer_tr, layer_ref):
        xb = x.clone().requires_grad_()
        y, aux = layer(xb)
        (y.square().sum() + aux.loss).backward()
        outs.append((y, xb.grad, {n: p.grad for n, p in layer.named_parameters()}))
    (y_tr, dx_tr, g_tr), (y_ref, dx_ref, g_ref) = outs
    torch.testing.assert_close(y_tr, y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dx_tr, dx_ref, rtol=1e-4, atol=1e-5)
    assert g_tr.keys() == g_ref.keys() and "shared_experts.gate" in g_ref
    for name in g_ref:
        torch.testing.assert_close(g_tr[name], g_ref[name], rtol=1e-4, atol=1e-5, msg=lambda m: f"d{name}: {m}")


def test_recompute_on_the_composed_path_saves_no_ffn_intermediate():
    """The composed (Triton) path under recompute keeps only its inputs for backward: the saved
    tensors seen by the autograd graph hold no [N, F] tensor."""
    from moesys.moe.experts import expert_ffn

    torch.manual_seed(0)
    cfg = MoEConfig(hidden_size=8, ffn_hidden_size=24, num_experts=3, kernel_backend="triton", recompute=True)
    counts = torch.tensor([5, 0, 9])
    x = torch.randn(14, 8, requires_grad=True)
    w1, w2 = torch.randn(3, 8, 24, requires_grad=True), torch.randn(3, 24, 8, requires_grad=True)
    shapes = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: shapes.append(tuple(t.shape)) or t, lambda t: t):
        y = expert_ffn(x, counts, w1, w2, None, cfg)
    assert (14, 24) not in shapes, shapes
    y_plain = expert_ffn(x, counts, w1, w2, None, cfg, recompute=False)
    torch.testing.assert_close(y, y_plain)
