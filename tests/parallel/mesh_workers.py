"""Rank-side body of tests/parallel/test_mesh.py."""
from __future__ import annotations

import torch.distributed as dist

from moesys.parallel import ParallelDims


def groups_worker(layouts: list) -> list:
    """For each (ep, local_world_size, num_experts): this rank's groups as global-rank lists."""
    out = []
    for ep, lws, E in layouts:
        d = ParallelDims.build(ep=ep, local_world_size=lws, num_experts=E, timeout_s=30)
        ranks = lambda g: None if g is None else dist.get_process_group_ranks(g)  # noqa: E731
        out.append({"dp": ranks(d.dp_group), "ep": ranks(d.ep_group), "edp": ranks(d.edp_group),
                    "ep_node": ranks(d.ep_node_group), "ep_cross": ranks(d.ep_cross_group),
                    "fshard": ranks(d.ffn_shard_mesh.get_group()) if d.ffn_shard_mesh is not None else None,
                    "fshard_coord": d.ffn_shard_mesh.get_coordinate() if d.ffn_shard_mesh is not None else None,
                    "mesh_dims": d.mesh.mesh_dim_names, "ep_rank": d.ep_rank, "S": d.ffn_shards})
    return out
