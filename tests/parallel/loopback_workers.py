"""Rank function of test_loopback.py (module-level: spawned ranks unpickle it by name)."""
from __future__ import annotations

import os

import sockets
import torch
import torch.distributed as dist

from moesys.parallel import ParallelDims


def listeners_after_groups() -> dict:
    """Build the mesh's groups (each a gloo group with its own sockets), run a collective, and report
    the listening sockets of this rank and of the parent serving the store, read while all are up."""
    dims = ParallelDims.build(ep=dist.get_world_size(), tp=1)
    t = torch.ones(1)
    dist.all_reduce(t, group=dims.ep_group)
    seen = sockets.listening_of([os.getpid(), os.getppid()])
    dist.barrier()  # no rank leaves (closing its sockets) before every rank has looked
    return {"rank": seen.get(os.getpid(), []), "parent": seen.get(os.getppid(), []), "sum": float(t)}
