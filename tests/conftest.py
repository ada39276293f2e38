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
