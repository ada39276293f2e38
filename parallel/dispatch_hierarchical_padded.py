"""Padded 2-D all-to-all dispatcher (`hierarchical_padded`): Tutel's 2-D plan with fixed capacity.

The padded dispatcher's [E, C, D] buffers (dispatch_padded.py: the same capacity, drops and
static-capacity semantics, the same plan) sent through the hierarchical dispatcher's two stages
(dispatch_hierarchical.py: within the node, then across nodes between ranks of the same local
index). Every (source rank, expert) pair holds C rows, so both stages have equal splits known from
C alone: no counts exchange at all. With a static capacity factor (`static_capacity_factor`), C
comes from T, K, E and no collective but the data all-to-alls runs; without one, C is agreed with
the padded dispatcher's one tiny all-reduce per layer call.

    ranks (node n, local index l), g = n*Lw + l; X = L*C rows per (source, destination) rank
    stage 1 (intra-node): [Nn, Lw, X] dest-major -> to local peer l' the [Nn, X] for ranks (*, l')
    stage 2 (inter-node): the [Lw, Nn, X] received -> to node n'' the [Lw, X] for rank (n'', l_me)
    result: [Nn, Lw, X] source-major, what the flat all-to-all gives; the combine sends its
    source-major outputs back through the same two stages (an equal-split all-to-all is its own
    reverse pattern).
"""
from __future__ import annotations

from typing import Optional

from .dispatch_hierarchical import alltoall_2d_start, alltoall_2d_wait, hierarchical_split
from .dispatch_padded import PaddedDispatcher
from .layout import ExpertLayout


class HierarchicalPaddedDispatcher(PaddedDispatcher):
    """Args: those of PaddedDispatcher, plus the hierarchical dispatcher's node_group, cross_group
    and local_world_size (ranks of the ep group per node)."""

    name = "hierarchical_padded"

    def __init__(self, layout: ExpertLayout, group, *, node_group, cross_group, local_world_size: int,
                 timeout_s: Optional[float] = None, static_capacity_factor: Optional[float] = None,
                 top_k: int = 1) -> None:
        super().__init__(layout, group, timeout_s, static_capacity_factor=static_capacity_factor, top_k=top_k)
        self.lw, self.nodes, self._node, self._cross = hierarchical_split(layout, group, node_group, cross_group,
                                                                           local_world_size, self.name)

    def a2a_start(self, x, out_splits, in_splits, group=None):
        X = in_splits[0]
        if group is not None or any(s != X for s in (*out_splits, *in_splits)):  # pragma: no cover - a bug
            raise RuntimeError(f"{self.name} dispatcher: the 2-D exchange takes equal splits on the ep group only")
        return alltoall_2d_start(x, X, self.lw, self.nodes, self._node.get(), self._cross.get(), self.timeout)

    @staticmethod
    def a2a_wait(token):
        return alltoall_2d_wait(token)

    def remote_rows(self, per_rank: int) -> int:
        """Rows leaving this rank in stage 1 plus rows leaving this node in stage 2."""
        return ((self.lw - 1) * self.nodes + (self.nodes - 1) * self.lw) * per_rank
