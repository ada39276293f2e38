import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))  # spawned ranks import the workers by module name

import _matrix  # noqa: E402
import ep_workers  # noqa: E402


# the layer through the 2-D dispatchers across nodes: dropless, and with drops
TWO_NODE_CASES = _matrix.cases(4)[:2]
TWO_NODE_COMBOS = [(d, "ep", c) for d in ("hierarchical", "hierarchical_padded") for c in (1, 2)]


@pytest.fixture(scope="session")
def two_nodes(rank_pool):
    """Per-rank results of ep_workers.two_node_worker: one 4-rank run (2 nodes of 2 ranks) shared
    by the fast 4-rank tests."""
    return rank_pool.run(ep_workers.two_node_worker, 4, TWO_NODE_CASES, TWO_NODE_COMBOS, timeout_s=60,
                         local_world_size=2)
