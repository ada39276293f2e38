"""Session-wide test set-up: Triton's interpreter flag at import time.

`@triton.jit` reads TRITON_INTERPRET when it decorates a function, and that includes Triton's own
helpers (`tl.zeros` and the rest of `triton.language.standard`), decorated when `triton` is first
imported. `moesys.kernels.backend` imports triton to probe for it, so whichever conftest or test
module first imports moesys fixes, for the whole session, whether the interpreter can run the
kernels: a helper decorated without it fails inside an interpreted kernel with "Cannot call
@triton.jit'd outside of the scope of a kernel". This file is loaded before every other conftest
and test module, so the flag is set here, during collection only. Afterwards the previous value is
back: the backend resolver reads the flag per call (forcing "triton" on CPU is an error without
it), and tests/kernels/conftest.py sets it again around each test that runs the kernels.
"""
from __future__ import annotations

import datetime
import multiprocessing
import multiprocessing.forkserver
import os
import runpy
import subprocess

import pytest

_BEFORE = os.environ.get("TRITON_INTERPRET")
os.environ["TRITON_INTERPRET"] = "1"

from moesys.parallel.simulate import RankPool  # noqa: E402  (imports triton: after the flag is set)
from moesys.parallel.spawn import IMPORT_TIME_ENV  # noqa: E402


def pytest_collection_modifyitems(config, items):
    """Stress tests (repetition loops at their full counts) run only when the marker expression
    names them (`pytest -m stress`); otherwise they are deselected, not skipped."""
    if "stress" in (config.option.markexpr or ""):
        return
    stress = [item for item in items if item.get_closest_marker("stress") is not None]
    if stress:
        config.hook.pytest_deselected(items=stress)
        items[:] = [item for item in items if item.get_closest_marker("stress") is None]


def pytest_collection_finish(session):
    if _BEFORE is None:
        os.environ.pop("TRITON_INTERPRET", None)
    else:
        os.environ["TRITON_INTERPRET"] = _BEFORE


@pytest.fixture
def world1(monkeypatch):
    """A one-rank gloo process group in this process (tests in every folder use it); its store and
    gloo's sockets on loopback only."""
    import torch.distributed as dist

    from moesys.parallel.simulate import loopback_env, serve_store

    for k, v in loopback_env().items():
        monkeypatch.setenv(k, v)
    store = serve_store(timeout_s=60)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1, timeout=datetime.timedelta(seconds=60))
    yield
    dist.destroy_process_group()


# runs before a pool starts new ranks (RankPool.renew_every: what runs leak, gloo threads, stays bounded)
POOL_RENEW_EVERY = 24


class RankPools:
    """`simulate` on ranks kept for the whole pytest run, one RankPool per world size, started by
    the first test that asks for that size: `rank_pool.run(fn, world_size, *args, **simulate_kw)`.
    A failing or hanging test restarts only its pool, after reporting every rank's traceback."""

    def __init__(self):
        self.pools: dict[int, RankPool] = {}

    def run(self, fn, world_size: int, *args, **kw) -> list:
        pool = self.pools.get(world_size)
        if pool is None:
            pool = self.pools[world_size] = RankPool(world_size, preload=FORKED_PRELOAD, renew_every=POOL_RENEW_EVERY)
        return pool.run(fn, *args, **kw)

    def close(self) -> None:
        for pool in self.pools.values():
            pool.close()


@pytest.fixture(scope="session")
def rank_pool():
    """Pools of gloo ranks for multi-rank tests whose subject is not process start-up or exit
    (those keep `simulate`, one fresh spawn per call). The ranks, and those of a pool's restart,
    are forked from the session's forkserver (_forkserver)."""
    pools = RankPools()
    yield pools
    pools.close()


# What the forkserver of `forked` imports once: the console scripts' modules (torch, Hydra and
# moesys with them).
FORKED_PRELOAD = ["moesys.train", "moesys.evaluate", "moesys.generate", "moesys.convert", "torch._dynamo"]
_FORKED_BODY = os.path.join(os.path.dirname(os.path.abspath(__file__)), "forked_command.py")


class Forked:
    """`run(script, argv, cwd, env, timeout)`: the script run as `python script argv...` would run
    it, as a process of its own (its own state, exit code, stdout and stderr; a CompletedProcess),
    but forked from a server that has already imported FORKED_PRELOAD instead of starting an
    interpreter and importing torch and moesys again (~4 s of CPU a command on the 2-core machine).
    The ranks the command forks come from the same server (tests/forked_command.py). `env` less
    what the server's modules read at their import (IMPORT_TIME_ENV: TRITON_INTERPRET), which a
    forked command cannot take another value of."""

    def __init__(self, tmp):
        self.ctx = multiprocessing.get_context("forkserver")
        self.tmp = tmp
        self.n = 0

    def run(self, script: str, argv: list, cwd, env: dict, timeout: float) -> subprocess.CompletedProcess:
        self.n += 1
        out, err = (os.path.join(self.tmp, f"{self.n}.{s}") for s in ("out", "err"))
        env = {k: v for k, v in env.items() if k not in IMPORT_TIME_ENV}
        glob = {"CWD": str(cwd), "ENV": env, "ARGV": [script, *argv], "SCRIPT": script, "OUT": out, "ERR": err,
                "FORKSERVER": multiprocessing.forkserver._forkserver._forkserver_address}
        p = self.ctx.Process(target=runpy.run_path, args=(_FORKED_BODY,), kwargs={"init_globals": glob},
                             name=os.path.basename(script))
        p.start()
        try:
            p.join(timeout)
            if p.exitcode is None:
                raise subprocess.TimeoutExpired([script, *argv], timeout)
        finally:  # past the timeout, or the test interrupted (Ctrl-C): the command does not outlive it
            if p.exitcode is None:
                p.kill()
                p.join()
        with open(out) as f_out, open(err) as f_err:
            return subprocess.CompletedProcess([script, *argv], p.exitcode, f_out.read(), f_err.read())


@pytest.fixture(scope="session", autouse=True)
def _forkserver():
    """This pytest process's multiprocessing forkserver (there is one per process), started first:
    the `forked` commands and the trainer's forked ranks (parallel.rank_start=auto, started by tests
    that call train.run) all come from it. It starts with the environment a command gets (no
    TRITON_INTERPRET: triton reads it at import), whatever a test sets later, and imports
    FORKED_PRELOAD in the background while the first tests run; it ends with pytest."""
    multiprocessing.get_context("forkserver").set_forkserver_preload(FORKED_PRELOAD)
    with pytest.MonkeyPatch.context() as mp:
        for k in ("RANK", "WORLD_SIZE", "TRITON_INTERPRET"):
            mp.delenv(k, raising=False)
        multiprocessing.forkserver.ensure_running()


@pytest.fixture(scope="session")
def forked(tmp_path_factory):
    """Commands (console scripts, benchmark scripts) forked from the session's forkserver
    (_forkserver), which imported FORKED_PRELOAD."""
    return Forked(str(tmp_path_factory.mktemp("forked")))
