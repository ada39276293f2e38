"""Run the Triton kernels on CPU through the interpreter.

TRITON_INTERPRET is read when a `@triton.jit` function is decorated, i.e. when a
`moesys.kernels.*_triton` module is first imported, so it is set here at import time (before
the test modules in this folder are collected). After collection the old value is restored so
test folders collected alongside this one see the environment they expect; the autouse fixture
sets it again around each test here (the backend resolver reads it per call).
"""
from __future__ import annotations

import os

import pytest
import torch

_BEFORE = os.environ.get("TRITON_INTERPRET")
os.environ["TRITON_INTERPRET"] = "1"


def pytest_collection_finish(session):
    if _BEFORE is None:
        os.environ.pop("TRITON_INTERPRET", None)
    else:
        os.environ["TRITON_INTERPRET"] = _BEFORE


@pytest.fixture(autouse=True)
def _triton_interpret(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    torch.manual_seed(0)


# 601 rows over 7 experts with an empty one (expert 1): the odd-shape case
COUNTS_601 = [100, 0, 150, 51, 120, 80, 100]


@pytest.fixture
def ws_forced(monkeypatch):
    """Every size goes through moesys.kernels.workspace (it normally serves only large blocks)."""
    from moesys.kernels import workspace

    monkeypatch.setattr(workspace, "MIN_BYTES", 0)
    workspace.set_enabled(True)
    workspace.release()
    yield
    workspace.release()


@pytest.fixture
def counts_601():
    return torch.tensor(COUNTS_601)


@pytest.fixture
def routes_601():
    """token_idx_N for 601 kept routes of T=250 tokens, top-3 with some routes dropped, in a
    shuffled (expert-like) order; some tokens keep no route at all. Returns (token_idx_N, T)."""
    T, K = 250, 3
    tok_N = torch.arange(T).repeat_interleave(K)
    tok_N = tok_N[torch.randperm(T * K)[:601]]
    # make sure at least one token lost every route so the "no route -> 0" case is exercised
    tok_N = torch.where(tok_N == 7, 8, tok_N)
    return tok_N, T
