"""topk_softmax: the Triton router kernel (and its torch backward) against the torch reference."""
from __future__ import annotations

import pytest
import torch

from moesys.kernels import topk_softmax, topk_softmax_reference


def _run(backend, logits, k, normalize, dprobs, dweights):
    z = logits.clone().requires_grad_()
    probs, weights, idx = topk_softmax(z, k, normalize, backend=backend)
    ((probs * dprobs).sum() + (weights * dweights).sum()).backward()
    return probs, weights, idx, z.grad


@pytest.mark.parametrize("T,E,k", [(601, 7, 1), (601, 7, 2), (64, 7, 7), (40, 64, 8), (33, 5, 3)])
@pytest.mark.parametrize("normalize", [True, False])
def test_matches_reference_with_grads(T, E, k, normalize):
    logits = torch.randn(T, E) * 2
    dprobs, dweights = torch.randn(T, E), torch.randn(T, k)
    p, w, i, dz = _run("triton", logits, k, normalize, dprobs, dweights)
    p_ref, w_ref, i_ref, dz_ref = _run("torch", logits, k, normalize, dprobs, dweights)
    assert p.dtype == w.dtype == torch.float32 and i.dtype == torch.int64
    assert torch.equal(i, i_ref), "top-k indices (and their order) must match torch.topk"
    torch.testing.assert_close(p, p_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(w, w_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(dz, dz_ref, rtol=1e-5, atol=1e-6)


def test_bf16_logits_route_in_fp32():
    logits = torch.randn(50, 7).bfloat16()
    dprobs, dweights = torch.randn(50, 7), torch.randn(50, 2)
    p, w, i, dz = _run("triton", logits, 2, True, dprobs, dweights)
    p_ref, w_ref, i_ref, dz_ref = _run("torch", logits, 2, True, dprobs, dweights)
    assert dz.dtype == torch.bfloat16
    assert torch.equal(i, i_ref)
    torch.testing.assert_close(w, w_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(dz.float(), dz_ref.float(), rtol=1e-2, atol=1e-2)


def test_only_weights_used_in_loss():
    # the probs output unused: its incoming grad is None/zeros and the backward must cope
    z = torch.randn(20, 7, requires_grad=True)
    _, w, _ = topk_softmax(z, 2, False, backend="triton")
    w.sum().backward()
    z_ref = z.detach().clone().requires_grad_()
    topk_softmax_reference(z_ref, 2, False)[1].sum().backward()
    torch.testing.assert_close(z.grad, z_ref.grad, rtol=1e-5, atol=1e-6)


def test_bad_calls_raise_clear_errors():
    z = torch.randn(4, 6)
    with pytest.raises(ValueError, match=r"k \(7\) must be in \[1, num_experts=6\]"):
        topk_softmax(z, 7, True, backend="triton")
    with pytest.raises(ValueError, match=r"k \(0\) must be in"):
        topk_softmax(z, 0, True, backend="triton")
    with pytest.raises(TypeError, match=r"k must be an int, got float"):
        topk_softmax(z, 2.0, True, backend="triton")
    with pytest.raises(ValueError, match=r"logits must be 2-D \[T, E\], got shape \(2, 2, 6\)"):
        topk_softmax(z.view(2, 2, 6), 2, True, backend="triton")
    with pytest.raises(TypeError, match=r"logits dtype torch.int64 not supported"):
        topk_softmax(torch.ones(4, 6, dtype=torch.int64), 2, True, backend="triton")
