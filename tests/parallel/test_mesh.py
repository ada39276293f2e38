"""ParallelDims builds every group from one DeviceMesh; they are the groups the rank arithmetic
(mesh_ranks) says, on real gloo ranks: several ep groups, the hierarchical split, the F-shard dim."""
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))

import mesh_workers  # noqa: E402

from moesys.parallel import mesh_ranks  # noqa: E402

LAYOUTS = [(2, 4, 4), (4, 2, 4), (4, 4, 2), (1, 4, 4)]  # (ep, ranks per node, num_experts) on 4 ranks


@pytest.mark.multirank
def test_mesh_groups_match_the_rank_arithmetic(rank_pool):
    results = rank_pool.run(mesh_workers.groups_worker, 4, LAYOUTS, timeout_s=60)
    for i, (ep, lws, E) in enumerate(LAYOUTS):
        want = mesh_ranks(4, ep=ep, local_world_size=lws)
        for rank, res in enumerate(results):
            got = res[i]
            assert got["mesh_dims"] == ("edp", "ep", "tp")
            for kind in ("dp", "ep", "edp", "ep_node", "ep_cross"):
                mine = [g for g in want[kind] if rank in g]
                assert got[kind] == (mine[0] if mine else None), (ep, lws, kind, rank)
            assert got["ep_rank"] == rank % ep
            S = ep // E if ep > E else 1
            assert got["S"] == S
            if S > 1:  # the S consecutive ep ranks holding F-slices of one expert, coordinate = slice index
                assert got["fshard"] == [r for r in range(4) if r // S == rank // S]
                assert list(got["fshard_coord"]) == [rank % S]
            else:
                assert got["fshard"] is None
