"""Rank-side bodies of tests/parallel/test_grad_overlap.py (module-level: the pool's ranks unpickle them)."""
from __future__ import annotations

import torch

from moesys.parallel import ParallelDims, allreduce_gradients


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def _grads(model) -> dict:
    return {n: _local(p.grad).detach().clone().numpy() for n, p in model.named_parameters() if p.grad is not None}


def grads_worker(cfg_overlap, cfg_flat, root: str) -> dict:
    """One step's forward/backward (trainer.grad_accum micro-batches) of two Trainers built alike, one
    with parallel.grad_overlap=true, one with false; returns this rank's gradients after each one's
    sync (and the flat trainer's before it: the reduction must change them), and what a full-backward
    pre-hook on block 0 saw at each micro-batch: (reducer armed, bucket launches issued so far)."""
    from moesys.trainer import Trainer

    dims = ParallelDims.build(ep=cfg_overlap.parallel.ep, tp=1, timeout_s=60, num_experts=cfg_overlap.moe.num_experts)
    tr = Trainer(cfg_overlap, dims=dims, out_dir=f"{root}/overlap")
    red = tr.grad_reducer
    seen = []
    tr.model.blocks[0].register_full_backward_pre_hook(
        lambda module, grad_output: seen.append((red.syncing, len(red.launches))))
    tr._forward_backward(0)
    after_backward = list(red.launches)
    red.finish()
    out = {"overlap": _grads(tr.model), "block0_backward": seen, "launches": after_backward,
           "buckets": {g.name: len(g.buckets) for g in red.groups}, "local_params": len(red.local)}
    flat = Trainer(cfg_flat, dims=dims, out_dir=f"{root}/flat")
    assert flat.grad_reducer is None
    flat._forward_backward(0)
    out["unreduced"] = _grads(flat.model)
    allreduce_gradients(flat.model, dims)
    out["flat"] = _grads(flat.model)
    return out
