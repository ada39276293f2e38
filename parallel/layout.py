"""Where every expert (and every F-slice of an expert) lives in an expert-parallel group.

Legend: P ranks, E global experts, L = E_local experts per rank, S = F-shards per expert,
N rows grouped by global expert (the layer's x_ND), F ffn width.

P <= E: rank r holds experts [r*E/P, (r+1)*E/P), whole (S = 1).
P >  E: S = P/E ranks share an expert; rank r holds expert r // S, F-slice r % S (L = 1). Tokens
        for expert e go to all S ranks and the partial outputs are summed (the activation is
        elementwise over F, so act(x @ w1[:, f]) @ w2[f, :] summed over F-slices is the full FFN).
The layout is the same for every mode and dispatcher, so switching costs no weight migration.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


@dataclass(frozen=True)
class ExpertLayout:
    world: int  # P
    rank: int
    num_experts: int  # E
    ffn_size: int  # F (full)

    def __post_init__(self) -> None:
        P, E, F = self.world, self.num_experts, self.ffn_size
        if P <= E and E % P != 0:
            raise ValueError(f"num_experts ({E}) must be divisible by the expert-parallel size ({P})")
        if P > E:
            if P % E != 0:
                raise ValueError(
                    f"expert-parallel size ({P}) > num_experts ({E}) needs P divisible by E to shard "
                    f"each expert's F over P/E ranks"
                )
            if F % (P // E) != 0:
                raise ValueError(
                    f"ffn_hidden_size ({F}) must be divisible by the F-shards per expert ({P // E} = "
                    f"expert-parallel size {P} / num_experts {E})"
                )

    @property
    def shards(self) -> int:  # S
        return max(1, self.world // self.num_experts)

    @property
    def local_experts(self) -> int:  # L
        return max(1, self.num_experts // self.world)

    def first_expert(self, rank: int) -> int:
        return rank // self.shards if self.shards > 1 else rank * self.local_experts

    @property
    def expert_slice(self) -> slice:
        lo = self.first_expert(self.rank)
        return slice(lo, lo + self.local_experts)

    @property
    def f_slice(self) -> Optional[slice]:
        if self.shards == 1:
            return None
        width = self.ffn_size // self.shards
        j = self.rank % self.shards
        return slice(j * width, (j + 1) * width)

    def dest_experts(self) -> torch.Tensor:
        """[P*L] global expert ids, rank-major: what each destination rank holds, in order."""
        return torch.tensor(
            [self.first_expert(j) + i for j in range(self.world) for i in range(self.local_experts)],
            dtype=torch.long,
        )


def expand_rows(counts_E: torch.Tensor, experts_X: torch.Tensor) -> torch.Tensor:
    """Row indices into x_ND (grouped by expert) taking the rows of experts_X in that order.

    Used for F-sharding (an expert's rows sent to each of its S ranks) and chunking. Pure index math,
    so the gather/index_add it drives is exactly differentiable by autograd.
    """
    offsets_E = torch.cumsum(counts_E, 0) - counts_E
    c_X = counts_E[experts_X]
    starts_X = offsets_E[experts_X]
    total = int(c_X.sum())  # host sync (CPU tensors here)
    if total == 0:
        return torch.zeros(0, dtype=torch.long)
    # row i of block k is starts_X[k] + (i - block_start_k)
    block_start = torch.cumsum(c_X, 0) - c_X
    rep_start = torch.repeat_interleave(starts_X - block_start, c_X)
    return torch.arange(total) + rep_start


def split_counts(counts_E: torch.Tensor, chunks: int) -> list[torch.Tensor]:
    """Split each expert's rows into `chunks` near-equal parts: [chunks] of counts_E-shaped tensors."""
    base = counts_E // chunks
    rem = counts_E % chunks
    return [base + (rem > i).to(counts_E.dtype) for i in range(chunks)]


def chunk_rows(counts_E: torch.Tensor, chunk_counts: list[torch.Tensor],
               totals: Optional[list] = None) -> list[torch.Tensor]:
    """Row indices into x_ND of each chunk (each chunk still grouped by expert).
    totals: each chunk's row count as Python ints, when known (then nothing is read here)."""
    offsets_E = torch.cumsum(counts_E, 0) - counts_E
    done = torch.zeros_like(counts_E)
    out = []
    for i, c_E in enumerate(chunk_counts):
        total = int(c_E.sum()) if totals is None else totals[i]
        if total == 0:
            out.append(torch.zeros(0, dtype=torch.long))
        else:
            block_start = torch.cumsum(c_E, 0) - c_E
            out.append(torch.arange(total) + torch.repeat_interleave(offsets_E + done - block_start, c_E,
                                                                     output_size=total))
        done = done + c_E
    return out
