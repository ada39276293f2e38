"""Upcycling a trained dense GPT (our own trainer's checkpoint) into a GPT-MoE.

Every non-FFN weight is copied; each block's dense FFN becomes E experts spawned from it
(diversify.py: copy = sparse upcycling, drop_upcycle, mask) and a fresh router N(0, std^2).
With spawn="copy" and a router whose combine weights sum to one per token (top-k with
normalize_topk=True), the upcycled model computes exactly the dense model's function, so the
first loss after upcycling equals the dense model's loss (tests/moesys/test_evo_upcycle.py).

The source may be a GPTMoE with model.moe_every=0 (DenseFFN blocks: fc [F, D], proj [D, F], GELU,
no bias) or one whose MoE layers have one expert (E=1) or are EvoMoELayers still in the dense phase.
"""
from __future__ import annotations

import dataclasses
from typing import Dict

import torch

from moesys.moe.config import MoEConfig
from moesys.model import GPTMoE

from . import diversify as _div


def dense_ffn_weights(block) -> Dict[str, torch.Tensor]:
    """{w1 [D, F], w2 [F, D] (, w3)} of a block's dense FFN, in the experts' layout."""
    if block.ffn is not None:
        return {"w1": block.ffn.fc.weight.detach().t(), "w2": block.ffn.proj.weight.detach().t()}
    moe = block.moe
    src = getattr(moe, "dense", None) if getattr(moe, "in_dense_phase", False) else None
    if src is None:
        if moe.cfg.num_experts != 1:
            raise ValueError(f"upcycle: block's MoE layer has {moe.cfg.num_experts} experts; the source must be dense")
        src = moe.experts
    out = {"w1": src.w1[0].detach(), "w2": src.w2[0].detach()}
    if src.w3 is not None:
        out["w3"] = src.w3[0].detach()
    return out


@torch.no_grad()
def upcycle_model(dense: GPTMoE, moe_cfg: MoEConfig, *, seed: int, spawn: str = "copy",
                  router_std: float = 0.02, **spawn_kw) -> GPTMoE:
    """A GPTMoE with every FFN replaced by an E-expert MoE layer spawned from the dense FFN.

    Args:
        dense: the trained dense model (see module docstring).
        moe_cfg: the MoE layers' config; hidden/ffn sizes and activation must match the dense FFN.
        seed, spawn, router_std, spawn_kw: as in diversify.spawn_slice / fresh_router.
    """
    gcfg = dense.cfg
    if moe_cfg.hidden_size != gcfg.d_model or moe_cfg.ffn_hidden_size != gcfg.ffn_hidden:
        raise ValueError(
            f"upcycle: MoEConfig sizes (D={moe_cfg.hidden_size}, F={moe_cfg.ffn_hidden_size}) != dense model "
            f"(d_model={gcfg.d_model}, ffn_hidden={gcfg.ffn_hidden})"
        )
    if moe_cfg.num_shared_experts:
        raise ValueError(
            f"upcycle: MoEConfig.num_shared_experts={moe_cfg.num_shared_experts} is not supported: the dense model "
            "has no shared experts to copy, and fresh ones would change the upcycled model's function"
        )
    any_dense_ffn = any(b.ffn is not None for b in dense.blocks)
    if any_dense_ffn and moe_cfg.activation != "gelu":
        raise ValueError(f"upcycle: the dense FFN is GELU; MoEConfig.activation={moe_cfg.activation!r}")
    moe = GPTMoE(dataclasses.replace(gcfg, moe_every=1), moe_cfg).to(dense.tok_emb.weight.device)
    src_state = dense.state_dict()
    dst_state = moe.state_dict()
    for k, v in src_state.items():
        if ".ffn." in k or ".moe." in k:
            continue
        dst_state[k].copy_(v)
    E = moe_cfg.num_experts
    for li, (blk_src, blk_dst) in enumerate(zip(dense.blocks, moe.blocks)):
        w = dense_ffn_weights(blk_src)
        new = _div.spawn_slice(w, first_expert=0, num_local=E, layer=li, seed=seed, method=spawn, **spawn_kw)
        ex = blk_dst.moe.experts
        for name, t in new.items():
            if getattr(ex, name) is None:
                raise ValueError(f"upcycle: the dense FFN has {name} but the MoE experts do not (activation mismatch)")
            getattr(ex, name).copy_(t)
        r = blk_dst.moe.router.weight
        r.copy_(_div.fresh_router(E, moe_cfg.hidden_size, layer=li, seed=seed, std=router_std).to(r))
    moe.train(dense.training)
    return moe
