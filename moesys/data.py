"""Token data for the GPT-MoE trainer: the embedded corpus, a text file, or a token memmap.

Sources (`DataConfig.path`):
  None            CPython's `pydoc_data.topics` texts joined in sorted key order, UTF-8 bytes (vocab 256)
  *.bin           a flat uint16/uint32 token array (nanoGPT layout), memory-mapped
  anything else   a text file, UTF-8 bytes (vocab 256)
The last `val_fraction` of the tokens is the validation split; the split is fixed.

Batches are a pure function of (seed, step, micro-step): the window offsets of step s are drawn
from a generator seeded with (seed, s), for the *global* batch, and each data-parallel rank takes
its slice. So a resumed run sees exactly the batches of an uninterrupted one, and runs at any
world size see the same global batches (which is what makes EP resharding comparable).

Shapes: B = sequences, S = seq_len.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterator, Optional, Tuple

import numpy as np
import torch

from .errors import ConfigError, ConfigFileNotFoundError

_MIX = 0x9E3779B97F4A7C15  # odd 64-bit constant: mixes (seed, step) into one generator seed


def embedded_corpus() -> bytes:
    """The default corpus: pydoc's topic help texts (~466 kB), deterministic order."""
    from pydoc_data.topics import topics

    return "".join(topics[k] for k in sorted(topics)).encode("utf-8")


_NP_DTYPES = {"uint16": np.uint16, "uint32": np.uint32}


def count_tokens(path: Optional[str], dtype: str = "uint16") -> int:
    """The number of tokens of the source from its size alone (no token is read).

    Raises:
        ConfigFileNotFoundError: `path` does not exist.
        ConfigError: the file is empty or its size is not a multiple of the dtype.
    """
    if path is None:
        return len(embedded_corpus())
    if not os.path.isfile(path):
        raise ConfigFileNotFoundError(f"data.path={path!r}: no such file")
    size = os.path.getsize(path)
    if path.endswith(".bin"):
        itemsize = np.dtype(_NP_DTYPES[dtype]).itemsize
        if size == 0 or size % itemsize:
            raise ConfigError(f"data.path={path!r}: {size} bytes is not a non-empty multiple of {dtype} ({itemsize} bytes)")
        return size // itemsize
    if size == 0:
        raise ConfigError(f"data.path={path!r} is empty")
    return size


def load_tokens(path: Optional[str], dtype: str = "uint16", vocab_size: int = 256) -> np.ndarray:
    """All tokens of the source as a 1-D integer array (a read-only memmap for .bin files).

    Raises:
        ConfigFileNotFoundError: `path` does not exist.
        ConfigError: the file is empty, its size is not a multiple of the dtype, or a token id is
            >= vocab_size.
    """
    if path is None:
        return np.frombuffer(embedded_corpus(), dtype=np.uint8)
    count_tokens(path, dtype)  # the checks on the file's size
    if path.endswith(".bin"):
        tokens = np.memmap(path, dtype=_NP_DTYPES[dtype], mode="r")
        # checks the whole file once: a token id >= vocab would index past the embedding later
        top = int(tokens.max())
        if top >= vocab_size:
            raise ConfigError(f"data.path={path!r} holds token id {top} >= data.vocab_size ({vocab_size})")
        return tokens
    with open(path, "rb") as f:
        raw = f.read()
    return np.frombuffer(raw, dtype=np.uint8)


def unused_ids(tokens: np.ndarray, vocab_size: int) -> int:
    """How many of the ids 0 .. vocab_size-1 never occur in `tokens` (one pass, in chunks)."""
    seen = np.zeros(vocab_size, dtype=bool)
    step = 1 << 24
    for i in range(0, len(tokens), step):
        seen[np.asarray(tokens[i:i + step])] = True
    return int(vocab_size - seen.sum())


@dataclass(frozen=True)
class Split:
    tokens: np.ndarray  # 1-D

    def __len__(self) -> int:
        return len(self.tokens)


def check_split(num_tokens: int, val_fraction: float, seq_len: int) -> Tuple[int, int]:
    """(train, validation) token counts of the fixed split; raises ConfigError when either is too short.

    Validation needs one window of seq_len + 1 tokens; training one token more, because
    TrainBatches draws window starts from [0, len - seq_len - 1).
    """
    n_val = int(num_tokens * val_fraction)
    n_train = num_tokens - n_val
    for name, n, need in (("train", n_train, seq_len + 2), ("validation", n_val, seq_len + 1)):
        if n < need:
            raise ConfigError(
                f"model.seq_len={seq_len} does not fit the data: the {name} split has {n} tokens and needs at "
                f"least {need} (model.seq_len + {need - seq_len}); use more data, a shorter model.seq_len or "
                f"another data.val_fraction (now {val_fraction})"
            )
    return n_train, n_val


def train_val_split(tokens: np.ndarray, val_fraction: float, seq_len: int) -> Tuple[Split, Split]:
    """Fixed split: the last `val_fraction` of the tokens is validation.

    Raises ConfigError when either split is too short for a window (see check_split).
    """
    n_train, _ = check_split(len(tokens), val_fraction, seq_len)
    return Split(tokens[:n_train]), Split(tokens[n_train:])


def _windows(split: Split, starts: np.ndarray, seq_len: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """x_BS, y_BS (int64) of the windows starting at `starts`; y is x shifted by one."""
    idx = starts[:, None] + np.arange(seq_len + 1)[None, :]
    w = torch.from_numpy(np.asarray(split.tokens[idx], dtype=np.int64))
    return w[:, :-1].contiguous(), w[:, 1:].contiguous()


class TrainBatches:
    """Deterministic training batches: the global batch of step s is drawn from a generator of (seed, s).

    Args:
        split: the training tokens.
        seq_len: S.
        global_batch: sequences per optimizer step over all data-parallel ranks.
        grad_accum: micro-batches per step.
        dp_rank, dp_size: this rank's slice of each micro-batch.
        seed: the run's seed.
    """

    def __init__(self, split: Split, *, seq_len: int, global_batch: int, grad_accum: int,
                 dp_rank: int, dp_size: int, seed: int) -> None:
        if global_batch % (dp_size * grad_accum):
            raise ValueError(f"global batch {global_batch} is not divisible by dp ({dp_size}) x grad_accum ({grad_accum})")
        self.split, self.seq_len, self.seed = split, seq_len, seed
        self.global_batch, self.grad_accum = global_batch, grad_accum
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.micro_global = global_batch // grad_accum  # sequences per micro-step over all ranks
        self.local = self.micro_global // dp_size

    def step_batches(self, step: int) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        """The grad_accum micro-batches (x_BS, y_BS) of this rank at optimizer step `step`."""
        rng = np.random.default_rng([self.seed & 0xFFFFFFFF, step, _MIX & 0xFFFFFFFF])
        starts = rng.integers(0, len(self.split) - self.seq_len - 1, size=self.global_batch)
        for m in range(self.grad_accum):
            micro = starts[m * self.micro_global : (m + 1) * self.micro_global]
            mine = micro[self.dp_rank * self.local : (self.dp_rank + 1) * self.local]
            yield _windows(self.split, mine, self.seq_len)


def eval_batches(split: Split, *, seq_len: int, batch_size: int, n_batches: int,
                 dp_rank: int, dp_size: int) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
    """A fixed validation set: n_batches x batch_size windows evenly spread over the split.

    Each rank yields its contiguous share of every batch (possibly empty when batch_size < dp);
    the caller sums loss and token counts over ranks, so the result does not depend on dp.
    """
    total = batch_size * n_batches
    last = len(split) - seq_len - 1
    starts = np.linspace(0, last, num=total).astype(np.int64)
    for b in range(n_batches):
        batch = starts[b * batch_size : (b + 1) * batch_size]
        mine = np.array_split(batch, dp_size)[dp_rank]
        yield _windows(split, mine, seq_len)
