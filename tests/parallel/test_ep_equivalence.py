"""Expert parallelism equals the single-process layer: every dispatcher x mode x overlap degree.

Real gloo ranks (the session's rank pool, tests/conftest.py); one run per world size covers every combination, since
a run still costs seconds on a shared CPU. fp32, atol 1e-5: outputs, input grads, router grads (summed
over ranks) and each rank's expert-weight grads (its slice of the reference).
"""
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))  # spawned ranks import the workers by module name

import _matrix  # noqa: E402
import ep_workers  # noqa: E402
import hier_workers  # noqa: E402


_cache = {}


def _suite(rank_pool, world):
    if world not in _cache:
        E_values = (1, 2, 4) if world == 2 else (2, 4, 8)
        _cache[world] = rank_pool.run(ep_workers.suite_worker, world, _matrix.cases(world), _matrix.COMBOS, E_values,
                                      timeout_s=60, local_world_size=2)
    return _cache[world]


@pytest.mark.multirank
@pytest.mark.parametrize("world", [2, pytest.param(4, marks=pytest.mark.slow)])
def test_dispatchers_plain_tensors(rank_pool, world):
    results = _suite(rank_pool, world)
    fails = [f for r in results for f in r["dispatchers"]]
    assert not fails, "\n".join(fails[:20])


@pytest.mark.multirank
@pytest.mark.parametrize("world", [2, pytest.param(4, marks=pytest.mark.slow)])
def test_layer_equivalence_every_combo(rank_pool, world):
    results = _suite(rank_pool, world)
    fails = [f for r in results for f in r["layer"]["fails"]]
    assert not fails, "\n".join(fails[:20])
    # every case x combo ran its checks on every rank (none skipped or cut short)
    for r in results:
        assert r["layer"]["checked"] == len(_matrix.cases(world)) * len(_matrix.COMBOS)


@pytest.mark.multirank
def test_hierarchical_across_two_nodes(two_nodes):
    # world 4 as 2 nodes of 2: stage 1 within a node, stage 2 across; the fast tier's only run
    # where a rank's node index is not 0
    fails = [f for r in two_nodes for f in r["dispatchers"] + r["layer"]["fails"]]
    assert not fails, "\n".join(fails[:20])
    for r in two_nodes:
        assert r["layer"]["checked"] == 8


@pytest.mark.multirank
def test_two_d_dispatchers_equal_their_flat_twins(rank_pool):
    """4 ranks on 2 simulated nodes: `hierarchical` (its 2-D counts exchange) equals all-to-all-v and
    `hierarchical_padded` equals `padded` (capacity agreed, and static with drops), on plain tensors
    (the rows each expert receives, exactly; outputs and gradients, rtol 1e-5) and as the layer
    (outputs, every gradient, dropped rows), with D = 7, an expert no token reaches, a rank with no rows."""
    results = rank_pool.run(hier_workers.two_node_flat_worker, 4, timeout_s=120, local_world_size=2)
    fails = [f for r in results for f in r["dispatchers"]["fails"] + r["layer"]["fails"]]
    assert not fails, "\n".join(fails[:20])
    for r in results:
        assert r["dispatchers"]["checked"] == 36 and r["layer"]["checked"] == 2 * len(hier_workers.LAYER_CASES)
