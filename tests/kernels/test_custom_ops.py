"""The torch.library custom ops: schema/fake/autograd registration (opcheck) and torch.compile."""
from __future__ import annotations

import pytest
import torch
from torch._dynamo.testing import AotEagerAndRecordGraphs

from moesys.kernels import grouped_gemm, permute, topk_softmax, unpermute
from moesys.kernels import grouped_gemm_triton as gg  # noqa: F401  (registers moesys::grouped_mm*)
from moesys.kernels import permute_triton as pt  # noqa: F401
from moesys.kernels import topk_softmax_triton as ts  # noqa: F401

ops = torch.ops.moesys


def _opcheck_cases():
    counts = torch.tensor([5, 0, 9, 4])
    x, w = torch.randn(18, 12), torch.randn(4, 12, 10)
    tok = torch.tensor([3, 0, 3, 1, 5, 2, 0, 4])
    return [
        ("grouped_mm", ops.grouped_mm, (x.requires_grad_(), w.requires_grad_(), counts)),
        ("grouped_mm_dw", ops.grouped_mm_dw, (torch.randn(18, 12), torch.randn(18, 10), counts)),
        ("permute", ops.permute, (torch.randn(6, 8, requires_grad=True), tok)),
        ("unpermute", ops.unpermute, (torch.randn(8, 8, requires_grad=True), tok, torch.rand(8, requires_grad=True), 6)),
        ("unpermute_unweighted", ops.unpermute, (torch.randn(8, 8, requires_grad=True), tok, None, 6)),
        ("unpermute_backward", ops.unpermute_backward, (torch.randn(6, 8), torch.randn(8, 8), tok, torch.rand(8))),
        ("topk_softmax", ops.topk_softmax, (torch.randn(9, 6, requires_grad=True), 2, True)),
    ]


@pytest.mark.parametrize("name,op,args", _opcheck_cases(), ids=[c[0] for c in _opcheck_cases()])
def test_opcheck(name, op, args):
    torch.library.opcheck(op, args)


def _tiny_moe(x_TD, wr_DE, w1_EDF, w2_EFD, backend):
    """Router -> permute -> grouped GEMMs -> unpermute, the path the MoE layer takes."""
    T, E, k = x_TD.shape[0], wr_DE.shape[1], 2
    _, weights_TK, idx_TK = topk_softmax(x_TD @ wr_DE, k, True, backend=backend)
    order_N = torch.argsort(idx_TK.reshape(-1), stable=True)
    tok_N = order_N // k
    counts_E = torch.zeros(E, dtype=torch.int64).scatter_add_(0, idx_TK.reshape(-1), torch.ones(T * k, dtype=torch.int64))
    h = grouped_gemm(permute(x_TD, tok_N, backend=backend), w1_EDF, counts_E, backend=backend)
    out = grouped_gemm(torch.relu(h), w2_EFD, counts_E, backend=backend)
    return unpermute(out, tok_N, weights_TK.reshape(-1)[order_N], T, backend=backend)


def test_torch_compile_over_custom_ops_matches_torch_path():
    T, D, F, E = 24, 16, 20, 4
    params = [torch.randn(T, D), torch.randn(D, E), torch.randn(E, D, F) / 4, torch.randn(E, F, D) / 4]
    # aot_eager: traces with the fakes and runs AOT autograd (the registered backward) without
    # needing a C++ compiler for inductor on CPU; the recorder lets us see the ops in the graphs
    recorder = AotEagerAndRecordGraphs()
    compiled = torch.compile(_tiny_moe, backend=recorder, fullgraph=False)
    got = [p.clone().requires_grad_() for p in params]
    want = [p.clone().requires_grad_() for p in params]
    y = compiled(*got, "triton")
    y_ref = _tiny_moe(*want, "torch")
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g)
    for name, a, b in zip(("x", "wr", "w1", "w2"), got, want):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-5, msg=lambda m: f"d{name}: {m}")
    # the custom ops were traced as single nodes (via their fakes), forward and backward
    fw = "\n".join(g.code for g in recorder.fw_graphs)
    bw = "\n".join(g.code for g in recorder.bw_graphs)
    for op in ("topk_softmax", "permute", "grouped_mm", "unpermute"):
        assert f"moesys.{op}" in fw, f"moesys::{op} missing from the compiled forward graphs"
    for op in ("grouped_mm_dw", "grouped_mm", "unpermute_backward", "unpermute"):
        assert f"moesys.{op}" in bw, f"moesys::{op} missing from the compiled backward graphs"
