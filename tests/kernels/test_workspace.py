"""The CPU buffer cache: correct results through reuse, and no reuse anyone can observe.

The cache serves only blocks of at least `workspace.MIN_BYTES`; the `forced` fixture (conftest's
`ws_forced`) lowers that to 0 so these small shapes go through it.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from moesys import MoEConfig, MoELayer
from moesys.kernels import grouped_gemm, grouped_gemm_reference, workspace
from moesys.kernels.permute import inverse_routes, permute, permute_fixed_k, unpermute, unpermute_fixed_k


@pytest.fixture
def forced(ws_forced):
    """The cache serves every size (conftest's ws_forced), under a short name for these tests."""


def _grads(fn, x, w, counts, dy):
    x = x.detach().clone().requires_grad_()
    w = w.detach().clone().requires_grad_()
    y = fn(x, w, counts)
    y.backward(dy)
    return y.detach(), x.grad, w.grad


def test_grouped_gemm_through_reused_blocks_matches_reference(forced):
    # three steps with different counts over the same 7 experts: blocks written in one step are
    # reused by the next, so an expert that is empty now must not keep the last step's gradient
    D, F = 13, 9
    w = torch.randn(7, D, F)
    for counts in ([100, 0, 150, 51, 120, 80, 100], [90, 60, 0, 51, 0, 200, 200], [0, 0, 0, 601, 0, 0, 0]):
        counts = torch.tensor(counts)
        x, dy = torch.randn(601, D), torch.randn(601, F)
        got = _grads(lambda a, b, c: grouped_gemm(a, b, c, backend="torch"), x, w, counts, dy)
        want = _grads(grouped_gemm_reference, x, w, counts, dy)
        for g, r in zip(got, want):
            torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-5)
        assert torch.equal(got[2][counts == 0], torch.zeros_like(got[2][counts == 0]))
    assert workspace.stats()["hits"] > 0


def test_a_gradient_someone_holds_is_never_reused(forced):
    torch.manual_seed(0)
    w = torch.randn(5, 8, 6, requires_grad=True)
    counts = torch.tensor([3, 0, 4, 2, 1])

    def step():
        grouped_gemm(torch.randn(10, 8), w, counts, backend="torch").square().sum().backward()

    step()
    held, snapshot = w.grad, w.grad.clone()
    w.grad = None  # what zero_grad(set_to_none=True) does, while the user keeps a reference
    step()
    assert torch.equal(held, snapshot)
    assert w.grad.data_ptr() != held.data_ptr()
    ptr = held.data_ptr()
    del held
    w.grad = None
    step()  # the block nobody references any more is the one used again
    assert w.grad.data_ptr() == ptr


def test_gradient_accumulation_without_zeroing(forced):
    w = torch.randn(4, 6, 5, requires_grad=True)
    counts = torch.tensor([2, 3, 0, 4])
    xs = [torch.randn(9, 6) for _ in range(3)]
    for x in xs:  # grads accumulate into w.grad while fresh ones come from the cache
        grouped_gemm(x, w, counts, backend="torch").sum().backward()
    w_ref = w.detach().clone().requires_grad_()
    for x in xs:
        grouped_gemm_reference(x, w_ref, counts).sum().backward()
    torch.testing.assert_close(w.grad, w_ref.grad)


@pytest.mark.parametrize("drop", [False, True])
def test_fixed_k_permute_and_combine_through_reused_blocks(forced, drop):
    T, K, D = 37, 3, 11
    for _ in range(2):
        x = torch.randn(T, D, requires_grad=True)
        wt = torch.rand(T, K, requires_grad=True)
        route = torch.randperm(T * K)
        if drop:
            route = route[: T * K - 10]
        inv = inverse_routes(route, T * K)
        y = torch.tanh(permute_fixed_k(x, route, inv, K))
        out = unpermute_fixed_k(y, wt, route, inv)
        g = torch.randn_like(out)
        gx, gw = torch.autograd.grad(out, (x, wt), g)

        x2, wt2 = x.detach().clone().requires_grad_(), wt.detach().clone().requires_grad_()
        tok = torch.div(route, K, rounding_mode="floor")
        y2 = torch.tanh(permute(x2, tok, backend="torch"))
        out2 = unpermute(y2, tok, wt2.reshape(-1)[route], T, backend="torch")
        gx2, gw2 = torch.autograd.grad(out2, (x2, wt2), g)
        torch.testing.assert_close(out, out2)
        torch.testing.assert_close(gx, gx2)
        torch.testing.assert_close(gw, gw2)


@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_layer_with_cache_equals_layer_without(monkeypatch, activation):
    cfg = MoEConfig(hidden_size=24, ffn_hidden_size=20, num_experts=7, top_k=2, activation=activation)
    torch.manual_seed(0)
    layer = MoELayer(cfg)
    xs = [torch.randn(601, 24) for _ in range(3)]

    def run():
        outs = []
        for x in xs:
            layer.zero_grad(set_to_none=True)
            x = x.clone().requires_grad_()
            y, aux = layer(x)
            (y.square().sum() + aux.loss).backward()
            outs.append([y.detach(), x.grad] + [p.grad.clone() for p in layer.parameters() if p.grad is not None])
        return outs

    workspace.set_enabled(False)
    want = run()
    workspace.set_enabled(True)
    monkeypatch.setattr(workspace, "MIN_BYTES", 0)
    got = run()
    assert workspace.stats()["hits"] > 0
    for g_step, w_step in zip(got, want):
        assert len(g_step) == len(w_step)
        for g, w in zip(g_step, w_step):
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)
    workspace.release()


def test_size_classes_reuse_across_row_counts(forced):
    a = workspace.empty((1000, 64), dtype=torch.float32, device="cpu")
    ptr = a.data_ptr()
    del a
    b = workspace.empty((990, 64), dtype=torch.float32, device="cpu")  # same size class
    assert b.data_ptr() == ptr and b.shape == (990, 64) and b.is_contiguous()
    c = workspace.empty((990, 64), dtype=torch.float32, device="cpu")  # b is in use: a new block
    assert c.data_ptr() != ptr


def test_limit_and_release(forced):
    base = workspace.stats()["held_bytes"]  # blocks some other test still references, if any
    blocks = [workspace.empty((256, 256), dtype=torch.float32, device="cpu") for _ in range(3)]
    assert workspace.stats()["held_bytes"] - base >= 3 * 256 * 256 * 4
    view = blocks[0][:5]  # a view keeps its block in use
    del blocks
    workspace.release()
    held = workspace.stats()["held_bytes"] - base
    assert 256 * 256 * 4 <= held < 2 * 256 * 256 * 4
    del view
    workspace.release()
    assert workspace.stats()["held_bytes"] == base
    # limit 0: unused blocks are dropped whenever the cache allocates
    workspace.set_limit(0)
    try:
        x = workspace.empty((64, 64), dtype=torch.float32, device="cpu")
        del x
        y = workspace.empty((300, 300), dtype=torch.float32, device="cpu")  # a miss: trims the free one
        assert workspace.stats()["unused_bytes"] == 0
        del y
    finally:
        workspace.set_limit(None)
    with pytest.raises(ValueError, match="nbytes must be >= 0"):
        workspace.set_limit(-1)


def test_small_or_disabled_requests_bypass_the_cache(monkeypatch):
    base = workspace.stats()
    kept = workspace.empty((8, 8), dtype=torch.float32, device="cpu")  # under MIN_BYTES
    assert workspace.stats()["misses"] == base["misses"] and workspace.stats()["hits"] == base["hits"]
    monkeypatch.setattr(workspace, "MIN_BYTES", 0)
    workspace.set_enabled(False)
    try:
        kept2 = workspace.empty((8, 8), dtype=torch.float32, device="cpu")
        assert workspace.stats()["misses"] == base["misses"] and workspace.stats()["hits"] == base["hits"]
    finally:
        workspace.set_enabled(True)
    assert kept.shape == kept2.shape == (8, 8)


def test_the_switches_are_arguments_not_environment_variables():
    """The cache and the batched GEMM are switched by set_enabled / set_keep_scratch (the trainer's
    config fields), never by the environment: the old variables change nothing."""
    code = ("from moesys.kernels import cpu_blas, workspace\n"
            "print(workspace.enabled(), workspace.keep_scratch(), cpu_blas.enabled())\n"
            "workspace.set_enabled(False); workspace.set_keep_scratch(True); cpu_blas.set_enabled(False)\n"
            "print(workspace.enabled(), workspace.keep_scratch(), cpu_blas.enabled(), cpu_blas.available())\n")
    env = dict(os.environ, MOESYS_CPU_BUFFER_CACHE="0", MOESYS_CPU_BUFFER_CACHE_KEEP_SCRATCH="1",
               MOESYS_CPU_GEMM_BATCH="0")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split("\n")[:2] == ["True False True", "False True False False"]


def test_taking_a_grad_block_frees_unused_scratch(forced):
    base = workspace.stats()["held_bytes"]
    live = workspace.empty((100, 100), dtype=torch.float32, device="cpu")
    idle = workspace.empty((200, 100), dtype=torch.float32, device="cpu")
    del idle
    assert workspace.stats()["unused_bytes"] >= 200 * 100 * 4
    g = workspace.empty((3, 10, 10), dtype=torch.float32, device="cpu", kind="grad")
    held = workspace.stats()["held_bytes"] - base
    # the live scratch block and the grad block remain; the idle scratch block is gone
    assert held == workspace._size_class(100 * 100 * 4) + workspace._size_class(300 * 4)
    del g
    h = workspace.empty((3, 10, 10), dtype=torch.float32, device="cpu")  # scratch never takes a grad block
    assert workspace.stats()["held_bytes"] - base == held + workspace._size_class(300 * 4)
    del live, h
    with pytest.raises(ValueError, match="kind must be one of"):
        workspace.empty((2, 2), dtype=torch.float32, device="cpu", kind="weights")


def test_keep_scratch_leaves_idle_scratch_for_the_next_layer(forced, monkeypatch):
    monkeypatch.setattr(workspace, "_keep_scratch", False)
    workspace.set_keep_scratch(True)
    assert workspace.keep_scratch()
    base = workspace.stats()
    idle = workspace.empty((200, 100), dtype=torch.float32, device="cpu")
    ptr = idle.data_ptr()
    del idle
    g = workspace.empty((3, 10, 10), dtype=torch.float32, device="cpu", kind="grad")
    # the idle block survived the grad take: the next scratch request of its size reuses its pages
    again = workspace.empty((200, 100), dtype=torch.float32, device="cpu")
    assert again.data_ptr() == ptr
    assert workspace.stats()["hits"] == base["hits"] + 1
    del g, again


def test_the_switches_are_trainer_fields():
    from moesys.configs.schema import TrainerConfig

    t = TrainerConfig()
    assert t.cpu_buffer_cache is True and t.cpu_buffer_cache_keep_scratch is False and t.cpu_gemm_batch is True


def test_best_fit_serves_a_smaller_request_from_an_idle_larger_block(forced):
    cls = workspace._size_class
    big = workspace.empty((1000, 100), dtype=torch.float32, device="cpu")  # 400 kB class
    ptr, held = big.data_ptr(), workspace.stats()["held_bytes"]
    del big
    small = workspace.empty((300, 100), dtype=torch.float32, device="cpu")  # < 4x smaller: same block
    assert small.data_ptr() == ptr and workspace.stats()["held_bytes"] == held
    assert cls(300 * 100 * 4) < cls(1000 * 100 * 4)
    tiny = workspace.empty((50, 100), dtype=torch.float32, device="cpu")  # the big block is in use: new
    assert tiny.data_ptr() != ptr
    del small, tiny
    far = workspace.empty((100, 100), dtype=torch.float32, device="cpu")  # over 4x smaller: not that block
    assert far.data_ptr() != ptr
    g = workspace.empty((300, 100), dtype=torch.float32, device="cpu", kind="grad")  # kinds never mix
    assert g.data_ptr() != ptr
    small = workspace.empty((300, 100), dtype=torch.float32, device="cpu")
    small.fill_(1.0)
    torch.testing.assert_close(small.sum(), torch.tensor(30000.0))  # the view has its own shape
    del far, g, small
