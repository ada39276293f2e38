"""Starting ranks on this machine: the one place moesys makes rank processes, and what each is given.

    store = serve_store(timeout_s)                          # the rendezvous, on 127.0.0.1 only
    procs = start_ranks(entry, [args_of_rank0, ...], daemon=True)   # spawn; entry(*args) per rank
    os.environ.update(rank_env(rank, world, store.port))    # in a rank: env:// joins that store
    join_job(rank, world, port, backend, timeout_s)         # ... and its default process group

Every launcher of local ranks is a thin use of this module: `simulate` (one call's ranks),
`RankPool` (ranks kept across calls) and `run_ranks` (moesys.supervise: the trainer's ranks, with
signal forwarding and fault files) start their processes with `start_ranks` (spawn context, one
intra-op thread, optionally tied to the parent's life: `die_with_parent`), give them `rank_env`, serve
their store with `serve_store`, and, where ranks report through a queue (simulate, RankPool), wait
for the reports with `wait_reports`. What stays in each launcher is its own policy: how results
come back (a queue, or supervise's private files), what a failure raises, and whether ranks are
reused. `run_script` (python -m moesys.parallel.simulate N script.py) starts `python script.py`
interpreters, not Python functions, so it keeps torch elastic's process launcher (torchrun's own),
with this module's store and environment.

Nothing listens outside the machine: the store is bound to 127.0.0.1 (serve_store) and gloo's and
NCCL's sockets use the loopback interface (loopback_env).
"""
from __future__ import annotations

import ctypes
import datetime
import os
import queue as queue_mod
import signal
import socket
import sys
import threading
import time
import weakref
from multiprocessing import reduction as mp_reduction
from typing import Any, Callable, Optional, Sequence

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

_PR_SET_PDEATHSIG = 1  # linux/prctl.h

# what the ranks' env:// rendezvous reads to join a store the launcher serves (torchrun's agent store)
AGENT_STORE_ENV = {"TORCHELASTIC_USE_AGENT_STORE": "True"}

# after the first failure, how long the peers get to report their side (usually a timeout naming
# the collective the failed rank never reached)
GRACE_S = 5.0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_store(timeout_s: float) -> "dist.TCPStore":
    """A TCPStore served by this (launching) process on 127.0.0.1, on a port the OS picks and keeps
    bound, for ranks that join it as clients (AGENT_STORE_ENV, as under torchrun's agent).

    Loopback only: the store has no authentication, and a TCPStore server binds every interface
    whatever host it is given, so the listening socket is made here, bound to 127.0.0.1, and handed
    over (master_listen_fd). A port picked free and then released for rank 0 to bind could be taken
    in between by another process: rank 0 then died with EADDRINUSE (seen in CI with tests running
    side by side)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.bind(("127.0.0.1", 0))
        sock.listen(socket.SOMAXCONN)
        store = dist.TCPStore("127.0.0.1", sock.getsockname()[1], is_master=True, wait_for_workers=False,
                              timeout=datetime.timedelta(seconds=timeout_s), master_listen_fd=sock.fileno())
    except BaseException:
        sock.close()
        raise
    sock.detach()  # the store owns the descriptor now (it closes it with the server)
    return store


def loopback_interface() -> str:
    """The name of this machine's loopback interface ('lo' on Linux, 'lo0' on macOS)."""
    names = [name for _, name in socket.if_nameindex()]
    for want in ("lo", "lo0"):
        if want in names:
            return want
    raise RuntimeError(f"no loopback interface (lo or lo0) among this machine's interfaces {names}")


def loopback_env() -> dict:
    """Environment for ranks that never leave this machine: gloo's pairs and NCCL's bootstrap listen
    on the loopback interface. Without it gloo binds the address this machine's hostname resolves
    to (often its LAN address). torch reads GLOO_SOCKET_IFNAME each time it builds a gloo group
    (the mesh's subgroups too); init_process_group takes no gloo device option."""
    lo = loopback_interface()
    return {"GLOO_SOCKET_IFNAME": lo, "NCCL_SOCKET_IFNAME": lo}


def rank_env(rank: int, world_size: int, port: int, local_world_size: Optional[int] = None) -> dict:
    """The environment of rank `rank` of a local job whose store listens on 127.0.0.1:`port`: what
    env:// rendezvous (init_process_group with no arguments) and torchrun-style code read, with
    the loopback sockets. local_world_size: ranks per simulated node (default all on one)."""
    lws = world_size if local_world_size is None else local_world_size
    return {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank), "WORLD_SIZE": str(world_size),
            "LOCAL_RANK": str(rank % lws), "LOCAL_WORLD_SIZE": str(lws), **AGENT_STORE_ENV, **loopback_env()}


def join_job(rank: int, world_size: int, port: int, backend: str, timeout_s: float,
             local_world_size: Optional[int] = None, debug_collectives: bool = False) -> None:
    """In a rank: take its rank_env and initialise the default process group through the parent's
    store, with a timeout (a dead peer surfaces as an error, not a hang). debug_collectives:
    fingerprint-check every collective (a mismatch raises, naming both ranks' ops).

    Ends with a barrier: gloo's full-mesh handshake can end on one rank before its peer, and a rank
    that then finished its job and closed its sockets at once made the peer's init fail ("Connection
    closed by peer"). No rank leaves before every rank's group is built. (NCCL builds its
    communicators at the first collective, so it has no such race and no barrier here.)"""
    os.environ.update(rank_env(rank, world_size, port, local_world_size))
    if debug_collectives:
        dist.set_debug_level(dist.DebugLevel.DETAIL)
    dist.init_process_group(backend, rank=rank, world_size=world_size, timeout=datetime.timedelta(seconds=timeout_s))
    if backend == "gloo":
        dist.barrier()


def die_with_parent(parent_pid: int) -> None:
    """Make this process die (SIGKILL) when its parent does. Call first thing in a child."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    else:
        def watch() -> None:
            while os.getppid() == parent_pid:
                time.sleep(0.5)
            os.kill(os.getpid(), signal.SIGKILL)

        threading.Thread(target=watch, name="moesys-parent-watch", daemon=True).start()
    if os.getppid() != parent_pid:  # the parent died before the request was in place
        os.kill(os.getpid(), signal.SIGKILL)


def context():
    """The multiprocessing context every rank is started in ("spawn": a fresh interpreter, no
    forked copy of the parent's threads or CUDA state). Queues the ranks report on come from it."""
    return mp.get_context("spawn")


def forkserver_available() -> bool:
    """Whether ranks can be forked from a preloaded server on this platform (Linux, macOS)."""
    return "forkserver" in mp.get_all_start_methods()


# what the preloaded server's modules read when they are imported, so a rank forked from it cannot
# take another value from its launcher (triton decorates its own kernels then)
IMPORT_TIME_ENV = ("TRITON_INTERPRET",)


class _FromLauncher:
    """What a rank forked from the preloaded server takes from its launcher rather than from the
    server: the environment of now (the server keeps the one it started with), stdout and stderr (a
    spawned rank inherits both), and, when it is tied to the launcher's life, the read end of a pipe
    only the launcher writes to. Unpickled first among the rank's arguments, so all of it is in place
    before the target's module is imported; the working directory and sys.path come with
    multiprocessing's preparation data, as for a spawned rank."""

    def __init__(self, tie_fd: Optional[int]):
        self.env, self.tie_fd = dict(os.environ), tie_fd

    def __reduce__(self):  # pickled while the process starts: DupFd sends the descriptors along
        tie = None if self.tie_fd is None else mp_reduction.DupFd(self.tie_fd)
        return _FromLauncher._apply, (self.env, mp_reduction.DupFd(1), mp_reduction.DupFd(2), tie)

    @staticmethod
    def _apply(env: dict, out, err, tie) -> str:
        for key in IMPORT_TIME_ENV:
            if os.environ.get(key) != env.get(key):
                raise RuntimeError(
                    f"this rank was forked from a server started with {key}={os.environ.get(key)!r}, read when "
                    f"its modules were imported, and its launcher has {key}={env.get(key)!r}; start the ranks "
                    "fresh (parallel.rank_start=spawn)")
        if tie is not None:
            _die_with_launcher(tie.detach())
        os.environ.clear()
        os.environ.update(env)
        for src, fd in ((out, 1), (err, 2)):
            got = src.detach()
            os.dup2(got, fd)
            os.close(got)
        return "forked"


def _die_with_launcher(read_fd: int) -> None:
    """In a forked rank: SIGKILL this process when the launcher's end of the pipe closes, i.e. when
    the launcher is gone, killed included (at once if it already is). Its OS parent is the server,
    which outlives the launcher while ranks hold its `alive` descriptor, so die_with_parent's
    PR_SET_PDEATHSIG cannot tell."""
    def watch() -> None:
        while True:
            try:
                if os.read(read_fd, 1) == b"":
                    break
            except InterruptedError:
                continue
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, name="moesys-launcher-watch", daemon=True).start()


def _rank_entry(how: Optional[str], parent_pid: Optional[int], threads: Optional[int], target: Callable,
                args: tuple) -> None:
    """Every rank's first frame: tie its life to the parent's (when asked), then run target(*args).
    how: "forked" for a rank forked from the preloaded server (start_ranks' `preload`; tied to the
    launcher already, by _FromLauncher), None for a spawned one."""
    if parent_pid is not None and how != "forked":
        die_with_parent(parent_pid)
    if threads is not None:
        torch.set_num_threads(threads)  # the ranks share the machine's cores
    target(*args)


def start_ranks(target: Callable, rank_args: Sequence[tuple], *, daemon: bool, tie_to_parent: bool = False,
                threads: Optional[int] = 1, name: Optional[str] = None, started: Optional[list] = None,
                preload: Sequence[str] = ()) -> list:
    """Start one process per entry of `rank_args` (rank r runs target(*rank_args[r])); returns them,
    started, in rank order.

    target and the arguments must be picklable (a module-level function). Ranks are spawned (a fresh
    interpreter each), or with `preload` (module names) forked from multiprocessing's forkserver,
    which imports those modules once (the first call starts it; it ends with this process): a rank
    then starts in a fraction of a second instead of paying the interpreter's start and torch's
    import (seconds of CPU each). It gets this process's environment, working directory, sys.path,
    stdout and stderr as a spawned rank does (_FromLauncher); only what the preloaded modules read
    at their import (IMPORT_TIME_ENV) comes from the server's start.
    daemon: multiprocessing ends the ranks when this process exits normally (simulate, RankPool).
    tie_to_parent: each rank also dies (SIGKILL) when this process dies in any way, killed
    included (`die_with_parent`; the trainer's ranks must never train on as orphans). threads: the
    rank's intra-op threads (None: torch's default). name: process names, `{name}{rank}`.
    started: a list each process joins as soon as it runs (a signal handler that forwards to the
    ranks then reaches those already started; run_ranks). If a start fails, the ranks already
    started are killed and the error raised."""
    parent = os.getpid() if tie_to_parent else None
    tie_r = None
    if preload:
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(list(preload))  # no effect on a server already running
        if tie_to_parent:  # the ranks read, this process holds the write end until they are gone
            tie_r, tie_w = os.pipe()
        how = _FromLauncher(tie_r)
    else:
        ctx, how = context(), None
    procs = [ctx.Process(target=_rank_entry, args=(how, parent, threads, target, tuple(args)), daemon=daemon,
                         name=None if name is None else f"{name}{r}")
             for r, args in enumerate(rank_args)]
    if tie_r is not None:
        end = _LauncherEnd(tie_w)
        for p in procs:
            p.launcher_end = end  # closed when the last of these process objects is collected
    running = [] if started is None else started
    try:
        for p in procs:
            p.start()
            running.append(p)
    except BaseException:  # none left running half a job
        for p in procs:
            if p.pid is not None and p.exitcode is None:
                p.kill()
                p.join(timeout=5.0)
        raise
    finally:
        if tie_r is not None:
            os.close(tie_r)  # the ranks have their copies (sent at their start)
    return procs


class _LauncherEnd:
    """The write end of the pipe forked ranks watch (_die_with_launcher), open while any of their
    process objects is alive in the launcher, and closed by the kernel if the launcher dies."""

    def __init__(self, fd: int):
        weakref.finalize(self, os.close, fd)


def wait_reports(results, procs: Sequence, deadline: float, *, task: Any = None,
                 dead: Callable[[Any], bool] = lambda p: not p.is_alive()) -> tuple:
    """Wait until every rank has put its report on `results` or `deadline` (time.monotonic) passes.

    A report is (rank, ok, payload), or (task, rank, ok, payload) when `task` is given (a report of
    another task is an error). After the first failed report, or the first rank found dead (`dead`:
    by default, no longer running) without a report, the peers get GRACE_S more to report theirs.
    Returns (got: rank -> (ok, payload), first_failed: the rank that failed or died first, or None,
    died: the ranks found dead without a report, in the order found)."""
    world = len(procs)
    got: dict = {}
    first_failed: Optional[int] = None
    died: list = []
    while len(got) < world:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        try:
            report = results.get(timeout=min(max(left, 0.01), 1.0))
        except queue_mod.Empty:
            for r, p in enumerate(procs):
                if r not in got and r not in died and dead(p):
                    died.append(r)
                    if first_failed is None:
                        first_failed = r
                        deadline = min(deadline, time.monotonic() + GRACE_S)
            continue
        if task is not None:
            task_id, *report = report
            if task_id != task:  # cannot happen (a failed pool run restarts its ranks): say so if it does
                raise RuntimeError(f"rank {report[0]} reported task {task_id} during task {task}")
        rank, ok, payload = report
        got[rank] = (ok, payload)
        if not ok and first_failed is None:
            first_failed = rank
            deadline = min(deadline, time.monotonic() + GRACE_S)
    return got, first_failed, died
