"""The gather-only fixed-K permute/combine equals the general index-based one (values and grads)."""
import pytest
import torch

from moesys.kernels.permute import (inverse_routes, permute_fixed_k, permute_torch, unpermute_fixed_k,
                                    unpermute_torch)


@pytest.mark.parametrize("T,K,D,drop", [(601, 2, 13, 0.0), (50, 1, 8, 0.3), (37, 3, 5, 0.5)])
def test_fixed_k_equals_general(T, K, D, drop):
    torch.manual_seed(0)
    R = T * K
    g = torch.Generator().manual_seed(1)
    keep = torch.rand(R, generator=g) >= drop
    route_idx_N = torch.randperm(R, generator=g)
    route_idx_N = route_idx_N[keep[route_idx_N]]  # kept routes in some expert order
    inv_R = inverse_routes(route_idx_N, R)
    x = torch.randn(T, D, requires_grad=True)
    w = torch.rand(T, K, requires_grad=True)
    gout = torch.randn(T, D)

    def run(fast):
        x.grad = w.grad = None
        if fast:
            xn = permute_fixed_k(x, route_idx_N, inv_R, K)
            yn = xn * 1.5 + 0.25
            out = unpermute_fixed_k(yn, w, route_idx_N, inv_R)
        else:
            tok = torch.div(route_idx_N, K, rounding_mode="floor")
            xn = permute_torch(x, tok)
            yn = xn * 1.5 + 0.25
            out = unpermute_torch(yn, tok, w.reshape(-1)[route_idx_N], T)
        (out * gout).sum().backward()
        return out.detach(), x.grad.clone(), w.grad.clone()

    for a, b in zip(run(True), run(False)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    # a dropped route's weight gets no gradient, a token with every route dropped gets 0
    dropped = (inv_R == route_idx_N.shape[0]).view(T, K)
    assert torch.all(run(True)[2][dropped] == 0)
