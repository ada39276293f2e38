"""A small decoder-only GPT whose feed-forward blocks are moesys MoE layers.

Legend: B batch, S sequence, D d_model, H heads, hd = D/H, V vocab.
Single-device model code: expert parallelism is applied afterwards by the trainer
(`moesys.parallel.apply_expert_parallel` on each MoE layer), never here.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .moe.config import MoEConfig
from .moe.layer import MoEAux, MoELayer


@dataclass(frozen=True)
class GPTConfig:
    vocab_size: int
    n_layers: int
    d_model: int
    n_heads: int
    ffn_hidden: int
    seq_len: int
    moe_every: int = 1  # 1: every block's FFN is MoE; k: blocks k-1, 2k-1, ...; 0: dense
    dropout: float = 0.0
    tie_embeddings: bool = True
    qk_norm: bool = False  # RMSNorm of each head's queries and keys before the dot product

    def is_moe(self, i: int) -> bool:
        return self.moe_every > 0 and (i + 1) % self.moe_every == 0


class KVCache:
    """Keys and values of every attention layer for the tokens seen so far (incremental decoding).

    `length` tokens are cached; GPTMoE.forward(idx, cache=c) treats idx as the next tokens (positions
    length ... length+S-1) and appends their keys and values. The positions are learned and absolute,
    so the cache holds at most model.seq_len tokens (moesys.generate slides the window by recomputing).
    """

    def __init__(self, n_layers: int):
        self.k: List[Optional[torch.Tensor]] = [None] * n_layers  # (B, H, length, hd)
        self.v: List[Optional[torch.Tensor]] = [None] * n_layers
        self.length = 0

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        if self.k[layer] is not None:
            k, v = torch.cat([self.k[layer], k], dim=2), torch.cat([self.v[layer], v], dim=2)
        self.k[layer], self.v[layer] = k, v
        return k, v


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.n_heads, self.dropout = cfg.n_heads, cfg.dropout
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=False)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        hd = cfg.d_model // cfg.n_heads
        self.q_norm = nn.RMSNorm(hd) if cfg.qk_norm else None
        self.k_norm = nn.RMSNorm(hd) if cfg.qk_norm else None

    def forward(self, x_BSD: torch.Tensor, cache: Optional[KVCache] = None, layer: int = 0) -> torch.Tensor:
        B, S, D = x_BSD.shape
        q, k, v = self.qkv(x_BSD).split(D, dim=-1)
        # (B, H, S, hd)
        q, k, v = (t.view(B, S, self.n_heads, D // self.n_heads).transpose(1, 2) for t in (q, k, v))
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        past = 0
        if cache is not None:
            past = cache.length
            k, v = cache.append(layer, k, v)  # (B, H, past+S, hd)
        if past == 0:
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                               dropout_p=self.dropout if self.training else 0.0)
        else:  # query i (position past+i) sees keys 0 .. past+i
            mask_SL = (torch.arange(past + S, device=q.device)[None, :]
                       <= past + torch.arange(S, device=q.device)[:, None])
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask_SL,
                                               dropout_p=self.dropout if self.training else 0.0)
        return self.proj(o.transpose(1, 2).reshape(B, S, D))


class DenseFFN(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.fc = nn.Linear(cfg.d_model, cfg.ffn_hidden, bias=False)
        self.proj = nn.Linear(cfg.ffn_hidden, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.gelu(self.fc(x)))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig, moe_cfg: MoEConfig, use_moe: bool):
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.d_model)
        self.attn = CausalSelfAttention(cfg)
        self.ln2 = nn.LayerNorm(cfg.d_model)
        self.moe = MoELayer(moe_cfg) if use_moe else None
        self.ffn = None if use_moe else DenseFFN(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x_BSD: torch.Tensor, cache: Optional[KVCache] = None, layer: int = 0):
        x_BSD = x_BSD + self.drop(self.attn(self.ln1(x_BSD), cache, layer))
        h = self.ln2(x_BSD)
        if self.moe is not None:
            y, aux = self.moe(h)
        else:
            y, aux = self.ffn(h), None
        return x_BSD + self.drop(y), aux


def check_moe_fits(moe_cfg: MoEConfig, d_model: int, moe_every: int, d_model_name: str) -> None:
    """What a decoder (the GPT or the modern one) asks of its MoE layers' config."""
    if moe_cfg.hidden_size != d_model:
        raise ValueError(f"MoEConfig.hidden_size ({moe_cfg.hidden_size}) != {d_model_name} ({d_model})")
    if moe_cfg.router == "expert_choice" and not moe_cfg.allow_noncausal and moe_every > 0:
        raise ValueError(
            "router='expert_choice' is not causal (experts pick tokens from the whole batch); "
            "set MoEConfig.allow_noncausal=True to use it in a decoder anyway"
        )


class GPTMoE(nn.Module):
    """Decoder-only GPT; `forward(idx_BS, cache=None) -> (logits_BSV, aux_loss, [MoEAux per MoE block])`."""

    def __init__(self, cfg: GPTConfig, moe_cfg: MoEConfig):
        super().__init__()
        check_moe_fits(moe_cfg, cfg.d_model, cfg.moe_every, "d_model")
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_emb = nn.Embedding(cfg.seq_len, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg, moe_cfg, cfg.is_moe(i)) for i in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self._init_weights()
        if cfg.tie_embeddings:
            self.head.weight = self.tok_emb.weight

    @torch.no_grad()
    def _init_weights(self) -> None:
        for name, m in self.named_modules():
            if isinstance(m, (nn.Linear, nn.Embedding)) and ".moe." not in f".{name}.":
                nn.init.normal_(m.weight, std=0.02)
        # GPT-2: scale the residual projections by 1/sqrt(2 * n_layers)
        for blk in self.blocks:
            nn.init.normal_(blk.attn.proj.weight, std=0.02 / (2 * self.cfg.n_layers) ** 0.5)
            if blk.ffn is not None:
                nn.init.normal_(blk.ffn.proj.weight, std=0.02 / (2 * self.cfg.n_layers) ** 0.5)

    def moe_layers(self) -> List[Tuple[int, MoELayer]]:
        """(block index, layer) of every MoE block."""
        return [(i, b.moe) for i, b in enumerate(self.blocks) if b.moe is not None]

    def forward(self, idx_BS: torch.Tensor, cache: Optional[KVCache] = None):
        """cache: a KVCache to extend (incremental decoding; idx_BS are the tokens after its `length`)."""
        B, S = idx_BS.shape
        past = cache.length if cache is not None else 0
        if past + S > self.cfg.seq_len:
            raise ValueError(f"sequence length {past + S} > model.seq_len {self.cfg.seq_len}")
        pos = torch.arange(past, past + S, device=idx_BS.device)
        x = self.tok_emb(idx_BS) + self.pos_emb(pos)[None]
        auxes: List[MoEAux] = []
        for i, blk in enumerate(self.blocks):
            x, aux = blk(x, cache, i)
            if aux is not None:
                auxes.append(aux)
        if cache is not None:
            cache.length += S
        logits_BSV = self.head(self.ln_f(x))
        aux_loss = sum((a.loss for a in auxes), start=logits_BSV.new_zeros((), dtype=torch.float32))
        return logits_BSV, aux_loss, auxes


def lm_loss(logits_BSV: torch.Tensor, y_BS: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Next-token cross-entropy in float32."""
    return F.cross_entropy(logits_BSV.float().reshape(-1, logits_BSV.shape[-1]), y_BS.reshape(-1), reduction=reduction)
