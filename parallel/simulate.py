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
"""
from __future__ import annotations

import datetime
import os
import pickle
import queue as queue_mod
import shutil
import socket
import sys
import tempfile
import time
import traceback
from typing import Any, Callable, Optional, Sequence

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# what the ranks' env:// rendezvous reads to join a store the launcher serves (torchrun's agent store)
AGENT_STORE_ENV = {"TORCHELASTIC_USE_AGENT_STORE": "True"}


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


def _rank_main(rank, world_size, port, backend, timeout_s, local_world_size, debug_collectives, fn, args, results):
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank % local_world_size), LOCAL_WORLD_SIZE=str(local_world_size), **AGENT_STORE_ENV, **loopback_env(),
    )
    torch.set_num_threads(1)  # N ranks share the machine's cores
    try:
        if debug_collectives:  # fingerprint-check every collective: a mismatch raises, naming both ranks' ops
            dist.set_debug_level(dist.DebugLevel.DETAIL)
        dist.init_process_group(backend, rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(seconds=timeout_s))
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
             debug_collectives: bool = False) -> list:
    """Run fn(*args) on `world_size` gloo ranks; return the per-rank results in rank order.

    Args:
        timeout_s: the process-group timeout of every collective.
        local_world_size: ranks per simulated node (LOCAL_WORLD_SIZE); default all on one node.
        join_timeout_s: how long to wait for all ranks (default 4 x timeout_s).
        debug_collectives: check each collective's fingerprint (op, shapes) across ranks first
            (torch.distributed's DETAIL debug level), so a mismatch is a clear error, not a gloo abort.
    """
    if world_size < 1:
        raise ValueError(f"simulate: world_size must be >= 1, got {world_size}")
    lws = world_size if local_world_size is None else local_world_size
    if lws < 1 or world_size % lws != 0:
        raise ValueError(f"simulate: local_world_size ({lws}) must divide world_size ({world_size})")
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    store = serve_store(timeout_s)  # held until the ranks are done (see serve_store)
    port = store.port
    procs = [
        ctx.Process(target=_rank_main, args=(r, world_size, port, backend, timeout_s, lws, debug_collectives, fn, args, results),
                    daemon=True)
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    deadline = time.monotonic() + (join_timeout_s if join_timeout_s is not None else 4 * timeout_s + 30)
    got: dict[int, tuple] = {}
    failure = None
    try:
        while len(got) < world_size:
            left = deadline - time.monotonic()
            if left <= 0:
                missing = sorted(set(range(world_size)) - set(got))
                raise TimeoutError(f"simulate: ranks {missing} of {world_size} did not finish in time")
            try:
                rank, ok, out = results.get(timeout=min(left, 1.0))
            except queue_mod.Empty:
                dead = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0) and r not in got]
                if dead:
                    raise RuntimeError(
                        f"simulate: rank {dead[0]} died with exit code {procs[dead[0]].exitcode} without reporting"
                    )
                continue
            got[rank] = (ok, pickle.loads(out) if ok else out)
            if not ok and failure is None:
                failure = (rank, out)
                # give the peers a moment to report their side (usually a timeout naming the collective)
                deadline = min(deadline, time.monotonic() + 5.0)
        if failure is not None:
            raise RuntimeError(f"simulate: rank {failure[0]} of {world_size} failed:\n{failure[1]}")
        return [got[r][1] for r in range(world_size)]
    except TimeoutError:
        if failure is not None:
            raise RuntimeError(f"simulate: rank {failure[0]} of {world_size} failed:\n{failure[1]}") from None
        raise
    finally:
        for p in procs:
            p.join(timeout=2.0)
            if p.is_alive():
                p.terminate()
                p.join(timeout=2.0)


def run_script(nprocs: int, script: str, script_args: Sequence[str] = ()) -> int:
    """Run `python script *script_args` as `nprocs` ranks on this machine, as torchrun --standalone
    would, but with nothing listening outside it: the store is served here on 127.0.0.1
    (serve_store; torchrun's binds every interface) and the ranks' gloo/NCCL sockets use loopback.
    Each rank's `init_process_group()` (env://) joins the store. Processes are started and watched
    by torch.distributed.elastic (torchrun's own launcher): one failing stops the others. Returns
    0, or the exit code of the first rank that failed."""
    from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs, SignalException, start_processes

    if nprocs < 1:
        raise ValueError(f"run_script: nprocs must be >= 1, got {nprocs}")
    store = serve_store(timeout_s=1800)
    common = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(store.port), "WORLD_SIZE": str(nprocs),
              "LOCAL_WORLD_SIZE": str(nprocs), **AGENT_STORE_ENV, **loopback_env()}
    log_dir = tempfile.mkdtemp(prefix="moesys-simulate-")  # mode 0700; only error files land here
    pc = start_processes(name="moesys-simulate", entrypoint=sys.executable,
                         args={r: (script, *script_args) for r in range(nprocs)},
                         envs={r: {**common, "RANK": str(r), "LOCAL_RANK": str(r)} for r in range(nprocs)},
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
