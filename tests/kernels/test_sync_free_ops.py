"""The sync-free path's ops against obviously-correct references: outputs and every gradient.

expert_ffn_grouped_mm (torch._grouped_mm with device offsets, hand-written grouped dX/dW) against a
per-expert loop; topk_route (fused softmax/top-k/renormalisation/aux statistics, hand-written
backward) against plain autograd; dispatch_static / combine_static against per-route loops.
"""
import pytest
import torch
import torch.nn.functional as F

from moesys.kernels.grouped_mm_ffn import expert_ffn_grouped_mm, gmm_offs, gmm_offs_dw
from moesys.kernels.permute_static import combine_static, dispatch_static
from moesys.kernels.topk_route import histogram, topk_route, topk_route_reference

COUNTS_601 = [100, 0, 150, 51, 120, 80, 100]  # 601 rows over 7 experts, expert 1 empty

ACT = {"gelu": F.gelu, "relu": F.relu, "silu": F.silu}


def ffn_loop(x, w1, w2, w3, counts, activation):
    """Per-expert reference (autograd through slices)."""
    outs, start = [], 0
    for e, n in enumerate(counts):
        xe = x[start : start + n]
        h = xe @ w1[e]
        h = F.silu(h) * (xe @ w3[e]) if activation == "swiglu" else ACT[activation](h)
        outs.append(h @ w2[e])
        start += n
    return torch.cat(outs)


@pytest.mark.parametrize("activation", ["gelu", "relu", "silu", "swiglu"])
@pytest.mark.parametrize("pad", [0, 5])
def test_expert_ffn_grouped_mm_matches_per_expert_loop(activation, pad):
    """601 rows over 7 experts, expert 1 empty; `pad` rows past the last offset (a static buffer's
    padding) are ignored: their gradient does not reach the weights."""
    torch.manual_seed(0)
    E, D, Fh = 7, 12, 20
    N = sum(COUNTS_601)
    x = torch.randn(N + pad, D, requires_grad=True)
    ws = [torch.randn(E, D, Fh, requires_grad=True), torch.randn(E, Fh, D, requires_grad=True)]
    w3 = torch.randn(E, D, Fh, requires_grad=True) if activation == "swiglu" else None
    offs = torch.tensor(COUNTS_601).cumsum(0).to(torch.int32)
    y = expert_ffn_grouped_mm(x, ws[0], ws[1], w3, offs, activation)
    gy = torch.randn(N, D)
    y[:N].mul(gy).sum().backward()  # the padding rows' output is unused (its gradient: zeros)
    got = [x.grad[:N].clone()] + [w.grad.clone() for w in ws + ([w3] if w3 is not None else [])]
    for t in [x] + ws + ([w3] if w3 is not None else []):
        t.grad = None
    y_ref = ffn_loop(x[:N], ws[0], ws[1], w3, COUNTS_601, activation)
    y_ref.mul(gy).sum().backward()
    want = [x.grad[:N]] + [w.grad for w in ws + ([w3] if w3 is not None else [])]
    torch.testing.assert_close(y[:N], y_ref, atol=1e-4, rtol=1e-4)
    for i, (a, b) in enumerate(zip(got, want)):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4, msg=lambda m: f"grad {i}: {m}")
    assert got[1][1].abs().max() == 0 and got[2][1].abs().max() == 0  # the empty expert: zero grads


def test_zero_stride_incoming_gradient():
    """y.sum().backward() hands a zero-stride gradient: torch's own _grouped_mm backward rejects it."""
    torch.manual_seed(0)
    x = torch.randn(10, 8, requires_grad=True)
    w1, w2 = torch.randn(3, 8, 4, requires_grad=True), torch.randn(3, 4, 8, requires_grad=True)
    offs = torch.tensor([4, 4, 10], dtype=torch.int32)
    expert_ffn_grouped_mm(x, w1, w2, None, offs, "gelu").sum().backward()
    x2, a, b = (t.detach().clone().requires_grad_() for t in (x, w1, w2))
    ffn_loop(x2, a, b, None, [4, 0, 6], "gelu").sum().backward()
    for g, r in ((x.grad, x2.grad), (w1.grad, a.grad), (w2.grad, b.grad)):
        torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-5)


def test_bad_arguments_are_clear_errors():
    x, w1, w2 = torch.randn(6, 8), torch.randn(2, 8, 4), torch.randn(2, 4, 8)
    with pytest.raises(ValueError, match="offs must be int32"):
        expert_ffn_grouped_mm(x, w1, w2, None, torch.tensor([2, 6]), "gelu")
    with pytest.raises(ValueError, match="needs w3"):
        expert_ffn_grouped_mm(x, w1, w2, None, torch.tensor([2, 6], dtype=torch.int32), "swiglu")
    with pytest.raises(ValueError, match=r"hidden_size \(6\) and ffn_hidden_size \(4\) to be multiples of 4"):
        expert_ffn_grouped_mm(torch.randn(6, 6), torch.randn(2, 6, 4), torch.randn(2, 4, 6), None,
                              torch.tensor([2, 6], dtype=torch.int32), "gelu")


def test_static_permute_ops_opcheck():
    """Schema, fake tensors and the autograd registration of the dispatch / combine ops."""
    from moesys.kernels.permute_static import (static_combine_backward_op, static_combine_op, static_dispatch_op,
                                               static_route_sum_op)

    T, K, M = 11, 2, 25
    dest, row_route = _random_placement(T, K, M, drop=True)
    x = torch.randn(T, 8, requires_grad=True)
    y = torch.randn(M, 8, requires_grad=True)
    w = torch.rand(T, K, requires_grad=True)
    utils = ("test_schema", "test_faketensor", "test_autograd_registration")
    torch.library.opcheck(static_dispatch_op, (x, row_route, dest, K, True), test_utils=utils)
    torch.library.opcheck(static_combine_op, (y, w, row_route, dest, True, True), test_utils=utils)
    torch.library.opcheck(static_route_sum_op, (y.detach(), dest, T, K, True), test_utils=utils[:2])
    torch.library.opcheck(static_combine_backward_op, (torch.randn(T, 8), y.detach(), w.detach(), row_route, dest,
                                                       True, False), test_utils=utils[:2])


def test_custom_ops_opcheck():
    offs = torch.tensor([5, 5, 14, 18], dtype=torch.int32)
    torch.library.opcheck(gmm_offs, (torch.randn(18, 12), torch.randn(4, 12, 8), offs),
                          test_utils=("test_schema", "test_faketensor"))
    torch.library.opcheck(gmm_offs_dw, (torch.randn(18, 12), torch.randn(18, 8), offs),
                          test_utils=("test_schema", "test_faketensor"))


# ---- fused routing --------------------------------------------------------------------------------
@pytest.mark.parametrize("k,normalize", [(1, False), (2, True), (2, False), (3, True)])
@pytest.mark.parametrize("aux", ["switch", "gshard", "none"])
@pytest.mark.parametrize("use_probs", [False, True])
def test_topk_route_matches_autograd_reference(k, normalize, aux, use_probs):
    torch.manual_seed(0)
    T, E = 601, 7
    logits = torch.randn(T, E) * 2
    logits[:, 1] -= 50.0  # expert 1 never chosen
    z = logits.clone().requires_grad_()
    z_ref = logits.clone().requires_grad_()
    gw = torch.randn(T, k)
    gp = torch.randn(T, E)
    out = topk_route(z, k, normalize, aux, 0.01)
    ref = topk_route_reference(z_ref, k, normalize, aux, 0.01)
    for name, a, b in zip(("probs", "weights", "idx", "routed", "loss"), out, ref):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=lambda m: f"{name}: {m}")
    assert int(out[3][1]) == 0 and int(out[3].sum()) == T * k

    def loss(o):
        extra = (o[0] * gp).sum() if use_probs else 0
        return (o[1] * gw).sum() + 3.0 * o[4] + extra

    loss(out).backward()
    loss(ref).backward()
    torch.testing.assert_close(z.grad, z_ref.grad, atol=1e-6, rtol=1e-5)


def test_topk_route_weights_only_and_histogram():
    z = torch.randn(9, 5, requires_grad=True)
    _, w, idx, routed, _ = topk_route(z, 2, True, "none")
    w.sum().backward()  # only the weights are used: no gradient from probs or the loss
    z2 = z.detach().clone().requires_grad_()
    topk_route_reference(z2, 2, True, "none", 0.0)[1].sum().backward()
    torch.testing.assert_close(z.grad, z2.grad, atol=1e-6, rtol=1e-5)
    assert torch.equal(histogram(idx, 5), torch.bincount(idx.reshape(-1), minlength=5))


# ---- static dispatch and combine ------------------------------------------------------------------
def _random_placement(T, K, M, drop):
    """A random valid placement: routes to distinct rows of an M-row buffer, some dropped (dest M)."""
    g = torch.Generator().manual_seed(1)
    R = T * K
    rows = torch.randperm(M, generator=g)[:R] if M >= R else None
    dest = rows.clone()
    if drop:
        dest[torch.randperm(R, generator=g)[: R // 4]] = M
    row_route = torch.full((M,), R, dtype=torch.int64)
    kept = dest < M
    row_route[dest[kept]] = torch.arange(R)[kept]
    return dest, row_route


@pytest.mark.parametrize("padded,renormalize", [(False, False), (True, False), (True, True)])
def test_dispatch_and_combine_match_per_route_loops(padded, renormalize):
    torch.manual_seed(0)
    T, K, D = 31, 2, 8
    M = T * K if not padded else T * K + 9
    dest, row_route = _random_placement(T, K, M, drop=padded)
    x = torch.randn(T, D, requires_grad=True)
    w = torch.rand(T, K, requires_grad=True)
    x_M = dispatch_static(x, row_route, dest, K, padded)
    y_M = x_M * 2.0 + 1.0  # stands in for the experts
    y = combine_static(y_M, w, row_route, dest, padded, renormalize)
    gy = torch.randn(T, D)
    (y * gy).sum().backward()
    # per-route loop; renormalize: each token's kept weights over their sum (clamped at eps)
    x2, w2 = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    out = [x2.new_zeros(D) for _ in range(T)]
    for t in range(T):
        kept = [k for k in range(K) if int(dest[t * K + k]) < M]
        total = sum((w2[t, k] for k in kept), torch.zeros(()))
        for k in kept:
            wk = w2[t, k] / total.clamp_min(torch.finfo(torch.float32).eps) if renormalize else w2[t, k]
            out[t] = out[t] + wk * (x2[t] * 2.0 + 1.0)
    y_ref = torch.stack(out)
    (y_ref * gy).sum().backward()
    torch.testing.assert_close(y, y_ref, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(x.grad, x2.grad, atol=1e-6, rtol=1e-5)
    # a token keeping one route has w' = 1 whatever w: its gradient is 0 up to rounding of the formula used
    torch.testing.assert_close(w.grad, w2.grad, atol=1e-5 if renormalize else 1e-6, rtol=1e-5)
    kept_rows = row_route < T * K
    torch.testing.assert_close(x_M[kept_rows], x.detach()[row_route[kept_rows] // K])
    assert x_M[~kept_rows].abs().sum() == 0  # an empty row is 0
    if renormalize:
        lost_one = [t for t in range(T) if sum(int(dest[t * K + k]) < M for k in range(K)) == 1]
        assert lost_one  # a token that kept one route puts weight 1 on it
