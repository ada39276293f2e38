"""Callbacks for the fault tests (module-level: spawned ranks unpickle them by name)."""
from __future__ import annotations

import os

import torch


class NaNAt:
    """Makes the model's logits NaN on `ranks` at the steps in `steps` (a forward hook, removed after
    the step), and records every rank's weights after each optimizer step."""

    def __init__(self, steps, ranks=None):
        self.steps, self.ranks = set(steps), ranks
        self.trainer, self.handle, self.after = None, None, {}

    def on_train_start(self, trainer) -> None:
        self.trainer = trainer

    def on_step_start(self, step: int) -> None:
        tr = self.trainer
        if step in self.steps and (self.ranks is None or tr.rank in self.ranks):
            self.handle = tr.model.register_forward_hook(lambda m, a, out: (out[0] * float("nan"), *out[1:]))

    def after_optimizer_step(self, step: int) -> None:
        if self.handle is not None:
            self.handle.remove()
            self.handle = None
        self.after[step] = [p.detach().clone() for p in self.trainer.model.parameters()]

    def on_train_end(self, trainer) -> None:
        # what the test reads back: did step s change any weight, are the weights finite
        steps = sorted(self.after)
        trainer.fault_report = {
            "changed": {s: any(not torch.equal(a, b) for a, b in zip(self.after[p], self.after[s]))
                        for p, s in zip(steps, steps[1:])},
            "finite": all(bool(torch.isfinite(p).all()) for p in trainer.model.parameters()),
        }


def nan_at_step3_rank1(cfg):
    return [NaNAt({3}, ranks={1})]


def nan_from_step2(cfg):
    return [NaNAt(range(2, 100))]


def nan_worker(overrides: list, nan_steps: list, nan_ranks, out_dir: str) -> dict:
    """A rank of a Trainer run with NaN logits injected; returns what the test checks."""
    import torch.distributed as dist

    from moesys.parallel import ParallelDims
    from moesys.trainer import Trainer
    from train_helpers import make_cfg

    cfg = make_cfg(f"parallel.simulate_ranks={dist.get_world_size()}", *overrides)
    dims = ParallelDims.build(ep=cfg.parallel.ep, timeout_s=60, num_experts=cfg.moe.num_experts)
    cb = NaNAt(nan_steps, ranks=nan_ranks)
    tr = Trainer(cfg, dims=dims, out_dir=out_dir, callbacks=[cb])
    summary = tr.fit(None)
    return {**tr.fault_report, "losses": summary["train_losses"], "checkpoint": summary["checkpoint"]}


def where_my_files_are(rank: int) -> dict:
    """run_ranks target: the directory of this rank's supervisor files (found from the fault file the
    supervisor keeps open in this process), its mode and owner, and what is in it."""
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.endswith(f"rank{rank}.fault.txt"):
            d = os.path.dirname(target)
            st = os.stat(d)
            return {"dir": d, "mode": st.st_mode & 0o777, "uid": st.st_uid, "files": sorted(os.listdir(d))}
    return {}
