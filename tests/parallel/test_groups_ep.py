"""Group-limited routing and the global-batch balance loss under expert parallelism, on real gloo
ranks (EP=2 on 2 ranks, EP=4 on 4, EP=2 on 4: two EP groups), against one process holding every
rank's tokens (tests/parallel/groups_workers.py), through the alltoallv and padded dispatchers
(overlap 1 and 2) and expert-sharded data parallelism. Also counts, from the routes the runtime
dispatches, the EP ranks each token is sent to: with groups aligned to ranks, at most topk_groups."""
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))  # spawned ranks import the workers by module name

import groups_workers  # noqa: E402


BASE = dict(hidden_size=6, ffn_hidden_size=8, num_experts=8)
CASES = [
    # 0: 4 groups of 2 experts: one group per rank at ep=4, two per rank at ep=2
    dict(BASE, top_k=4, num_groups=4, topk_groups=2),
    # 1: one group per token: one destination rank, whatever ep (2 or 4)
    dict(BASE, top_k=2, num_groups=4, topk_groups=1, router="sigmoid_bias", aux_loss="global_batch"),
    # 2: the same as 0 with no limit (topk_groups == num_groups): the fan-out baseline
    dict(BASE, top_k=4, num_groups=4, topk_groups=4),
    # 3: global-batch loss without groups
    dict(BASE, top_k=2, aux_loss="global_batch", aux_loss_coef=0.5),
    # 4: switch (top-1) in groups, global-batch loss
    dict(BASE, top_k=1, router="switch", num_groups=2, topk_groups=1, aux_loss="global_batch"),
    # 5: one expert per group, with capacity (drops are per source rank, as the reference runs them)
    dict(BASE, top_k=3, num_groups=8, topk_groups=3, capacity_factor=1.0, z_loss_coef=1e-2),
]


def _run(rank_pool, world, ep):
    results = rank_pool.run(groups_workers.groups_worker, world, CASES, ep, timeout_s=120)
    fails = [f for r in results for f in r["fails"]]
    assert not fails, "\n".join(fails[:20])
    assert all(r["checked"] == len(CASES) * len(groups_workers.COMBOS) for r in results)
    fan = results[0]["fanout"]
    # groups aligned to ranks: a token reaches at most topk_groups ranks ...
    assert fan[0]["max_dest"] <= 2 and fan[1]["max_dest"] == 1
    # ... and without the limit some token reaches more (so the count can fail)
    assert fan[2]["max_dest"] > (2 if ep == 4 else 1)
    # rows (one per route) vs distinct (token, rank) pairs: what a per-rank de-duplicating dispatch would send
    assert fan[0]["pairs"] < fan[0]["rows"] and fan[2]["pairs"] > fan[0]["pairs"]
    return results


@pytest.mark.multirank
def test_ep2_on_2_ranks(rank_pool):
    _run(rank_pool, 2, 2)


@pytest.mark.multirank
@pytest.mark.slow
def test_ep4_on_4_ranks(rank_pool):
    _run(rank_pool, 4, 4)


@pytest.mark.multirank
@pytest.mark.slow
def test_ep2_on_4_ranks_two_ep_groups(rank_pool):
    _run(rank_pool, 4, 2)


@pytest.mark.multirank
@pytest.mark.slow
def test_node_limited_routing_two_nodes_hierarchical(rank_pool):
    """DeepSeek-V3's node-limited routing: 2 nodes of 2 ranks, one group per node, the hierarchical
    (2-D) dispatcher: each token reaches one node (two ranks at most), and equals one process."""
    cases = [dict(BASE, top_k=3, num_groups=2, topk_groups=1, router="sigmoid_bias", aux_loss="global_batch"),
             dict(BASE, top_k=3, num_groups=2, topk_groups=2)]  # no limit
    combos = (("hierarchical", "ep", 1), ("hierarchical", "ep", 2))
    results = rank_pool.run(groups_workers.groups_worker, 4, cases, 4, 9, 0, combos, timeout_s=120, local_world_size=2)
    fails = [f for r in results for f in r["fails"]]
    assert not fails, "\n".join(fails[:20])
    assert all(r["checked"] == len(cases) * len(combos) for r in results)
    limited, free = results[0]["fanout"]
    assert limited["max_nodes"] == 1 and limited["max_dest"] <= 2
    assert free["max_nodes"] == 2
