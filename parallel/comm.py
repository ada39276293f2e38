"""Differentiable collectives with split start/wait, so communication can overlap compute.

Legend: N rows, D hidden, P ranks in the group.

Every big collective is a pair of autograd Functions sharing one `_Pending` object:

    buf = Start(x)   # forward: launch the async collective into buf (not yet valid)
    y   = Wait(buf)  # forward: wait, y aliases buf

In backward the roles swap: Wait.backward launches the reverse collective asynchronously and
Start.backward waits for it. Between the two, the autograd engine runs whatever other nodes are
ready (e.g. the expert backward of another chunk), so the backward overlaps too. The autograd
engine visits nodes in a deterministic order, so every rank issues the backward collectives in
the same order (a mismatch would hang).

The backward of an all-to-all is the reverse all-to-all (splits swapped); the backward of an
all-gather is a reduce-scatter (sum); the backward of a reduce-scatter is an all-gather.
Small metadata exchanges (counts) are plain blocking calls outside autograd. (The all-to-all-v
dispatcher's plan issues its own asynchronous counts exchange, beside the CUDA side stream that
waits for it: dispatch_alltoallv.plan_start.)

The runtime never owns a process group: dispatchers, the sharded-DP mode and the autograd graph
hold it through a `GroupRef` (a weak reference), so `destroy_process_group()` destroys it on the
spot and joins its gloo worker threads while the interpreter is intact (issue 11).
"""
from __future__ import annotations

import datetime
import weakref
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.distributed as dist

# torch 2.13 renamed the flat-tensor collectives (the old names warn there); older torch has only those
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


class GroupRef:
    """A process group held weakly; `get()` returns it, or None for a group given as None.

    Why weakly: an autograd graph can outlive the step that built it (the user keeps an output, or a
    collective's Work holds a tensor whose graph reaches here), and the last reference to a graph
    can be dropped on a gloo worker thread as it releases a finished Work. A group the graph (or a
    dispatcher) kept alive past destroy_process_group() then lived on with its worker threads, and
    one of them, releasing a Work while Python finalized, needed the GIL and aborted the process
    ("terminate called without an active exception"); dropped on its own worker thread, it
    deadlocked in the group's destructor. Whoever made the group owns it (torch's registry, the
    user's ParallelDims); the runtime only borrows it.
    """

    __slots__ = ("_ref",)

    def __init__(self, group) -> None:
        self._ref = None if group is None else weakref.ref(group)

    def get(self):
        if self._ref is None:
            return None
        group = self._ref()
        if group is None:
            raise RuntimeError("moesys.parallel: the process group was destroyed (destroy_process_group) "
                               "while an expert-parallel layer or its autograd graph still uses it")
        return group


@dataclass(frozen=True)
class A2AToken:
    """An all-to-all in flight: `buf` fills when `all_to_all_wait(token)` returns it."""

    buf: torch.Tensor
    out_splits: tuple
    in_splits: tuple
    group_ref: GroupRef
    pending: "_Pending"

    @property
    def group(self):
        return self.group_ref.get()


@dataclass(frozen=True)
class AllGatherToken:
    """An all-gather in flight: `buf` fills when `all_gather_wait(token)` returns it."""

    buf: torch.Tensor
    world: int
    group_ref: GroupRef
    pending: "_Pending"

    @property
    def group(self):
        return self.group_ref.get()


class _Pending:
    """Mutable state shared between a Start and its Wait (forward and backward)."""

    __slots__ = ("work", "bwd_work", "bwd_buf", "bwd_keep", "timeout")

    def __init__(self, timeout: Optional[datetime.timedelta]) -> None:
        self.work = None
        self.bwd_work = None
        self.bwd_buf = None
        self.bwd_keep = None  # keeps the sent grad alive until the async send completes
        self.timeout = timeout


def _wait(work, timeout: Optional[datetime.timedelta], what: str) -> None:
    try:
        if timeout is None:
            work.wait()
        else:
            work.wait(timeout)
    except RuntimeError as err:  # gloo reports a dead peer / timeout as RuntimeError
        raise RuntimeError(f"moesys.parallel: {what} failed or timed out ({timeout}): {err}") from err


def _a2a(out: torch.Tensor, x: torch.Tensor, out_splits, in_splits, group):
    return dist.all_to_all_single(out, x, list(out_splits), list(in_splits), group=group, async_op=True)


# ---------------------------------------------------------------------------------------------
# all-to-all-v
class _A2AStart(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_ND, out_splits, in_splits, group, pending):
        x_ND = x_ND.contiguous()
        buf = x_ND.new_empty((sum(out_splits),) + tuple(x_ND.shape[1:]))
        pending.work = _a2a(buf, x_ND, out_splits, in_splits, group)
        ctx.pending = pending
        ctx.keep = x_ND  # the send buffer must outlive the async op
        return buf

    @staticmethod
    def backward(ctx, _unused):
        p = ctx.pending
        _wait(p.bwd_work, p.timeout, "all-to-all backward")
        grad, p.bwd_buf, p.bwd_keep = p.bwd_buf, None, None
        return grad, None, None, None, None


class _A2AWait(torch.autograd.Function):
    @staticmethod
    def forward(ctx, buf, out_splits, in_splits, group, pending):
        _wait(pending.work, pending.timeout, "all-to-all")
        pending.work = None
        ctx.meta = (out_splits, in_splits, GroupRef(group), pending)
        return buf.view_as(buf)

    @staticmethod
    def backward(ctx, dy):
        out_splits, in_splits, group_ref, p = ctx.meta
        group = group_ref.get()
        dy = dy.contiguous()
        p.bwd_buf = dy.new_empty((sum(in_splits),) + tuple(dy.shape[1:]))
        p.bwd_keep = dy
        # reverse exchange: what I received from rank j goes back to rank j
        p.bwd_work = _a2a(p.bwd_buf, dy, in_splits, out_splits, group)
        return dy, None, None, None, None


def all_to_all_start(x_ND, out_splits: Sequence[int], in_splits: Sequence[int], group,
                     timeout: Optional[datetime.timedelta] = None):
    """Launch an uneven all-to-all of rows; returns a token for `all_to_all_wait`.

    in_splits[j] rows of x go to rank j; out_splits[j] rows arrive from rank j.
    """
    pending = _Pending(timeout)
    out_splits, in_splits = tuple(int(s) for s in out_splits), tuple(int(s) for s in in_splits)
    buf = _A2AStart.apply(x_ND, out_splits, in_splits, group, pending)
    return A2AToken(buf, out_splits, in_splits, GroupRef(group), pending)


def all_to_all_wait(token: A2AToken) -> torch.Tensor:
    return _A2AWait.apply(token.buf, token.out_splits, token.in_splits, token.group, token.pending)


def all_to_all(x_ND, out_splits, in_splits, group, timeout=None) -> torch.Tensor:
    """Blocking differentiable all-to-all-v (backward: the reverse all-to-all-v)."""
    return all_to_all_wait(all_to_all_start(x_ND, out_splits, in_splits, group, timeout))


# ---------------------------------------------------------------------------------------------
# all-gather along dim 0 (backward: reduce-scatter, sum)
class _AGStart(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w, world, group, pending):
        w = w.contiguous()
        buf = w.new_empty((world * w.shape[0],) + tuple(w.shape[1:]))
        pending.work = _all_gather_single(buf, w, group=group, async_op=True)
        ctx.pending, ctx.keep = pending, w
        return buf

    @staticmethod
    def backward(ctx, _unused):
        p = ctx.pending
        _wait(p.bwd_work, p.timeout, "all-gather backward (reduce-scatter)")
        grad, p.bwd_buf, p.bwd_keep = p.bwd_buf, None, None
        return grad, None, None, None


class _AGWait(torch.autograd.Function):
    @staticmethod
    def forward(ctx, buf, world, group, pending):
        _wait(pending.work, pending.timeout, "all-gather")
        pending.work = None
        ctx.meta = (world, GroupRef(group), pending)
        return buf.view_as(buf)

    @staticmethod
    def backward(ctx, dbuf):
        world, group_ref, p = ctx.meta
        group = group_ref.get()
        dbuf = dbuf.contiguous()
        p.bwd_buf = dbuf.new_empty((dbuf.shape[0] // world,) + tuple(dbuf.shape[1:]))
        p.bwd_keep = dbuf
        # sum of every rank's gradient for my shard: the dW of tokens on all ranks
        p.bwd_work = _reduce_scatter_single(p.bwd_buf, dbuf, op=dist.ReduceOp.SUM, group=group,
                                                async_op=True)
        return dbuf, None, None, None


def all_gather_start(w, group, timeout=None):
    pending = _Pending(timeout)
    world = dist.get_world_size(group)
    return AllGatherToken(_AGStart.apply(w, world, group, pending), world, GroupRef(group), pending)


def all_gather_wait(token: AllGatherToken) -> torch.Tensor:
    return _AGWait.apply(token.buf, token.world, token.group, token.pending)


def all_gather(w, group, timeout=None) -> torch.Tensor:
    """Differentiable all-gather along dim 0; backward reduce-scatters (sums) the gradient."""
    return all_gather_wait(all_gather_start(w, group, timeout))


# ---------------------------------------------------------------------------------------------
# small blocking metadata exchanges (not differentiable). Index math runs on the host, so these
# take and return CPU tensors; NCCL only moves CUDA tensors, so they travel through the GPU there.
def comm_device(group) -> torch.device:
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def exchange_counts(send_PX: torch.Tensor, group) -> torch.Tensor:
    """send_PX[j] goes to rank j; returns recv_PX with recv_PX[j] from rank j (int64, blocking, CPU)."""
    dev = comm_device(group)
    send_PX = send_PX.to(dev).contiguous()
    recv_PX = torch.empty_like(send_PX)
    dist.all_to_all_single(recv_PX, send_PX, group=group)
    return recv_PX.cpu()  # host sync: the splits are host integers


def all_gather_counts(x_X: torch.Tensor, group) -> torch.Tensor:
    """Returns [P, *x.shape] on the CPU: every rank's tensor (blocking)."""
    world = dist.get_world_size(group)
    x_X = x_X.to(comm_device(group)).contiguous()
    flat = x_X.new_empty(world * x_X.numel())  # gloo wants the concatenated (flat) output shape
    _all_gather_single(flat, x_X.view(-1), group=group)
    return flat.view((world,) + tuple(x_X.shape)).cpu()


def all_reduce_host(x: torch.Tensor, group, op=dist.ReduceOp.SUM) -> torch.Tensor:
    """Blocking all-reduce of a small CPU tensor; returns the CPU result."""
    y = x.to(comm_device(group))
    dist.all_reduce(y, op=op, group=group)
    return y.cpu()


def broadcast_host(x: torch.Tensor, src_group_rank: int, group) -> torch.Tensor:
    y = x.to(comm_device(group))
    dist.broadcast(y, src=dist.get_global_rank(group, src_group_rank), group=group)
    return y.cpu()
