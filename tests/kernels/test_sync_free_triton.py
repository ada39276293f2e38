"""The sync-free layer (kernel_backend="grouped_mm") with its CUDA kernels: router softmax + top-k,
placement, dispatch and combine on Triton (interpreted here; on CUDA the ops pick them by themselves) equal the torch bodies
the CPU runs, outputs, every gradient, counts and drops. The expert GEMMs stay torch._grouped_mm."""
from __future__ import annotations

import collections

import pytest
import torch

import moesys.kernels.permute_static as permute_static
import moesys.kernels.permute_static_triton as pst
import moesys.kernels.route_place as route_place
import moesys.kernels.route_place_triton as rpt
import moesys.kernels.topk_route as topk_route
import moesys.kernels.topk_softmax_triton as tst
from moesys import MoEConfig, MoELayer


def _build(**kw):
    torch.manual_seed(1)
    cfg = MoEConfig(hidden_size=24, ffn_hidden_size=40, num_experts=7, top_k=2, kernel_backend="grouped_mm", **kw)
    layer = MoELayer(cfg)
    with torch.no_grad():
        layer.router.weight.normal_(0, 0.5)
        layer.router.weight[1] = 0.0
        layer.router.weight[1, 0] = -100.0  # expert 1 gets no token (x[:, 0] > 0 below)
    return layer


def _step(layer, x):
    xb = x.clone().requires_grad_()
    y, aux = layer(xb)
    (y * torch.linspace(-1, 1, y.numel()).view(y.shape)).sum().add(aux.loss).backward()
    return y.detach(), aux, xb.grad, {n: p.grad.clone() for n, p in layer.named_parameters()}


@pytest.mark.parametrize("cfg", [
    dict(activation="gelu"),
    dict(activation="swiglu", capacity_factor=1.25),
    dict(activation="gelu", capacity_factor=0.6, drop_policy="bpr", renormalize_after_drop=True),
    dict(activation="gelu", capacity_factor=0.8, drop_policy="probs"),
])
def test_layer_with_triton_twins_equals_torch_bodies(cfg, monkeypatch):
    layer = _build(**cfg)
    x = torch.randn(61, 24)
    x[:, 0] = x[:, 0].abs() + 1.0
    y_ref, aux_ref, dx_ref, g_ref = _step(layer, x)

    calls = collections.Counter()

    def counted(module, name):
        fn = getattr(module, name)

        def wrapper(*a, **k):
            calls[name] += 1
            return fn(*a, **k)

        monkeypatch.setattr(module, name, wrapper)

    for name in ("launch_static_gather", "launch_static_route_sum", "launch_static_combine_backward"):
        counted(pst, name)
    counted(rpt, "launch_route_place")
    counted(tst, "launch_topk_softmax")
    monkeypatch.setattr(topk_route, "_use_triton", lambda t: True)
    monkeypatch.setattr(route_place, "_use_triton", lambda t: True)
    monkeypatch.setattr(permute_static, "_use_triton", lambda t: True)
    layer.zero_grad(set_to_none=True)
    y, aux, dx, g = _step(layer, x)
    # router 1; placement 1; dispatch 1 + the combine's dy 1; dispatch backward 1 + combine 1; combine backward 1
    assert calls == {"launch_topk_softmax": 1, "launch_route_place": 1, "launch_static_gather": 2, "launch_static_route_sum": 2,
                     "launch_static_combine_backward": 1}, calls

    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(aux.loss, aux_ref.loss)
    assert torch.equal(aux.tokens_per_expert, aux_ref.tokens_per_expert) and int(aux.tokens_per_expert[1]) == 0
    assert torch.equal(aux.dropped, aux_ref.dropped)
    if cfg.get("capacity_factor", 1.25) < 1.0:
        assert int(aux.dropped) > 0
    torch.testing.assert_close(dx, dx_ref, rtol=1e-4, atol=1e-5)
    for name in g_ref:
        torch.testing.assert_close(g[name], g_ref[name], rtol=1e-4, atol=1e-5, msg=lambda m: f"d{name}: {m}")


@pytest.mark.parametrize("k,normalize,aux", [(2, True, "switch"), (1, False, "gshard"), (3, True, "none")])
def test_topk_route_with_the_triton_router_kernel(k, normalize, aux, monkeypatch):
    """topk_route's CUDA branch (the fused softmax + top-k kernel) against plain autograd, 601 tokens
    over 7 experts, expert 1 never chosen."""
    import moesys.kernels.topk_route as topk_route_mod

    monkeypatch.setattr(topk_route_mod, "_use_triton", lambda t: True)
    logits = torch.randn(601, 7) * 2
    logits[:, 1] -= 50.0
    z, z_ref = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    out = topk_route_mod.topk_route(z, k, normalize, aux, 0.01)
    ref = topk_route_mod.topk_route_reference(z_ref, k, normalize, aux, 0.01)
    for name, a, b in zip(("probs", "weights", "idx", "routed", "loss"), out, ref):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=lambda m: f"{name}: {m}")
    assert int(out[3][1]) == 0
    gw, gp = torch.randn(601, k), torch.randn(601, 7)
    for o in (out, ref):
        ((o[1] * gw).sum() + (o[0] * gp).sum() + 3.0 * o[4]).backward()
    torch.testing.assert_close(z.grad, z_ref.grad, atol=1e-6, rtol=1e-5)
