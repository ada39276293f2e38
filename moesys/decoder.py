"""The modern decoder: RMSNorm, rotary positions, grouped-query or multi-head latent attention, SwiGLU.

One model covers the open MoE families (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, DeepSeek-V3): their
differences are DecoderConfig fields (q/k/v biases, q/k norm per head or over all heads, the dense
and MoE layer pattern, tied embeddings, MLA) plus the MoEConfig of the MoE blocks.

Legend: B batch, S sequence, D d_model, H query heads, G key/value heads, hd head dim, V vocab;
MLA: R = qk_rope_head_dim, N = qk_nope_head_dim, Dv = v_head_dim, Lq/Lkv the q / kv latent ranks.
Single-device model code: expert parallelism is applied afterwards by the trainer, never here.
`forward(idx_BS, cache=None) -> (logits_BSV, aux_loss, [MoEAux per MoE block])`, as GPTMoE's.
Positions are rotary: nothing in the weights bounds the sequence length.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .model import KVCache, check_moe_fits
from .moe.config import MoEConfig
from .moe.layer import MoEAux, MoELayer

QK_NORM_SCOPES = ("head", "all")
# the trainer's model.* fields that only the decoder has (the rest it shares with the GPT)
DECODER_FIELDS = ("n_kv_heads", "head_dim", "norm_eps", "rope_theta", "qkv_bias", "out_bias", "qk_norm_scope",
                  "dense_ffn_hidden", "first_k_dense", "q_lora_rank", "kv_lora_rank", "qk_rope_head_dim",
                  "qk_nope_head_dim", "v_head_dim")


@dataclass(frozen=True)
class DecoderConfig:
    """Shapes and switches of the decoder; validated at construction (errors name the model.* field).

    `ffn_hidden` is each routed expert's width (it goes to MoEConfig.ffn_hidden_size);
    `dense_ffn_hidden` the width of the dense SwiGLU FFN of the non-MoE blocks.
    """

    vocab_size: int
    n_layers: int
    d_model: int
    n_heads: int
    dense_ffn_hidden: int
    n_kv_heads: Optional[int] = None  # None: n_heads (multi-head attention); fewer: grouped-query
    head_dim: Optional[int] = None  # None: d_model // n_heads
    norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    qkv_bias: bool = False  # biases on the q, k, v projections (Qwen2-MoE)
    out_bias: bool = False  # bias on the attention output projection
    qk_norm: bool = False  # RMSNorm of queries and keys before RoPE
    qk_norm_scope: str = "head"  # head: over each head's hd (Qwen3-MoE); all: over all heads (OLMoE)
    moe_every: int = 1  # block i is MoE when i >= first_k_dense and (i + 1) % moe_every == 0; 0: dense
    first_k_dense: int = 0  # the first k blocks are dense (DeepSeek-V3's first_k_dense_replace)
    tie_embeddings: bool = False
    dropout: float = 0.0
    # multi-head latent attention (DeepSeek-V2/V3): on when kv_lora_rank is set
    q_lora_rank: Optional[int] = None  # None: queries through one D x H*(N+R) projection
    kv_lora_rank: Optional[int] = None
    qk_rope_head_dim: int = 0
    qk_nope_head_dim: int = 0
    v_head_dim: int = 0

    def __post_init__(self) -> None:
        def positive(name: str, optional: bool = False) -> None:
            v = getattr(self, name)
            if optional and v is None:
                return
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"model.{name} must be a positive integer{' or null' if optional else ''}, got {v!r}")

        for name in ("vocab_size", "n_layers", "d_model", "n_heads", "dense_ffn_hidden"):
            positive(name)
        for name in ("n_kv_heads", "head_dim", "q_lora_rank", "kv_lora_rank"):
            positive(name, optional=True)
        for name in ("qkv_bias", "out_bias", "qk_norm", "tie_embeddings"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"model.{name} must be true or false, got {getattr(self, name)!r}")
        if not (math.isfinite(self.norm_eps) and self.norm_eps > 0):
            raise ValueError(f"model.norm_eps must be a finite number > 0, got {self.norm_eps}")
        if not (math.isfinite(self.rope_theta) and self.rope_theta > 1):
            raise ValueError(f"model.rope_theta must be a finite number > 1, got {self.rope_theta}")
        if self.qk_norm_scope not in QK_NORM_SCOPES:
            raise ValueError(f"model.qk_norm_scope={self.qk_norm_scope!r} is not one of {'|'.join(QK_NORM_SCOPES)}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"model.dropout must be in [0, 1), got {self.dropout}")
        if isinstance(self.moe_every, bool) or not isinstance(self.moe_every, int) or self.moe_every < 0:
            raise ValueError(f"model.moe_every must be an integer >= 0 (0: a dense model), got {self.moe_every!r}")
        fk = self.first_k_dense
        if isinstance(fk, bool) or not isinstance(fk, int) or not 0 <= fk <= self.n_layers:
            raise ValueError(f"model.first_k_dense must be an integer in [0, model.n_layers ({self.n_layers})], "
                             f"got {fk!r}")
        if self.mla:
            for name in ("qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim"):
                positive(name)
            if self.qk_rope_head_dim % 2:
                raise ValueError(f"model.qk_rope_head_dim ({self.qk_rope_head_dim}) must be even (RoPE rotates pairs)")
            for name in ("n_kv_heads", "head_dim"):
                if getattr(self, name) is not None:
                    raise ValueError(f"model.{name}={getattr(self, name)} does not apply to latent attention "
                                     f"(model.kv_lora_rank={self.kv_lora_rank}): leave it null")
            if self.qkv_bias or self.out_bias or self.qk_norm:
                raise ValueError("model.qkv_bias / model.out_bias / model.qk_norm do not apply to latent attention "
                                 f"(model.kv_lora_rank={self.kv_lora_rank}): set them false")
        else:
            if self.q_lora_rank is not None:
                raise ValueError(f"model.q_lora_rank={self.q_lora_rank} needs latent attention: set "
                                 "model.kv_lora_rank too")
            for name in ("qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim"):
                if getattr(self, name) != 0:
                    raise ValueError(f"model.{name}={getattr(self, name)} needs latent attention: set "
                                     "model.kv_lora_rank too (or leave it 0)")
            if self.head_dim is None and self.d_model % self.n_heads:
                raise ValueError(f"model.d_model ({self.d_model}) must be divisible by model.n_heads "
                                 f"({self.n_heads}), or set model.head_dim")
            if self.n_heads % self.kv_heads:
                raise ValueError(f"model.n_kv_heads ({self.kv_heads}) must divide model.n_heads ({self.n_heads})")
            if self.hd % 2:
                raise ValueError(f"the head dimension ({self.hd}: model.head_dim or model.d_model / model.n_heads) "
                                 "must be even (RoPE rotates pairs)")

    @property
    def mla(self) -> bool:
        return self.kv_lora_rank is not None

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads if self.n_kv_heads is not None else self.n_heads

    @property
    def hd(self) -> int:
        return self.head_dim if self.head_dim is not None else self.d_model // self.n_heads

    def is_moe(self, i: int) -> bool:
        return i >= self.first_k_dense and self.moe_every > 0 and (i + 1) % self.moe_every == 0


# ---- rotary positions ------------------------------------------------------------------------------
def rope_cos_sin(positions_S: torch.Tensor, dim: int, theta: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [S, dim] in float32 for the half-split layout (pairs (i, i + dim/2) rotate together)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32, device=positions_S.device) / dim))
    freqs_SF = positions_S.float()[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs_SF, freqs_SF), dim=-1)
    return emb.cos(), emb.sin()


def apply_rope(x_BHSd: torch.Tensor, cos_Sd: torch.Tensor, sin_Sd: torch.Tensor) -> torch.Tensor:
    x1, x2 = x_BHSd.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return x_BHSd * cos_Sd.to(x_BHSd.dtype) + rotated * sin_Sd.to(x_BHSd.dtype)


def _attend(q_BHSd, k_BGLd, v_BGLd, past: int, dropout: float) -> torch.Tensor:
    """Causal attention of S queries at positions past..past+S-1 over L = past+S keys (G <= H heads)."""
    S = q_BHSd.shape[2]
    gqa = k_BGLd.shape[1] != q_BHSd.shape[1]
    if past == 0:
        return F.scaled_dot_product_attention(q_BHSd, k_BGLd, v_BGLd, is_causal=True, dropout_p=dropout,
                                              enable_gqa=gqa)
    L = k_BGLd.shape[2]
    mask_SL = torch.arange(L, device=q_BHSd.device)[None, :] <= past + torch.arange(S, device=q_BHSd.device)[:, None]
    return F.scaled_dot_product_attention(q_BHSd, k_BGLd, v_BGLd, attn_mask=mask_SL, dropout_p=dropout,
                                          enable_gqa=gqa)


class Attention(nn.Module):
    """Grouped-query attention with rotary positions, optional q/k/v biases and q/k RMSNorm."""

    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        H, G, hd, D = cfg.n_heads, cfg.kv_heads, cfg.hd, cfg.d_model
        self.H, self.G, self.hd, self.theta, self.dropout = H, G, hd, cfg.rope_theta, cfg.dropout
        self.q_proj = nn.Linear(D, H * hd, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(D, G * hd, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(D, G * hd, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(H * hd, D, bias=cfg.out_bias)
        self.per_head_norm = cfg.qk_norm_scope == "head"
        q_dim, k_dim = (hd, hd) if self.per_head_norm else (H * hd, G * hd)
        self.q_norm = nn.RMSNorm(q_dim, eps=cfg.norm_eps) if cfg.qk_norm else None
        self.k_norm = nn.RMSNorm(k_dim, eps=cfg.norm_eps) if cfg.qk_norm else None

    def forward(self, x_BSD: torch.Tensor, positions_S: torch.Tensor, cache: Optional[KVCache], layer: int):
        B, S, _ = x_BSD.shape
        q, k, v = self.q_proj(x_BSD), self.k_proj(x_BSD), self.v_proj(x_BSD)
        if self.q_norm is not None and not self.per_head_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q_BHSd = q.view(B, S, self.H, self.hd).transpose(1, 2)
        k_BGSd = k.view(B, S, self.G, self.hd).transpose(1, 2)
        v_BGSd = v.view(B, S, self.G, self.hd).transpose(1, 2)
        if self.q_norm is not None and self.per_head_norm:
            q_BHSd, k_BGSd = self.q_norm(q_BHSd), self.k_norm(k_BGSd)
        cos, sin = rope_cos_sin(positions_S, self.hd, self.theta)
        q_BHSd, k_BGSd = apply_rope(q_BHSd, cos, sin), apply_rope(k_BGSd, cos, sin)
        past = 0
        if cache is not None:
            past = cache.length
            k_BGSd, v_BGSd = cache.append(layer, k_BGSd, v_BGSd)
        o = _attend(q_BHSd, k_BGSd, v_BGSd, past, self.dropout if self.training else 0.0)
        return self.o_proj(o.transpose(1, 2).reshape(B, S, self.H * self.hd))


class LatentAttention(nn.Module):
    """DeepSeek-V2/V3 multi-head latent attention: queries (optionally) and keys/values through
    low-rank latents with an RMSNorm each; a rotary part of R dims per head, its key shared by all heads.

    The rotary dims use the half-split layout; DeepSeek's checkpoints interleave them, which the
    Hugging Face importer turns into this layout by permuting weight rows (moesys/hf.py)."""

    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        D, H = cfg.d_model, cfg.n_heads
        self.H, self.R, self.N, self.Dv = H, cfg.qk_rope_head_dim, cfg.qk_nope_head_dim, cfg.v_head_dim
        self.Lkv, self.theta, self.dropout = cfg.kv_lora_rank, cfg.rope_theta, cfg.dropout
        qk = self.N + self.R
        if cfg.q_lora_rank is None:
            self.q_proj = nn.Linear(D, H * qk, bias=False)
            self.q_a_proj = self.q_a_norm = self.q_b_proj = None
        else:
            self.q_proj = None
            self.q_a_proj = nn.Linear(D, cfg.q_lora_rank, bias=False)
            self.q_a_norm = nn.RMSNorm(cfg.q_lora_rank, eps=cfg.norm_eps)
            self.q_b_proj = nn.Linear(cfg.q_lora_rank, H * qk, bias=False)
        self.kv_a_proj = nn.Linear(D, self.Lkv + self.R, bias=False)
        self.kv_a_norm = nn.RMSNorm(self.Lkv, eps=cfg.norm_eps)
        self.kv_b_proj = nn.Linear(self.Lkv, H * (self.N + self.Dv), bias=False)
        self.o_proj = nn.Linear(H * self.Dv, D, bias=False)

    def forward(self, x_BSD: torch.Tensor, positions_S: torch.Tensor, cache: Optional[KVCache], layer: int):
        B, S, _ = x_BSD.shape
        H, R, N, Dv = self.H, self.R, self.N, self.Dv
        q = self.q_proj(x_BSD) if self.q_proj is not None else self.q_b_proj(self.q_a_norm(self.q_a_proj(x_BSD)))
        q_BHSq = q.view(B, S, H, N + R).transpose(1, 2)
        q_nope, q_rope = q_BHSq.split([N, R], dim=-1)
        kv_lat, k_rope = self.kv_a_proj(x_BSD).split([self.Lkv, R], dim=-1)
        kv_BHSx = self.kv_b_proj(self.kv_a_norm(kv_lat)).view(B, S, H, N + Dv).transpose(1, 2)
        k_nope, v_BHSv = kv_BHSx.split([N, Dv], dim=-1)
        cos, sin = rope_cos_sin(positions_S, R, self.theta)
        q_rope = apply_rope(q_rope, cos, sin)
        k_rope_B1SR = apply_rope(k_rope.view(B, 1, S, R), cos, sin)
        q_BHSq = torch.cat((q_nope, q_rope), dim=-1)
        k_BHSq = torch.cat((k_nope, k_rope_B1SR.expand(B, H, S, R)), dim=-1)
        past = 0
        if cache is not None:
            past = cache.length
            k_BHSq, v_BHSv = cache.append(layer, k_BHSq, v_BHSv)
        o = _attend(q_BHSq, k_BHSq, v_BHSv, past, self.dropout if self.training else 0.0)  # scale (N+R)^-0.5
        return self.o_proj(o.transpose(1, 2).reshape(B, S, H * Dv))


class SwiGLU(nn.Module):
    """Dense FFN: w2(silu(w1 x) * w3 x); weights in nn.Linear's [out, in] layout."""

    def __init__(self, d_model: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(d_model, hidden, bias=False)
        self.w3 = nn.Linear(d_model, hidden, bias=False)
        self.w2 = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class DecoderBlock(nn.Module):
    def __init__(self, cfg: DecoderConfig, moe_cfg: MoEConfig, use_moe: bool):
        super().__init__()
        self.attn_norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.attn = LatentAttention(cfg) if cfg.mla else Attention(cfg)
        self.ffn_norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.moe = MoELayer(moe_cfg) if use_moe else None
        self.ffn = None if use_moe else SwiGLU(cfg.d_model, cfg.dense_ffn_hidden)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x_BSD: torch.Tensor, positions_S: torch.Tensor, cache: Optional[KVCache] = None,
                layer: int = 0):
        x_BSD = x_BSD + self.drop(self.attn(self.attn_norm(x_BSD), positions_S, cache, layer))
        h = self.ffn_norm(x_BSD)
        if self.moe is not None:
            y, aux = self.moe(h)
        else:
            y, aux = self.ffn(h), None
        return x_BSD + self.drop(y), aux


class Decoder(nn.Module):
    """Decoder-only transformer of the modern MoE families; the same interface as GPTMoE."""

    def __init__(self, cfg: DecoderConfig, moe_cfg: MoEConfig):
        super().__init__()
        check_moe_fits(moe_cfg, cfg.d_model, cfg.moe_every, "model.d_model")
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(DecoderBlock(cfg, moe_cfg, cfg.is_moe(i)) for i in range(cfg.n_layers))
        self.norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self._init_weights()
        if cfg.tie_embeddings:
            self.head.weight = self.tok_emb.weight

    @torch.no_grad()
    def _init_weights(self) -> None:
        for name, m in self.named_modules():
            if ".moe." in f".{name}.":
                continue  # the MoE layers initialise themselves
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)
        # GPT-2: scale the residual projections by 1/sqrt(2 * n_layers)
        std = 0.02 / (2 * self.cfg.n_layers) ** 0.5
        for blk in self.blocks:
            nn.init.normal_(blk.attn.o_proj.weight, std=std)
            if blk.ffn is not None:
                nn.init.normal_(blk.ffn.w2.weight, std=std)

    def moe_layers(self) -> List[Tuple[int, MoELayer]]:
        """(block index, layer) of every MoE block."""
        return [(i, b.moe) for i, b in enumerate(self.blocks) if b.moe is not None]

    def forward(self, idx_BS: torch.Tensor, cache: Optional[KVCache] = None):
        """cache: a KVCache to extend (incremental decoding; idx_BS are the tokens after its `length`)."""
        _, S = idx_BS.shape
        past = cache.length if cache is not None else 0
        positions_S = torch.arange(past, past + S, device=idx_BS.device)
        x = self.tok_emb(idx_BS)
        auxes: List[MoEAux] = []
        for i, blk in enumerate(self.blocks):
            x, aux = blk(x, positions_S, cache, i)
            if aux is not None:
                auxes.append(aux)
        if cache is not None:
            cache.length += S
        logits_BSV = self.head(self.norm(x))
        aux_loss = sum((a.loss for a in auxes), start=logits_BSV.new_zeros((), dtype=torch.float32))
        return logits_BSV, aux_loss, auxes
