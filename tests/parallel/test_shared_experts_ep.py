"""Shared experts and MoE recompute under expert parallelism equal the single-process layer.

Real gloo ranks (moesys.parallel.simulate): ep = world (2 and 4 ranks) and ep < world (ep=2 on 4
ranks: two ep groups); every dispatcher kind, both modes, overlap 1 and 2. Outputs, input grads
and, after allreduce_gradients, every parameter gradient (router, shared experts as dense
parameters over dp, each rank's expert slice over edp). The shared FFN runs between the first
dispatch's start and finish (the overlap), its backward between the launch of the dispatch's
reverse all-to-all and its wait, and the shared experts stay whole and untagged on every rank.
"""
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))  # spawned ranks import the workers by module name

import shared_workers  # noqa: E402



def _check(results, ep):
    fails = [f for r in results for f in r["fails"]]
    assert not fails, "\n".join(fails[:20])
    n_ep = sum(1 for c in shared_workers.COMBOS if c[1] == "ep")
    for r in results:
        assert r["checked"] == len(shared_workers.cases(ep)) * len(shared_workers.COMBOS)
        assert len(r["orders"]) == len(shared_workers.cases(ep)) * n_ep


@pytest.mark.multirank
def test_ep2_on_2_ranks(rank_pool):
    _check(rank_pool.run(shared_workers.shared_worker, 2, 2, timeout_s=120), 2)


@pytest.mark.multirank
@pytest.mark.slow
def test_ep2_on_4_ranks_two_ep_groups(rank_pool):
    _check(rank_pool.run(shared_workers.shared_worker, 4, 2, timeout_s=240), 2)


@pytest.mark.multirank
@pytest.mark.slow
def test_ep4_on_4_ranks_with_f_sharded_experts(rank_pool):
    _check(rank_pool.run(shared_workers.shared_worker, 4, 4, timeout_s=240), 4)
