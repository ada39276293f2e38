"""parallel.grad_overlap (issue 26 part 1): the plain engine's gradients all-reduced in buckets
launched from post-accumulate-grad hooks during the backward (parallel/grad_overlap.py).

Real gloo ranks through the Trainer, fp32, world 4: ep 2 (experts reduce over edp = 2) and ep 4
(edp = 1: experts only divided), grad accumulation 2. The overlapped gradients equal the flat
all-reduce's (rtol 1e-6) and differ from the unreduced ones (the check can fail); no bucket is
launched in the first micro-batch's backward; in the last one, the first bucket's reduction is
issued before block 0's backward starts (a full-backward pre-hook on block 0 reads the reducer's
launch record: ordering by hooks, not timing). An end-to-end run trains like the flat run.
"""
import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(__file__))  # spawned ranks import the workers by module name
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "moesys"))

import grad_overlap_workers as gw  # noqa: E402
import overflow_workers  # noqa: E402
from train_helpers import make_cfg  # noqa: E402

from moesys.errors import ConfigError  # noqa: E402
from moesys.parallel.grad_overlap import make_buckets  # noqa: E402

WORLD = 4
# 10 KiB buckets: the tiny GPT's gradients (200 KB) fill several, so block 1's are full before block 0 runs
COMMON = ("trainer.grad_accum=2", "trainer.batch_size=16", f"parallel.simulate_ranks={WORLD}",
          "parallel.grad_bucket_mb=0.01", "parallel.mode=ep", "parallel.overlap=1")


def _cfgs(ep, *extra):
    return (make_cfg(*COMMON, f"parallel.ep={ep}", "parallel.grad_overlap=true", *extra),
            make_cfg(*COMMON, f"parallel.ep={ep}", "parallel.grad_overlap=false", *extra))


@pytest.fixture(scope="module")
def grad_runs(rank_pool, tmp_path_factory):
    cache = {}

    def get(ep):
        if ep not in cache:
            root = str(tmp_path_factory.mktemp(f"grads-ep{ep}"))
            cache[ep] = rank_pool.run(gw.grads_worker, WORLD, *_cfgs(ep), root, timeout_s=120)
        return cache[ep]
    return get


@pytest.mark.multirank
@pytest.mark.parametrize("ep", [2, 4], ids=["ep2-edp2", "ep4-edp1"])
def test_overlapped_gradients_equal_the_flat_allreduce(grad_runs, ep):
    results = grad_runs(ep)
    for rank, r in enumerate(results):
        assert set(r["overlap"]) == set(r["flat"]) and r["flat"]
        changed = 0
        for name, want in r["flat"].items():
            np.testing.assert_allclose(r["overlap"][name], want, rtol=1e-6, atol=1e-9, err_msg=f"rank {rank}: {name}")
            changed += not np.allclose(r["unreduced"][name], want, rtol=1e-6, atol=1e-9)
        assert changed > len(r["flat"]) // 2, f"rank {rank}: the reduction changed only {changed} gradients"
        # the dense parameters reduce over dp in buckets; the experts over edp, or (edp = 1) locally
        assert r["buckets"]["dense"] > 2
        assert ("expert" in r["buckets"]) == (ep == 2) and (r["local_params"] > 0) == (ep == 4)
        # every bucket launched once, all by the last micro-batch's backward, in index order per group
        launched = r["launches"]
        assert sorted(launched) == sorted((g, i) for g, n in r["buckets"].items() for i in range(n))
        for g in r["buckets"]:
            assert [i for name, i in launched if name == g] == list(range(r["buckets"][g]))


@pytest.mark.multirank
@pytest.mark.parametrize("ep", [2, 4], ids=["ep2-edp2", "ep4-edp1"])
def test_first_bucket_is_issued_before_block0_backward(grad_runs, ep):
    for rank, r in enumerate(grad_runs(ep)):
        first, last = r["block0_backward"]  # one entry per micro-batch
        assert first == (False, 0), f"rank {rank}: micro-batch 0 launched a reduction: {first}"
        armed, launched = last
        assert armed and launched >= 1, f"rank {rank}: no bucket issued before block 0's backward: {last}"
        assert launched < len(r["launches"])  # and block 0's own gradients come after it


@pytest.mark.multirank
def test_trainer_with_overlap_trains_like_the_flat_run(rank_pool, tmp_path):
    common = ("trainer.steps=4", "trainer.log_interval=1", "trainer.eval_interval=100", "trainer.save_final=false",
              *COMMON, "parallel.ep=2", "moe.jitter_eps=0.01")
    runs = [("overlap", make_cfg(*common, "parallel.grad_overlap=true")),
            ("flat", make_cfg(*common, "parallel.grad_overlap=false"))]
    results = rank_pool.run(overflow_workers.train_runs_worker, WORLD, runs, str(tmp_path), timeout_s=180)
    for rank, r in enumerate(results):
        ov, flat = r["overlap"], r["flat"]
        assert len(ov["losses"]) == 4
        np.testing.assert_allclose(ov["losses"], flat["losses"], rtol=1e-6, atol=1e-7)
        for k, v in ov["state"].items():
            np.testing.assert_allclose(v, flat["state"][k], rtol=1e-5, atol=1e-6, err_msg=f"rank {rank}: {k}")


class _P:
    """A stand-in tensor for the pure bucketing arithmetic: make_buckets reads numel and element_size."""

    def __init__(self, n):
        self.n = n

    def numel(self):
        return self.n

    def element_size(self):
        return 4


def test_buckets_follow_reverse_parameter_order_with_a_small_first_bucket():
    ps = [_P(n) for n in (100, 300, 50, 50, 1000, 10, 10)]  # bytes: 400 1200 200 200 4000 40 40
    buckets = make_buckets(ps, bucket_bytes=1500, first_bucket_bytes=100)
    assert [[ps.index(p) for p in b] for b in buckets] == [[6, 5], [4], [3, 2], [1], [0]]
    # a parameter over the cap is a bucket of its own; nothing is dropped or repeated
    assert [[ps.index(p) for p in b] for b in make_buckets(ps, 10 ** 6, 10 ** 6)] == [[6, 5, 4, 3, 2, 1, 0]]


@pytest.mark.parametrize("override,match", [("parallel.grad_bucket_mb=0", "parallel.grad_bucket_mb must be > 0"),
                                            ("parallel.grad_bucket_mb=-1", "parallel.grad_bucket_mb must be > 0")])
def test_bad_bucket_size_is_a_config_error(override, match):
    with pytest.raises(ConfigError, match=match):
        make_cfg(override).validate(world_size=2)
