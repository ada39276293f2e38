"""Consecutive items packed under a size cap: the gradient buckets of the overlapped all-reduce
(moesys.parallel.grad_overlap) and the safetensors shard files of the Hugging Face export
(moesys.hf_export) are both this one greedy pass.

    groups = pack_consecutive(items, cap, size=nbytes)              # [[item, ...], ...]
    groups = pack_consecutive(items, cap, size=nbytes, first_cap=c)  # the first group: at most c

Pure (no torch, no state), in the lowest layer both callers may import (the runtime and the
application both stand on the MoE core).
"""
from __future__ import annotations

from typing import Callable, Iterable, List, Optional, TypeVar

T = TypeVar("T")


def pack_consecutive(items: Iterable[T], cap: int, *, size: Callable[[T], int],
                     first_cap: Optional[int] = None) -> List[List[T]]:
    """`items`, in their order, cut into consecutive groups whose sizes sum to at most `cap` (the
    first group: at most `first_cap`, default `cap`). Greedy: an item joins the open group unless it
    would take it past the cap, then it opens the next one; an item larger than the cap is a group
    of its own. Every item lands in exactly one group, in order; no items, no groups. (The callers
    check their own caps, where the user set them: parallel.grad_bucket_mb, --max-shard-bytes.)"""
    groups: List[List[T]] = []
    open_group: List[T] = []
    total = 0
    limit = cap if first_cap is None else first_cap
    for item in items:
        n = size(item)
        if open_group and total + n > limit:
            groups.append(open_group)
            open_group, total, limit = [], 0, cap
        open_group.append(item)
        total += n
    if open_group:
        groups.append(open_group)
    return groups
