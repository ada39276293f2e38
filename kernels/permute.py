"""Permute tokens into expert order and combine them back with their routing weights.

Legend: T tokens, N kept routes, D hidden.

permute:   x_ND[i]  = x_TD[token_idx_N[i]]
unpermute: y_TD[t]  = sum over i with token_idx_N[i] == t of weight_N[i] * y_ND[i]
(a token whose routes were all dropped gets 0.)
"""
from __future__ import annotations

import torch

from . import backend as _backend


def _check(name: str, token_idx_N: torch.Tensor, n_rows: int) -> None:
    if token_idx_N.dim() != 1 or token_idx_N.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{name}: token_idx must be a 1-D integer tensor, got {token_idx_N.dtype} {tuple(token_idx_N.shape)}")
    if token_idx_N.shape[0] != n_rows:
        raise ValueError(f"{name}: token_idx has {token_idx_N.shape[0]} entries but there are {n_rows} rows")


def permute_torch(x_TD: torch.Tensor, token_idx_N: torch.Tensor) -> torch.Tensor:
    return x_TD.index_select(0, token_idx_N)


def unpermute_torch(y_ND: torch.Tensor, token_idx_N: torch.Tensor, weight_N: torch.Tensor, num_tokens: int) -> torch.Tensor:
    # weights are fp32 (router precision); accumulate in fp32 and return y's dtype
    contrib = y_ND.float() * weight_N.float().unsqueeze(1)
    out = contrib.new_zeros(num_tokens, y_ND.shape[1])
    out = out.index_add(0, token_idx_N, contrib)
    return out.to(y_ND.dtype)


def permute(x_TD: torch.Tensor, token_idx_N: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """Gather rows of x_TD into expert order. Differentiable."""
    _check("permute", token_idx_N, token_idx_N.shape[0])
    if _backend.resolve(backend, x_TD.device) == "triton":
        from .permute_triton import permute_triton

        return permute_triton(x_TD, token_idx_N)
    return permute_torch(x_TD, token_idx_N)


def unpermute(y_ND: torch.Tensor, token_idx_N: torch.Tensor, weight_N: torch.Tensor, num_tokens: int, *, backend: str = "auto") -> torch.Tensor:
    """Scatter-add expert outputs back to tokens, each scaled by its routing weight. Differentiable
    in y_ND and weight_N."""
    _check("unpermute", token_idx_N, y_ND.shape[0])
    if weight_N.shape != token_idx_N.shape:
        raise ValueError(f"unpermute: weight has shape {tuple(weight_N.shape)}, token_idx {tuple(token_idx_N.shape)}")
    if _backend.resolve(backend, y_ND.device) == "triton":
        from .permute_triton import unpermute_triton

        return unpermute_triton(y_ND, token_idx_N, weight_N, num_tokens)
    return unpermute_torch(y_ND, token_idx_N, weight_N, num_tokens)
