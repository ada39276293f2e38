"""`moesys-train`: train a small GPT-MoE with expert parallelism (a Hydra app over moesys.configs).

    moesys-train                                     # pydoc corpus, CPU, 2 simulated EP ranks, ~3 min
    moesys-train preset=tiny                         # seconds
    moesys-train model.d_model=256 moe.num_experts=16 moe.router=sigmoid_bias parallel.ep=2 trainer.steps=1000
    moesys-train data.path=my.txt                    # a text file (bytes)
    moesys-train data.path=tok.bin data.dtype=uint16 data.vocab_size=50304
    moesys-train trainer.out_dir=runs/a trainer.resume=auto    # continue runs/a from its latest checkpoint
    torchrun --nproc_per_node=8 -m moesys.train parallel.ep=8  # a real world (see launchers/)

Without torchrun (no RANK/WORLD_SIZE in the environment) the app spawns parallel.simulate_ranks
local gloo ranks itself. Every check of the config, the data and the checkpoint to resume runs on
every rank before the process group exists, so bad input fails with a clear message and no hang.
"""
from __future__ import annotations

import os
import socket
import sys
from typing import Callable, List, Optional

import torch
import torch.distributed as dist

from moesys.configs.schema import TrainConfig, register
from moesys.kernels import workspace

from . import checkpoint as ckpt
from . import data as data_mod
from .trainer import Trainer, structure_of

register()


def under_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def world_size_of(cfg: TrainConfig) -> int:
    return int(os.environ["WORLD_SIZE"]) if under_torchrun() else cfg.parallel.simulate_ranks


def build_callbacks(cfg: TrainConfig) -> List:
    """Step hooks built from the config (EvoMoE's `evo` group plugs in here)."""
    if cfg.evo.enabled:
        from moesys.evo import EvoCallback

        return [EvoCallback(cfg.evo, seed=cfg.trainer.seed)]
    return []


def prepare(cfg: TrainConfig, out_dir: str, world_size: int) -> Optional[str]:
    """All local checks, run on every rank before any collective. Returns the checkpoint to resume.

    Raises ValueError / FileNotFoundError / CheckpointError naming what is wrong. Writes nothing.
    """
    cfg.validate(world_size)
    tokens = data_mod.load_tokens(cfg.data.path, cfg.data.dtype, cfg.data.vocab_size)
    data_mod.train_val_split(tokens, cfg.data.val_fraction, cfg.model.seq_len)
    t = cfg.trainer
    own = os.path.join(out_dir, "checkpoints")
    has_own = os.path.isfile(os.path.join(own, ckpt.LATEST))
    if t.resume is None:
        if has_own:
            raise ValueError(f"{out_dir} already holds checkpoints ({own}); pass trainer.resume=auto to continue "
                             "that run or choose another trainer.out_dir (nothing was overwritten)")
        return None
    if t.resume == "auto":
        if not has_own:
            return None
        path, notes = ckpt.resolve_verified(own)
        if path is None:
            raise ckpt.CheckpointError(f"trainer.resume=auto: no checkpoint under {own} verifies: " + "; ".join(notes))
        if notes and os.environ.get("RANK", "0") == "0":
            print(f"moesys-train: {'; '.join(notes)}; resuming from {path}, the newest checkpoint that verifies",
                  file=sys.stderr)
    else:
        path = ckpt.resolve(t.resume)
        ckpt.verify_checkpoint(path)
    ckpt.check_compatible(path, structure_of(cfg))
    return path


def _backend(cfg: TrainConfig) -> str:
    if cfg.parallel.backend != "auto":
        return cfg.parallel.backend
    return "nccl" if torch.cuda.is_available() else "gloo"


def rank_main(cfg: TrainConfig, out_dir: str, callbacks_fn: Optional[Callable] = None,
              share_out_dir: bool = False) -> dict:
    """One rank: checks, process group, trainer. Needs RANK, WORLD_SIZE, MASTER_ADDR/PORT in the env.

    share_out_dir: every rank adopts rank 0's out_dir (torchrun ranks each get their own Hydra run
    dir, whose timestamps can differ by a second).
    """
    import datetime

    from moesys.parallel import ParallelDims

    world, rank = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"])
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    resume = prepare(cfg, out_dir, world)  # before the first collective
    backend = _backend(cfg)
    device = torch.device("cpu")
    if backend == "nccl":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    workspace.set_enabled(cfg.trainer.cpu_buffer_cache)
    workspace.set_keep_scratch(cfg.trainer.cpu_buffer_cache_keep_scratch)
    if cfg.parallel.debug_collectives:  # wraps every process group created from here on
        dist.set_debug_level(dist.DebugLevel.DETAIL)
    dist.init_process_group(backend, rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=cfg.parallel.timeout_s))
    try:
        if share_out_dir:
            box = [out_dir]
            dist.broadcast_object_list(box, src=0)
            out_dir = box[0]
        dims = ParallelDims.build(ep=cfg.parallel.ep, tp=1, timeout_s=cfg.parallel.timeout_s,
                                  local_world_size=local_world, num_experts=cfg.moe.num_experts)
        callbacks = (callbacks_fn or build_callbacks)(cfg)
        trainer = Trainer(cfg, dims=dims, out_dir=out_dir, callbacks=callbacks, device=device)
        return trainer.fit(resume)
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawned(rank: int, world: int, port: int, cfg: TrainConfig, out_dir: str, queue, callbacks_fn) -> None:
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
                       "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": str(world)})
    summary = rank_main(cfg, out_dir, callbacks_fn)
    if rank == 0:
        queue.put(summary)


def run(cfg: TrainConfig, out_dir: str, callbacks_fn: Optional[Callable] = None, share_out_dir: bool = False) -> dict:
    """Train; returns rank 0's summary (None on other torchrun ranks).

    Under torchrun this process is one rank. Otherwise parallel.simulate_ranks local gloo ranks are
    spawned (1: this process alone). `callbacks_fn(cfg) -> [callbacks]` must be picklable (a
    module-level function) when ranks are spawned.
    """
    if under_torchrun():
        return rank_main(cfg, out_dir, callbacks_fn, share_out_dir)
    world = cfg.parallel.simulate_ranks
    resume = prepare(cfg, out_dir, world)  # fail here, in the parent, before spawning anything
    if resume is not None:  # the ranks load exactly what the parent verified (resume=auto may have fallen back)
        cfg.trainer.resume = resume
    if world == 1:
        saved = {k: os.environ.get(k) for k in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK",
                                                 "LOCAL_WORLD_SIZE")}
        os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "RANK": "0",
                           "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1"})
        threads, cache_on, keep = torch.get_num_threads(), workspace.enabled(), workspace.keep_scratch()
        try:
            return rank_main(cfg, out_dir, callbacks_fn)
        finally:
            torch.set_num_threads(threads)
            workspace.set_enabled(cache_on)
            workspace.set_keep_scratch(keep)
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    mp.start_processes(_spawned, args=(world, _free_port(), cfg, out_dir, queue, callbacks_fn), nprocs=world,
                       join=True, start_method="spawn")
    return queue.get() if not queue.empty() else None


# ---- Hydra entry point -----------------------------------------------------------------------------
def _hydra_main(dcfg) -> None:
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    cfg: TrainConfig = OmegaConf.to_object(dcfg)
    out_dir = cfg.trainer.out_dir or HydraConfig.get().runtime.output_dir
    run(cfg, os.path.abspath(out_dir), share_out_dir=cfg.trainer.out_dir is None)


def main() -> None:
    import hydra

    hydra.main(version_base="1.3", config_path="pkg://moesys.configs", config_name="train")(_hydra_main)()


if __name__ == "__main__":
    main()
