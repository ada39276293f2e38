"""The persistent Triton grouped GEMM (forward, dX, dW; pointer and TMA loads) under the interpreter,
against a per-expert torch loop; its backend name; `auto`'s measured choice (gemm_select).

Odd shapes: 7 experts, one with 0 rows, widths not a multiple of the 32-wide interpreter tiles,
more tiles than the 3 interpreter programs (so every program loops).
"""
from __future__ import annotations

import pytest
import torch

from moesys import MoEConfig
from moesys.kernels import backend, gemm_select, grouped_gemm, grouped_gemm_reference
from moesys.kernels.grouped_gemm_persistent import (
    INTERPRETER_PROGRAMS, launch_persistent_mm, launch_persistent_mm_dw, rows_bucket,
)
from moesys.kernels.grouped_mm_ffn import expert_ffn_grouped_mm

COUNTS = [9, 0, 40, 3, 33, 1, 17]  # 103 rows, expert 1 empty, 40 rows = a full and a partial tile


def _data(counts, D, F, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    N = sum(counts)
    x = torch.randn(N, D, generator=g).to(dtype)
    w = (torch.randn(len(counts), D, F, generator=g) / D**0.5).to(dtype)
    dy = torch.randn(N, F, generator=g).to(dtype)
    return x, w, torch.tensor(counts), dy


def _loop(x, w, counts, dy):
    """Per-expert torch loop in fp32: y, dx, dw."""
    xr = x.detach().float().requires_grad_()
    wr = w.detach().float().requires_grad_()
    y = grouped_gemm_reference(xr, wr, counts)
    y.backward(dy.float())
    return y.detach(), xr.grad, wr.grad


def _close(got, want, dtype, what):
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4, msg=lambda m: f"{what}: {m}")
    else:  # one 16-bit rounding of an fp32-accumulated result
        scale = want.abs().max().item()
        torch.testing.assert_close(got.float(), want, rtol=2e-2, atol=1e-2 * scale, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_autograd_matches_per_expert_loop(dtype):
    # D=45, F=70: neither a multiple of 32; pointer loads (the interpreter's default)
    x, w, counts, dy = _data(COUNTS, 45, 70, dtype)
    xg, wg = x.clone().requires_grad_(), w.clone().requires_grad_()
    y = grouped_gemm(xg, wg, counts, backend="triton_persistent")
    y.backward(dy)
    assert y.dtype == xg.grad.dtype == wg.grad.dtype == dtype
    for name, got, want in zip(("y", "dx", "dw"), (y, xg.grad, wg.grad), _loop(x, w, counts, dy)):
        _close(got, want, dtype, name)
    assert torch.count_nonzero(wg.grad[1]) == 0  # the empty expert's gradient is exactly zero


@pytest.mark.parametrize("use_tma", [False, True])
@pytest.mark.parametrize("counts", [COUNTS, [0, 37, 0, 0, 5, 0, 0], [0, 0, 0, 0, 0, 0, 64]])
def test_offsets_with_nan_padding_pointer_and_tma(counts, use_tma):
    """Offsets (the sync-free layout): 6 padding rows past offs[-1] hold NaN and must never be read.
    D=48, F=72: 16-byte strides in fp32, so the TMA path runs (interpreted descriptors); F is not a
    multiple of the tile. dX goes through the [E, F, D] view of w (the transposed-load branch)."""
    x, w, counts_t, dy = _data(counts, 48, 72, torch.float32, seed=1)
    M = x.shape[0]
    nan_rows = lambda t: torch.cat([t, torch.full((6, t.shape[1]), float("nan"))])  # noqa: E731
    xp, dyp = nan_rows(x), nan_rows(dy)
    offs = torch.cumsum(counts_t, 0, dtype=torch.int32)
    y = launch_persistent_mm(xp, w, offs_E=offs, use_tma=use_tma)[:M]
    dx = launch_persistent_mm(dyp, w.transpose(1, 2), offs_E=offs, use_tma=use_tma)[:M]
    dw = launch_persistent_mm_dw(xp, dyp, offs_E=offs, use_tma=use_tma)
    want = _loop(x, w, counts_t, dy)
    for name, got, ref in zip(("y", "dx", "dw"), (y, dx, dw), want):
        _close(got, ref, torch.float32, name)
    # and the counts form of the same call
    _close(launch_persistent_mm(x, w, counts_t, use_tma=use_tma), want[0], torch.float32, "y (counts)")


def test_more_tiles_than_programs_and_zero_rows():
    assert INTERPRETER_PROGRAMS == 3
    x, w, counts, _ = _data(COUNTS, 45, 70, torch.float32)
    # 103 rows x 70 cols in 32x32 tiles: 7 row tiles (one per non-empty expert... and 40 rows -> 2) x 3
    assert launch_persistent_mm(x, w, counts).shape == (103, 70)
    empty = launch_persistent_mm(x[:0], w, torch.zeros(7, dtype=torch.int64))
    assert empty.shape == (0, 70)
    dw = launch_persistent_mm_dw(x[:0], torch.zeros(0, 70), torch.zeros(7, dtype=torch.int64))
    assert torch.count_nonzero(dw) == 0


def test_bad_calls_raise_clear_errors():
    x, w, counts, dy = _data(COUNTS, 45, 70, torch.float32)
    with pytest.raises(ValueError, match="exactly one of counts"):
        launch_persistent_mm(x, w)
    with pytest.raises(ValueError, match="one entry per expert \\(7\\)"):
        launch_persistent_mm(x, w, counts[:5])
    with pytest.raises(TypeError, match="counts has dtype torch.float32"):
        launch_persistent_mm(x, w, counts.float())
    with pytest.raises(ValueError, match="use_tma=True but TMA cannot run"):  # 45 fp32 = 180-byte rows
        launch_persistent_mm(x, w, counts, use_tma=True)
    with pytest.raises(ValueError, match="counts sum to 103 but x has N=102"):
        grouped_gemm(x[:102], w, counts, backend="triton_persistent")


def test_rows_bucket():
    assert [rows_bucket(M, 8) for M in (0, 8, 9, 800, 10**7)] == [1, 1, 2, 128, 4096]


def test_backend_name_is_validated_and_needs_triton(monkeypatch):
    cfg = MoEConfig(hidden_size=8, ffn_hidden_size=8, num_experts=2, top_k=1, kernel_backend="triton_persistent")
    assert cfg.kernel_backend == "triton_persistent"
    with pytest.raises(ValueError, match="kernel_backend='persistent' is not one of"):
        MoEConfig(hidden_size=8, ffn_hidden_size=8, num_experts=2, top_k=1, kernel_backend="persistent")
    cpu = torch.device("cpu")
    assert backend.resolve("triton_persistent", cpu) == "triton"  # permute / top-k: ordinary Triton
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="'triton_persistent' was forced but cannot run on device cpu"):
        backend.resolve("triton_persistent", cpu)


@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_expert_ffn_on_offsets_persistent_equals_grouped_mm(activation):
    """The sync-free FFN with gemm="triton_persistent" against gemm="grouped_mm" (torch._grouped_mm
    on CPU): output and every gradient, 3 padding rows."""
    torch.manual_seed(0)
    counts = torch.tensor(COUNTS)
    E, D, Fh, M = 7, 16, 40, sum(COUNTS) + 3
    offs = torch.cumsum(counts, 0, dtype=torch.int32)
    x = torch.randn(M, D)
    ws = [torch.randn(E, D, Fh) / 4, torch.randn(E, Fh, D) / 6, torch.randn(E, D, Fh) / 4 if activation == "swiglu" else None]
    dy = torch.randn(M, D)
    outs = []
    for gemm in ("grouped_mm", "triton_persistent"):
        xi = x.clone().requires_grad_()
        wi = [w.clone().requires_grad_() if w is not None else None for w in ws]
        y = expert_ffn_grouped_mm(xi, wi[0], wi[1], wi[2], offs, activation, gemm=gemm)
        n = int(offs[-1])
        (y[:n] * dy[:n]).sum().backward()
        outs.append([y[:n], xi.grad[:n]] + [w.grad for w in wi if w is not None])
    for got, want in zip(outs[1], outs[0]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)
    with pytest.raises(ValueError, match="gemm 'fast' is not one of"):
        expert_ffn_grouped_mm(x, *ws, offs, activation, gemm="fast")


# ---- auto: the measured choice ------------------------------------------------------------------
def test_choice_is_measured_once_per_bucket_and_picks_the_faster(monkeypatch):
    """The real candidates on CPU (torch._grouped_mm, the interpreted kernel) under a fake timer."""
    monkeypatch.setattr(gemm_select, "_CHOICE", {})
    fake = {"torch_path": 2.0, "persistent": 1.0}  # seconds by candidate
    calls = []

    def timer(fn):
        calls.append(fn.__name__)
        return fake[fn.__name__]

    x, w, counts, _ = _data([8, 0, 16, 8], 16, 32, torch.float32)
    offs = torch.cumsum(counts, 0, dtype=torch.int32)
    assert gemm_select.choose(x, w, offs, timer=timer) == gemm_select.PERSISTENT
    assert calls.count("persistent") == gemm_select.REPEATS and calls.count("torch_path") == gemm_select.REPEATS
    n = len(calls)
    # same bucket (rows per expert 8 -> bucket 8): cached, nothing timed
    assert gemm_select.choose(x[:30], w, torch.tensor([8, 0, 14, 8]).cumsum(0).int(), timer=timer) == "triton_persistent"
    assert len(calls) == n
    # another bucket (4x the rows): measured again; now torch._grouped_mm is faster
    fake.update(torch_path=0.5)
    x4 = x.repeat(4, 1)
    assert gemm_select.choose(x4, w, (offs * 4).int(), timer=timer) == gemm_select.GROUPED_MM
    assert len(calls) == 2 * n and len(gemm_select.choices()) == 2


def test_a_failing_candidate_loses():
    def bad():
        raise RuntimeError("no kernel image")

    assert gemm_select.measure({"a": bad, "b": lambda: None}, timer=lambda fn: 1.0) == "b"
    with pytest.raises(RuntimeError, match="every candidate failed"):
        gemm_select.measure({"a": bad}, timer=lambda fn: 1.0)


def test_auto_on_cpu_measures_nothing_and_stays_the_torch_path(monkeypatch):
    def fail(*a, **k):
        raise AssertionError("auto measured on CPU")

    monkeypatch.setattr(gemm_select, "measure", fail)
    import moesys.kernels.grouped_gemm_persistent as P

    monkeypatch.setattr(P, "persistent_mm", fail)
    x, w, counts, _ = _data([8, 0, 16, 8], 16, 32, torch.float32)
    torch.testing.assert_close(grouped_gemm(x, w, counts, backend="auto"), grouped_gemm_reference(x, w, counts))
    offs = torch.cumsum(counts, 0, dtype=torch.int32)
    assert gemm_select.choose(x, w, offs) == gemm_select.GROUPED_MM
    expert_ffn_grouped_mm(x, w, w.transpose(1, 2).contiguous(), None, offs, "gelu", gemm="auto")


@pytest.mark.parametrize("offsets", [False, True])
def test_custom_ops_opcheck(offsets):
    """Schema, fake (torch.compile) and autograd registration of moesys::persistent_mm(_dw)."""
    counts = torch.tensor([5, 0, 9, 4])
    groups = torch.cumsum(counts, 0, dtype=torch.int32) if offsets else counts
    x, w = torch.randn(18, 12, requires_grad=True), torch.randn(4, 12, 10, requires_grad=True)
    torch.library.opcheck(torch.ops.moesys.persistent_mm, (x, w, groups, offsets))
    torch.library.opcheck(torch.ops.moesys.persistent_mm_dw, (torch.randn(18, 12), torch.randn(18, 10), groups, offsets))


def test_layer_on_triton_persistent_equals_torch(monkeypatch):
    """MoELayer(kernel_backend="triton_persistent") against the torch path, same weights: output,
    aux loss and every gradient; its expert GEMMs do go through the persistent kernel."""
    from moesys import MoELayer
    import moesys.kernels.grouped_gemm_persistent as P

    calls = []
    real = P.grouped_gemm_persistent
    monkeypatch.setattr(P, "grouped_gemm_persistent", lambda *a: calls.append(1) or real(*a))

    def build(backend):
        torch.manual_seed(1)
        return MoELayer(MoEConfig(hidden_size=24, ffn_hidden_size=40, num_experts=7, top_k=2, activation="swiglu",
                                  kernel_backend=backend))

    layer, ref = build("triton_persistent"), build("torch")
    layer.load_state_dict(ref.state_dict())
    x = torch.randn(45, 24)
    outs = []
    for m in (layer, ref):
        xb = x.clone().requires_grad_()
        y, aux = m(xb)
        (y.square().sum() + aux.loss).backward()
        outs.append((y, aux.loss, xb.grad, {n: p.grad for n, p in m.named_parameters()}))
    assert len(calls) == 3  # w1, w3, w2
    (y, loss, dx, g), (y_ref, loss_ref, dx_ref, g_ref) = outs
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss, loss_ref)
    torch.testing.assert_close(dx, dx_ref, rtol=1e-4, atol=1e-5)
    for name in g_ref:
        torch.testing.assert_close(g[name], g_ref[name], rtol=1e-4, atol=1e-5, msg=lambda m: f"d{name}: {m}")
