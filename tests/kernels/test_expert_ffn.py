"""The fused expert FFN (torch path) against a per-expert loop of plain autograd ops."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moesys.kernels.expert_ffn import expert_ffn_torch

ACTS = {"gelu": F.gelu, "relu": F.relu, "silu": F.silu}


def reference(x, w1, w2, w3, counts, activation):
    """Per expert, plain autograd: act(x_e @ w1[e]) @ w2[e] (swiglu: silu(x_e@w1) * (x_e@w3))."""
    outs, start = [], 0
    for e, n in enumerate(counts.tolist()):
        xe = x[start : start + n]
        h = xe @ w1[e]
        a = F.silu(h) * (xe @ w3[e]) if activation == "swiglu" else ACTS[activation](h)
        outs.append(a @ w2[e])
        start += n
    return torch.cat(outs)


def _leaves(*ts, grads=None):
    grads = grads or [True] * len(ts)
    return [None if t is None else t.detach().clone().requires_grad_(g) for t, g in zip(ts, grads)]


@pytest.fixture(params=[False, True], ids=["plain", "cached"])
def cache(request):
    if request.param:
        request.getfixturevalue("ws_forced")
    return request.param


@pytest.mark.parametrize("activation", ["gelu", "relu", "silu", "swiglu"])
def test_matches_per_expert_loop(activation, cache, counts_601):
    # 601 rows, 7 experts, expert 1 empty, odd widths; two steps so cached blocks are reused
    E, D, Fh = 7, 13, 10
    for step in range(2):
        x = torch.randn(601, D)
        w1, w2 = torch.randn(E, D, Fh) / D**0.5, torch.randn(E, Fh, D) / Fh**0.5
        w3 = torch.randn(E, D, Fh) / D**0.5 if activation == "swiglu" else None
        dy = torch.randn(601, D)
        got_in, ref_in = _leaves(x, w1, w2, w3), _leaves(x, w1, w2, w3)
        y = expert_ffn_torch(*got_in, counts_601, activation)
        y_ref = reference(*ref_in, counts_601, activation)
        y.backward(dy)
        y_ref.backward(dy)
        torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
        for name, g, r in zip(("x", "w1", "w2", "w3"), got_in, ref_in):
            if g is not None:
                torch.testing.assert_close(g.grad, r.grad, rtol=1e-5, atol=1e-5, msg=lambda m: f"d{name}: {m}")
        assert torch.count_nonzero(got_in[1].grad[1]) == 0  # the empty expert


@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_only_the_needed_gradients(activation, counts_601):
    # frozen weights / an input without grad: the others are still right, and absent ones are None
    E, D, Fh = 7, 8, 6
    x = torch.randn(601, D)
    ws = [torch.randn(E, D, Fh) / D**0.5, torch.randn(E, Fh, D) / Fh**0.5,
          torch.randn(E, D, Fh) / D**0.5 if activation == "swiglu" else None]
    for needs in ([False, True, False, True], [True, False, True, False], [False, False, True, False]):
        got = _leaves(x, *ws, grads=needs)
        ref = _leaves(x, *ws, grads=needs)
        expert_ffn_torch(*got, counts_601, activation).square().sum().backward()
        reference(*ref, counts_601, activation).square().sum().backward()
        for g, r, need in zip(got, ref, needs):
            if g is None:
                continue
            assert (g.grad is not None) == need
            if need:
                torch.testing.assert_close(g.grad, r.grad, rtol=1e-4, atol=1e-5)


def test_bf16(counts_601):
    E, D, Fh = 7, 16, 12
    x = torch.randn(601, D, dtype=torch.bfloat16)
    w1 = (torch.randn(E, D, Fh) / 4).bfloat16()
    w2 = (torch.randn(E, Fh, D) / 4).bfloat16()
    got = _leaves(x, w1, w2)
    ref = _leaves(x.float(), w1.float(), w2.float())
    y = expert_ffn_torch(got[0], got[1], got[2], None, counts_601, "gelu")
    y.float().sum().backward()
    reference(ref[0], ref[1], ref[2], None, counts_601, "gelu").sum().backward()
    assert y.dtype == torch.bfloat16 and got[1].grad.dtype == torch.bfloat16
    for g, r in zip(got, ref):
        torch.testing.assert_close(g.grad.float(), r.grad, rtol=3e-2, atol=3e-2 * r.grad.abs().max().item())


@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_bf16_under_autocast_matches_float_reference(activation, cache, counts_601, monkeypatch):
    """Issue 15: the CPU bf16 training path. Inside torch.autocast the experts get bf16 operands
    (GroupedExperts casts them; autocast does not reach custom ops), which must take a bf16 path
    (torch._grouped_mm, or the cached per-expert loop), never the fp32 MKL batch; the batch's
    one-time fp32 self-check may itself first run here, for an fp32 grouped GEMM."""
    from moesys.kernels import cpu_blas, grouped_gemm

    monkeypatch.setattr(cpu_blas, "_checked", None)  # as in a fresh process: no check done yet
    E, D, Fh = 7, 16, 24
    x = torch.randn(601, D)
    w1, w2 = torch.randn(E, D, Fh) / D**0.5, torch.randn(E, Fh, D) / Fh**0.5
    w3 = torch.randn(E, D, Fh) / D**0.5 if activation == "swiglu" else None
    dy = torch.randn(601, D)
    ref = _leaves(x, w1, w2, w3)
    y_ref = reference(*ref, counts_601, activation)
    y_ref.backward(dy)
    got = _leaves(x, w1, w2, w3)  # fp32 leaves, cast inside autocast as GroupedExperts does
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = expert_ffn_torch(*[None if t is None else t.bfloat16() for t in got], counts_601, activation)
        y_gg32 = grouped_gemm(x, w1, counts_601)  # fp32 operands under autocast: the fp32 path
    y.float().backward(dy)
    assert y.dtype == torch.bfloat16 and y_gg32.dtype == torch.float32
    scale = y_ref.abs().max().item()
    torch.testing.assert_close(y.float(), y_ref, rtol=3e-2, atol=2e-2 * scale)
    for name, g, r in zip(("x", "w1", "w2", "w3"), got, ref):
        if g is not None:
            assert g.grad.dtype == torch.float32
            torch.testing.assert_close(g.grad, r.grad, rtol=3e-2, atol=3e-2 * r.grad.abs().max().item(),
                                       msg=lambda m: f"d{name}: {m}")
    starts = torch.cumsum(counts_601, 0) - counts_601
    for e, (s, n) in enumerate(zip(starts.tolist(), counts_601.tolist())):
        torch.testing.assert_close(y_gg32[s : s + n], x[s : s + n] @ w1[e], rtol=1e-5, atol=1e-5)
    if cpu_blas._FN is not None and cpu_blas._enabled:
        assert cpu_blas._checked is True  # the first check ran inside autocast, and passed


def test_bad_arguments_are_clear_errors():
    x, c = torch.randn(5, 4), torch.tensor([2, 3])
    w1, w2 = torch.randn(2, 4, 6), torch.randn(2, 6, 4)
    with pytest.raises(ValueError, match="w2 has shape"):
        expert_ffn_torch(x, w1, torch.randn(2, 4, 6), None, c, "gelu")
    with pytest.raises(ValueError, match="needs w3"):
        expert_ffn_torch(x, w1, w2, None, c, "swiglu")
    with pytest.raises(ValueError, match="takes no w3"):
        expert_ffn_torch(x, w1, w2, w1, c, "gelu")
    with pytest.raises(ValueError, match="not one of"):
        expert_ffn_torch(x, w1, w2, None, c, "tanh")
    with pytest.raises(ValueError, match="counts sum to 4 but x has N=5"):
        expert_ffn_torch(x, w1, w2, None, torch.tensor([1, 3]), "gelu")
    with pytest.raises(ValueError, match="x has width D=4 but w expects D=3"):
        expert_ffn_torch(x, torch.randn(2, 3, 6), w2, None, c, "gelu")


def test_double_backward_is_refused():
    x = torch.randn(5, 4, requires_grad=True)
    w1, w2 = torch.randn(2, 4, 6, requires_grad=True), torch.randn(2, 6, 4, requires_grad=True)
    y = expert_ffn_torch(x, w1, w2, None, torch.tensor([2, 3]), "gelu")
    (gx,) = torch.autograd.grad(y.sum(), x, create_graph=True)
    with pytest.raises(RuntimeError):
        gx.sum().backward()
