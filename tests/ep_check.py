"""Checks shared by the multi-rank worker modules (tests/parallel/ep_workers.py and
tests/moesys/evo_ep_workers.py): each rank's outputs and gradients against the single-process
reference, collected as failure strings (a worker reports them; it never raises mid-collective)."""
from __future__ import annotations

import torch

from moesys.moe.experts import FFN_DIM, slice_ffn

ATOL = 1e-5


def local(t):
    """A rank's part of a tensor: a DTensor's local shard (sharded expert weights and their grads)."""
    return t.to_local() if hasattr(t, "to_local") else t


def close(name, a, b, fails, tag):
    a, b = local(a), local(b)
    if a.shape != b.shape:
        fails.append(f"{tag}: {name} shape {tuple(a.shape)} != {tuple(b.shape)}")
    elif a.numel() and not torch.allclose(a, b, atol=ATOL, rtol=1e-4):
        fails.append(f"{tag}: {name} max err {(a - b).abs().max().item():.3g}")


def check_local_expert_grads(layer, grads, fails, tag):
    """The rank's expert-weight grads equal its slice (experts, and the FFN dim when sharded) of
    the single-process layer's grads (`grads`: name -> tensor)."""
    lay = layer.runner.layout
    for wn in FFN_DIM:
        p = getattr(layer.experts, wn)
        if p is None:
            continue
        close(f"d {wn}", p.grad, slice_ffn(wn, grads[f"experts.{wn}"][lay.expert_slice], lay.f_slice), fails, tag)
