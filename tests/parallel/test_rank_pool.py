"""RankPool: ranks kept across runs; each run's process group fresh; a failure, hang or death names
every rank and the pool restarts, leaving the next run unaffected."""
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "moesys"))

import pool_workers  # noqa: E402
from fault_helpers import alive  # noqa: E402  (tests/moesys)

from moesys.parallel.simulate import RankPool  # noqa: E402


@pytest.fixture
def own_pool():
    """A pool of 2 of this test's own (the session's renews its ranks every few runs), forked from
    the session's server."""
    pool = RankPool(2, preload=("moesys.parallel",))
    yield pool
    pool.close()


@pytest.mark.multirank
def test_pool_reuses_ranks_and_starts_each_run_clean(own_pool):
    first = own_pool.run(pool_workers.identity_worker, "a", timeout_s=30)
    second = own_pool.run(pool_workers.identity_worker, "b", timeout_s=30, local_world_size=1)
    assert [r["rank"] for r in first] == [0, 1] and {r["world"] for r in first} == {2}
    assert {r["sum"] for r in first + second} == {3.0}  # 1 + 2: a real all-reduce over both ranks
    assert [r["pid"] for r in first] == [r["pid"] for r in second]  # the same processes
    for r in second:  # nothing the first body changed is left
        assert r["leftover"]["env"] is None and r["leftover"]["dtype"] == "torch.float32", r
        assert r["leftover"]["groups"] == first[r["rank"]]["leftover"]["groups"]  # its new_group destroyed
    assert [r["local"] for r in first] == [("0", "2"), ("1", "2")]
    assert [r["local"] for r in second] == [("0", "1"), ("0", "1")]  # two simulated nodes of one rank


@pytest.mark.multirank
def test_renew_every_bounds_what_runs_leak():
    """A group a body keeps referenced keeps gloo's loop thread in the rank after its run; with
    renew_every=2 the third run is on new ranks, which hold none of them."""
    pool = RankPool(2, preload=("moesys.parallel",), renew_every=2)
    try:
        runs = [pool.run(pool_workers.leaking_worker, timeout_s=30) for _ in range(3)]
        old_left_running = alive(runs[0][0][0])
    finally:
        pool.close()
    (pid1, loops1), (pid2, loops2), (pid3, loops3) = (r[0] for r in runs)
    assert pid1 == pid2 != pid3 and pool.renewals == 1 and pool.restarts == 0
    assert not old_left_running, "the renewed ranks were left running"
    assert loops2 > loops1 and loops3 == loops1, (loops1, loops2, loops3)
    with pytest.raises(ValueError, match="renew_every must be >= 1 or None, got 0"):
        RankPool(2, renew_every=0)


@pytest.mark.multirank
def test_failure_reports_every_rank_and_the_pool_restarts(rank_pool):
    before = rank_pool.run(pool_workers.identity_worker, 2, "c", timeout_s=30)
    restarts = rank_pool.pools[2].restarts
    with pytest.raises(RuntimeError) as err:
        rank_pool.run(pool_workers.failing_worker, 2, timeout_s=120)
    text = str(err.value)
    assert "rank 1 of 2 failed" in text and "ValueError: pool body fails on purpose" in text, text
    # the waiter's side too: the collective's error, or its stack when it is still waiting
    assert "--- rank 0: " in text and text.count("in failing_worker") == 2, text
    after = rank_pool.run(pool_workers.identity_worker, 2, "d", timeout_s=30)
    assert {r["sum"] for r in after} == {3.0} and after[0]["leftover"]["env"] is None
    assert not {r["pid"] for r in after} & {r["pid"] for r in before}  # new ranks
    assert rank_pool.pools[2].restarts == restarts + 1


@pytest.mark.slow  # a restart of the pool each (the fast set keeps the failure-and-restart test)
@pytest.mark.multirank
def test_hang_is_a_timeout_with_every_ranks_stack(rank_pool):
    with pytest.raises(TimeoutError) as err:
        rank_pool.run(pool_workers.hanging_worker, 2, timeout_s=30, join_timeout_s=3)
    text = str(err.value)
    assert "ranks [0, 1] of 2 did not finish in time" in text, text
    assert text.count("sleeping_in_the_body") == 2, text
    assert {r["sum"] for r in rank_pool.run(pool_workers.identity_worker, 2, "e", timeout_s=30)} == {3.0}


@pytest.mark.slow
@pytest.mark.multirank
def test_a_rank_that_dies_is_named_and_replaced(rank_pool):
    with pytest.raises(RuntimeError) as err:
        rank_pool.run(pool_workers.dying_worker, 2, timeout_s=120)
    text = str(err.value)
    # the header names whichever side was seen first: the death, or the peer's broken collective
    assert "of 2 failed" in text and "--- rank 0: exited with code 3 without reporting" in text, text
    assert "--- rank 1: " in text and "in dying_worker" in text, text
    assert {r["sum"] for r in rank_pool.run(pool_workers.identity_worker, 2, "f", timeout_s=30)} == {3.0}


@pytest.mark.multirank
def test_dtensor_caches_do_not_carry_a_mesh_into_the_next_run(rank_pool):
    # a DTensor plan cached in one run named that run's mesh group; a later run's mesh of the same
    # shape hashed equal and got the stale group name (seen in the auto-mode trainer matrix)
    for extra in (2, 0, 1):  # the first run's group name (3) does not exist in the second
        for got, want in rank_pool.run(pool_workers.dtensor_norm_worker, 2, extra, timeout_s=30):
            assert abs(got - want) < 1e-5, (extra, got, want)
