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
import os

import pytest

_BEFORE = os.environ.get("TRITON_INTERPRET")
os.environ["TRITON_INTERPRET"] = "1"

from moesys.parallel.simulate import RankPool  # noqa: E402  (imports triton: after the flag is set)


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


class RankPools:
    """`simulate` on ranks kept for the whole pytest run, one RankPool per world size, started by
    the first test that asks for that size: `rank_pool.run(fn, world_size, *args, **simulate_kw)`.
    A failing or hanging test restarts only its pool, after reporting every rank's traceback."""

    def __init__(self):
        self.pools: dict[int, RankPool] = {}

    def run(self, fn, world_size: int, *args, **kw) -> list:
        pool = self.pools.get(world_size)
        if pool is None:
            pool = self.pools[world_size] = RankPool(world_size)
        return pool.run(fn, *args, **kw)

    def close(self) -> None:
        for pool in self.pools.values():
            pool.close()


@pytest.fixture(scope="session")
def rank_pool():
    """Pools of gloo ranks for multi-rank tests whose subject is not process start-up or exit
    (those keep `simulate`, one fresh spawn per call)."""
    pools = RankPools()
    yield pools
    pools.close()
