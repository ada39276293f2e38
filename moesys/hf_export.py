"""The modern decoder out as a Hugging Face model directory (the inverse of moesys/hf.py).

`save_pretrained(model, out_dir)` writes config.json, generation_config.json, safetensors shards
with their index (one shard's tensors in memory at a time) and, when given, the tokenizer files,
into a temporary sibling directory that is renamed to out_dir at the end: a failure leaves nothing
half-written. The family is read off the model: latent attention -> DeepSeek-V3; q/k norm over all
heads -> OLMoE; per head -> Qwen3-MoE; a gated shared expert -> Qwen2-MoE; otherwise Mixtral.
What no family expresses is refused by name; capacity dropping (transformers' blocks are dropless)
is warned about. Experts are written per expert, as the published checkpoints and transformers'
save_pretrained store them.
"""
from __future__ import annotations

import json
import os
import shutil
import warnings
from typing import Dict, Optional, Tuple

import torch

from .decoder import Decoder, DecoderConfig
from .hf import CONFIG_FILE, INDEX_FILE, SINGLE_FILE, HFFormatError, hf_tensors, weight_map
from .moe.config import MoEConfig
from .moe.packing import pack_consecutive

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
DEFAULT_SHARD_BYTES = 2 * 1024**3


def _refuse(ok: bool, message: str) -> None:
    if not ok:
        raise HFFormatError(message)


def hf_config_of(dcfg: DecoderConfig, moe: MoEConfig, *, max_position_embeddings: int = 4096) -> Tuple[str, dict]:
    """(architecture, config.json dict) of a Decoder's configs; HFFormatError for what no family has."""
    _refuse(moe.activation == "swiglu", f"moe.activation={moe.activation!r}: the Hugging Face MoE families have "
                                        "SwiGLU experts only (moe.activation=swiglu)")
    _refuse(moe.router in ("topk", "sigmoid_bias"), f"moe.router={moe.router!r} (expert choice, EvoMoE gates) has no "
                                                   "Hugging Face equivalent: the families route top-k")
    _refuse(moe.num_shared_experts <= 1, f"moe.num_shared_experts={moe.num_shared_experts}: the families have at "
                                         "most one shared FFN")
    if moe.capacity_factor is not None:
        warnings.warn(f"moe.capacity_factor={moe.capacity_factor}: transformers' MoE blocks never drop tokens, so "
                      "the exported model is the dropless one", UserWarning, stacklevel=2)
    H = dcfg.n_heads
    n_moe = sum(dcfg.is_moe(i) for i in range(dcfg.n_layers))
    c = {"vocab_size": dcfg.vocab_size, "hidden_size": dcfg.d_model, "num_hidden_layers": dcfg.n_layers,
         "num_attention_heads": H, "hidden_act": "silu", "rms_norm_eps": dcfg.norm_eps,
         "rope_parameters": {"rope_type": "default", "rope_theta": dcfg.rope_theta},
         "tie_word_embeddings": dcfg.tie_embeddings, "max_position_embeddings": max_position_embeddings,
         "num_experts_per_tok": moe.top_k, "initializer_range": moe.init_std, "attention_dropout": 0.0,
         "use_cache": True, "dtype": "float32", "bos_token_id": None, "eos_token_id": None, "pad_token_id": None}
    all_moe = dcfg.first_k_dense == 0 and dcfg.moe_every == 1
    if dcfg.mla:
        arch = "DeepseekV3ForCausalLM"
        _refuse(moe.router == "sigmoid_bias", f"latent attention exports as DeepSeek-V3, whose router is "
                                              f"sigmoid_bias; got moe.router={moe.router!r}")
        _refuse(dcfg.moe_every == 1, f"DeepSeek-V3 has MoE in every block after the first k: model.moe_every="
                                     f"{dcfg.moe_every} must be 1")
        S = moe.num_shared_experts
        _refuse(not S or moe.shared_ffn % moe.ffn_hidden_size == 0 and not moe.shared_expert_gate,
                f"DeepSeek-V3's shared FFN is n x moe_intermediate_size wide and ungated: moe.shared_ffn_hidden_size "
                f"({moe.shared_ffn}) must be a multiple of model.ffn_hidden ({moe.ffn_hidden_size}), "
                "moe.shared_expert_gate false")
        c.update({"model_type": "deepseek_v3", "num_key_value_heads": H, "intermediate_size": dcfg.dense_ffn_hidden,
                  "moe_intermediate_size": moe.ffn_hidden_size, "n_routed_experts": moe.num_experts,
                  "n_shared_experts": moe.shared_ffn // moe.ffn_hidden_size if S else 0,
                  "n_group": moe.num_groups or 1, "topk_group": moe.topk_groups or 1,
                  "first_k_dense_replace": dcfg.first_k_dense, "q_lora_rank": dcfg.q_lora_rank,
                  "kv_lora_rank": dcfg.kv_lora_rank, "qk_rope_head_dim": dcfg.qk_rope_head_dim,
                  "qk_nope_head_dim": dcfg.qk_nope_head_dim, "v_head_dim": dcfg.v_head_dim,
                  "routed_scaling_factor": moe.routed_scaling_factor, "norm_topk_prob": moe.renormalize_topk,
                  "rope_interleave": True, "attention_bias": False})
        return arch, {"architectures": [arch], **c}
    _refuse(moe.router == "topk", f"moe.router={moe.router!r} with grouped-query attention: only DeepSeek-V3 "
                                  "(latent attention) routes by sigmoid scores")
    _refuse(moe.routed_scaling_factor == 1.0, f"moe.routed_scaling_factor={moe.routed_scaling_factor} exists in "
                                              "DeepSeek-V3 only (latent attention)")
    _refuse(moe.num_groups is None, f"moe.num_groups={moe.num_groups}: group-limited routing exists in DeepSeek-V3 only")
    _refuse(dcfg.first_k_dense == 0, f"model.first_k_dense={dcfg.first_k_dense} exists in DeepSeek-V3 only")
    coef = 0.0 if moe.aux_loss == "none" else moe.aux_loss_coef * max(1, n_moe) / moe.top_k
    c.update({"num_key_value_heads": dcfg.kv_heads, "router_aux_loss_coef": coef,
              "norm_topk_prob": moe.renormalize_topk, "head_dim": dcfg.hd})
    if dcfg.qk_norm:
        _refuse(not moe.num_shared_experts, "q/k norm exports as Qwen3-MoE or OLMoE, which have no shared experts: "
                                            f"moe.num_shared_experts={moe.num_shared_experts}")
        _refuse(dcfg.qkv_bias == dcfg.out_bias, f"Qwen3-MoE and OLMoE have one attention_bias for q, k, v and o: "
                                                f"model.qkv_bias={dcfg.qkv_bias}, model.out_bias={dcfg.out_bias}")
        c.update({"attention_bias": dcfg.qkv_bias, "num_experts": moe.num_experts})
        if dcfg.qk_norm_scope == "all":
            arch = "OlmoeForCausalLM"
            _refuse(all_moe, "OLMoE has MoE in every block: model.moe_every must be 1")
            _refuse(dcfg.hd * H == dcfg.d_model, f"OLMoE's q norm is over d_model: model.head_dim ({dcfg.hd}) x "
                                                 f"model.n_heads ({H}) must be model.d_model ({dcfg.d_model})")
            c.update({"model_type": "olmoe", "intermediate_size": moe.ffn_hidden_size, "clip_qkv": None})
        else:
            arch = "Qwen3MoeForCausalLM"
            c.update({"model_type": "qwen3_moe", "intermediate_size": dcfg.dense_ffn_hidden,
                      "moe_intermediate_size": moe.ffn_hidden_size, "decoder_sparse_step": dcfg.moe_every,
                      "mlp_only_layers": [], "use_sliding_window": False, "sliding_window": None})
        return arch, {"architectures": [arch], **c}
    _refuse(not dcfg.out_bias, "model.out_bias=true exists in Qwen3-MoE and OLMoE only (with model.qk_norm=true)")
    if moe.num_shared_experts or dcfg.qkv_bias:
        arch = "Qwen2MoeForCausalLM"
        _refuse(not moe.num_shared_experts or moe.shared_expert_gate,
                "Qwen2-MoE's shared expert is gated: set moe.shared_expert_gate=true")
        _refuse(dcfg.hd * H == dcfg.d_model, f"Qwen2-MoE has no head_dim of its own: model.head_dim ({dcfg.hd}) must "
                                             f"be model.d_model / model.n_heads")
        c.update({"model_type": "qwen2_moe", "intermediate_size": dcfg.dense_ffn_hidden,
                  "moe_intermediate_size": moe.ffn_hidden_size, "num_experts": moe.num_experts,
                  "shared_expert_intermediate_size": moe.shared_ffn if moe.num_shared_experts else 0,
                  "decoder_sparse_step": dcfg.moe_every, "qkv_bias": dcfg.qkv_bias, "mlp_only_layers": [],
                  "use_sliding_window": False, "sliding_window": None})
        return arch, {"architectures": [arch], **c}
    arch = "MixtralForCausalLM"
    _refuse(all_moe, f"Mixtral has MoE in every block: model.moe_every={dcfg.moe_every} must be 1")
    _refuse(moe.renormalize_topk, "Mixtral renormalises its top-k weights: moe.normalize_topk must be true")
    c.update({"model_type": "mixtral", "intermediate_size": moe.ffn_hidden_size, "num_local_experts": moe.num_experts,
              "router_jitter_noise": moe.jitter_eps, "sliding_window": None})
    return arch, {"architectures": [arch], **c}


def _moe_cfg(model: Decoder) -> MoEConfig:
    layers = model.moe_layers()
    _refuse(bool(layers), "the model has no MoE layer (model.moe_every=0): not an MoE family")
    return layers[0][1].cfg


def _writable_parent(out_dir: str) -> str:
    parent = os.path.dirname(os.path.abspath(out_dir))
    if os.path.exists(out_dir) and (not os.path.isdir(out_dir) or os.listdir(out_dir)):
        raise HFFormatError(f"{out_dir}: exists and is not an empty directory; moesys writes a new one")
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK):
        raise HFFormatError(f"{out_dir}: cannot write there ({parent} is not a writable directory)")
    return parent


@torch.no_grad()
def save_pretrained(model: Decoder, out_dir: str, *, max_shard_bytes: int = DEFAULT_SHARD_BYTES,
                    tokenizer_dir: Optional[str] = None, max_position_embeddings: int = 4096) -> str:
    """Write `model` (all experts local, on one process) as a Hugging Face directory; returns out_dir."""
    from safetensors.torch import save_file

    _refuse(isinstance(model, Decoder), f"only the modern decoder (model.arch=decoder) exports: got "
                                        f"{type(model).__name__} (the GPT's learned absolute positions have no "
                                        "Hugging Face equivalent)")
    moe = _moe_cfg(model)
    arch, config = hf_config_of(model.cfg, moe, max_position_embeddings=max_position_embeddings)
    _writable_parent(out_dir)
    entries = weight_map(arch, model.cfg, moe, config)
    sd = model.state_dict()
    for e in entries:  # a sharded (DTensor) expert would export its local part only
        _refuse(not hasattr(sd[e.ours], "to_local"), f"{e.ours} is sharded: export from one process "
                                                     "(moesys-convert export-hf loads the checkpoint whole)")
    # consecutive tensors per file, each file under max_shard_bytes unless one tensor alone is larger
    groups = pack_consecutive([e.ours for e in entries], max_shard_bytes,
                              size=lambda name: sd[name].numel() * sd[name].element_size())
    by_name = {e.ours: e for e in entries}
    n = len(groups)
    names = [SINGLE_FILE] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    tmp = os.path.join(os.path.dirname(os.path.abspath(out_dir)), f".{os.path.basename(out_dir)}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        index: Dict[str, str] = {}
        total = 0
        for fname, group in zip(names, groups):
            tensors = {}
            for ours in group:  # only this shard's tensors are materialised (expert transposes are copies)
                for key, t in hf_tensors(by_name[ours], sd[ours].detach().cpu()):
                    tensors[key] = t.contiguous()
                    index[key] = fname
                    total += t.numel() * t.element_size()
            save_file(tensors, os.path.join(tmp, fname), metadata={"format": "pt"})
            del tensors
        if n > 1:
            with open(os.path.join(tmp, INDEX_FILE), "w") as f:
                json.dump({"metadata": {"total_size": total}, "weight_map": dict(sorted(index.items()))}, f, indent=2)
        with open(os.path.join(tmp, CONFIG_FILE), "w") as f:
            json.dump(config, f, indent=2)
        with open(os.path.join(tmp, "generation_config.json"), "w") as f:
            json.dump({"_from_model_config": True, "bos_token_id": None, "eos_token_id": None}, f, indent=2)
        if tokenizer_dir is not None:
            for name in TOKENIZER_FILES:
                src = os.path.join(tokenizer_dir, name)
                if os.path.isfile(src):
                    shutil.copyfile(src, os.path.join(tmp, name))
        if os.path.isdir(out_dir):
            os.rmdir(out_dir)  # empty (checked above)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir
