"""Backend resolution: which path a kernel call takes, and the torch._grouped_mm probe."""
from __future__ import annotations

import pytest
import torch

from moesys.kernels import backend, grouped_gemm, grouped_gemm_reference


def test_probe_accepts_a_working_grouped_mm_and_rejects_a_wrong_or_missing_one(monkeypatch):
    cpu = torch.device("cpu")
    assert backend._probe_grouped_mm(cpu, torch.float32)
    assert backend._probe_grouped_mm(cpu, torch.bfloat16)
    # a build whose kernel gives wrong numbers, or raises, must not be used
    real = torch._grouped_mm
    monkeypatch.setattr(torch, "_grouped_mm", lambda a, b, offs: real(a, b, offs=offs) * 1.01)
    assert not backend._probe_grouped_mm(cpu, torch.float32)

    def broken(a, b, offs):
        raise RuntimeError("grouped gemm is only supported on SM90")
    monkeypatch.setattr(torch, "_grouped_mm", broken)
    assert not backend._probe_grouped_mm(cpu, torch.float32)


def test_supported_on_cpu_by_dtype_and_never_off_cpu_cuda():
    cpu = torch.device("cpu")
    assert backend.grouped_mm_supported(cpu, torch.float32)
    assert backend.grouped_mm_supported(cpu, torch.bfloat16)
    assert not backend.grouped_mm_supported(cpu, torch.float16)
    assert not backend.grouped_mm_supported(torch.device("meta"), torch.bfloat16)


def test_triton_itself_was_imported_under_the_interpreter():
    # tests/conftest.py sets TRITON_INTERPRET before any import of triton: Triton's own helpers
    # (tl.zeros) decorated without it fail inside every interpreted kernel that calls them, so the
    # kernel tests would pass or fail by which test file happened to import moesys first
    pytest.importorskip("triton")
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction

    assert isinstance(tl.zeros, InterpretedFunction)


def test_resolve_rules(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert backend.resolve("auto", cpu, torch.float32) == "torch"
    assert backend.resolve("torch", cuda, torch.float32) == "torch"
    with pytest.raises(ValueError, match="'cuda_fast' is not one of"):
        backend.resolve("cuda_fast", cpu)
    # CUDA, decided without a GPU: the probe's answer is what the resolver reads
    monkeypatch.setattr(backend, "_TRITON_AVAILABLE", True)
    monkeypatch.setitem(backend._GROUPED_MM_OK, ("cuda", 0, torch.bfloat16), True)
    monkeypatch.setitem(backend._GROUPED_MM_OK, ("cuda", 0, torch.float32), False)
    assert backend.resolve("auto", cuda, torch.bfloat16) == "torch"  # torch._grouped_mm
    assert backend.resolve("auto", cuda, torch.float32) == "triton"  # no grouped_mm for fp32 there
    assert backend.resolve("auto", cuda) == "triton"  # permute / top-k: no dtype given
    assert backend.resolve("triton", cuda, torch.bfloat16) == "triton"  # forcing still wins


def test_grouped_mm_path_zeroes_an_empty_expert_and_matches_the_reference(monkeypatch):
    # the cache and the MKL batch off, so the CPU torch path runs torch._grouped_mm itself
    # (forward, dX and dW), as it does for bf16 or without MKL
    from moesys.kernels import cpu_blas, workspace

    monkeypatch.setattr(workspace, "_enabled", False)  # restored after the test
    monkeypatch.setattr(cpu_blas, "_enabled", False)
    counts = torch.tensor([100, 0, 150, 51, 120, 80, 100])
    x = torch.randn(601, 48, requires_grad=True)
    w = (torch.randn(7, 48, 64) / 7).requires_grad_()
    calls = []
    real = torch._grouped_mm

    def spy(a, b, offs):
        calls.append(a.dim() + b.dim())
        return real(a, b, offs=offs)
    monkeypatch.setattr(torch, "_grouped_mm", spy)
    y = grouped_gemm(x, w, counts, backend="torch")
    dy = torch.randn_like(y)
    y.backward(dy)
    assert sorted(calls) == [4, 5, 5], calls  # dW (2-D x 2-D), y and dX (2-D x 3-D)
    xr, wr = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    grouped_gemm_reference(xr, wr, counts).backward(dy)
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(w.grad, wr.grad, rtol=1e-5, atol=1e-4)
    assert torch.count_nonzero(w.grad[1]) == 0
