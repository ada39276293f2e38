"""Helpers for the trainer/checkpoint tests (module-level so spawned ranks can unpickle them)."""
from __future__ import annotations

import os

import torch


# simulate(..., preload=FORKED): ranks forked from the session's forkserver (tests/conftest.py), which
# has imported torch and moesys, rather than spawned (an interpreter and its imports a rank); for
# tests whose subject is what the ranks compute, not how they start
FORKED = ("moesys.train",)


def make_cfg(*overrides: str):
    """A TrainConfig composed by Hydra from configs/ (preset=tiny) plus overrides, on the GPT
    (model.arch=gpt, the model these tests were written for) unless the overrides pick the model
    (model.arch, model.init_from or another preset)."""
    from hydra import compose, initialize_config_module
    from omegaconf import OmegaConf

    import moesys.train  # noqa: F401  (registers the schema)

    picks = any(o.startswith(("model.arch=", "model.init_from=", "preset=")) for o in overrides)
    with initialize_config_module("moesys.configs", version_base="1.3"):
        dcfg = compose("train", overrides=["preset=tiny", *([] if picks else ["model.arch=gpt"]), *overrides])
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
    local = lambda t: t.to_local() if hasattr(t, "to_local") else t  # noqa: E731  (DTensor experts)
    # (under FSDP2 a rank holds part of its local experts: no whole-expert probe there)
    if 0 <= j < mod.num_local_experts and local(p.detach()).shape[0] == mod.num_local_experts:
        st = tr.optimizer.state[p]
        # numpy, not tensors: torch's queue pickling passes tensors as shared-memory fds, which breaks
        # when the rank exits before the parent reads them
        probe = {"exp_avg": local(st["exp_avg"])[j].numpy().copy(),
                 "exp_avg_sq": local(st["exp_avg_sq"])[j].numpy().copy(),
                 "weight": local(p.detach())[j].numpy().copy(), "step": float(st["step"]),
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


def expert_offset_worker(root):
    """Rank fn (2 ranks): save a checkpoint of one MoE layer at EP=2, load it back at EP=2 and at EP=1
    into differently initialised layers; report every local expert tensor (weights and AdamW moments)
    that is not exactly its slice of the global [E, ...] tensor. Returns a list of failure strings."""

    import torch.distributed as dist

    from moesys import MoEConfig, MoELayer
    from moesys import checkpoint as ckpt
    from moesys.parallel import ParallelDims, allreduce_gradients, apply_expert_parallel

    cfg = MoEConfig(hidden_size=6, ffn_hidden_size=10, num_experts=4, top_k=2, activation="swiglu")
    dims = ParallelDims.build(ep=2, timeout_s=60)
    me = dist.get_rank()
    torch.manual_seed(0)
    layer = apply_expert_parallel(MoELayer(cfg), dims.ep_group, dims=dims, mode="ep", overlap=1, timeout_s=60)
    opt = torch.optim.AdamW(layer.parameters(), lr=1e-2)
    x = torch.randn(9, 6, generator=torch.Generator().manual_seed(me))
    layer(x)[0].square().sum().backward()
    allreduce_gradients(layer, dims)  # the router stays replicated
    opt.step()
    names = ("w1", "w2", "w3")

    def local(model, optimizer):
        out = {}
        shard = lambda t: t.to_local() if hasattr(t, "to_local") else t  # noqa: E731  (DTensor experts)
        for n in names:
            p = getattr(model.experts, n)
            out[n] = shard(p.detach())
            out.update({f"{n}.{m}": shard(optimizer.state[p][m]) for m in ("exp_avg", "exp_avg_sq")})
        return out

    def gather(t):  # [E/2, ...] on each rank -> the global [E, ...] tensor
        parts = [torch.empty_like(t) for _ in range(2)]
        dist.all_gather(parts, t.contiguous(), group=dims.ep_group)
        return torch.cat(parts)

    want = {k: gather(v) for k, v in local(layer, opt).items()}
    path = ckpt.save_checkpoint(root, 1, model=layer, optimizer=opt, trainer_state={"world_size": 2}, structure={})
    fails = []
    for ep in (2, 1):
        torch.manual_seed(100 + ep)  # other weights than the saved ones
        fresh = MoELayer(cfg)
        if ep == 2:
            apply_expert_parallel(fresh, dims.ep_group, dims=dims, mode="ep", overlap=1, timeout_s=60)
        fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=1e-2)
        ckpt.load_checkpoint(path, model=fresh, optimizer=fresh_opt, structure={})
        sl = slice(fresh.experts.expert_offset, fresh.experts.expert_offset + fresh.experts.num_local_experts)
        for k, v in local(fresh, fresh_opt).items():
            if not torch.equal(v, want[k][sl]):
                fails.append(f"rank {me} EP={ep}: experts.{k} is not global experts [{sl.start}, {sl.stop})")
        if not torch.equal(fresh.router.weight, layer.router.weight):
            fails.append(f"rank {me} EP={ep}: router weight differs")
    return fails


def _pool_rank_main(cfg, out_dir, callbacks_fn):
    """Rank fn: moesys.train.rank_main (its checks, settings and trainer) in the pool's process group;
    the process settings rank_context sets for its run are restored after (a spawned rank dies)."""
    from moesys import train
    from moesys.kernels import cpu_blas, workspace

    saved = workspace.enabled(), workspace.keep_scratch(), cpu_blas.enabled()
    try:
        return train.rank_main(cfg, out_dir, callbacks_fn)
    finally:
        workspace.set_enabled(saved[0])
        workspace.set_keep_scratch(saved[1])
        cpu_blas.set_enabled(saved[2])
        workspace.release()


def pool_run(rank_pool, cfg, out_dir, callbacks_fn=None, join_timeout_s: float = 540):
    """`moesys.train.run(cfg, out_dir)` with its parallel.simulate_ranks ranks taken from the test
    suite's pool (tests/conftest.py `rank_pool`) instead of spawned: the same checks in this process
    first (a bad config raises here), the same rank_main on every rank; rank 0's summary. For tests
    whose subject is what the ranks compute; the supervisor's own behaviour (signals, a dying rank,
    exit codes) is tested through train.run and the CLI (tests/moesys/test_preemption.py)."""
    from moesys import train

    world = cfg.parallel.simulate_ranks
    resume = train.prepare(cfg, out_dir, world)
    if resume is not None:
        cfg.trainer.resume = resume
    if world == 1:
        return train.run(cfg, out_dir, callbacks_fn)
    return rank_pool.run(_pool_rank_main, world, cfg, out_dir, callbacks_fn, timeout_s=cfg.parallel.timeout_s,
                         join_timeout_s=join_timeout_s, debug_collectives=cfg.parallel.debug_collectives)[0]
