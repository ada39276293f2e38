"""Callbacks for the fault tests (module-level: spawned ranks unpickle them by name)."""
from __future__ import annotations

import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))


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


class GradNaNAt:
    """Makes one parameter's gradient NaN on `ranks` at the steps in `steps` (a tensor hook on the
    parameter, removed after the step): an overflow inside one layer's backward, under a finite loss.
    Records every rank's weights after each optimizer step and the step's reported loss."""

    def __init__(self, steps, ranks, param: str = "blocks.0.attn.proj.weight"):
        self.steps, self.ranks, self.param = set(steps), set(ranks), param
        self.trainer, self.handle, self.after = None, None, {}

    def on_train_start(self, trainer) -> None:
        self.trainer = trainer

    def on_step_start(self, step: int) -> None:
        tr = self.trainer
        if step in self.steps and tr.rank in self.ranks:
            p = dict(tr.model.named_parameters())[self.param]
            self.handle = p.register_hook(lambda g: g * float("nan"))

    def after_optimizer_step(self, step: int) -> None:
        if self.handle is not None:
            self.handle.remove()
            self.handle = None
        self.after[step] = [p.detach().clone() for p in self.trainer.model.parameters()]

    def report(self) -> dict:
        steps = sorted(self.after)
        return {"changed": {s: any(not torch.equal(a, b) for a, b in zip(self.after[p], self.after[s]))
                            for p, s in zip(steps, steps[1:])},
                "finite": all(bool(torch.isfinite(p).all()) for p in self.trainer.model.parameters())}


class SignalsAt:
    """At the start of `step`, rank r sends itself the signal `signals[r]` (a real os.kill) and waits
    until its handler has recorded it, so every rank's request rides in the same step's all-reduce."""

    def __init__(self, step: int, signals: dict):
        self.step, self.signals = step, dict(signals)

    def on_train_start(self, trainer) -> None:
        self.trainer = trainer

    def on_step_start(self, step: int) -> None:
        import os
        import time

        sig = self.signals.get(self.trainer.rank)
        if step != self.step or sig is None:
            return
        os.kill(os.getpid(), sig)
        deadline = time.time() + 60
        while self.trainer.stop.signum != sig and time.time() < deadline:
            time.sleep(0.01)
        assert self.trainer.stop.signum == sig, "the signal never reached this rank"


def paths_worker(overrides: list, out_dir: str) -> dict:
    """A rank of the fault-path scenarios of test_fault_paths.py, run one after another in one spawn
    (real gloo ranks, real signals):

    grad_nan  a NaN gradient on rank 1 at step 1 under a finite loss
    int_term  SIGINT to rank 0 and SIGTERM to rank 1 during step 1
    usr1_int  SIGUSR1 to rank 0 and SIGINT to rank 1 during step 1
    """
    import os
    import signal

    import torch.distributed as dist

    from moesys.parallel import ParallelDims
    from moesys.preemption import StopSignal
    from moesys.trainer import Trainer
    from train_helpers import make_cfg

    cfg = make_cfg(f"parallel.simulate_ranks={dist.get_world_size()}", *overrides)
    dims = ParallelDims.build(ep=cfg.parallel.ep, timeout_s=60, num_experts=cfg.moe.num_experts)
    out = {}
    cb = GradNaNAt({1}, ranks={1})
    tr = Trainer(cfg, dims=dims, out_dir=os.path.join(out_dir, "grad_nan"), callbacks=[cb])
    s = tr.fit(None)
    out["grad_nan"] = {**cb.report(), "losses": s["train_losses"]}
    for name, sigs in (("int_term", {0: signal.SIGINT, 1: signal.SIGTERM}),
                       ("usr1_int", {0: signal.SIGUSR1, 1: signal.SIGINT})):
        run_dir = os.path.join(out_dir, name)
        with StopSignal() as stop:
            tr = Trainer(cfg, dims=dims, out_dir=run_dir, callbacks=[SignalsAt(1, sigs)], stop=stop)
            s = tr.fit(None)
        root = os.path.join(run_dir, "checkpoints")
        out[name] = {"stopped": s["stopped"],
                     "dirs": sorted(os.listdir(root)) if os.path.isdir(root) else []}
    return out


def sleeping_rank(rank: int, workdir: str) -> None:
    """A run_ranks target that records its pid and every SIGINT it is sent (as a rank in the middle
    of a long step would: the first SIGINT asks for a stop at the step boundary), and sleeps on."""
    import os
    import signal
    import time

    def note(signum, frame):
        open(os.path.join(workdir, f"rank{rank}.sigint"), "a").close()

    signal.signal(signal.SIGINT, note)
    with open(os.path.join(workdir, f"rank{rank}.pid.tmp"), "w") as f:
        f.write(str(os.getpid()))
    os.replace(os.path.join(workdir, f"rank{rank}.pid.tmp"), os.path.join(workdir, f"rank{rank}.pid"))
    deadline = time.time() + 600
    while time.time() < deadline:
        time.sleep(0.5)


def exiting_rank(rank: int, workdir: str) -> None:
    """Rank 1 leaves at once with exit code 3 and no Python error (os._exit: as a native library's
    exit() would); the others sleep (sleeping_rank)."""
    import os

    if rank == 1:
        os._exit(3)
    sleeping_rank(rank, workdir)


def starting_rank(rank: int, workdir: str) -> None:
    """A rank still starting: it records its pid and sleeps with the default signal handlers (as a
    rank importing torch does, before the trainer installs its own), so SIGTERM ends it at once."""
    import os
    import time

    with open(os.path.join(workdir, f"rank{rank}.pid.tmp"), "w") as f:
        f.write(str(os.getpid()))
    os.replace(os.path.join(workdir, f"rank{rank}.pid.tmp"), os.path.join(workdir, f"rank{rank}.pid"))
    time.sleep(600)


def slow_to_exit_rank(rank: int, workdir: str) -> None:
    """Rank 1 raises first but takes 3 s to exit after its error is recorded (a finalizer, as a
    rank's teardown can); rank 0 notices its absence and fails at once, so rank 0 ends first."""
    import multiprocessing.util
    import os
    import time

    marker = os.path.join(workdir, "rank1.raised")
    if rank == 1:
        multiprocessing.util.Finalize(None, time.sleep, args=(3.0,), exitpriority=10)
        open(marker, "w").close()
        raise ValueError("injected failure on rank 1")
    deadline = time.time() + 120
    while not os.path.exists(marker) and time.time() < deadline:
        time.sleep(0.02)
    time.sleep(0.3)  # rank 1's error file is written right after its marker
    raise RuntimeError("rank 0: the connection to rank 1 was closed (a consequence, not the cause)")


def alive(pid: int) -> bool:
    """Whether process `pid` exists and is not a zombie (read from /proc)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def how_i_started(rank: int, launcher: int, key: str, say: bool = True) -> dict:
    """A rank's view of its start (tests/moesys/test_rank_start.py): its OS parent, the launcher's
    environment variable `key`, its working directory and sys.path, and (say) a line on stdout and stderr."""
    if say:
        print(f"rank {rank} on stdout", flush=True)
        print(f"rank {rank} on stderr", file=sys.stderr, flush=True)
    with open(f"/proc/{os.getppid()}/cmdline", "rb") as f:
        parent_cmd = f.read().decode(errors="replace")
    return {"rank": rank, "forked": os.getppid() != launcher and "multiprocessing.forkserver" in parent_cmd,
            "value": os.environ.get(key), "cwd": os.getcwd(), "sys_path_has_helpers": HERE in sys.path}
