"""The parent of simulated ranks: start them, forward stop signals, and take the job down when one dies.

`moesys-train parallel.simulate_ranks=N` runs N local ranks as child processes (spawn). This
module is the parent's side (torchrun's elastic agent plays the same part under torchrun):

- **Signals.** SIGINT, SIGTERM and SIGUSR1 sent to the parent are forwarded to every rank, which
  stop together at the next step boundary (moesys.preemption). A second SIGINT kills the ranks at
  once (no checkpoint) and raises KeyboardInterrupt.
- **No orphans.** Each rank asks the kernel to SIGKILL it when the parent dies (Linux
  `prctl(PR_SET_PDEATHSIG)`; elsewhere a thread watching the parent's pid), so a killed parent
  leaves no rank training on. The ranks are started by moesys.parallel.spawn (`start_ranks`, the
  one process starter, with `tie_to_parent`); this module adds the supervision above.
- **A rank that dies takes the job down** with a message naming the rank, how it ended (exit code
  or signal) and its error: each rank writes its exception (type, message, traceback, time) to a
  per-rank error file, and its native stack to another (faulthandler: SIGABRT, SIGSEGV). The
  parent kills the other ranks at once with SIGKILL: they may be blocked in a collective, and
  waiting for its timeout (parallel.timeout_s) helps nobody. The first rank to fail is named;
  the others usually failed because it did.
- **Private files.** The error, fault and result files (results are pickles the parent loads) live
  in a directory only this user can open (mode 0700, tempfile.mkdtemp), checked before every read
  and removed at the end; nothing is read from anywhere else.
"""
from __future__ import annotations

import faulthandler
import json
import os
import pickle
import shutil
import signal
import stat
import tempfile
import threading
import time
import traceback
from multiprocessing.connection import wait
from typing import Any, Callable, List, Optional, Sequence

from moesys.parallel.spawn import die_with_parent, start_ranks

from .preemption import STOP_SIGNALS

__all__ = ["RankFailedError", "check_private", "die_with_parent", "run_ranks"]


class RankFailedError(RuntimeError):
    """A rank ended with an error or was killed; the message names the rank and its error.

    Attributes: rank, exitcode (negative: killed by signal -exitcode), error (the rank's exception
    text, or None when it left none), stopped_by.
    """

    def __init__(self, message: str, *, rank: int, exitcode: Optional[int], error: Optional[str],
                 stopped_by: Optional[int] = None):
        super().__init__(message)
        self.rank, self.exitcode, self.error = rank, exitcode, error
        # the stop signal this process forwarded, when the rank died of it before it could handle
        # it (still starting): a stop, not a fault
        self.stopped_by = stopped_by


def check_private(workdir: str) -> None:
    """Raise PermissionError unless `workdir` is a real directory of this user that no one else can
    open (mode 0700): the files in it are loaded with pickle."""
    st = os.lstat(workdir)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or stat.S_IMODE(st.st_mode) & 0o077:
        raise PermissionError(f"{workdir} is not a private directory of this user (mode "
                              f"{stat.S_IMODE(st.st_mode):o}, owner uid {st.st_uid}, this user {os.getuid()}): "
                              "the ranks' result files are not read from it")


def _error_file(workdir: str, rank: int) -> str:
    return os.path.join(workdir, f"rank{rank}.error.json")


def _fault_file(workdir: str, rank: int) -> str:
    return os.path.join(workdir, f"rank{rank}.fault.txt")


def _result_file(workdir: str, rank: int) -> str:
    return os.path.join(workdir, f"rank{rank}.result.pkl")


def _child(rank: int, workdir: str, target: Callable, args: tuple) -> None:
    """A rank's body (started by moesys.parallel.spawn.start_ranks, tied to this process's life): run
    target(rank, *args), write its result or its error."""
    fault = open(_fault_file(workdir, rank), "w")
    faulthandler.enable(file=fault, all_threads=True)  # native crashes (SIGABRT from a collective, SIGSEGV)
    try:
        result = target(rank, *args)
    except BaseException as e:  # recorded for the parent, then re-raised: the rank still fails
        with open(_error_file(workdir, rank) + ".tmp", "w") as f:
            json.dump({"rank": rank, "time": time.time(), "type": type(e).__name__, "message": str(e),
                       "traceback": traceback.format_exc()}, f)
        os.replace(_error_file(workdir, rank) + ".tmp", _error_file(workdir, rank))
        raise
    if result is not None:
        with open(_result_file(workdir, rank), "wb") as f:
            pickle.dump(result, f)


EXIT_GRACE_S = 10.0  # how long a failed rank that recorded its error may take to exit before it is killed


def _signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def _describe(workdir: str, rank: int, world: int, exitcode: Optional[int]) -> RankFailedError:
    error = None
    path = _error_file(workdir, rank)
    if os.path.isfile(path):
        with open(path) as f:
            rec = json.load(f)
        error = f"{rec['type']}: {rec['message']}".strip()
        tb = rec["traceback"].rstrip().splitlines()
        detail = f"rank {rank} of {world} failed (exit code {exitcode}): {error}\n" + "\n".join(tb[-12:])
    elif exitcode is not None and exitcode < 0:
        how = f"rank {rank} of {world} was killed by {_signal_name(-exitcode)}"
        stack = ""
        if os.path.isfile(_fault_file(workdir, rank)):
            with open(_fault_file(workdir, rank)) as f:
                stack = f.read().strip()
        if stack:
            detail = f"{how}; its stack:\n" + "\n".join(stack.splitlines()[:30])
        else:
            detail = f"{how} (no Python error: killed from outside, e.g. `kill -9` or the out-of-memory killer)"
    else:
        detail = (f"rank {rank} of {world} exited with code {exitcode} before its error could be recorded "
                  "(while starting: see its output above)")
    return RankFailedError(detail + "\nthe other ranks were stopped", rank=rank, exitcode=exitcode, error=error)


def _first_failure(workdir: str, failed: Sequence[tuple]) -> tuple:
    """Of the ranks found dead in one look, the one that failed first: a rank killed by a signal
    (it left no error file; its peers' errors are most likely about its absence), else the earliest
    error file."""
    def key(item):
        rank, code = item
        path = _error_file(workdir, rank)
        if not os.path.isfile(path):
            return (0, 0.0, rank)
        with open(path) as f:
            return (1, float(json.load(f)["time"]), rank)

    return min(failed, key=key)


def run_ranks(target: Callable, world: int, args: tuple = (), *, poll_s: float = 1.0,
              preload: Sequence[str] = ()) -> List[Any]:
    """Run `target(rank, *args)` in `world` spawned processes; return their results by rank.
    preload: fork them from a server that imported these modules once instead (spawn.start_ranks).

    `target` and `args` must be picklable (module-level). Raises RankFailedError for the first rank
    that fails (the others are killed). While it runs, this process's SIGINT/SIGTERM/SIGUSR1
    handlers forward the signal to the ranks (main thread only; restored on return).
    """
    workdir = tempfile.mkdtemp(prefix="moesys-ranks-")  # mode 0700: the ranks' files are private
    check_private(workdir)
    procs: List[Any] = []
    sigints = [0]
    forwarded: List[int] = []  # stop signals passed on to the ranks

    def kill_all() -> None:
        for p in procs:
            if p.pid is not None and p.exitcode is None:
                try:
                    os.kill(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass

    reached: List[int] = []  # per forwarded signal, how many ranks had started to get it

    def send(signum: int, ranks) -> None:
        for p in ranks:
            if p.pid is not None:
                try:
                    os.kill(p.pid, signum)
                except ProcessLookupError:
                    pass

    def forward(signum, frame) -> None:  # os.kill only: no I/O here
        if signum == signal.SIGINT:
            sigints[0] += 1
        forwarded.append(signum)
        reached.append(len(procs))
        send(signal.SIGKILL if sigints[0] > 1 else signum, procs)

    previous = {}
    if threading.current_thread() is threading.main_thread():
        previous = {s: signal.signal(s, forward) for s in STOP_SIGNALS}
    try:
        # each rank joins `procs` as it starts, so a signal during the start reaches those running
        start_ranks(_child, [(rank, workdir, target, args) for rank in range(world)], daemon=False,
                    tie_to_parent=True, threads=None, name="moesys-rank", started=procs, preload=preload)
        # a signal that came while the ranks started (a forked rank's start waits for the server's
        # imports, seconds the first time) reached only those already running: the rest get it now
        for i, signum in enumerate(forwarded[:]):
            send(signal.SIGKILL if sigints[0] > 1 else signum, procs[reached[i]:])
        while True:  # the checks run once more after the last rank ended (they may all end at once)
            running = [p.sentinel for p in procs if p.exitcode is None]
            if running:
                wait(running, timeout=poll_s)
            if sigints[0] > 1:
                kill_all()
                for p in procs:
                    p.join()
                raise KeyboardInterrupt("a second SIGINT: the ranks were killed without a checkpoint")
            failed = [(r, p.exitcode) for r, p in enumerate(procs) if p.exitcode not in (None, 0)]
            if failed:
                # A rank that recorded its error may still be exiting while a peer that failed because of
                # it has ended: let such ranks finish (briefly) so the first failure is the one named.
                grace = time.monotonic() + EXIT_GRACE_S
                while time.monotonic() < grace and any(
                        p.exitcode is None and os.path.isfile(_error_file(workdir, r)) for r, p in enumerate(procs)):
                    time.sleep(0.02)
                failed = [(r, p.exitcode) for r, p in enumerate(procs) if p.exitcode not in (None, 0)]
                kill_all()  # do not wait for the survivors' collective timeouts
                for p in procs:
                    p.join()
                check_private(workdir)
                rank, code = _first_failure(workdir, failed)
                if code is not None and -code in forwarded and not os.path.isfile(_error_file(workdir, rank)):
                    raise RankFailedError(f"the ranks were stopped by {_signal_name(-code)} while starting, before "
                                          "their first step", rank=rank, exitcode=code, error=None,
                                          stopped_by=-code)
                raise _describe(workdir, rank, world, code)
            if not running:
                break
        results = []
        check_private(workdir)
        for rank in range(world):
            path = _result_file(workdir, rank)
            if os.path.isfile(path):
                with open(path, "rb") as f:
                    results.append(pickle.load(f))
            else:
                results.append(None)
        return results
    finally:
        kill_all()
        for p in procs:
            p.join()
        for s, h in previous.items():
            signal.signal(s, h)
        shutil.rmtree(workdir, ignore_errors=True)
