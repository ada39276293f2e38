"""Fault injection for the signal, rank-death and restart tests: step callbacks that send a real
signal, raise, or SIGKILL their own rank at a given step, and scripts run as real processes.
Module-level so spawned ranks unpickle them by name (bind arguments with functools.partial).

Run as a script (the parent process of a test):
    python stop_helpers.py cli   OUT STEPS STEP RANK SIGNUM|raise [self|parent]   # cli_run, 2 simulated ranks
    python stop_helpers.py torchrun OUT STEPS STEP RANK [kill|raise]              # one torchrun rank
    python stop_helpers.py blocksave OUT STEPS BLOCK_AT_SAVE               # 1 rank; SIGKILL me mid-save
"""
from __future__ import annotations

import functools
import os
import signal
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def launcher_pid() -> int:
    """The process that started this rank (moesys-train's): the OS parent of a spawned rank, the
    parent of the forkserver a forked rank (parallel.rank_start=auto) came from."""
    ppid = os.getppid()
    with open(f"/proc/{ppid}/cmdline", "rb") as f:
        if b"multiprocessing.forkserver" not in f.read():
            return ppid
    with open(f"/proc/{ppid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[1])


class SignalAt:
    """At the start of `step`, on rank `rank`, send `sig` to this rank ("self") or to the parent
    ("parent"). For the parent, wait until the forwarded signal has reached this rank, so the stop
    lands on the same step in every run (the test is deterministic)."""

    def __init__(self, step: int, rank: int, sig: int, to: str):
        self.step, self.rank, self.sig, self.to = step, rank, sig, to

    def on_train_start(self, trainer) -> None:
        self.trainer = trainer

    def on_step_start(self, step: int) -> None:
        if step != self.step or self.trainer.rank != self.rank:
            return
        os.kill(os.getpid() if self.to == "self" else launcher_pid(), self.sig)
        deadline = time.time() + 60
        while not self.trainer.stop.requested and time.time() < deadline:
            time.sleep(0.01)
        assert self.trainer.stop.requested, "the signal never reached this rank"


class RaiseAt:
    def __init__(self, step: int, rank: int):
        self.step, self.rank = step, rank

    def on_train_start(self, trainer) -> None:
        self.trainer = trainer

    def on_step_start(self, step: int) -> None:
        if step == self.step and self.trainer.rank == self.rank:
            raise ValueError(f"injected failure at step {step} on rank {self.rank}")


class AbortAt(RaiseAt):
    """os.abort() (SIGABRT, as a failed native assertion in a collective ends) at `step` on `rank`."""

    def on_step_start(self, step: int) -> None:
        if step == self.step and self.trainer.rank == self.rank:
            os.abort()


class KillSelfAt:
    """SIGKILL this rank at the start of `step` on rank `rank`; under torchrun on the first attempt
    only (TORCHELASTIC_RESTART_COUNT, set by torchrun, is read here in the test, not by moesys)."""

    def __init__(self, step: int, rank: int):
        self.step, self.rank = step, rank

    def on_train_start(self, trainer) -> None:
        self.trainer = trainer

    def on_step_start(self, step: int) -> None:
        first = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
        if step == self.step and self.trainer.rank == self.rank and first:
            os.kill(os.getpid(), signal.SIGKILL)


def callbacks(cfg, *, kind, **kw):
    return [kind(**kw)]


def signal_at(step, rank, sig, to="self"):
    return functools.partial(callbacks, kind=SignalAt, step=step, rank=rank, sig=int(sig), to=to)


def raise_at(step, rank):
    return functools.partial(callbacks, kind=RaiseAt, step=step, rank=rank)


def abort_at(step, rank):
    return functools.partial(callbacks, kind=AbortAt, step=step, rank=rank)


def kill_self_at(step, rank):
    return functools.partial(callbacks, kind=KillSelfAt, step=step, rank=rank)


def _cfg(*overrides):
    sys.path.insert(0, HERE)
    from train_helpers import make_cfg

    return make_cfg(*overrides)


COMMON = ("trainer.eval_interval=1000", "trainer.log_interval=1", "schedule.warmup_steps=2")


def _block_saves(at: int, marker: str) -> None:
    """From the `at`-th checkpoint on, DCP's file writer stops for good after writing its data files
    (before DCP's .metadata and moesys.json), after touching `marker`: the test SIGKILLs us there."""
    import torch.distributed.checkpoint as dcp

    base = dcp.FileSystemWriter
    count = [0]

    class Blocking(base):
        def write_data(self, plan, planner):
            fut = base.write_data(self, plan, planner)
            fut.wait()
            count[0] += 1
            if count[0] >= at:
                open(marker, "w").close()
                time.sleep(3600)
            return fut

    dcp.FileSystemWriter = Blocking  # this test process only


def main(argv) -> int:
    mode, out, steps = argv[0], argv[1], int(argv[2])
    from moesys import train

    import stop_helpers as sh  # by name, not __main__: the spawned ranks unpickle the callbacks

    if mode == "cli":  # simulated ranks under cli_run; a rank injects a fault: a signal number, or "raise"
        step, rank, what = int(argv[3]), int(argv[4]), argv[5]
        to = argv[6] if len(argv) > 6 else "self"
        ov = ["parallel.simulate_ranks=2", "parallel.ep=2", f"trainer.steps={steps}", f"trainer.out_dir={out}",
              "trainer.resume=auto", "trainer.ckpt_interval=2", *COMMON]
        cb = sh.raise_at(step, rank) if what == "raise" else sh.signal_at(step, rank, int(what), to)
        return train.cli_run(_cfg(*ov), out, ov, callbacks_fn=cb)
    if mode == "torchrun":  # one rank of `torchrun --nproc_per_node=2 --max-restarts=1`
        kill_step, kill_rank = int(argv[3]), int(argv[4])
        how = argv[5] if len(argv) > 5 else "kill"
        ov = ["parallel.ep=2", f"trainer.steps={steps}", f"trainer.out_dir={out}", "trainer.resume=auto",
              "trainer.ckpt_interval=2", "parallel.timeout_s=30", *COMMON]
        cb = (sh.kill_self_at if how == "kill" else sh.raise_at)(kill_step, kill_rank)
        return train.cli_run(_cfg(*ov), out, ov, callbacks_fn=cb)
    if mode == "blocksave":
        _block_saves(int(argv[3]), os.path.join(out, "blocked"))
        ov = ["parallel.simulate_ranks=1", "parallel.ep=1", f"trainer.steps={steps}", f"trainer.out_dir={out}",
              "trainer.resume=auto", "trainer.ckpt_interval=2", "trainer.keep_checkpoints=5", *COMMON]
        return train.cli_run(_cfg(*ov), out, ov)
    raise SystemExit(f"unknown mode {mode}")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
