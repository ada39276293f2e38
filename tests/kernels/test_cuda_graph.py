"""CUDA graphs: the single-device dropless MoELayer (kernel_backend="grouped_mm") captured fwd+bwd
in `torch.cuda.graph` replays equal to eager (GPU, skipped without CUDA); the persistent grouped
GEMM captured likewise; and, on CPU, the property a graph relies on: the sync-free path issues the
same ops with the same shapes whatever the routing.

The GPU checks run in a fresh interpreter without TRITON_INTERPRET (tests/conftest.py sets it for
the collection, and Triton reads it when kernels are decorated).
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from moesys import MoEConfig, MoELayer

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

LAYER_GRAPH_SCRIPT = textwrap.dedent("""
    import copy, torch
    from moesys import MoEConfig, MoELayer
    torch.manual_seed(0)
    dev, dt = "cuda", torch.bfloat16
    T, D, Fh, E = 256, 64, 128, 7
    for cf, act in ((None, "swiglu"), (None, "gelu"), (1.0, "gelu")):
        cfg = MoEConfig(hidden_size=D, ffn_hidden_size=Fh, num_experts=E, top_k=2, activation=act,
                        capacity_factor=cf, kernel_backend="grouped_mm", z_loss_coef=1e-3)
        layer = MoELayer(cfg).to(dev, dt)
        eager = copy.deepcopy(layer)
        static_x = torch.randn(T, D, device=dev, dtype=dt, requires_grad=True)
        static_dy = torch.randn(T, D, device=dev, dtype=torch.float32)

        def step(m, x, dy):
            y, aux = m(x)
            ((y.float() * dy).sum() + aux.loss).backward()
            return y, aux

        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up off the capture stream (allocator, cuBLAS workspaces)
            for _ in range(3):
                layer.zero_grad(set_to_none=True); static_x.grad = None
                step(layer, static_x, static_dy)
        torch.cuda.current_stream().wait_stream(side)
        layer.zero_grad(set_to_none=True); static_x.grad = None  # grads allocated inside the graph's pool
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_y, static_aux = step(layer, static_x, static_dy)
        seen = set()
        for i in range(3):  # new inputs, new routing each time; the last starves expert 3
            x = torch.randn(T, D, device=dev, dtype=dt)
            if i == 2:
                with torch.no_grad():
                    x[:, 0] = x[:, 0].abs() + 2
                    for m in (layer, eager):
                        m.router.weight[3].zero_(); m.router.weight[3, 0] = -50.0
            dy = torch.randn(T, D, device=dev)
            with torch.no_grad():
                static_x.copy_(x); static_dy.copy_(dy)
            graph.replay()
            xe = x.clone().requires_grad_()
            eager.zero_grad(set_to_none=True)
            y, aux = step(eager, xe, dy)
            torch.cuda.synchronize()
            tag = f"cf={cf} {act} replay {i}"
            counts = static_aux.tokens_per_expert.cpu()
            assert torch.equal(counts, aux.tokens_per_expert.cpu()), tag
            seen.add(tuple(counts.tolist()))
            if i == 2:
                assert counts[3] == 0, tag
            def close(got, want, what):
                err = ((got.float() - want.float()).abs().max() / want.float().abs().max().clamp_min(1e-12)).item()
                assert err < 2e-2, f"{tag} {what}: relative error {err:.3g}"
            close(static_y, y, "y"); close(static_aux.loss, aux.loss, "aux loss"); close(static_x.grad, xe.grad, "dx")
            for (n, p), q in zip(layer.named_parameters(), eager.parameters()):
                close(p.grad, q.grad, "d" + n)
        assert len(seen) == 3, seen  # the routing did change between replays
        print(f"ok layer graph cf={cf} {act}", flush=True)

    # the fixed overhead the graph removes: eager vs replay of one T=256 fwd+bwd
    def ms(fn, n=20):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        fn(); s.record()
        for _ in range(n): fn()
        e.record(); torch.cuda.synchronize()
        return s.elapsed_time(e) / n
    print(f"T=256 fwd+bwd: eager {ms(lambda: step(eager, static_x.detach().clone().requires_grad_(), static_dy)):.3f} ms, "
          f"graph replay {ms(graph.replay):.3f} ms")
""")

PERSISTENT_GRAPH_SCRIPT = textwrap.dedent("""
    import torch
    from moesys.kernels import grouped_gemm_reference
    from moesys.kernels.grouped_gemm_persistent import grouped_gemm_offsets_persistent, launch_persistent_mm, tma_supported
    dev = torch.device("cuda")
    print("TMA:", tma_supported(dev))
    torch.manual_seed(0)
    for dtype, tol in ((torch.bfloat16, 2e-2), (torch.float32, 1e-4)):
        for use_tma in ((None, False) if tma_supported(dev) else (False,)):
            counts = torch.tensor([100, 0, 150, 51, 120, 80, 100], device=dev)
            x = torch.randn(601, 304, device=dev, dtype=dtype, requires_grad=True)
            w = (torch.randn(7, 304, 200, device=dev) / 17).to(dtype).requires_grad_()
            dy = torch.randn(601, 200, device=dev, dtype=dtype)
            y = launch_persistent_mm(x.detach(), w.detach(), counts, use_tma=use_tma)
            err = ((y.float() - grouped_gemm_reference(x.detach().float(), w.detach().float(), counts)).abs().max()).item()
            assert err < tol * 40, f"{dtype} use_tma={use_tma}: forward error {err}"
    # captured in a CUDA graph, fwd+bwd, against eager
    x = torch.randn(601, 304, device=dev, dtype=torch.bfloat16, requires_grad=True)
    w = (torch.randn(7, 304, 200, device=dev) / 17).to(torch.bfloat16).requires_grad_()
    offs = torch.tensor([100, 100, 250, 301, 421, 501, 601], device=dev, dtype=torch.int32)
    dy = torch.randn(601, 200, device=dev, dtype=torch.bfloat16)
    s = torch.cuda.Stream(); s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            grouped_gemm_offsets_persistent(x, w, offs).backward(dy)
    torch.cuda.current_stream().wait_stream(s)
    x.grad = w.grad = None
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        y = grouped_gemm_offsets_persistent(x, w, offs); y.backward(dy)
    with torch.no_grad():
        offs.copy_(torch.tensor([0, 300, 300, 301, 421, 590, 601], device=dev, dtype=torch.int32))  # new groups
    g.replay(); torch.cuda.synchronize()
    xr, wr = x.detach().float().requires_grad_(), w.detach().float().requires_grad_()
    counts = torch.diff(offs, prepend=offs.new_zeros(1)).long()
    yr = grouped_gemm_reference(xr, wr, counts); yr.backward(dy.float())
    for name, a, b in (("y", y, yr), ("dx", x.grad, xr.grad), ("dw", w.grad, wr.grad)):
        err = ((a.float() - b).abs().max() / b.abs().max()).item()
        assert err < 2e-2, f"persistent graph {name}: relative error {err}"
    print("ok persistent grouped GEMM: compiled, TMA and pointer loads, captured and replayed with new offsets")
""")


def _run(script: str) -> None:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    print(proc.stdout)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]


@pytest.mark.gpu
@needs_cuda
def test_layer_graph_replay_equals_eager():
    _run(LAYER_GRAPH_SCRIPT)


@pytest.mark.gpu
@needs_cuda
def test_persistent_grouped_gemm_compiled_and_graph_captured():
    _run(PERSISTENT_GRAPH_SCRIPT)


# ---- CPU: what a graph needs, checked without one -------------------------------------------------
class _Trace(TorchDispatchMode):
    """(op, output shapes and dtypes) of every ATen call, in order."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        flat = out if isinstance(out, (tuple, list)) else (out,)
        self.calls.append((str(func), tuple((tuple(o.shape), o.dtype) for o in flat if isinstance(o, torch.Tensor))))
        return out


@pytest.mark.parametrize("cf", [None, 1.0])
def test_sync_free_step_is_the_same_ops_and_shapes_whatever_the_routing(cf):
    """Two fwd+bwd steps of the grouped_mm layer whose routings differ (the second starves expert 3,
    and with capacity drops differ) issue the same ATen ops with the same output shapes: a graph
    captured on one replays correctly on the other. (Addresses are the graph pool's business.)"""
    torch.manual_seed(0)
    cfg = MoEConfig(hidden_size=16, ffn_hidden_size=24, num_experts=7, top_k=2, activation="swiglu",
                    capacity_factor=cf, kernel_backend="grouped_mm", z_loss_coef=1e-3)
    layer = MoELayer(cfg)
    x1 = torch.randn(61, 16)
    x2 = torch.randn(61, 16)
    x2[:, 0] = x2[:, 0].abs() + 2
    traces, counts = [], []
    for i, x in enumerate((x1, x2)):
        if i == 1:
            with torch.no_grad():
                layer.router.weight[3].zero_()
                layer.router.weight[3, 0] = -50.0
        layer.zero_grad(set_to_none=True)
        xi = x.clone().requires_grad_()
        with _Trace() as t:
            y, aux = layer(xi)
            ((y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum() + aux.loss).backward()
        traces.append(t.calls)
        counts.append(aux.tokens_per_expert.clone())
    assert not torch.equal(counts[0], counts[1]) and counts[1][3] == 0 and counts[0][3] > 0
    assert len(traces[0]) == len(traces[1])
    for a, b in zip(*traces):
        assert a == b, f"{a} != {b}"
