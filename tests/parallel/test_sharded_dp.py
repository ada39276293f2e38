"""Sharded data parallel (gathered expert weights, F split into c overlap chunks) equals the
single-process experts when the chunks do not divide F: outputs, input grads and weight grads,
on real gloo ranks. Degree 3 is not a pinned overlap option, so ShardedDataParallel is called
directly rather than through apply_expert_parallel."""
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))  # spawned ranks import the workers by module name

import ep_workers  # noqa: E402


# (num_experts, F, activation) on 2 ranks; local F-chunks at c = 2, 3, 4:
#   F=12: 4+8 | 4+4+4 | 4+4+4    F=24 (w3 too): 12+12 | 8+8+8 | 4+8+4+8
#   F=10 (not 4-aligned): 5+5 | 3+3+4 | 2+3+2+3    E=1, F=14: each rank holds F/2 = 7: 3+4 | 2+2+3 | 2+2+3
CASES = [(4, 12, "gelu"), (4, 24, "swiglu"), (4, 10, "relu"), (1, 14, "gelu")]


@pytest.mark.multirank
def test_sharded_dp_chunks_that_do_not_divide_f(rank_pool):
    results = rank_pool.run(ep_workers.sharded_dp_worker, 2, CASES, (1, 2, 3, 4), timeout_s=60)
    fails = [f for r in results for f in r["fails"]]
    assert not fails, "\n".join(fails[:20])
    spans = results[0]["spans"]
    assert spans["E=4 F=12 gelu c=2"] == [(0, 4), (4, 12)]  # the uneven split is really exercised
    assert spans["E=4 F=24 swiglu c=4"] == [(0, 4), (4, 12), (12, 16), (16, 24)]
    assert spans["E=1 F=14 gelu c=3"] == [(0, 2), (2, 4), (4, 7)]
