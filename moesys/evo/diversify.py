"""Expert diversification: spawn E experts from one trained dense FFN.

Legend: D hidden, F ffn hidden, E experts, L local experts (this rank: global [o, o + L)).

Methods (`spawn`):
  copy          exact copies (sparse upcycling, Komatsuzaki et al. 2022).
  mask          EvoMoE's expert-diversify (Nie et al. 2021): expert e gets W * M_e with M_e an
                independent Bernoulli(1 - mask_ratio) mask per weight entry. The paper describes a
                multiplicative random mask on the shared expert's weights, so masked entries are
                zeroed (mask_fill="zero", the default, no rescaling); mask_fill="redraw" re-draws
                them from N(mean, std) of the original matrix instead.
  drop_upcycle  Drop-Upcycling (Nozawa et al. 2025): for each expert, a random fraction r of the F
                hidden units is re-initialised -- columns of w1/w3 and rows of w2 -- from
                N(mean, std) of the original matrix; the other units are copied.

Determinism: every expert draws from its own generator seeded from (seed, layer, expert), so a
rank builds exactly its slice [o, o + L) without generating the others, and the spawned weights
do not depend on the expert-parallel size. Random numbers are drawn on the CPU in float32 (so
they are the same on every device) and then moved.
"""
from __future__ import annotations

import hashlib
from typing import Dict, Optional

import torch

WEIGHTS = ("w1", "w2", "w3")
# dim of the F (hidden-unit) axis in each weight: w1/w3 [D, F], w2 [F, D]
_F_DIM = {"w1": 1, "w3": 1, "w2": 0}


def stream_seed(seed: int, layer: int, tag) -> int:
    """A 63-bit seed for the random stream (seed, layer, tag); tag = expert index or a name."""
    h = hashlib.blake2b(f"moesys.evo/{seed}/{layer}/{tag}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & ((1 << 63) - 1)


def _generator(seed: int, layer: int, tag) -> torch.Generator:
    g = torch.Generator(device="cpu")
    g.manual_seed(stream_seed(seed, layer, tag))
    return g


def _normal_like(w: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """N(mean(w), std(w)) of w's shape, drawn in float32 on the CPU."""
    w32 = w.detach().float()
    return torch.randn(w.shape, generator=g, dtype=torch.float32) * w32.std() + w32.mean()


def spawn_expert(
    dense: Dict[str, torch.Tensor],
    *,
    method: str,
    generator: torch.Generator,
    mask_ratio: float = 0.2,
    mask_fill: str = "zero",
    reinit_fraction: float = 0.5,
) -> Dict[str, torch.Tensor]:
    """One expert's weights (float32, CPU) from the dense FFN's `dense` = {w1 [D,F], w2 [F,D], w3?}.

    The draws happen in a fixed order (w1, w2, w3) so the result is a pure function of the
    generator's seed.
    """
    src = {k: v.detach().float().cpu() for k, v in dense.items() if v is not None}
    if method == "copy":
        return {k: v.clone() for k, v in src.items()}
    if method == "mask":
        out = {}
        for k in WEIGHTS:
            if k not in src:
                continue
            w = src[k]
            keep = torch.rand(w.shape, generator=generator) >= mask_ratio
            fill = torch.zeros_like(w) if mask_fill == "zero" else _normal_like(w, generator)
            out[k] = torch.where(keep, w, fill)
        return out
    if method == "drop_upcycle":
        F = src["w1"].shape[1]
        n = int(round(reinit_fraction * F))
        units = torch.randperm(F, generator=generator)[:n]
        out = {}
        for k in WEIGHTS:
            if k not in src:
                continue
            w = src[k].clone()
            fresh = _normal_like(w, generator)
            if _F_DIM[k] == 1:
                w[:, units] = fresh[:, units]
            else:
                w[units, :] = fresh[units, :]
            out[k] = w
        return out
    raise ValueError(f"spawn method {method!r} is not one of copy | mask | drop_upcycle")


def spawn_slice(
    dense: Dict[str, torch.Tensor],
    *,
    first_expert: int,
    num_local: int,
    layer: int,
    seed: int,
    method: str,
    f_slice: Optional[slice] = None,
    **kw,
) -> Dict[str, torch.Tensor]:
    """Stacked weights of global experts [first_expert, first_expert + num_local): {w1 [L,D,F], ...}.

    `f_slice` selects this rank's part of the F axis when experts are F-sharded (more ranks than
    experts): the whole expert is drawn, then sliced, so the result is again independent of P.
    """
    experts = []
    for e in range(first_expert, first_expert + num_local):
        w = spawn_expert(dense, method=method, generator=_generator(seed, layer, e), **kw)
        if f_slice is not None:
            w = {k: (v[:, f_slice] if _F_DIM[k] == 1 else v[f_slice, :]) for k, v in w.items()}
        experts.append(w)
    return {k: torch.stack([w[k] for w in experts]) for k in experts[0]}


def fresh_router(num_experts: int, hidden: int, *, layer: int, seed: int, std: float = 0.02) -> torch.Tensor:
    """A new router weight [E, D] ~ N(0, std^2), identical on every rank (replicated parameter)."""
    g = _generator(seed, layer, "router")
    return torch.randn(num_experts, hidden, generator=g, dtype=torch.float32) * std
