"""Helpers for the trainer/checkpoint tests (module-level so spawned ranks can unpickle them)."""
from __future__ import annotations

import os

import torch


def make_cfg(*overrides: str):
    """A TrainConfig composed by Hydra from configs/ (preset=tiny) plus overrides."""
    from hydra import compose, initialize_config_module
    from omegaconf import OmegaConf

    import moesys.train  # noqa: F401  (registers the schema)

    with initialize_config_module("moesys.configs", version_base="1.3"):
        dcfg = compose("train", overrides=["preset=tiny", *overrides])
    return OmegaConf.to_object(dcfg)


def build_trainer(cfg, out_dir):
    """A Trainer in the current (initialised) process group."""
    from moesys.parallel import ParallelDims
    from moesys.trainer import Trainer

    dims = ParallelDims.build(ep=cfg.parallel.ep, tp=1, timeout_s=60, num_experts=cfg.moe.num_experts)
    return Trainer(cfg, dims=dims, out_dir=out_dir)


def load_and_probe(cfg, ckpt_dir, out_dir, probe_key):
    """Rank fn: build at this world's EP, load `ckpt_dir`, return eval loss and the AdamW moments of
    global expert `probe_key` = (module name, param name, global expert index) if this rank holds it
    (with F-sharded experts: its F-slice, and `ffn_shard` = (slice index, slices))."""
    tr = build_trainer(cfg, out_dir)
    tr.load(ckpt_dir)
    loss = tr.evaluate()
    mod_name, pname, g = probe_key
    mod = tr.model.get_submodule(mod_name)
    p = getattr(mod, pname)
    probe = None
    j = g - mod.expert_offset
    if 0 <= j < mod.num_local_experts:
        st = tr.optimizer.state[p]
        # numpy, not tensors: torch's queue pickling passes tensors as shared-memory fds, which breaks
        # when the rank exits before the parent reads them
        probe = {"exp_avg": st["exp_avg"][j].numpy().copy(), "exp_avg_sq": st["exp_avg_sq"][j].numpy().copy(),
                 "weight": p.detach()[j].numpy().copy(), "step": float(st["step"]),
                 "ffn_shard": getattr(mod, "ffn_shard", None)}
    return {"loss": loss, "probe": probe, "step": tr.step}


def train_losses(cfg, out_dir):
    """Rank fn: train cfg in the current group; return the per-step mean training losses."""
    tr = build_trainer(cfg, out_dir)
    summary = tr.fit(None)
    return summary["train_losses"]


def read_flat_checkpoint(ckpt_dir):
    """The whole DCP checkpoint as one flat dict (reads files only)."""
    import tempfile

    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "flat.pt")
        dcp_to_torch_save(ckpt_dir, path)
        return torch.load(path, weights_only=False)
