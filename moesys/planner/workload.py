"""What `moesys-plan` needs to know of a training job, read from a `moesys-train` config.

Parameter counts come from the model itself, built on the meta device (no memory, any size), so
they are exact for moesys's GPT-MoE; expert parameters are the MoE layers' w1/w2/w3.
Tokens: trainer.batch_size sequences of model.seq_len per optimizer step over all data-parallel
ranks, in trainer.grad_accum micro-steps.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Optional

import torch

from moesys.moe.config import MoEConfig
from moesys.parallel.cost_model import Shape
from moesys.trainer import build_model


class PlanError(ValueError):
    """An impossible plan; the message names the field and the value (moesys-plan exits with 2)."""


@dataclass(frozen=True)
class Workload:
    moe: MoEConfig  # the MoE layer (hidden = d_model)
    n_layers: int
    n_moe_layers: int
    d_model: int
    n_heads: int
    seq_len: int
    vocab: int
    batch_size: int  # sequences per optimizer step, whole job
    grad_accum: int
    precision: str  # fp32 | bf16
    engine: str  # plain | fsdp | deepspeed
    zero_stage: int
    dense_params: int  # every parameter but the experts' (embeddings, attention, dense FFNs, routers, norms)
    dense_matmul_params: int  # of which used as GEMM weights per token (attention, dense FFNs, head)
    active_k: float  # mean experts per token (top_k; a dense-to-sparse gate's current value)
    skew: float  # hottest expert's load / mean load
    # pinned runtime choices (None: the tuner decides); the dispatcher is always the config's
    dispatcher: str = "alltoallv"
    mode: Optional[str] = None
    overlap: Optional[int] = None
    fsdp_param_dtype: str = "fp32"  # engine fsdp: the dtype weights are gathered in
    grad_overlap: bool = False  # engine plain: gradient reduction overlapped with the backward (parallel.grad_overlap)
    grad_bucket_mb: float = 25.0  # its bucket cap, MiB

    @property
    def matrices(self) -> int:
        return 3 if self.moe.gated else 2

    @property
    def expert_params_per_layer(self) -> int:
        return self.moe.num_experts * self.matrices * self.d_model * self.moe.ffn_hidden_size

    @property
    def param_bytes(self) -> int:
        """Bytes of a weight as the expert GEMMs read it (bf16 under autocast or DeepSpeed bf16)."""
        return 2 if self.precision == "bf16" else 4

    def tokens_per_rank(self, world: int) -> float:
        """Tokens each rank runs per micro-step."""
        return self.batch_size * self.seq_len / (world * self.grad_accum)

    def shape(self, ep: int) -> Shape:
        return Shape(world=ep, num_experts=self.moe.num_experts, hidden=self.d_model, ffn=self.moe.ffn_hidden_size,
                     matrices=self.matrices, dtype_bytes=self.param_bytes)

    def scaled(self, world: int, base_world: int, ep: int, base_ep: int) -> "Workload":
        """Weak scaling (Tutel's scaling runs): tokens per GPU and experts per GPU held."""
        E = max(1, self.moe.num_experts * ep // base_ep)
        moe = replace(self.moe, num_experts=E, top_k=min(self.moe.top_k, E))
        return replace(self, moe=moe, batch_size=self.batch_size * world // base_world)


def count_params(cfg) -> tuple:
    """(dense, dense GEMM weights, expert) parameter counts of the moesys-train model `cfg` (meta device)."""

    with torch.device("meta"):
        model = build_model(cfg)
    dense = expert = matmul = 0
    seen = set()
    for name, p in model.named_parameters():
        if id(p) in seen:  # tied embeddings
            continue
        seen.add(id(p))
        if ".experts.w" in name:
            expert += p.numel()
        else:
            dense += p.numel()
            if p.dim() == 2 and ("attn." in name or ".ffn." in name or name.startswith("head")):
                matmul += p.numel()
    if model.cfg.tie_embeddings:  # the head's GEMM uses the embedding matrix
        matmul += model.tok_emb.weight.numel()
    return dense, matmul, expert


def workload_from_config(cfg, skew: float = 1.25, active_k: Optional[float] = None) -> Workload:
    """A Workload from a moesys-train TrainConfig (validates the moe.* and model.* fields)."""
    m, t, p = cfg.model, cfg.trainer, cfg.parallel
    for name in ("n_layers", "d_model", "n_heads", "ffn_hidden", "seq_len"):
        if getattr(m, name) <= 0:
            raise PlanError(f"model.{name} must be > 0, got {getattr(m, name)}")
    if m.arch == "gpt" and m.d_model % m.n_heads:
        raise PlanError(f"model.d_model ({m.d_model}) must be divisible by model.n_heads ({m.n_heads})")
    for name in ("batch_size", "grad_accum"):
        if getattr(t, name) <= 0:
            raise PlanError(f"trainer.{name} must be > 0, got {getattr(t, name)}")
    if t.precision not in ("fp32", "bf16"):
        raise PlanError(f"trainer.precision={t.precision!r} is not one of fp32|bf16")
    if not skew >= 1:
        raise PlanError(f"--skew must be >= 1 (hottest expert load / mean load), got {skew}")
    try:
        moe = cfg.moe_config()
    except ValueError as e:
        raise PlanError(str(e)) from None
    n_moe = sum(1 for i in range(m.first_k_dense, m.n_layers) if m.moe_every > 0 and (i + 1) % m.moe_every == 0)
    if n_moe == 0:
        raise PlanError(f"model.moe_every={m.moe_every}: the model has no MoE layer to plan")
    dense, matmul, _ = count_params(cfg)
    if active_k is None:
        active_k = 1.0 if moe.router == "switch" else float(moe.top_k)
    overlap = None if str(p.overlap) == "auto" else int(p.overlap)
    return Workload(moe=moe, n_layers=m.n_layers, n_moe_layers=n_moe, d_model=m.d_model, n_heads=m.n_heads,
                    seq_len=m.seq_len, vocab=cfg.data.vocab_size, batch_size=t.batch_size, grad_accum=t.grad_accum,
                    precision=t.precision, engine=t.engine, zero_stage=t.zero_stage, dense_params=dense,
                    dense_matmul_params=matmul, active_k=active_k, skew=skew, dispatcher=p.dispatcher,
                    mode=None if p.mode == "auto" else p.mode, overlap=overlap,
                    fsdp_param_dtype=t.fsdp_param_dtype, grad_overlap=t.engine == "plain" and p.grad_overlap,
                    grad_bucket_mb=p.grad_bucket_mb)


def ep_sizes(wl: Workload, world: int) -> list:
    """Every EP size the layout allows on `world` ranks: dividing the world, and dividing E or
    (F-sharded experts) a multiple of E whose quotient divides F. Largest F-split: 8."""
    E, F = wl.moe.num_experts, wl.moe.ffn_hidden_size
    out = []
    for ep in range(1, world + 1):
        if world % ep:
            continue
        if ep <= E and E % ep == 0:
            out.append(ep)
        elif ep > E and ep % E == 0 and ep // E <= 8 and F % (ep // E) == 0:
            out.append(ep)
    return out


def check_ep(wl: Workload, world: int, ep: int) -> None:
    """PlanError naming the fields when `ep` cannot lay out this job on `world` ranks."""
    E, F = wl.moe.num_experts, wl.moe.ffn_hidden_size
    if ep <= 0:
        raise PlanError(f"--ep {ep}: parallel.ep must be > 0")
    if ep <= E and E % ep:
        raise PlanError(f"--ep {ep}: moe.num_experts ({E}) must be divisible by parallel.ep ({ep})")
    if ep > E and (ep % E or F % (ep // E)):
        raise PlanError(f"--ep {ep}: parallel.ep > moe.num_experts ({E}) needs parallel.ep divisible by "
                        f"moe.num_experts and model.ffn_hidden ({F}) divisible by parallel.ep / moe.num_experts")
    if world % ep:
        raise PlanError(f"--ep {ep}: the world size ({world} GPUs) must be divisible by parallel.ep ({ep})")
    tokens = wl.tokens_per_rank(world)
    if tokens < 1 or not math.isclose(tokens, round(tokens)):
        raise PlanError(f"trainer.batch_size ({wl.batch_size}) x model.seq_len ({wl.seq_len}) must split into whole "
                        f"tokens over {world} GPUs x trainer.grad_accum ({wl.grad_accum}); got {tokens:g} per GPU")
