"""parallel.overflow=rerun (issue 13 item 4): a step whose static dispatch buffer overflowed on any
rank is re-run once, on every rank, with a grown parallel.static_capacity_factor.

Real gloo ranks through the Trainer, fp32, pinned ep mode: a run from a deliberately tiny factor
(0.25: C = ceil(0.25 T K / E), far below the load) with overflow=rerun trains exactly like a run
whose buffer can never overflow (f = E/K: C = T) from step 0 (the same losses and, on every rank,
the same weights and buffers), with router jitter on (the re-run must replay the RNG) and grad
accumulation; it logged overflow_rerun events, and a checkpoint keeps the grown factor. A drop run
from the same tiny factor differs (so the comparison can fail). world 4 with ep 2 (two ep groups),
and ep = world 4 with the sigmoid_bias router (its aux-loss-free bias update reads the loads the
forward accumulates: the first pass's must be discarded), and world 4 / ep 2 under the FSDP2
engine (its gradients are sharded DTensors, reduce-scattered in the last micro-batch's backward).
"""
import json
import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(__file__))  # spawned ranks import the workers by module name
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "moesys"))

import overflow_workers  # noqa: E402
from train_helpers import make_cfg  # noqa: E402

from moesys.parallel.overflow import grown_factor  # noqa: E402

TINY, AMPLE = 0.25, 4.0  # E=4, K=2: f = 4 gives C = 2T, more than any expert can receive (T)
LIMIT = 2.0  # E / K: C = T, where growth stops


def _cfgs(world, ep, extra):
    common = ("trainer.steps=4", "trainer.log_interval=1", "trainer.eval_interval=100", "trainer.save_final=false",
              f"parallel.simulate_ranks={world}", f"parallel.ep={ep}", "parallel.dispatcher=padded",
              "parallel.mode=ep", "parallel.overlap=1", "moe.jitter_eps=0.01", *extra)
    return [("rerun", make_cfg(*common, f"parallel.static_capacity_factor={TINY}", "parallel.overflow=rerun",
                               "trainer.ckpt_interval=2")),
            ("ample", make_cfg(*common, f"parallel.static_capacity_factor={AMPLE}")),
            ("drop", make_cfg(*common, f"parallel.static_capacity_factor={TINY}"))]


@pytest.mark.multirank
@pytest.mark.parametrize("world,ep,extra", [
    (4, 2, ("trainer.grad_accum=2", "trainer.batch_size=16")),
    pytest.param(4, 4, ("moe.router=sigmoid_bias",), marks=pytest.mark.slow),  # the fast set keeps world4-ep2
    pytest.param(4, 2, ("trainer.engine=fsdp", "trainer.grad_accum=2", "trainer.batch_size=16"), marks=pytest.mark.slow),
], ids=["world4-ep2", "world4-ep4-sigmoid_bias", "world4-ep2-fsdp"])
def test_rerun_equals_an_ample_buffer_from_the_start(rank_pool, world, ep, extra, tmp_path):
    results = rank_pool.run(overflow_workers.train_runs_worker, world, _cfgs(world, ep, extra), str(tmp_path),
                            ("rerun", 2), timeout_s=120)
    for rank, r in enumerate(results):
        rerun, ample, drop = r["rerun"], r["ample"], r["drop"]
        np.testing.assert_allclose(rerun["losses"], ample["losses"], rtol=1e-6, atol=1e-6)
        assert set(rerun["state"]) == set(ample["state"])
        for k, v in rerun["state"].items():
            np.testing.assert_allclose(v, ample["state"][k], rtol=1e-5, atol=1e-6, err_msg=f"rank {rank}: {k}")
        # the drop run with the same tiny buffer trains differently: the comparison can fail
        assert not np.allclose(drop["losses"], ample["losses"], rtol=1e-4, atol=1e-4)
        # every rank saw the same events and grew to the same factor
        assert rerun["events"] == results[0]["rerun"]["events"]
        events = rerun["events"]
        assert events and events[0]["step"] == 0 and events[0]["rerun"] and events[0]["factor_from"] == TINY
        assert all(e["rerun"] for e in events), f"a re-run overflowed again: {events}"
        for e in events:
            assert e["dropped"] > 0 and e["factor_to"] == grown_factor(e["factor_from"], e["factor_needed"], LIMIT)
            assert e["factor_to"] > e["factor_needed"] > e["factor_from"]
        assert rerun["factor"] == events[-1]["factor_to"] and drop["factor"] == TINY and not drop["events"]
        # the checkpoint of step 2 keeps the factor grown by steps 0 and 1
        want = max(e["factor_to"] for e in events if e["step"] < 2)
        assert rerun["resumed_factor"] == (want, want)
    with open(tmp_path / "rerun" / "metrics.jsonl") as f:
        recs = [json.loads(line) for line in f]
    logged = [x for x in recs if x.get("event") == "overflow_rerun"]
    assert [x["step"] for x in logged] == [e["step"] for e in results[0]["rerun"]["events"]]
    steps = [x for x in recs if "overflow/reruns" in x]
    assert [x["overflow/reruns"] for x in steps][0] == 1.0
    assert steps[-1]["overflow/static_capacity_factor"] == results[0]["rerun"]["factor"]
