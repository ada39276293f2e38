"""EvoMoE under real expert parallelism (gloo ranks via moesys.parallel.simulate), world size 2:
a DTS / act-DTS layer at EP=2 equals the single-process layer for every dispatcher, mode and
overlap degree (dense phase, variable K, hard switch with drops, F-sharded experts); spawning on
sharded layers gives each rank exactly its slice of the single-process spawn."""
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))  # spawned ranks import the workers by module name

import evo_ep_workers  # noqa: E402


_cache = {}


def _suite(rank_pool):
    if "r" not in _cache:
        _cache["r"] = rank_pool.run(evo_ep_workers.suite, 2, timeout_s=60)
    return _cache["r"]


@pytest.mark.multirank
def test_dts_layer_ep2_equals_single_process_every_dispatcher_and_mode(rank_pool):
    res = _suite(rank_pool)
    fails = [f for r in res for f in r["layer"]["fails"]]
    assert not fails, "\n".join(fails[:20])
    assert res[0]["layer"]["checked"] == len(evo_ep_workers.CASES) * res[0]["layer"]["combos"]
    k = res[0]["layer"]["k_mean"]
    assert k[0] > 2.0, "the tau=2 case must route many experts per token"


@pytest.mark.multirank
def test_diversify_on_sharded_layers_gives_each_rank_its_slice(rank_pool):
    fails = [f for r in _suite(rank_pool) for f in r["diversify"]]
    assert not fails, "\n".join(fails[:20])
