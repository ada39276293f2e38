"""Gradient reduction of the plain engine overlapped with the backward (parallel.grad_overlap=true).

The flat path (`mesh.allreduce_gradients`) waits for the whole backward, then all-reduces every
gradient in one collective per group. This one does the same math in buckets launched while the
backward still runs, as torch's DDP reducer does: each parameter's post-accumulate-grad hook marks
it ready; when every parameter of a bucket is ready, the bucket is copied into one flat buffer and
all-reduced asynchronously; after the backward, `finish` launches whatever is left, waits, divides
by dp and copies the sums back. Dense gradients reduce over dp, expert gradients (their local
shards) over edp, both divided by dp: exactly `allreduce_gradients`.

    reducer = OverlappedGradReducer(model, dims, bucket_mb=25.0)   # after apply_expert_parallel
    for i, batch in enumerate(micro_batches):
        reducer.prepare_backward(sync=i == len(micro_batches) - 1)  # reduce on the last one only
        loss(batch).backward()
    reducer.finish()                                                # then clip, step

Why not torch's DDP or the composable `replicate` (DDP inside) for the dense parameters: DDP
reduces over one process group and averages by that group's size; the experts need a second group
(edp) with the dp divisor, so they would still need these hooks, and two reducers with two
accumulation switches (DDP's `no_sync`) would run side by side. DDP also wraps or hooks the root
module's forward (the trainer, checkpoints and HF I/O address `model.*` directly), broadcasts the
module state at construction and needs `find_unused_parameters=True` (a graph walk every step)
for EvoMoE's phases, where some parameters get no gradient. One reducer for both groups keeps the
flat path's math and its tests' tolerance.

Collective order: every rank launches a group's buckets in the same order (bucket 0, 1, ...: a
bucket that is ready waits for the ones before it), so the async all-reduces match across ranks
whatever order the hooks fire in. Buckets follow the reverse of `model.parameters()` (the order
the backward produces gradients, DDP's heuristic); the first is at most 1 MiB (DDP's first
bucket), so a reduction starts early. A parameter that gets no gradient in the last micro-batch
(unused there) holds its bucket back until `finish`, which reduces the gradients that exist, as
the flat path does. A group of one rank (edp = 1) needs no collective: `finish` divides.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, List, Optional

import torch
import torch.distributed as dist
import torch.nn as nn

from moesys.moe.packing import pack_consecutive

from .mesh import ParallelDims, expert_param_groups

FIRST_BUCKET_MB = 1.0  # DDP's first bucket (dist._DEFAULT_FIRST_BUCKET_BYTES)
_MB = 1024 * 1024


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def _nbytes(p: torch.Tensor) -> int:
    q = _local(p)
    return q.numel() * q.element_size()


def make_buckets(params: list, bucket_bytes: int, first_bucket_bytes: int) -> List[list]:
    """`params` in reverse order cut into buckets of at most `bucket_bytes` (the first: at most
    `first_bucket_bytes`); a parameter larger than the cap is a bucket of its own. Pure, testable."""
    return pack_consecutive(reversed(params), bucket_bytes, size=_nbytes, first_cap=first_bucket_bytes)


@dataclass
class _Bucket:
    params: list
    index: int
    ready: set = field(default_factory=set)  # ids of the parameters whose gradient this backward accumulated
    grads: Optional[list] = None  # the local gradients reduced (set at launch)
    flat: Optional[torch.Tensor] = None
    work: Any = None
    launched: bool = False


@dataclass
class _Group:
    name: str  # "dense" | "expert"
    group: Any  # the process group (dp or edp)
    size: int
    buckets: List[_Bucket] = field(default_factory=list)
    next: int = 0  # the first bucket not launched yet (buckets launch in index order)


class OverlappedGradReducer:
    """Bucketed, asynchronous all-reduces of the plain engine's gradients, launched from
    post-accumulate-grad hooks during the backward (see the module docstring).

    Args:
        model: the model, after apply_expert_parallel (its parameters are final: the hooks hold them).
        dims: the job's ParallelDims (dp_group, edp_group, dp).
        bucket_mb: bucket cap in MiB (parallel.grad_bucket_mb; DDP's default is 25).
        first_bucket_mb: the first bucket's cap in MiB.

    `launches` lists this step's bucket launches in issue order, (group name, bucket index): what the
    ordering tests read from their own hooks.
    """

    def __init__(self, model: nn.Module, dims: ParallelDims, *, bucket_mb: float = 25.0,
                 first_bucket_mb: float = FIRST_BUCKET_MB):
        if not bucket_mb > 0 or not first_bucket_mb > 0:
            raise ValueError(f"OverlappedGradReducer: bucket sizes must be > 0 MiB, got bucket_mb={bucket_mb}, "
                             f"first_bucket_mb={first_bucket_mb}")
        self.dims = dims
        self.syncing = False  # armed by prepare_backward(sync=True), disarmed by finish()
        self.launches: list = []
        split = expert_param_groups(model)
        cap, first = int(bucket_mb * _MB), int(min(bucket_mb, first_bucket_mb) * _MB)
        self.groups: List[_Group] = []
        self.local: list = []  # parameters of one-rank groups: divided by dp in finish, no collective
        self._where: dict = {}  # id(param) -> (group, bucket)
        self._handles: list = []
        for name, params, group in (("dense", split.non_expert, dims.dp_group),
                                    ("expert", split.expert, dims.edp_group)):
            params = [p for p in params if p.requires_grad]
            size = dist.get_world_size(group)
            if size == 1:
                self.local += params
                continue
            g = _Group(name=name, group=group, size=size)
            for i, ps in enumerate(make_buckets(params, cap, first)):
                b = _Bucket(params=ps, index=i)
                g.buckets.append(b)
                for p in ps:
                    self._where[id(p)] = (g, b)
            self.groups.append(g)
            for p in params:
                self._handles.append(p.register_post_accumulate_grad_hook(self._on_grad))

    # ---- the step --------------------------------------------------------------------------------
    def prepare_backward(self, *, sync: bool) -> None:
        """Before each micro-batch's backward: sync=True on the last one (its hooks launch the
        reductions), False on the others (gradients only accumulate)."""
        self.syncing = sync
        if sync:
            self.launches = []
            for g in self.groups:
                g.next = 0
                for b in g.buckets:
                    b.ready, b.grads, b.flat, b.work, b.launched = set(), None, None, None, False

    @torch.no_grad()
    def finish(self) -> None:
        """After the last backward: launch the buckets not launched yet (in order), wait for every
        reduction, divide by dp and write the results back into the gradients."""
        for g in self.groups:
            self._launch_ready(g, flush=True)
        for g in self.groups:
            for b in g.buckets:
                if b.work is None:
                    continue
                b.work.wait()
                b.flat.div_(self.dims.dp)
                offset = 0
                for grad in b.grads:
                    grad.copy_(b.flat[offset:offset + grad.numel()].view_as(grad))
                    offset += grad.numel()
                b.grads = b.flat = b.work = None
        if self.dims.dp > 1:
            for p in self.local:
                if p.grad is not None:
                    _local(p.grad).div_(self.dims.dp)
        self.syncing = False

    def remove(self) -> None:
        """Take the hooks off the parameters."""
        for h in self._handles:
            h.remove()
        self._handles = []

    # ---- hooks -----------------------------------------------------------------------------------
    def _on_grad(self, p: torch.Tensor) -> None:
        if not self.syncing:
            return
        g, b = self._where[id(p)]
        if b.launched:  # e.g. a second backward through the model before finish()
            raise RuntimeError(f"OverlappedGradReducer: a gradient of {g.name} bucket {b.index} accumulated again after "
                               "the bucket's all-reduce was launched; run one backward per prepare_backward(sync=True)")
        b.ready.add(id(p))
        if len(b.ready) == len(b.params):
            self._launch_ready(g, flush=False)

    @torch.no_grad()
    def _launch_ready(self, g: _Group, *, flush: bool) -> None:
        """Launch g's buckets from g.next on while they are complete (flush: all of them, with the
        gradients that exist)."""
        while g.next < len(g.buckets):
            b = g.buckets[g.next]
            if not flush and len(b.ready) < len(b.params):
                return
            g.next += 1
            grads = [_local(p.grad) for p in b.params if p.grad is not None]
            b.launched = True
            if not grads:
                continue
            # the copy is the bucket's (DDP keeps gradients as views of it; a copy keeps .grad plain)
            b.grads = grads
            b.flat = torch.cat([x.reshape(-1) for x in grads])
            b.work = dist.all_reduce(b.flat, group=g.group, async_op=True)
            self.launches.append((g.name, b.index))
