"""The compiled (not interpreted) Triton kernels on a CUDA device, against the torch references.

The test conftests set TRITON_INTERPRET=1 for the CPU tests, and the variable is read when
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


# The whole MoELayer on CUDA against the same layer on CPU through the torch path: outputs, aux
# loss and every gradient, for each router, gelu and swiglu, dropless and with capacity, 601
# tokens, 7 experts, and (top-k routers) an expert that no token reaches. fp32 with TF32 off (both
# sides true fp32) through the default backend (Triton, or torch._grouped_mm where the probe finds
# it) and the forced torch path; bf16 through the default backend against fp32 with bf16 tolerances.
LAYER_SCRIPT = textwrap.dedent("""
    import copy, sys, time, torch
    from moesys import MoEConfig, MoELayer
    from moesys.kernels import backend as B
    dev = sys.argv[1] if len(sys.argv) > 1 else "cuda"
    torch.backends.cuda.matmul.allow_tf32 = False
    print("grouped_mm on", dev, {str(dt): B.grouped_mm_supported(torch.device(dev), dt)
                                 for dt in (torch.float32, torch.bfloat16)}, flush=True)
    CASES = [  # router, activation, capacity factor, dtype, backend
        ("topk", "gelu", None, torch.float32, "auto"), ("topk", "swiglu", 1.0, torch.float32, "auto"),
        ("switch", "gelu", 1.0, torch.float32, "auto"), ("sigmoid_bias", "swiglu", None, torch.float32, "auto"),
        ("expert_choice", "gelu", 1.0, torch.float32, "auto"), ("topk", "swiglu", None, torch.float32, "torch"),
        ("topk", "swiglu", None, torch.bfloat16, "auto"), ("topk", "gelu", 1.0, torch.bfloat16, "auto"),
    ]
    for i, (router, act, cf, dtype, backend) in enumerate(CASES):
        t0 = time.time()
        torch.manual_seed(i)
        cfg = MoEConfig(hidden_size=48, ffn_hidden_size=80, num_experts=7, top_k=1 if router == "switch" else 2,
                        router=router, activation=act, capacity_factor=cf, kernel_backend=backend,
                        allow_noncausal=router == "expert_choice", z_loss_coef=1e-3)
        ref = MoELayer(cfg)
        x = torch.randn(601, 48)
        if router != "expert_choice":  # expert 3 gets no token
            x[:, 0] = x[:, 0].abs() + 3
            with torch.no_grad():
                ref.router.weight[3].zero_()
                ref.router.weight[3, 0] = -50.0
        if dtype != torch.float32:
            # both sides see bf16-representable inputs and weights, so routing is the same and
            # only the expert arithmetic differs (bf16 on the GPU side)
            x = x.to(dtype).float()
            with torch.no_grad():
                for p in ref.parameters():
                    p.copy_(p.to(dtype).float())
        gpu = copy.deepcopy(ref).to(dev)
        if dtype != torch.float32:  # experts in bf16 (the router keeps its fp32 logits)
            gpu.experts.to(dtype)
        outs = []
        for m, d, dt in ((ref, "cpu", torch.float32), (gpu, dev, dtype)):
            xi = x.detach().to(d, dt).clone().requires_grad_()
            y, aux = m(xi)
            dy = torch.linspace(-1, 1, y.numel()).reshape(y.shape).to(d)
            ((y.float() * dy).sum() + aux.loss).backward()
            outs.append((y, aux, xi.grad, dict(m.named_parameters())))
        (y0, a0, g0, p0), (y1, a1, g1, p1) = outs
        tag = f"{router}/{act}/cf={cf}/{dtype}/{backend}"
        if dtype == torch.float32:
            assert torch.equal(a0.tokens_per_expert.cpu(), a1.tokens_per_expert.cpu()), tag
            assert int(a0.dropped) == int(a1.dropped), tag
        if router != "expert_choice":
            assert int(a1.tokens_per_expert[3]) == 0, tag
        def close(got, want, what):
            got = got.detach().float().cpu()
            if dtype == torch.float32:  # summation order differs: absolute error grows with the scale
                atol = 1e-5 * max(1.0, want.abs().max().item())
                torch.testing.assert_close(got, want, atol=atol, rtol=1e-4, msg=lambda m: f"{tag} {what} {m}")
            else:  # bf16 inputs and weights: errors relative to the tensor's scale
                err = ((got - want).abs().max() / want.abs().max().clamp_min(1e-12)).item()
                assert err < 3e-2, f"{tag} {what}: relative error {err:.3g}"
        close(y1, y0, "y")
        close(g1, g0, "dx")
        for n in p0:
            close(p1[n].grad, p0[n].grad, "d" + n)
        print(f"ok {tag} ({time.time() - t0:.1f} s)", flush=True)
    print(f"{len(CASES)} layer cases match")
""")


def _run(script: str, *args: str) -> None:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", script, *args], env=env, capture_output=True, text=True,
                          timeout=600)
    print(proc.stdout)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]


def test_compiled_kernels_on_cuda():
    _run(SCRIPT)


def test_layer_on_cuda_matches_cpu():
    _run(LAYER_SCRIPT)
