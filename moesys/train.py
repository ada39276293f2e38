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

A bad override or setting is one line on stderr and exit code 2, before Hydra makes its run dir or
any rank starts (`moesys-train: error: trainer.batch_size must be > 0, got 0`); trainer.debug=true
prints the traceback as well.

SIGTERM or SIGUSR1 (to this process or to any rank) stops every rank at the next step boundary
after a checkpoint; SIGINT stops without one. The process prints one line (the step, the
checkpoint, the command that resumes) and exits with 143 (SIGTERM, SIGUSR1) or 130 (SIGINT). A rank
that dies takes the job down: exit code 1 and a message naming the rank and its error.
"""
from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import sys
from typing import Callable, Iterator, List, NoReturn, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from moesys.configs.schema import TrainConfig, from_composed, register
from moesys.errors import ConfigError
from moesys.evo import EvoCallback
from moesys.kernels import cpu_blas, workspace
from moesys.parallel import ParallelDims
from moesys.parallel.spawn import forkserver_available, rank_env, serve_store

from . import checkpoint as ckpt
from . import cli, hf, preemption, supervise
from . import data as data_mod
from . import tokens as tokens_mod
from .trainer import Trainer, structure_of

register()


def under_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def world_size_of(cfg: TrainConfig) -> int:
    return int(os.environ["WORLD_SIZE"]) if under_torchrun() else cfg.parallel.simulate_ranks


def build_callbacks(cfg: TrainConfig) -> List:
    """Step hooks built from the config (EvoMoE's `evo` group plugs in here)."""
    if cfg.evo.enabled:
        return [EvoCallback(cfg.evo, seed=cfg.trainer.seed)]
    return []


class ResumeError(ckpt.CheckpointError, ConfigError):
    """The checkpoint trainer.resume names cannot be used (missing, corrupt, another model's): bad
    input like a ConfigError, and a CheckpointError for callers that catch those."""


def prepare(cfg: TrainConfig, out_dir: str, world_size: int) -> Optional[str]:
    """All local checks, run on every rank before any collective. Returns the checkpoint to resume.

    Raises ConfigError naming what is wrong: the config, the data, the out dir, or (ResumeError) the
    checkpoint to resume. Writes nothing.
    """
    cfg.validate(world_size)
    if cfg.model.init_from is not None:  # the safetensors headers: every tensor there, its shape and dtype
        hf.check_checkpoint(cfg.model.init_from)
    tokens = data_mod.load_tokens(*tokens_mod.source_of(cfg.data), cfg.data.vocab_size)  # tokenizer: makes the cache
    data_mod.train_val_split(tokens, cfg.data.val_fraction, cfg.model.seq_len)
    t = cfg.trainer
    own = os.path.join(out_dir, "checkpoints")
    has_own = os.path.isfile(os.path.join(own, ckpt.LATEST))
    if t.resume is None:
        if has_own:
            raise ConfigError(f"{out_dir} already holds checkpoints ({own}); pass trainer.resume=auto to continue "
                              "that run or choose another trainer.out_dir (nothing was overwritten)")
        return None
    if t.resume == "auto":
        if not has_own:
            return None
        path, notes = ckpt.resolve_verified(own)
        if path is None:
            raise ResumeError(f"trainer.resume=auto: no checkpoint under {own} verifies: " + "; ".join(notes))
        if notes and os.environ.get("RANK", "0") == "0":
            print(f"moesys-train: {'; '.join(notes)}; resuming from {path}, the newest checkpoint that verifies",
                  file=sys.stderr)
    else:
        try:
            path = ckpt.resolve(t.resume)
            ckpt.verify_checkpoint(path)
        except ckpt.CheckpointError as e:
            raise ResumeError(f"trainer.resume={t.resume!r}: {e}") from e
    try:
        meta = ckpt.check_compatible(path, structure_of(cfg))
        ckpt.check_trusted(path, meta, t.trust_checkpoint)  # pickled entries: refused unless trusted
    except ckpt.CheckpointError as e:
        raise ResumeError(f"trainer.resume={t.resume!r}: {e}") from e
    return path


def _backend(cfg: TrainConfig) -> str:
    if cfg.parallel.backend != "auto":
        return cfg.parallel.backend
    return "nccl" if torch.cuda.is_available() else "gloo"


@contextlib.contextmanager
def rank_context(cfg: TrainConfig) -> Iterator[Tuple[object, torch.device]]:
    """This rank's process group and ParallelDims (cfg.parallel) and device; the group is destroyed on
    exit (one that existed before is used and kept). Needs RANK, WORLD_SIZE, MASTER_ADDR/PORT in the
    env; run every local check before it."""
    import datetime


    world, rank = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"])
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    backend = _backend(cfg)
    device = torch.device("cpu")
    if backend == "nccl":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    workspace.set_enabled(cfg.trainer.cpu_buffer_cache)
    workspace.set_keep_scratch(cfg.trainer.cpu_buffer_cache_keep_scratch)
    cpu_blas.set_enabled(cfg.trainer.cpu_gemm_batch)
    if cfg.parallel.debug_collectives:  # wraps every process group created from here on
        dist.set_debug_level(dist.DebugLevel.DETAIL)
    timeout = datetime.timedelta(seconds=cfg.parallel.timeout_s)
    # A default group the caller already made for this world (the test suite's pool of ranks) is
    # used as it is and left to the caller; otherwise this rank joins the job's rendezvous.
    own = not dist.is_initialized()
    if own:
        # Under torchrun the ranks share the agent's TCPStore, which outlives a restart (--max-restarts):
        # keys of the failed attempt (a dead rank's gloo address) would be read by the new one, and the
        # new ranks connect to ports nobody listens on and hang. Each attempt gets its own key space.
        store, _, _ = next(dist.rendezvous("env://", rank=rank, world_size=world, timeout=timeout))
        store = dist.PrefixStore(f"moesys/attempt{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)
        dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=timeout)
    elif (dist.get_rank(), dist.get_world_size()) != (rank, world):
        raise RuntimeError(f"rank_context: the existing default group is rank {dist.get_rank()} of "
                           f"{dist.get_world_size()}, the environment says rank {rank} of {world}")
    try:
        dims = ParallelDims.build(ep=cfg.parallel.ep, tp=1, timeout_s=cfg.parallel.timeout_s,
                                  local_world_size=local_world, num_experts=cfg.moe.num_experts)
        yield dims, device
    finally:
        if own:
            dist.destroy_process_group()


def rank_main(cfg: TrainConfig, out_dir: str, callbacks_fn: Optional[Callable] = None,
              share_out_dir: bool = False) -> dict:
    """One rank: checks, process group, trainer. Needs RANK, WORLD_SIZE, MASTER_ADDR/PORT in the env.

    share_out_dir: every rank adopts rank 0's out_dir (torchrun ranks each get their own Hydra run
    dir, whose timestamps can differ by a second).
    """
    resume = prepare(cfg, out_dir, int(os.environ["WORLD_SIZE"]))  # before the first collective
    with rank_context(cfg) as (dims, device):
        with preemption.StopSignal() as stop:  # a signal from here on stops at a step boundary
            if share_out_dir:
                box = [out_dir]
                dist.broadcast_object_list(box, src=0)
                out_dir = box[0]
            callbacks = (callbacks_fn or build_callbacks)(cfg)
            trainer = Trainer(cfg, dims=dims, out_dir=out_dir, callbacks=callbacks, device=device, stop=stop)
            return trainer.fit(resume)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawned(rank: int, world: int, port: int, fn: Callable, args: tuple) -> Optional[object]:
    os.environ.update(rank_env(rank, world, port))
    result = fn(*args)
    return result if rank == 0 else None


def rank_preload(cfg: TrainConfig, module: str) -> tuple:
    """The modules a server imports once, for this job's ranks to be forked from it
    (parallel.rank_start=auto on a CPU job, where the platform has a forkserver), or () to spawn each
    rank (parallel.rank_start=spawn, or a CUDA job). `module`: the one the ranks run (moesys.train,
    moesys.evaluate); torch._dynamo too, which torch's optimizers import when they are built."""
    p = cfg.parallel
    if p.rank_start != "auto" or p.on_cuda(torch.cuda.is_available()) or not forkserver_available():
        return ()
    return (module, "torch._dynamo")


def launch(world: int, fn: Callable, *args, preload: Sequence[str] = ()):
    """Run `fn(*args)` as every rank of a local gloo world of `world` ranks; returns rank 0's result.

    world == 1 runs it in this process (the rank environment set for the call and restored after);
    otherwise `world` ranks are spawned under moesys.supervise (fn and args must be picklable), or
    forked from a server that imported `preload` (rank_preload): signals are forwarded to them, they
    die with this process, and a rank that fails raises supervise.RankFailedError naming it, with the
    others killed at once."""

    # the rendezvous store is served from here, on 127.0.0.1 and a port that stays bound (no
    # EADDRINUSE race); the ranks' gloo/NCCL sockets stay on loopback too (nothing listens outside)
    store = serve_store(timeout_s=1800)
    if world == 1:
        env = rank_env(0, 1, store.port)
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        threads, cache_on, keep = torch.get_num_threads(), workspace.enabled(), workspace.keep_scratch()
        batch = cpu_blas.enabled()
        try:
            return fn(*args)
        finally:
            torch.set_num_threads(threads)
            workspace.set_enabled(cache_on)
            workspace.set_keep_scratch(keep)
            cpu_blas.set_enabled(batch)
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
    return supervise.run_ranks(_spawned, world, (world, store.port, fn, args), preload=preload)[0]


def run(cfg: TrainConfig, out_dir: str, callbacks_fn: Optional[Callable] = None, share_out_dir: bool = False) -> dict:
    """Train; returns rank 0's summary (None on other torchrun ranks).

    Under torchrun this process is one rank. Otherwise parallel.simulate_ranks local gloo ranks are
    spawned (1: this process alone; see moesys.supervise). `callbacks_fn(cfg) -> [callbacks]` must be
    picklable (a module-level function) when ranks are spawned. A run stopped by a signal returns
    its summary with `stopped` ({signal, exit_code, step, checkpoint, saved}); a rank that fails
    raises supervise.RankFailedError naming it.
    """
    if under_torchrun():
        supervise.die_with_parent(os.getppid())  # torchrun's agent: no rank outlives it
        return rank_main(cfg, out_dir, callbacks_fn, share_out_dir)
    world = cfg.parallel.simulate_ranks
    resume = prepare(cfg, out_dir, world)  # fail here, in the parent, before spawning anything
    if resume is not None:  # the ranks load exactly what the parent verified (resume=auto may have fallen back)
        cfg.trainer.resume = resume
    return launch(world, rank_main, cfg, out_dir, callbacks_fn, preload=rank_preload(cfg, "moesys.train"))


# ---- Hydra entry point -----------------------------------------------------------------------------
# Bad input is one line and exit code 2 (moesys.cli, shared with moesys-eval and moesys-generate).
# Only ConfigError is caught: the checks raise it, training never does.
PROG = "moesys-train"
ERROR_PREFIX = cli.error_prefix(PROG)
EXIT_BAD_INPUT = cli.EXIT_BAD_INPUT


def _exit_bad_input(message: str, debug: bool) -> NoReturn:
    cli.exit_bad_input(PROG, message, debug)


def _checked(dcfg) -> TrainConfig:
    cfg = from_composed(dcfg)
    cfg.validate(world_size_of(cfg))
    return cfg


def check_overrides(overrides: List[str]) -> TrainConfig:
    """Compose the config of these command-line overrides as Hydra will and check it.

    Runs before Hydra creates its run dir and before any rank: a bad override or setting prints one
    line (ERROR_PREFIX ...) and exits with EXIT_BAD_INPUT, writing nothing. Returns the checked config.
    """
    return cli.compose_checked(PROG, "train", overrides, _checked, debug_key="trainer.debug")


EXIT_RANK_FAILED = 1


def stop_line(stopped: dict, out_dir: str, argv: List[str]) -> str:
    """The one line a stopped run prints: the step, the checkpoint, the command that resumes."""
    import shlex

    keep = [a for a in argv if not re.match(r"\+{0,2}trainer\.(out_dir|resume)=", a)
            and a not in _no_run_dir([])]  # what main() added for Hydra
    prog = "torchrun <same options> -m moesys.train" if under_torchrun() else "moesys-train"
    cmd = " ".join([prog, *map(shlex.quote, keep), shlex.quote(f"trainer.out_dir={out_dir}"), "trainer.resume=auto"])
    where = (f"checkpoint {stopped['checkpoint']}" if stopped["saved"] else
             f"no checkpoint written, latest {stopped['checkpoint'] or 'none'}")
    return f"moesys-train: stopped by {stopped['signal']} at step {stopped['step']}; {where}; resume: {cmd}"


def cli_run(cfg: TrainConfig, out_dir: str, argv: List[str], callbacks_fn: Optional[Callable] = None,
            share_out_dir: bool = False) -> int:
    """run() as the command line does it: returns the exit status (0; 130/143 after a stop, with the
    stop line on stderr; 1 when a rank failed, with its error on stderr). ConfigError propagates."""
    runner = run
    if under_torchrun():  # torchrun's failure summary shows this rank's exception (its error file)
        from torch.distributed.elastic.multiprocessing.errors import record

        runner = record(run)
    try:
        summary = runner(cfg, out_dir, callbacks_fn, share_out_dir)
    except supervise.RankFailedError as e:
        if e.stopped_by is not None:  # a stop signal that came while the ranks were starting
            newest = ckpt.newest_checkpoint(os.path.join(out_dir, "checkpoints"))
            print(f"moesys-train: stopped by {signal.Signals(e.stopped_by).name} while the ranks were starting; "
                  f"nothing trained, latest checkpoint {newest or 'none'}", file=sys.stderr, flush=True)
            return preemption.exit_code(e.stopped_by)
        print(f"moesys-train: {e}", file=sys.stderr, flush=True)
        return EXIT_RANK_FAILED
    stopped = (summary or {}).get("stopped")
    if stopped is None:
        return 0
    if os.environ.get("RANK", "0") == "0":
        print(stop_line(stopped, (summary or {}).get("out_dir", out_dir), argv), file=sys.stderr, flush=True)
    return int(stopped["exit_code"])


def _hydra_main(dcfg) -> None:
    from hydra.core.hydra_config import HydraConfig

    try:
        cfg: TrainConfig = from_composed(dcfg)
        out_dir = cfg.trainer.out_dir or HydraConfig.get().runtime.output_dir
        code = cli_run(cfg, os.path.abspath(out_dir), sys.argv[1:], share_out_dir=cfg.trainer.out_dir is None)
    except ConfigError as e:  # from prepare(), in this process, before any rank starts
        _exit_bad_input(str(e), bool(dcfg.trainer.debug))
    if code:
        sys.exit(code)


def _no_run_dir(overrides: List[str]) -> List[str]:
    """With trainer.out_dir set, Hydra needs no run dir of its own: point it at the working directory
    and write no `.hydra/` (the run's config is saved as <out_dir>/config.yaml and in every
    checkpoint), so no stray outputs/<date>/<time>/ appears. A hydra.run.dir or hydra.output_subdir
    on the command line is kept as given."""
    if any(a.lstrip("+").startswith(("hydra.run.dir=", "hydra.output_subdir=")) for a in overrides):
        return []
    return ["hydra.run.dir=.", "hydra.output_subdir=null"]


def main() -> None:
    import hydra

    overrides = sys.argv[1:]
    # flags (--help, --cfg, -m, -cd ...) and multirun sweeps go to Hydra untouched (its own messages)
    if cli.plain_overrides(overrides):
        cfg = check_overrides(overrides)
        if cfg.trainer.out_dir:
            sys.argv = [sys.argv[0], *overrides, *_no_run_dir(overrides)]
    hydra.main(version_base="1.3", config_path="pkg://moesys.configs", config_name="train")(_hydra_main)()


if __name__ == "__main__":
    main()
