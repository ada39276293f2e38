"""A user's script: shard a MoELayer, one forward and backward, check, destroy the group, exit.

    torchrun --standalone --nproc_per_node=4 tests/parallel/exit_script.py
    python -m torch.distributed.run --standalone --nproc_per_node=4 tests/parallel/exit_script.py

Issue 11: the work passed but the process aborted at exit ("terminate called without an active
exception", exit code -6) because something the runtime started outlived the process group.
The exit code is the check: 0 on every rank, every time (tests/parallel/test_exit.py runs it 20 times);
the script also checks that the group is gone right after destroy_process_group().
The reference runs first and the check ends in a collective, so the process exits right after
its last collective, as a short user script does (the abort was a race with the interpreter's
shutdown).
"""
from __future__ import annotations

import copy
import weakref

import torch
import torch.distributed as dist

from moesys import MoEConfig, MoELayer
from moesys.parallel import apply_expert_parallel

D, F, E, K, T = 16, 24, 8, 2, 64  # T: tokens per rank


def main() -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)  # the same weights on every rank
    layer = MoELayer(MoEConfig(hidden_size=D, ffn_hidden_size=F, num_experts=E, top_k=K))
    reference = copy.deepcopy(layer)
    x_TD = torch.randn(T, D, generator=torch.Generator().manual_seed(rank))
    y_ref, aux_ref = reference(x_TD)
    (y_ref.square().sum() + aux_ref.loss).backward()

    apply_expert_parallel(layer, dist.group.WORLD)  # auto mode: probe + tuner
    y_TD, aux = layer(x_TD)
    (y_TD.square().sum() + aux.loss).backward()

    # every rank must agree that every rank is right: the largest error over the group
    errors = [(y_TD - y_ref).abs().max()]
    errors += [(p.grad - q.grad).abs().max() for p, q in zip(layer.router.parameters(), reference.router.parameters())]
    worst = torch.stack(errors).max()
    dist.all_reduce(worst, op=dist.ReduceOp.MAX)
    if not worst < 1e-5:
        raise AssertionError(f"rank {rank}: the sharded layer differs from the reference by {float(worst):.3g}")
    # the runtime borrows the group, never owns it: destroy_process_group() must destroy it (and
    # join its gloo worker threads) now, while this script still holds the layer and its outputs
    group = weakref.ref(dist.group.WORLD)
    dist.destroy_process_group()
    if group() is not None:
        raise AssertionError(f"rank {rank}: the process group outlived destroy_process_group()")


if __name__ == "__main__":
    main()
