"""Rank functions of test_overflow_rerun.py (module-level: spawned ranks unpickle them)."""
from __future__ import annotations

import os

import torch
import torch.distributed as dist

from moesys.parallel import ParallelDims


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def train_runs_worker(runs, root, resume=None):
    """runs: [(name, TrainConfig)] of one ep degree, trained one after the other in this process
    group. Returns per run: the training losses, the final static factor, the overflow events of the
    history, and this rank's parameters and buffers (numpy, local shards).

    resume: (run name, step): that run also resumes from its checkpoint of that step into a fresh
    Trainer and reports the factor the resumed trainer uses (`resumed_factor`: the trainer's, the
    layers')."""
    from moesys.trainer import Trainer

    out = {}
    dims = None
    for name, cfg in runs:
        if dims is None:
            dims = ParallelDims.build(ep=cfg.parallel.ep, tp=1, timeout_s=60, num_experts=cfg.moe.num_experts)
        out_dir = os.path.join(root, name)
        tr = Trainer(cfg, dims=dims, out_dir=out_dir)
        summary = tr.fit(None)
        state = {k: _local(v.detach()).numpy().copy() for k, v in tr.model.state_dict().items()
                 if isinstance(v, torch.Tensor)}
        res = {"losses": summary["train_losses"], "factor": tr.static_capacity_factor,
               "events": list(tr.history.get("overflow_events", [])), "state": state}
        if resume is not None and resume[0] == name:
            fresh = Trainer(cfg, dims=dims, out_dir=out_dir + "-resumed")
            fresh.load(os.path.join(out_dir, "checkpoints", f"step_{resume[1]:08d}"))
            from moesys.parallel.overflow import static_capacity_factor

            res["resumed_factor"] = (fresh.static_capacity_factor, static_capacity_factor(fresh.model))
        out[name] = res
        dist.barrier()
    return out
