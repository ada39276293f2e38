"""Grouped GEMM: the torch path and the Triton kernels (forward, dX, dW) against the loop reference."""
from __future__ import annotations

import pytest
import torch

from moesys.kernels import grouped_gemm, grouped_gemm_reference
from moesys.kernels.grouped_gemm_triton import launch_grouped_mm, launch_grouped_mm_dw


def _run(fn, x_ND, w_EDF, counts_E, dy_NF):
    x = x_ND.detach().clone().requires_grad_()
    w = w_EDF.detach().clone().requires_grad_()
    y = fn(x, w, counts_E)
    y.backward(dy_NF)
    return y, x.grad, w.grad


def _reference_fp32(x_ND, w_EDF, counts_E, dy_NF):
    return _run(grouped_gemm_reference, x_ND.float(), w_EDF.float(), counts_E, dy_NF.float())


def _assert_all_close(got, want, dtype):
    for name, g, r in zip(("y", "dx", "dw"), got, want):
        if dtype == torch.float32:
            torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-4, msg=lambda m: f"{name}: {m}")
        else:
            # one 16-bit rounding of an fp32-accumulated result: relative to the output scale
            scale = r.abs().max().item()
            torch.testing.assert_close(g.float(), r, rtol=2e-2, atol=1e-2 * scale, msg=lambda m: f"{name}: {m}")


def _data(counts, D, F, dtype):
    E, N = len(counts), int(sum(counts))
    x = torch.randn(N, D, dtype=dtype)
    w = (torch.randn(E, D, F) / D**0.5).to(dtype)
    dy = torch.randn(N, F, dtype=dtype)
    return x, w, torch.tensor(counts), dy


# (48, 64): strides 16-byte aligned -> torch._grouped_mm; (13, 7): the per-expert loop fallback
@pytest.mark.parametrize("D,F", [(48, 64), (13, 7)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_torch_path_matches_reference(D, F, dtype, counts_601):
    x, w, counts, dy = _data(counts_601.tolist(), D, F, dtype)
    got = _run(lambda a, b, c: grouped_gemm(a, b, c, backend="torch"), x, w, counts, dy)
    _assert_all_close(got, _reference_fp32(x, w, counts, dy), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, pytest.param(torch.bfloat16, marks=pytest.mark.slow),
                                   pytest.param(torch.float16, marks=pytest.mark.slow)])  # the fast set: fp32
def test_triton_matches_reference_601_rows(dtype, counts_601):
    # D=45, F=70: neither a multiple of the 32-wide interpreter blocks
    x, w, counts, dy = _data(counts_601.tolist(), 45, 70, dtype)
    got = _run(lambda a, b, c: grouped_gemm(a, b, c, backend="triton"), x, w, counts, dy)
    assert got[0].dtype == dtype and got[1].dtype == dtype and got[2].dtype == dtype
    _assert_all_close(got, _reference_fp32(x, w, counts, dy), dtype)


@pytest.mark.parametrize("counts", [
    [0, 37, 0, 0, 5, 0, 0],   # leading, trailing and consecutive empty experts
    [70, 0, 0, 0, 0, 0, 0],   # every row on one expert
    [1, 2, 3, 4, 5, 6, 33],   # many partial tiles
])
def test_triton_edge_loads(counts):
    x, w, counts_E, dy = _data(counts, 19, 33, torch.float32)
    got = _run(lambda a, b, c: grouped_gemm(a, b, c, backend="triton"), x, w, counts_E, dy)
    _assert_all_close(got, _reference_fp32(x, w, counts_E, dy), torch.float32)
    for e, n in enumerate(counts):
        if n == 0:
            assert torch.count_nonzero(got[2][e]) == 0, f"dW of empty expert {e} must be 0"


def test_triton_int32_counts_and_strided_inputs(counts_601):
    # a transposed w view and a column-sliced x run without copies (the kernels take strides)
    x_big = torch.randn(601, 60)
    x = x_big[:, 5:50]
    w = torch.randn(7, 70, 45).transpose(1, 2)
    counts = counts_601.to(torch.int32)
    y = grouped_gemm(x, w, counts, backend="triton")
    torch.testing.assert_close(y, grouped_gemm_reference(x, w, counts), rtol=1e-5, atol=1e-4)


def test_triton_zero_rows():
    x = torch.randn(0, 8)
    w = torch.randn(3, 8, 16, requires_grad=True)
    y = grouped_gemm(x, w, torch.zeros(3, dtype=torch.int64), backend="triton")
    assert y.shape == (0, 16)
    y.sum().backward()
    assert torch.count_nonzero(w.grad) == 0


def test_bad_calls_raise_clear_errors(counts_601):
    x, w = torch.randn(601, 16), torch.randn(7, 16, 8)
    with pytest.raises(ValueError, match=r"counts sum to 600 but x has N=601"):
        grouped_gemm(x, w, counts_601 - torch.tensor([1, 0, 0, 0, 0, 0, 0]), backend="triton")
    with pytest.raises(ValueError, match=r"counts must be >= 0"):
        grouped_gemm(x, w, torch.tensor([-1, 1, 150, 51, 120, 80, 200]), backend="triton")
    with pytest.raises(TypeError, match=r"x dtype torch.float32 != w dtype torch.bfloat16"):
        grouped_gemm(x, w.bfloat16(), counts_601, backend="triton")
    with pytest.raises(TypeError, match=r"counts must be an integer tensor"):
        grouped_gemm(x, w, counts_601.float(), backend="triton")
    with pytest.raises(ValueError, match=r"w must be 3-D \[E, D, F\], got shape \(16, 8\)"):
        grouped_gemm(x, w[0], counts_601, backend="triton")
    with pytest.raises(ValueError, match=r"x has width D=16 but w expects D=15"):
        grouped_gemm(x, w[:, :15], counts_601, backend="triton")
    # the launchers check what the public function does not (they are called directly by the ops)
    with pytest.raises(ValueError, match=r"grouped_mm: counts must be contiguous"):
        launch_grouped_mm(x, w, torch.stack([counts_601, counts_601], 1)[:, 0])
    with pytest.raises(TypeError, match=r"grouped_mm: x has dtype torch.float64"):
        launch_grouped_mm(x.double(), w.double(), counts_601)
    with pytest.raises(ValueError, match=r"grouped_mm_dw: x has N=601 rows but dy has 600"):
        launch_grouped_mm_dw(x, torch.randn(600, 8), counts_601)
