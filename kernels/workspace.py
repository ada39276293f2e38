"""Reusable CPU buffers for the MoE layer's large per-step tensors.

Why: on CPU, torch allocates every tensor through the C allocator. glibc serves blocks of tens of
MB with a fresh `mmap` and returns them to the OS on free, so each step touches every page of
every large tensor anew: a page fault and a kernel memset per 4 KiB (measured here: writing a
fresh 128 MB tensor takes ~37 ms, an already-mapped one ~5 ms). An MoE layer pays this on far
more memory than the dense FFN it replaces: its expert weight gradients are E/K times the dense
layer's (256 MB a step at E=64, D=512, F=1024), plus the permuted copies of the tokens. CUDA
does not have the problem (torch's caching allocator keeps freed blocks); this module gives the
CPU path the same thing for the tensors moesys itself allocates.

Safety: a cached block is handed out again only when nothing but the cache references its
storage (the storage's reference count is 1): no tensor, view, saved-for-backward tensor or
`.grad` anywhere can observe the reuse. A `.grad` produced from the cache is an ordinary tensor;
`zero_grad(set_to_none=True)` drops it and the next backward writes the same pages again.

Two kinds of block. "scratch" holds the tensors of one step (permuted tokens, the expert FFN's
intermediates); "grad" holds expert weight gradients, which live from the backward until the
optimizer's zero_grad. Taking a grad block first frees every unused scratch block: gradients
pile up at the end of the backward, which is where a layer's memory peaks, and scratch held idle
there would raise that peak (measured: E=64 peak RSS 437 MB instead of ~325 MB without this
rule). The scratch freed there is mapped afresh when next needed (in a model of many MoE
layers, by the next layer's backward); the grad blocks, the bulk of the bytes, are not.
`set_keep_scratch(True)` (the trainer's `trainer.cpu_buffer_cache_keep_scratch=true`) skips that rule: a stack of MoE layers then
reuses one layer's freed step buffers in the next layer's backward, faster for more memory
(`python benchmarks/stack_cpu.py` measures both).

Size classes: requests round up to 1/8 of their power of two, so varying row counts (capacity
drops, expert-parallel receive sizes) reuse blocks. Requests under `MIN_BYTES` are not cached
(glibc keeps small blocks on its heap). Unused blocks beyond `limit_bytes()` are freed, least
recently used first, whenever the cache allocates; `release()` frees every unused block. Off
with `set_enabled(False)` (the trainer's `trainer.cpu_buffer_cache=false`).
"""
from __future__ import annotations

import math
import threading
from typing import Optional, Sequence

import torch

MIN_BYTES = 1 << 20  # 1 MiB: smaller blocks stay on glibc's heap already

_lock = threading.Lock()
_blocks: dict[tuple, list] = {}  # (size class in bytes, kind) -> [[UntypedStorage, last-use tick], ...]
KINDS = ("scratch", "grad")
_tick = 0
_enabled = True  # set_enabled(); the trainer sets it from trainer.cpu_buffer_cache
_keep_scratch = False  # set_keep_scratch(); the trainer sets it from trainer.cpu_buffer_cache_keep_scratch
_limit: Optional[int] = None  # bytes of unused blocks kept; None = default
_stats = {"hits": 0, "misses": 0}
_use_count = getattr(torch._C, "_storage_Use_Count", None)  # private; without it nothing is cached


def _new_block(size: int):
    """[storage, last-use tick]: the pages are untouched (not resident) until first written."""
    return [torch.empty(size, dtype=torch.uint8).untyped_storage(), 0]


def set_enabled(flag: bool) -> None:
    """Turn the cache on or off for this process. Off keeps the blocks it holds (`release` frees
    the unused ones), so switching back on finds them again."""
    global _enabled
    _enabled = bool(flag)


def set_keep_scratch(flag: bool) -> None:
    """Keep idle scratch blocks when a grad block is taken (faster across many MoE layers, more
    memory held at the end of the backward); off by default."""
    global _keep_scratch
    _keep_scratch = bool(flag)


def keep_scratch() -> bool:
    return _keep_scratch


def enabled() -> bool:
    return _enabled and _use_count is not None


def set_limit(nbytes: Optional[int]) -> None:
    """Most bytes of unused blocks the cache keeps (None: the default, 8 GiB)."""
    global _limit
    if nbytes is not None and nbytes < 0:
        raise ValueError(f"workspace.set_limit: nbytes must be >= 0 or None, got {nbytes}")
    _limit = nbytes


def limit_bytes() -> int:
    return 8 << 30 if _limit is None else _limit


def _size_class(nbytes: int) -> int:
    # round up to a multiple of 1/8 of the power of two at or below nbytes: at most 12.5% waste
    step = max(1 << (nbytes.bit_length() - 4), 4096)
    return math.ceil(nbytes / step) * step


def _free(storage) -> bool:
    return _use_count(storage._cdata) == 1  # only the cache's own reference


def _cached_nbytes(shape: Sequence[int], dtype: torch.dtype, device: torch.device) -> Optional[int]:
    """The request's size in bytes when the cache serves it (large, on CPU, cache on), else None."""
    if torch.compiler.is_compiling():  # traced graphs allocate their own outputs
        return None
    nbytes = math.prod(int(s) for s in shape) * dtype.itemsize
    if torch.device(device).type == "cpu" and nbytes >= MIN_BYTES and enabled():
        return nbytes
    return None


def cacheable(shape: Sequence[int], dtype: torch.dtype, device: torch.device) -> bool:
    """Whether `empty` with these arguments is served from the cache (large, on CPU, cache on)."""
    return _cached_nbytes(shape, dtype, device) is not None


def empty(shape: Sequence[int], *, dtype: torch.dtype, device: torch.device, kind: str = "scratch") -> torch.Tensor:
    """An uninitialised contiguous tensor, from the cache where that helps (large, on CPU).

    kind="grad" for weight gradients (they live until the optimizer's zero_grad); "scratch" for
    tensors of one step. Taking a grad block first frees the unused scratch blocks: weight
    gradients pile up at the end of backward, and cached scratch must not add to that peak."""
    if kind not in KINDS:
        raise ValueError(f"workspace.empty: kind must be one of {KINDS}, got {kind!r}")
    shape = tuple(int(s) for s in shape)
    nbytes = _cached_nbytes(shape, dtype, device)
    if nbytes is None:
        return torch.empty(shape, dtype=dtype, device=device)
    size = _size_class(nbytes)
    global _tick
    with _lock:
        _tick += 1
        if kind == "grad" and not _keep_scratch:
            _trim(0, kinds=("scratch",))
        blocks = _blocks.setdefault((size, kind), [])
        entry = next((b for b in blocks if _free(b[0])), None)
        if entry is None:
            # best fit: an idle block of the same kind up to 4x larger serves the request rather
            # than a new block mapped beside it (which would raise the peak)
            entry = next((b for key in sorted(k for k in _blocks if k[1] == kind and size < k[0] <= 4 * size)
                          for b in _blocks[key] if _free(b[0])), None)
        if entry is not None:
            _stats["hits"] += 1
        else:
            _stats["misses"] += 1
            _trim(limit_bytes())
            entry = _new_block(size)
            blocks.append(entry)
        entry[1] = _tick
        storage = entry[0]
    return torch.empty((), dtype=dtype).set_(storage, 0, shape)


def empty_as(shape: Sequence[int], like: torch.Tensor, kind: str = "scratch") -> torch.Tensor:
    """`empty(shape)` with `like`'s dtype and device."""
    return empty(shape, dtype=like.dtype, device=like.device, kind=kind)


def _trim(keep: int, kinds=KINDS) -> None:
    """Drop unused blocks of `kinds`, least recently used first, until at most `keep` bytes of
    them remain (checked each time the cache allocates, and by `release`)."""
    unused = sorted(((b[1], key, b) for key, blocks in _blocks.items() if key[1] in kinds
                     for b in blocks if _free(b[0])), key=lambda u: u[0])
    total = sum(key[0] for _, key, _ in unused)
    for _, key, b in unused:
        if total <= keep:
            break
        _blocks[key] = [x for x in _blocks[key] if x is not b]
        total -= key[0]


def release() -> None:
    """Free every block nothing uses any more (blocks still in use stay until they are free)."""
    with _lock:
        _trim(0)
        for key in [k for k, v in _blocks.items() if not v]:
            del _blocks[key]


def stats() -> dict:
    """Hits, misses, and the bytes the cache holds (in use and unused)."""
    with _lock:
        held = sum(key[0] * len(blocks) for key, blocks in _blocks.items())
        unused = sum(key[0] for key, blocks in _blocks.items() for b in blocks if _free(b[0]))
        return {**_stats, "held_bytes": held, "unused_bytes": unused}
