"""The batched CPU GEMM path (MKL cblas_sgemm_batch) against per-expert torch.mm."""
from __future__ import annotations

import pytest
import torch

from moesys.kernels import cpu_blas

pytestmark = pytest.mark.skipif(not cpu_blas.available(), reason="torch built without MKL's batch GEMM")

COUNTS = [100, 0, 150, 51, 120, 80, 100]  # 601 rows, 7 experts, one with none


def _starts(counts):
    out, s = [], 0
    for n in counts:
        out.append(s)
        s += n
    return out


@pytest.mark.parametrize("w_transposed", [False, True])
def test_mm_rows_matches_per_expert_mm(w_transposed):
    x = torch.randn(601, 48)
    w = torch.randn(7, 48, 40) if not w_transposed else torch.randn(7, 40, 48).transpose(1, 2)  # strided view
    out = torch.full((601, 40), float("nan"))
    assert cpu_blas.mm_rows(x, w, COUNTS, out)
    for e, (s, n) in enumerate(zip(_starts(COUNTS), COUNTS)):
        torch.testing.assert_close(out[s : s + n], x[s : s + n] @ w[e], rtol=1e-5, atol=1e-5)
    assert not torch.isnan(out).any()


def test_mm_rows_into_a_strided_output_and_from_a_row_slice():
    base = torch.randn(700, 64)
    x = base[50:651, 8:56]  # rows of stride 64, a storage offset
    w = torch.randn(7, 48, 40)
    big = torch.zeros(601, 100)
    out = big[:, 30:70]  # leading dimension 100
    assert cpu_blas.mm_rows(x, w, COUNTS, out)
    for e, (s, n) in enumerate(zip(_starts(COUNTS), COUNTS)):
        torch.testing.assert_close(out[s : s + n], x[s : s + n] @ w[e], rtol=1e-5, atol=1e-5)
    assert big[:, :30].abs().sum() == 0 and big[:, 70:].abs().sum() == 0  # nothing written outside


def test_mm_weight_matches_per_expert_mm_and_zeroes_empty_experts():
    x, dy = torch.randn(601, 48), torch.randn(601, 40)
    out = torch.full((7, 48, 40), float("nan"))
    assert cpu_blas.mm_weight(x, dy, COUNTS, out)
    for e, (s, n) in enumerate(zip(_starts(COUNTS), COUNTS)):
        torch.testing.assert_close(out[e], x[s : s + n].t() @ dy[s : s + n], rtol=1e-5, atol=1e-4)
    assert torch.count_nonzero(out[1]) == 0


def test_declines_what_it_cannot_do_without_writing():
    x, w = torch.randn(601, 48), torch.randn(7, 48, 40)
    out = torch.zeros(601, 40)
    assert not cpu_blas.mm_rows(x.bfloat16(), w.bfloat16(), COUNTS, out.bfloat16())  # fp32 only
    assert not cpu_blas.mm_rows(x, w, COUNTS, torch.zeros(40, 601).t())  # a column-major output
    assert not cpu_blas.mm_rows(torch.randn(601, 96)[:, ::2], w, COUNTS, out)  # no unit stride
    assert out.abs().sum() == 0
    cpu_blas.set_enabled(False)
    try:
        assert not cpu_blas.available() and not cpu_blas.mm_rows(x, w, COUNTS, out)
    finally:
        cpu_blas.set_enabled(True)


def test_all_experts_empty_is_a_no_op():
    x, w = torch.randn(0, 48), torch.randn(3, 48, 40)
    assert cpu_blas.mm_rows(x, w, [0, 0, 0], torch.empty(0, 40))
    out = torch.ones(3, 48, 40)
    assert cpu_blas.mm_weight(x, torch.randn(0, 40), [0, 0, 0], out)
    assert out.abs().sum() == 0


def test_large_gemms_are_left_to_the_loop():
    big = cpu_blas.MAX_MEAN_ROWS + 1
    x, w = torch.randn(2 * big, 16), torch.randn(2, 16, 8)
    out = torch.zeros(2 * big, 8)
    assert not cpu_blas.mm_rows(x, w, [big, big], out)
    assert not cpu_blas.mm_weight(x, torch.randn(2 * big, 8), [big, big], torch.zeros(2, 16, 8))
    assert out.abs().sum() == 0
    w3 = torch.randn(3, 16, 8)
    assert cpu_blas.mm_rows(x, w3, [2 * big - 20, 10, 10], out)  # the mean is what counts
    torch.testing.assert_close(out[: 2 * big - 20], x[: 2 * big - 20] @ w3[0])


@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_layer_with_the_batch_matches_the_loop(activation, monkeypatch):
    from moesys import MoEConfig, MoELayer

    torch.manual_seed(0)
    layer = MoELayer(MoEConfig(hidden_size=40, ffn_hidden_size=72, num_experts=7, top_k=2, activation=activation))
    x = torch.randn(601, 40)
    results = []
    for on in (True, False):
        monkeypatch.setattr(cpu_blas, "_enabled", on)
        layer.zero_grad(set_to_none=True)
        xi = x.clone().requires_grad_()
        y, aux = layer(xi)
        ((y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum() + aux.loss).backward()
        results.append([y.detach(), xi.grad] + [p.grad for p in layer.parameters()])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_a_batched_gemm_that_answers_wrong_is_never_used(monkeypatch):
    assert cpu_blas._self_check()
    # e.g. an MKL that reads another integer width gets the sizes wrong; here it writes nothing
    monkeypatch.setattr(cpu_blas, "_call", lambda *a: None)
    monkeypatch.setattr(cpu_blas, "_checked", None)
    assert not cpu_blas.available()
    assert not cpu_blas.mm_rows(torch.randn(601, 48), torch.randn(7, 48, 40), COUNTS, torch.zeros(601, 40))


def test_the_first_use_may_come_under_bf16_autocast(monkeypatch):
    # moesys-train trainer.precision=bf16 first reaches the check inside autocast: its fp32 reference must not
    # turn bf16 (that raised "Float did not match BFloat16")
    monkeypatch.setattr(cpu_blas, "_checked", None)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        assert cpu_blas.available()
