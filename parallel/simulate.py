"""Simulated expert parallelism: N real torch.distributed ranks as processes on one machine.

    results = simulate(fn, 4, arg1, arg2)   # fn(arg1, arg2) on ranks 0..3; returns [r0, r1, r2, r3]
    python -m moesys.parallel.simulate 4 my_script.py --steps 10   # a script on 4 ranks (simulate_ep.sh)

Each rank gets MASTER_ADDR/MASTER_PORT (the parent's store), RANK, WORLD_SIZE, LOCAL_RANK and
LOCAL_WORLD_SIZE, one intra-op thread (ranks share the CPU), and an initialised default process
group with a timeout, so a dead peer surfaces as an error rather than a hang.
Nothing listens outside the machine: the store is bound to 127.0.0.1 (serve_store) and gloo's and
NCCL's sockets use the loopback interface (loopback_env). `fn` must be
picklable (a module-level function): ranks are started with the "spawn" method.
If any rank raises, `simulate` raises RuntimeError carrying that rank's traceback.
Ranks are started, given their environment and store, and waited for by moesys.parallel.spawn (the
one process starter; RankPool and moesys.supervise.run_ranks use it too).
"""
from __future__ import annotations

import faulthandler
import logging
import os
import pickle
import shutil
import signal
import sys
import tempfile
import time
import traceback
from typing import Any, Callable, Optional, Sequence

import torch
import torch.distributed as dist
from torch.distributed.tensor import _redistribute as dtensor_redistribute  # private: its plan cache

# the store and environment helpers live in spawn.py; these names stay importable from here
from .spawn import (
    AGENT_STORE_ENV,
    context,
    free_port,
    join_job,
    loopback_env,
    loopback_interface,
    rank_env,
    serve_store,
    start_ranks,
    wait_reports,
)

__all__ = ["AGENT_STORE_ENV", "RankPool", "free_port", "loopback_env", "loopback_interface", "run_script",
           "serve_store", "simulate"]


def _check_world(world_size: int, local_world_size: Optional[int]) -> int:
    """The ranks per simulated node (local_world_size, default all), after checking both numbers."""
    if world_size < 1:
        raise ValueError(f"simulate: world_size must be >= 1, got {world_size}")
    lws = world_size if local_world_size is None else local_world_size
    if lws < 1 or world_size % lws != 0:
        raise ValueError(f"simulate: local_world_size ({lws}) must divide world_size ({world_size})")
    return lws


def _rank_main(rank, world_size, port, backend, timeout_s, local_world_size, debug_collectives, fn, args, results):
    try:
        join_job(rank, world_size, port, backend, timeout_s, local_world_size, debug_collectives)
        out = fn(*args)
        # plain pickle copies tensor data into the message: torch's queue reduction would share
        # memory through a file descriptor that dies with this process if it exits first
        results.put((rank, True, pickle.dumps(out)))
    except BaseException:  # report any failure (incl. SystemExit) to the parent, with its traceback
        results.put((rank, False, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def simulate(fn: Callable[..., Any], world_size: int, *args, backend: str = "gloo", timeout_s: float = 60.0,
             local_world_size: Optional[int] = None, join_timeout_s: Optional[float] = None,
             debug_collectives: bool = False, preload: Sequence[str] = ()) -> list:
    """Run fn(*args) on `world_size` gloo ranks; return the per-rank results in rank order.

    Args:
        timeout_s: the process-group timeout of every collective.
        local_world_size: ranks per simulated node (LOCAL_WORLD_SIZE); default all on one node.
        join_timeout_s: how long to wait for all ranks (default 4 x timeout_s).
        debug_collectives: check each collective's fingerprint (op, shapes) across ranks first
            (torch.distributed's DETAIL debug level), so a mismatch is a clear error, not a gloo abort.
        preload: module names; the ranks are then forked from multiprocessing's forkserver, which
            imports them once (its first use starts it), instead of each starting an interpreter and
            importing torch (start_ranks; TRITON_INTERPRET must be the server's). A forked rank's
            resident memory counts the server's pages it touches from its start.
    """
    lws = _check_world(world_size, local_world_size)
    results = context().Queue()
    store = serve_store(timeout_s)  # held until the ranks are done (see serve_store)
    procs = start_ranks(_rank_main, [(r, world_size, store.port, backend, timeout_s, lws, debug_collectives, fn, args,
                                      results) for r in range(world_size)], daemon=True, preload=preload)
    deadline = time.monotonic() + (join_timeout_s if join_timeout_s is not None else 4 * timeout_s + 30)
    try:
        # a rank that exited 0 without reporting is not dead yet: its report may still be in the queue
        got, first, died = wait_reports(results, procs, deadline, dead=lambda p: p.exitcode not in (None, 0))
        if first is not None and first in died:
            raise RuntimeError(f"simulate: rank {first} died with exit code {procs[first].exitcode} without reporting")
        if first is not None:
            raise RuntimeError(f"simulate: rank {first} of {world_size} failed:\n{got[first][1]}")
        if len(got) < world_size:
            missing = sorted(set(range(world_size)) - set(got))
            raise TimeoutError(f"simulate: ranks {missing} of {world_size} did not finish in time")
        return [pickle.loads(got[r][1]) for r in range(world_size)]
    finally:
        for p in procs:
            p.join(timeout=2.0)
            if p.is_alive():
                p.terminate()
                p.join(timeout=2.0)


# the signal a pool rank dumps its Python stack on (SIGUSR1 is a stop request, moesys.preemption)
_STACK_SIGNAL = signal.SIGUSR2


def _restore_process_state(env: dict, cwd: str, handlers: dict, log_handlers: list) -> None:
    """Undo what one pool task may have changed in a rank's process, so the next task starts alike:
    environment, working directory, signal handlers, root log handlers, default dtype, threads,
    torch.compile's caches, the collectives' debug level, and DTensor's caches. Those hold meshes:
    a new task's mesh of the same shape hashes equal to an old one, and a cached plan then named a
    group of the old task ("Could not resolve the process group registered under the name 3")."""
    os.environ.clear()
    os.environ.update(env)
    os.chdir(cwd)
    for s, h in handlers.items():
        signal.signal(s, h)
    for h in logging.root.handlers[:]:
        if h not in log_handlers:
            logging.root.removeHandler(h)
            h.close()
    torch.set_default_dtype(torch.float32)
    torch.set_num_threads(1)
    dist.set_debug_level(dist.DebugLevel.OFF)
    # imported here, not at the top: torch.distributed.tensor.debug imports torch._dynamo and
    # inductor (~1.5 s of CPU), which every process importing moesys would pay; a pool rank pays once
    from torch.distributed.tensor import debug as dtensor_debug
    dtensor_debug._clear_sharding_prop_cache()
    dtensor_redistribute._gen_transform_infos.cache_clear()
    dynamo = sys.modules.get("torch._dynamo")
    if dynamo is not None:
        dynamo.reset()


def _pool_rank_main(rank: int, world_size: int, tasks, results, stack_path: str) -> None:
    """One rank of a RankPool: run the tasks it is sent until it is killed. Each task gets a fresh
    default process group (joined through that task's store) destroyed before the result is sent,
    so no group outlives its task; a failure is reported with its traceback, like simulate's ranks."""
    stack_file = open(stack_path, "w")  # kept open: faulthandler writes to its descriptor
    faulthandler.register(_STACK_SIGNAL, file=stack_file, all_threads=True)
    env, cwd = dict(os.environ), os.getcwd()
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGHUP)}
    handlers = {s: h for s, h in handlers.items() if h is not None}  # None: not set from Python
    log_handlers = logging.root.handlers[:]
    while True:
        task_id, sys_path, port, backend, timeout_s, lws, debug_collectives, payload = tasks.get()
        sys.path.extend(p for p in sys_path if p not in sys.path)  # test helpers added since the start
        # the rank's environment before the task's modules are imported (unpickling fn may import them)
        os.environ.update(rank_env(rank, world_size, port, lws))
        try:
            fn, args = pickle.loads(payload)
            join_job(rank, world_size, port, backend, timeout_s, lws, debug_collectives)
            report = (task_id, rank, True, pickle.dumps(fn(*args)))
            # no rank tears its groups down while a peer still uses them (a group made last by the
            # body, still connecting on a slower rank, saw "connection closed by peer")
            dist.barrier()
        except BaseException:  # any failure (incl. SystemExit) goes to the parent with its traceback,
            # before this rank's groups go: the peers' errors that follow must not be reported first
            results.put((task_id, rank, False, traceback.format_exc()))
            results.close()  # flushed now, so it arrives first; the pool starts new ranks after a failure
            results.join_thread()
            report = None
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()
            _restore_process_state(env, cwd, handlers, log_handlers)
        if report is not None:
            results.put(report)


class RankPool:
    """`world_size` gloo ranks started once and reused: `pool.run(fn, *args)` is `simulate(fn,
    world_size, *args)` without starting interpreters, importing torch and moesys, per call.

        pool = RankPool(4)
        results = pool.run(fn, arg1, timeout_s=60)   # fn(arg1) on ranks 0..3; [r0, r1, r2, r3]
        pool.close()

    Each run gets a fresh default process group (its own store, so no state crosses runs); groups
    and meshes made by `fn` are destroyed with it before the results come back. When a rank fails,
    hangs or dies, `run` raises with every rank's report (its traceback, or for a rank still running
    its Python stack, dumped by faulthandler) and the pool restarts, so the next run is unaffected.
    The pattern of torch's MultiProcContinuousTest (torch/testing/_internal/common_distributed.py).
    preload: module names; the ranks (and those of a restart) are then forked from
    multiprocessing's forkserver, which imports them once, rather than spawned (simulate's).
    renew_every: start new ranks after this many runs (None: never). What a run's libraries keep
    alive outlives its task: a process group still referenced after destroy_process_group keeps
    gloo's loop threads, which wake and take CPU for as long as the rank lives (a pool rank of the
    test suite had ~100 of them, ~8% of a core, after a few hundred trainer runs). Cheap with preload.
    """

    def __init__(self, world_size: int, preload: Sequence[str] = (), renew_every: Optional[int] = None):
        _check_world(world_size, None)
        if renew_every is not None and renew_every < 1:
            raise ValueError(f"RankPool: renew_every must be >= 1 or None, got {renew_every}")
        self.world_size = world_size
        self.preload = tuple(preload)
        self.renew_every = renew_every
        self.renewals = 0  # how many times renew_every made the pool start new ranks
        self._runs = 0  # runs on the ranks now running
        self.restarts = 0  # how many times a failure made the pool start new ranks
        self._procs: list = []
        self._task_id = 0
        self._dir = tempfile.mkdtemp(prefix=f"rankpool{world_size}_")

    def _stack_path(self, rank: int) -> str:
        return os.path.join(self._dir, f"rank{rank}.stack")

    def _start(self) -> None:
        ctx = context()
        self._results = ctx.Queue()
        self._tasks = [ctx.Queue() for _ in range(self.world_size)]
        self._procs = start_ranks(_pool_rank_main, [(r, self.world_size, self._tasks[r], self._results,
                                                     self._stack_path(r)) for r in range(self.world_size)], daemon=True,
                                   preload=self.preload)

    def _stop(self) -> None:
        for p in self._procs:
            if p.is_alive():
                p.kill()
            p.join(timeout=5.0)
        self._procs = []

    def close(self) -> None:
        """Stop the ranks (killed: between runs they hold no group and no file; they are daemons
        too, so they also end with the process that started them)."""
        self._stop()
        shutil.rmtree(self._dir, ignore_errors=True)

    def _stacks(self, ranks: list) -> dict:
        """The Python stacks of the ranks still running a task (faulthandler, on _STACK_SIGNAL)."""
        out = {}
        for r in ranks:
            p = self._procs[r]
            if not p.is_alive():
                out[r] = f"exited with code {p.exitcode} without reporting"
                continue
            os.kill(p.pid, _STACK_SIGNAL)
        time.sleep(0.5)
        for r in ranks:
            if r not in out:
                with open(self._stack_path(r)) as f:
                    out[r] = "no report; its Python stack:\n" + f.read()
        return out

    def run(self, fn: Callable[..., Any], *args, backend: str = "gloo", timeout_s: float = 60.0,
            local_world_size: Optional[int] = None, join_timeout_s: Optional[float] = None,
            debug_collectives: bool = False) -> list:
        """fn(*args) on every rank of the pool; the per-rank results in rank order. The keywords
        are simulate's; a failure raises RuntimeError, a run past join_timeout_s TimeoutError."""
        lws = _check_world(self.world_size, local_world_size)
        renew = bool(self._procs) and self.renew_every is not None and self._runs >= self.renew_every
        if renew or not self._procs or not all(p.is_alive() for p in self._procs):
            self.renewals += renew
            self._stop()
            self._start()
            self._runs = 0
        self._runs += 1
        for r in range(self.world_size):  # a fresh stack file per run
            open(self._stack_path(r), "w").close()
        payload = pickle.dumps((fn, args))  # plain pickle: tensors by value (see _rank_main)
        store = serve_store(timeout_s)  # this run's rendezvous, held until every rank reported
        self._task_id += 1
        task = (self._task_id, list(sys.path), store.port, backend, timeout_s, lws, debug_collectives, payload)
        for q in self._tasks:
            q.put(task)
        deadline = time.monotonic() + (join_timeout_s if join_timeout_s is not None else 4 * timeout_s + 30)
        got, first_failed, _ = wait_reports(self._results, self._procs, deadline, task=self._task_id)
        got = {r: (ok, pickle.loads(out) if ok else out) for r, (ok, out) in got.items()}
        del store
        if len(got) == self.world_size and all(ok for ok, _ in got.values()):
            return [got[r][1] for r in range(self.world_size)]
        reports = {r: out for r, (ok, out) in got.items() if not ok}
        reports.update(self._stacks([r for r in range(self.world_size) if r not in got]))
        self.restarts += 1
        self._stop()  # the next run starts fresh ranks
        text = "\n".join(f"--- rank {r}: {reports[r]}" for r in sorted(reports))
        if first_failed is not None:
            raise RuntimeError(f"RankPool: rank {first_failed} of {self.world_size} failed:\n{text}")
        missing = sorted(set(range(self.world_size)) - set(got))
        raise TimeoutError(f"RankPool: ranks {missing} of {self.world_size} did not finish in time:\n{text}")


def run_script(nprocs: int, script: str, script_args: Sequence[str] = ()) -> int:
    """Run `python script *script_args` as `nprocs` ranks on this machine, as torchrun --standalone
    would (interpreters running a script, not Python functions: the one launcher not started by
    spawn.start_ranks, but with its store and rank_env), with nothing listening outside it: the store is served here on 127.0.0.1
    (serve_store; torchrun's binds every interface) and the ranks' gloo/NCCL sockets use loopback.
    Each rank's `init_process_group()` (env://) joins the store. Processes are started and watched
    by torch.distributed.elastic (torchrun's own launcher): one failing stops the others. Returns
    0, or the exit code of the first rank that failed."""
    from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs, SignalException, start_processes

    if nprocs < 1:
        raise ValueError(f"run_script: nprocs must be >= 1, got {nprocs}")
    store = serve_store(timeout_s=1800)
    log_dir = tempfile.mkdtemp(prefix="moesys-simulate-")  # mode 0700; only error files land here
    pc = start_processes(name="moesys-simulate", entrypoint=sys.executable,
                         args={r: (script, *script_args) for r in range(nprocs)},
                         envs={r: rank_env(r, nprocs, store.port) for r in range(nprocs)},
                         logs_specs=DefaultLogsSpecs(log_dir=log_dir))
    try:
        result = pc.wait(period=0.2)
    except SignalException as e:  # SIGTERM/SIGINT to this process: pass it on, then stop
        pc.close(e.sigval, timeout=30)
        return 128 + int(e.sigval)
    finally:
        pc.close()
        shutil.rmtree(log_dir, ignore_errors=True)
    if result is None or not result.is_failed():
        return 0
    first = min(result.failures.values(), key=lambda f: f.timestamp)
    print(f"simulate: rank {first.local_rank} of {nprocs} failed with exit code {first.exitcode}", file=sys.stderr)
    return first.exitcode if first.exitcode > 0 else 128 - first.exitcode


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) < 2 or not args[0].isdigit() or int(args[0]) < 1:
        print("usage: python -m moesys.parallel.simulate N script.py [script args...]  (N >= 1)", file=sys.stderr)
        return 2
    return run_script(int(args[0]), args[1], args[2:])


if __name__ == "__main__":
    sys.exit(main())
