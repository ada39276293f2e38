"""The static dispatch / combine Triton kernels (interpreter) against their torch references, on a
real placement: 601 tokens, top-2 over 7 experts, expert 1 empty, a binding capacity."""
from __future__ import annotations

import pytest
import torch

from moesys.kernels.permute_static import (
    combine_backward_reference,
    combine_reference,
    combine_static,
    dispatch_reference,
    dispatch_static,
    route_sum_reference,
)
from moesys.kernels.permute_static_triton import (
    launch_static_combine_backward,
    launch_static_gather,
    launch_static_route_sum,
)
from moesys.kernels.route_place import route_place

D = 45  # not a multiple of the interpreter's 32-wide column block


def placement(T=601, K=2, E=7, C=150):
    """(dest_R, row_route_M, M, padded): routes placed by route_place, expert 1 never chosen."""
    g = torch.Generator().manual_seed(0)
    scores = torch.rand(T, E, generator=g) + torch.linspace(0, 0.6, E)
    scores[:, 1] = -1.0
    expert_TK = scores.topk(K, dim=1).indices
    dest_R, row_route_M, _, counts_E, dropped = route_place(expert_TK, E, C, "choice" if C is not None else "token")
    if C is not None and C < 200:
        assert int(dropped) > 0 and int(counts_E[1]) == 0
    return dest_R, row_route_M, row_route_M.shape[0], C is not None


def _tol(dtype):
    return dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=3e-2)


@pytest.mark.parametrize("C", [None, 150])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dispatch_and_its_backward(C, dtype):
    dest_R, row_route_M, M, padded = placement(C=C)
    T, K = 601, 2
    x = torch.randn(T, D, dtype=dtype)
    got = launch_static_gather(x, row_route_M, K)
    want = dispatch_reference(x, row_route_M, K, padded)
    assert torch.equal(got, want), "a gather must be exact (empty rows 0)"
    dx_M = torch.randn(M, D, dtype=dtype)
    got = launch_static_route_sum(dx_M, dest_R, T, K)
    want = route_sum_reference(dx_M, dest_R, T, K, padded)
    torch.testing.assert_close(got.float(), want.float(), **_tol(dtype))
    assert got.dtype == dtype


@pytest.mark.parametrize("C,renormalize", [(None, False), (150, False), (150, True), (40, True)])
@pytest.mark.parametrize("dtype", [torch.float32, pytest.param(torch.bfloat16, marks=pytest.mark.slow)])  # fast: fp32
def test_combine_forward_and_backward(C, renormalize, dtype):
    dest_R, row_route_M, M, padded = placement(C=C)
    T, K = 601, 2
    y = torch.randn(M, D, dtype=dtype)
    w = torch.rand(T, K)
    w[5] = 0.0  # a token whose kept weights sum to 0: the clamp holds
    dout = torch.randn(T, D)
    got = launch_static_route_sum(y, dest_R, T, K, w, renormalize)
    want = combine_reference(y, w, dest_R, padded, renormalize)
    torch.testing.assert_close(got.float(), want.float(), **_tol(dtype))
    dy, dw = launch_static_combine_backward(dout, y, w, row_route_M, dest_R, renormalize)
    dy_r, dw_r = combine_backward_reference(dout, y, w, row_route_M, dest_R, padded, renormalize)
    torch.testing.assert_close(dy.float(), dy_r.float(), **_tol(dtype))
    # dw: the kernel takes the fp32 dout as it is (the reference rounds it to bf16 first), so it is the
    # fp32 reference on the same rows, to fp32 tolerance
    dw_r = combine_backward_reference(dout, y.float(), w, row_route_M, dest_R, padded, renormalize)[1]
    torch.testing.assert_close(dw, dw_r, rtol=1e-5, atol=1e-5)
    assert dy.dtype == dtype and dw.dtype == torch.float32
    if padded:
        empty = row_route_M == T * K
        assert empty.any() and dy[empty].abs().max() == 0


@pytest.mark.parametrize("K", [1, 3])
def test_small_odd_shapes(K):
    T, E, C = 13, 5, 3
    expert_TK = torch.stack([torch.randperm(E)[:K] for _ in range(T)])
    dest_R, row_route_M, *_ = route_place(expert_TK, E, C, "choice")
    M = row_route_M.shape[0]
    x, y, w, dout = torch.randn(T, 7), torch.randn(M, 7), torch.rand(T, K), torch.randn(T, 7)
    assert torch.equal(launch_static_gather(x, row_route_M, K), dispatch_reference(x, row_route_M, K, True))
    torch.testing.assert_close(launch_static_route_sum(y, dest_R, T, K, w, True),
                               combine_reference(y, w, dest_R, True, True), rtol=1e-5, atol=1e-6)
    for a, b in zip(launch_static_combine_backward(dout, y, w, row_route_M, dest_R, True),
                    combine_backward_reference(dout, y, w, row_route_M, dest_R, True, True)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_cpu_ops_take_torch_even_when_interpreting(monkeypatch):
    import moesys.kernels.permute_static_triton as pst

    def fail(*a, **k):
        raise AssertionError("a CPU op launched a Triton kernel")

    for name in ("launch_static_gather", "launch_static_route_sum", "launch_static_combine_backward"):
        monkeypatch.setattr(pst, name, fail)
    dest_R, row_route_M, M, padded = placement(T=20, C=5)
    x = torch.randn(20, 8, requires_grad=True)
    w = torch.rand(20, 2, requires_grad=True)
    y = combine_static(dispatch_static(x, row_route_M, dest_R, 2, padded) * 2, w, row_route_M, dest_R, padded, True)
    y.sum().backward()
    assert x.grad is not None and w.grad is not None
