"""The compiled (not interpreted) Triton kernels on a CUDA device, against the torch references.

This folder's conftest sets TRITON_INTERPRET=1 for the CPU tests, and the variable is read when
the kernels are first imported, so the GPU check runs in a fresh interpreter without it.
Skipped without CUDA.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

SCRIPT = textwrap.dedent("""
    import torch
    from moesys.kernels import grouped_gemm, grouped_gemm_reference, permute, unpermute, topk_softmax
    torch.manual_seed(0)
    dev = "cuda"
    counts = torch.tensor([100, 0, 150, 51, 120, 80, 100], device=dev)
    for dtype, tol in ((torch.float32, 1e-4), (torch.bfloat16, 2e-2)):
        x = torch.randn(601, 300, device=dev, dtype=dtype, requires_grad=True)
        w = (torch.randn(7, 300, 200, device=dev) / 17).to(dtype).requires_grad_()
        dy = torch.randn(601, 200, device=dev, dtype=dtype)
        y = grouped_gemm(x, w, counts, backend="triton"); y.backward(dy)
        xr, wr = x.detach().float().requires_grad_(), w.detach().float().requires_grad_()
        yr = grouped_gemm_reference(xr, wr, counts); yr.backward(dy.float())
        for name, a, b in (("y", y, yr), ("dx", x.grad, xr.grad), ("dw", w.grad, wr.grad)):
            err = ((a.float() - b).abs().max() / b.abs().max()).item()
            assert err < tol, f"grouped_gemm {dtype} {name}: relative error {err}"
    tok = torch.randint(0, 250, (601,), device=dev)
    x = torch.randn(250, 300, device=dev, requires_grad=True)
    assert torch.equal(permute(x, tok, backend="triton"), permute(x, tok, backend="torch"))
    y = torch.randn(601, 300, device=dev); wt = torch.rand(601, device=dev)
    torch.testing.assert_close(unpermute(y, tok, wt, 250, backend="triton"), unpermute(y, tok, wt, 250, backend="torch"))
    z = torch.randn(601, 64, device=dev)
    got, want = topk_softmax(z, 8, True, backend="triton"), topk_softmax(z, 8, True, backend="torch")
    assert torch.equal(got[2], want[2])
    torch.testing.assert_close(got[1], want[1])
""")


def test_compiled_kernels_on_cuda():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
