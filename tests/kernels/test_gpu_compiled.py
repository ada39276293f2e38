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


# The whole MoELayer on CUDA (default backend: the compiled Triton kernels) against the same layer
# on CPU through the torch path: outputs, aux loss and every gradient, for each router, gelu and
# swiglu, dropless and with capacity, 601 tokens, 7 experts, and (top-k routers) an expert that no
# token reaches. fp32 with TF32 off, so both sides are true fp32.
LAYER_SCRIPT = textwrap.dedent("""
    import copy, sys, torch
    from moesys import MoEConfig, MoELayer
    dev = sys.argv[1] if len(sys.argv) > 1 else "cuda"
    torch.backends.cuda.matmul.allow_tf32 = False
    cases = 0
    for router in ("topk", "switch", "sigmoid_bias", "expert_choice"):
        for act in ("gelu", "swiglu"):
            for cf in ((None, 1.0) if router != "expert_choice" else (1.0,)):
                torch.manual_seed(cases)
                cfg = MoEConfig(hidden_size=48, ffn_hidden_size=80, num_experts=7,
                                top_k=1 if router == "switch" else 2, router=router, activation=act,
                                capacity_factor=cf, allow_noncausal=router == "expert_choice",
                                z_loss_coef=1e-3)
                ref = MoELayer(cfg)
                x = torch.randn(601, 48)
                if router != "expert_choice":  # expert 3 gets no token
                    x[:, 0] = x[:, 0].abs() + 3
                    with torch.no_grad():
                        ref.router.weight[3].zero_()
                        ref.router.weight[3, 0] = -50.0
                gpu = copy.deepcopy(ref).to(dev)
                outs = []
                for m, d in ((ref, "cpu"), (gpu, dev)):
                    xi = x.to(d).requires_grad_()
                    y, aux = m(xi)
                    dy = torch.linspace(-1, 1, y.numel()).reshape(y.shape).to(d)
                    ((y * dy).sum() + aux.loss).backward()
                    outs.append((y, aux, xi.grad, dict(m.named_parameters())))
                (y0, a0, g0, p0), (y1, a1, g1, p1) = outs
                tag = f"{router}/{act}/cf={cf}"
                assert torch.equal(a0.tokens_per_expert.cpu(), a1.tokens_per_expert.cpu()), tag
                assert int(a0.dropped) == int(a1.dropped), tag
                if router != "expert_choice":
                    assert int(a1.tokens_per_expert[3]) == 0, tag
                torch.testing.assert_close(y1.cpu(), y0, atol=1e-5, rtol=1e-4, msg=lambda m: tag + " y " + m)
                torch.testing.assert_close(a1.loss.cpu(), a0.loss, atol=1e-6, rtol=1e-5)
                torch.testing.assert_close(g1.cpu(), g0, atol=1e-5, rtol=1e-4, msg=lambda m: tag + " dx " + m)
                for n in p0:
                    torch.testing.assert_close(p1[n].grad.cpu(), p0[n].grad, atol=1e-5, rtol=1e-4,
                                               msg=lambda m: f"{tag} d{n} {m}")
                cases += 1
    print(f"{cases} layer cases match")
""")


def _run(script: str, *args: str) -> None:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", script, *args], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]


def test_compiled_kernels_on_cuda():
    _run(SCRIPT)


def test_layer_on_cuda_matches_cpu():
    _run(LAYER_SCRIPT)
