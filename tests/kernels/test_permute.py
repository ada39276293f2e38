"""permute / unpermute: the Triton kernels (gather, weighted combine, fused backward) against the torch path."""
from __future__ import annotations

import pytest
import torch

from moesys.kernels import permute, unpermute
from moesys.kernels.permute_triton import launch_permute, launch_unpermute, launch_unpermute_backward

D = 45  # not a multiple of the 32-wide interpreter column block


def _tol(dtype):
    # fp32: the sums differ only in order; bf16: one rounding of the fp32 sum (the torch path's
    # permute backward adds in bf16, so allow a few bf16 ulps)
    return dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=3e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_permute_forward_and_dx(dtype, routes_601):
    tok_N, T = routes_601
    x = torch.randn(T, D, dtype=dtype)
    dxN = torch.randn(tok_N.shape[0], D, dtype=dtype)
    grads = []
    for backend in ("triton", "torch"):
        xb = x.clone().requires_grad_()
        out = permute(xb, tok_N, backend=backend)
        out.backward(dxN)
        grads.append((out, xb.grad))
    (y_tr, dx_tr), (y_ref, dx_ref) = grads
    assert torch.equal(y_tr, y_ref), "a gather must be exact"
    torch.testing.assert_close(dx_tr.float(), dx_ref.float(), **_tol(dtype))
    assert dx_tr.dtype == dtype
    assert torch.count_nonzero(dx_tr[7]) == 0, "a token with no route gets no gradient"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_unpermute_forward_dy_and_dweight(dtype, routes_601):
    tok_N, T = routes_601
    N = tok_N.shape[0]
    y = torch.randn(N, D, dtype=dtype)
    w = torch.rand(N)
    dyT = torch.randn(T, D, dtype=dtype)
    results = []
    for backend in ("triton", "torch"):
        yb, wb = y.clone().requires_grad_(), w.clone().requires_grad_()
        out = unpermute(yb, tok_N, wb, T, backend=backend)
        out.backward(dyT)
        results.append((out, yb.grad, wb.grad))
    (o_tr, dy_tr, dw_tr), (o_ref, dy_ref, dw_ref) = results
    assert o_tr.dtype == dtype and dy_tr.dtype == dtype and dw_tr.dtype == torch.float32
    torch.testing.assert_close(o_tr.float(), o_ref.float(), **_tol(dtype))
    torch.testing.assert_close(dy_tr.float(), dy_ref.float(), **_tol(dtype))
    torch.testing.assert_close(dw_tr, dw_ref, rtol=1e-5, atol=1e-4)
    assert torch.count_nonzero(o_tr[7]) == 0, "a token with no route is 0"


def test_unpermute_against_per_token_loop():
    # the formula written out: y_T[t] = sum_i [tok_i == t] w_i y_i
    tok_N = torch.tensor([2, 0, 2, 2, 4, 0])
    y, w, T = torch.randn(6, 5), torch.rand(6), 6
    want = torch.zeros(T, 5)
    for i, t in enumerate(tok_N.tolist()):
        want[t] += w[i] * y[i]
    torch.testing.assert_close(unpermute(y, tok_N, w, T, backend="triton"), want)


def test_unpermute_backward_launcher_formulas():
    tok_N = torch.tensor([1, 0, 1])
    y, w, dyT = torch.randn(3, 4), torch.rand(3), torch.randn(2, 4)
    dy_N, dw_N = launch_unpermute_backward(dyT, y, tok_N, w)
    torch.testing.assert_close(dy_N, w[:, None] * dyT[tok_N])
    torch.testing.assert_close(dw_N, (y * dyT[tok_N]).sum(1))


def test_empty_routes():
    x = torch.randn(5, 4, requires_grad=True)
    tok = torch.zeros(0, dtype=torch.int64)
    assert permute(x, tok, backend="triton").shape == (0, 4)
    out = unpermute(torch.randn(0, 4), tok, torch.zeros(0), 5, backend="triton")
    assert torch.equal(out, torch.zeros(5, 4))


def test_bad_calls_raise_clear_errors():
    x, tok = torch.randn(10, 4), torch.tensor([0, 3, 9])
    with pytest.raises(TypeError, match=r"token_idx must be a 1-D integer tensor"):
        permute(x, tok.float(), backend="triton")
    with pytest.raises(IndexError, match=r"token_idx values must lie in \[0, 10\), got min 0 max 10"):
        permute(x, torch.tensor([0, 10]), backend="triton")
    with pytest.raises(TypeError, match=r"permute: x has dtype torch.int64"):
        permute(torch.ones(10, 4, dtype=torch.int64), tok, backend="triton")
    with pytest.raises(ValueError, match=r"unpermute: weight has shape \(2,\), token_idx \(3,\)"):
        unpermute(torch.randn(3, 4), tok, torch.rand(2), 10, backend="triton")
    with pytest.raises(TypeError, match=r"weight must be a floating tensor"):
        unpermute(torch.randn(3, 4), tok, torch.ones(3, dtype=torch.int64), 10, backend="triton")
    with pytest.raises(ValueError, match=r"unpermute: y must be 2-D \[N, D\], got shape \(3, 4, 1\)"):
        launch_unpermute(torch.randn(3, 4, 1), tok, torch.rand(3), 10)
    with pytest.raises(ValueError, match=r"permute: token_idx must be contiguous"):
        launch_permute(x, torch.tensor([[0, 1], [3, 4], [9, 2]])[:, 0])
    with pytest.raises(TypeError, match=r"unpermute: weight has dtype torch.bfloat16; expected one of float32"):
        launch_unpermute(torch.randn(3, 4), tok, torch.rand(3).bfloat16(), 10)
    with pytest.raises(ValueError, match=r"permute: x must have unit stride in its last dim"):
        launch_permute(x.t().contiguous().t(), tok)
