"""The adaptive runtime's decisions are global: with several ep groups whose timings disagree, every
rank of the job runs the same (mode, degree) at every step: exploring, deciding, and re-deciding
after routing shifts (issue 11: 3 of 6 runs died in gloo when ep groups chose differently)."""
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))

import agreement_workers as aw  # noqa: E402



def _check_one_job(results, n_groups):
    first = results[0]["trace"]
    for r, res in enumerate(results):
        assert res["trace"] == first, f"rank {r} ran another sequence of (mode, degree) than rank 0"
        assert res["metric_keys"] == results[0]["metric_keys"]
    assert first[0][3] == "warmup"
    assert results[0]["decisions_made"] >= 2, "no re-decision after the routing shift"
    assert results[0]["decision"] == aw.job_choice(n_groups)
    # the groups on their own would have chosen differently: the test exercises a real conflict
    alone = [min(aw.CANDIDATES, key=lambda k: (aw.skewed_cost(g, k), k)) for g in range(n_groups)]
    assert len(set(alone)) == n_groups


@pytest.mark.multirank
def test_two_ep_groups_with_opposite_timings_run_one_decision(rank_pool):
    results = rank_pool.run(aw.agreement_worker, 4, 2, 30, 14, timeout_s=60)
    assert sorted({r["group_index"] for r in results}) == [0, 1]
    _check_one_job(results, 2)


@pytest.mark.multirank
@pytest.mark.slow
@pytest.mark.parametrize("dispatcher", ["padded", "hierarchical", "allgather"])
def test_agreement_under_every_dispatcher(rank_pool, dispatcher):
    results = rank_pool.run(aw.agreement_worker, 4, 2, 30, 14, dispatcher, timeout_s=60)
    _check_one_job(results, 2)


@pytest.mark.multirank
def test_trainer_with_skewed_ep_groups_and_collective_checks(rank_pool, tmp_path):
    """The issue's command (4 ranks, ep=2, auto) with timings that split the ep groups, every
    collective fingerprint-checked: it used to die in gloo with a size mismatch."""
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "moesys"))
    from train_helpers import make_cfg, pool_run

    cfg = make_cfg("parallel.ep=2", "parallel.simulate_ranks=4", "trainer.steps=14", "trainer.eval_interval=6",
                   "trainer.ckpt_interval=6", "trainer.seed=3", "trainer.log_interval=1",
                   "parallel.debug_collectives=true", "logging.wandb_mode=disabled", "trainer.plots=false")
    summary = pool_run(rank_pool, cfg, str(tmp_path / "run"), callbacks_fn=aw.skewed_callbacks)
    assert len(summary["train_losses"]) == 14


def _trainer_matrix(rank_pool, tmp_path, seeds: int):
    """4 ranks, ep in {1, 2, 4} x every dispatcher, auto mode, `seeds` seeds each, collectives
    checked: every run finishes, and the ranks of a run end on the same (mode, degree) in every layer."""
    from moesys.parallel import DISPATCHERS

    combos = [(1, "alltoallv", s) for s in (0, 1)[:seeds]]
    combos += [(ep, d, s) for ep in (2, 4) for d in DISPATCHERS for s in (ep + 7, ep + 8)[:seeds]]
    results = rank_pool.run(aw.trainer_matrix_worker, 4, str(tmp_path), combos, 8, timeout_s=120,
                            debug_collectives=True)
    for i, combo in enumerate(combos):
        runs = [r[i] for r in results]
        assert all(r["combo"] == tuple(combo) for r in runs)
        assert len(runs[0]["losses"]) == 8, combo
        assert all(r["ran"] == runs[0]["ran"] for r in runs), (combo, [r["ran"] for r in runs])
        assert all(r["losses"] == runs[0]["losses"] for r in runs), combo  # dp-mean losses: equal on every rank


@pytest.mark.multirank
@pytest.mark.slow
def test_trainer_every_ep_and_dispatcher_in_auto_mode(rank_pool, tmp_path):
    _trainer_matrix(rank_pool, tmp_path, seeds=1)


@pytest.mark.stress
@pytest.mark.multirank
@pytest.mark.slow
def test_trainer_stress_every_ep_and_dispatcher_in_auto_mode(rank_pool, tmp_path):
    _trainer_matrix(rank_pool, tmp_path, seeds=2)
