"""Hugging Face checkpoints in and out: config.json + safetensors <-> the modern decoder.

    model = moesys.hf.from_pretrained("path/to/hf_dir")      # a Decoder; model(idx)[0] are the logits
    moesys.hf.save_pretrained(model, "out_dir", architecture="MixtralForCausalLM")

Supported: MixtralForCausalLM, Qwen2MoeForCausalLM, Qwen3MoeForCausalLM, OlmoeForCausalLM,
DeepseekV3ForCausalLM; other architectures are refused by name. The moesys settings come from
config.json (`derive_settings`); what moesys cannot express (sliding windows, rope scaling, OLMoE's
clip_qkv, Qwen's mlp_only_layers, MLA biases, quantization_config) is refused naming the config.json
field, and float8 or integer tensors naming the tensor (`check_checkpoint`, headers only).

Weight layout (every family): nn.Linear weights map as they are ([out, in] both sides); the experts
are stored per expert in the checkpoints (`experts.{e}.gate_proj.weight [F, D]`; Mixtral: `w1`, `w3`,
`w2`) or fused in transformers' in-memory layout (`experts.gate_up_proj [E, 2F, D]`,
`experts.down_proj [E, D, F]`); moesys holds `w1 = gate.T`, `w3 = up.T` ([E, D, F]) and
`w2 = down.T` ([E, F, D]). HF `hidden_act="silu"` with gate/up is moesys `activation="swiglu"`.
DeepSeek-V3's `e_score_correction_bias` is the sigmoid_bias router's `expert_bias`; its interleaved
rotary dims (`rope_interleave`) become moesys's half-split layout by permuting the rope rows of
q_b_proj (q_proj) and kv_a_proj_with_mqa: the same numbers, and the export permutes them back.

Balance loss: transformers adds router_aux_loss_coef x E x sum_i f_i P_i over the layers' pooled
tokens (f_i: routes to i per token, summing to K), i.e. K x moesys's Switch loss for one MoE layer;
the import sets moe.aux_loss_coef = K x router_aux_loss_coef / (number of MoE layers), which equals
it for one layer and matches its size when balanced (moesys sums one loss per layer).
"""
from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Tuple

import torch

from .decoder import Decoder, DecoderConfig
from .errors import ConfigError
from .moe.config import MoEConfig

ARCHITECTURES = ("MixtralForCausalLM", "Qwen2MoeForCausalLM", "Qwen3MoeForCausalLM", "OlmoeForCausalLM",
                 "DeepseekV3ForCausalLM")
CONFIG_FILE = "config.json"
WEIGHT_DTYPES = ("F32", "BF16", "F16")  # safetensors names of what moesys loads
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


class HFFormatError(ConfigError):
    """A Hugging Face model directory moesys cannot read (the message names the file or field)."""


# ---- config.json -> moesys settings ------------------------------------------------------------------
def read_config(path: str) -> dict:
    """config.json of the model directory `path`, checked to be a supported architecture."""
    f = os.path.join(path, CONFIG_FILE)
    if not os.path.isfile(f):
        raise HFFormatError(f"{f}: no such file (a Hugging Face model directory holds config.json)")
    try:
        with open(f) as fh:
            cfg = json.load(fh)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise HFFormatError(f"{f} is not readable JSON ({e})") from None
    arch = (cfg.get("architectures") or [None])[0]
    if arch not in ARCHITECTURES:
        raise HFFormatError(f"{f}: architectures={cfg.get('architectures')!r} is not supported; moesys reads "
                            f"{', '.join(ARCHITECTURES)}")
    return cfg


def _rope_theta(c: dict, where: str) -> float:
    """rope_theta of config.json `c`; rope scaling (yarn, linear, dynamic, ...) under transformers 5's
    `rope_parameters` or the older `rope_scaling` is refused naming the field."""
    for key in ("rope_parameters", "rope_scaling"):
        rp = c.get(key) or {}
        for tkey in ("rope_type", "type"):
            if rp.get(tkey, "default") != "default":
                raise HFFormatError(f"{where}: {key}.{tkey}={rp[tkey]!r}: moesys implements plain RoPE only "
                                    "(no yarn/linear/dynamic scaling)")
    rp = c.get("rope_parameters") or c.get("rope_scaling") or {}
    theta = rp.get("rope_theta", c.get("rope_theta"))
    if theta is None:
        raise HFFormatError(f"{where}: no rope_theta (in rope_parameters or at the top level)")
    return float(theta)


def derive_settings(c: dict, where: str = CONFIG_FILE) -> Dict[str, object]:
    """The moesys settings ("model.x", "moe.x", "data.vocab_size") that config.json `c` determines."""
    arch = c["architectures"][0]

    def need(key, *aliases):  # transformers writes some keys under an alias (attribute_map)
        for k in (key, *aliases):
            if c.get(k) is not None:
                return c[k]
        raise HFFormatError(f"{where}: {key} is missing")

    def refuse(key, ok, why):
        if not ok:
            raise HFFormatError(f"{where}: {key}={c.get(key)!r} is not supported: {why}")

    q = c.get("quantization_config")
    if q:  # FP8 (DeepSeek-V3's published weights), GPTQ, AWQ, bitsandbytes, ...
        method = q.get("quant_method") if isinstance(q, dict) else q
        raise HFFormatError(f"{where}: quantization_config (quant_method={method!r}) is not supported: moesys loads "
                            "unquantized checkpoints (float32, bfloat16, float16); dequantize it to bfloat16 first")
    refuse("hidden_act", c.get("hidden_act", "silu") == "silu", "moesys's gated experts are SwiGLU (silu)")
    s: Dict[str, object] = {
        "model.arch": "decoder", "data.vocab_size": need("vocab_size"), "model.n_layers": need("num_hidden_layers"),
        "model.d_model": need("hidden_size"), "model.n_heads": need("num_attention_heads"),
        "model.norm_eps": float(c.get("rms_norm_eps", 1e-6)), "model.rope_theta": _rope_theta(c, where),
        "model.tie_embeddings": bool(c.get("tie_word_embeddings", False)), "moe.activation": "swiglu",
        "moe.top_k": need("num_experts_per_tok"), "moe.jitter_eps": float(c.get("router_jitter_noise", 0.0) or 0.0),
    }
    if arch != "DeepseekV3ForCausalLM":
        kv = c.get("num_key_value_heads") or c["num_attention_heads"]
        s["model.n_kv_heads"] = kv
        hd = c.get("head_dim")
        if hd is not None and hd != c["hidden_size"] // c["num_attention_heads"]:
            s["model.head_dim"] = hd
    if arch in ("Qwen2MoeForCausalLM", "Qwen3MoeForCausalLM"):
        refuse("use_sliding_window", not c.get("use_sliding_window", False), "moesys attends over the whole window")
        refuse("mlp_only_layers", not c.get("mlp_only_layers"), "moesys's layer pattern is first_k_dense/moe_every")
        s["model.moe_every"] = c.get("decoder_sparse_step", 1)
    else:
        s["model.moe_every"] = 1
    if arch == "MixtralForCausalLM":
        refuse("sliding_window", c.get("sliding_window") is None, "moesys attends over the whole window")
        s.update({"model.ffn_hidden": need("intermediate_size"), "moe.num_experts": need("num_local_experts", "num_experts"),
                  "moe.normalize_topk": True})
    elif arch == "DeepseekV3ForCausalLM":
        refuse("attention_bias", not c.get("attention_bias", False), "moesys's latent attention has no biases")
        refuse("num_key_value_heads", c.get("num_key_value_heads") in (None, c["num_attention_heads"]),
               "latent attention expands keys and values to every head")
        E, ng = need("n_routed_experts", "num_local_experts"), c.get("n_group") or 1
        s.update({"model.ffn_hidden": need("moe_intermediate_size"), "model.dense_ffn_hidden": need("intermediate_size"),
                  "model.first_k_dense": c.get("first_k_dense_replace", 0) or 0, "model.q_lora_rank": c.get("q_lora_rank"),
                  "model.kv_lora_rank": need("kv_lora_rank"), "model.qk_rope_head_dim": need("qk_rope_head_dim"),
                  "model.qk_nope_head_dim": need("qk_nope_head_dim"), "model.v_head_dim": need("v_head_dim"),
                  "moe.num_experts": E, "moe.router": "sigmoid_bias", "moe.aux_loss": "none",
                  "moe.normalize_topk": bool(c.get("norm_topk_prob", True)),
                  "moe.routed_scaling_factor": float(c.get("routed_scaling_factor", 1.0))})
        if ng > 1:
            s.update({"moe.num_groups": ng, "moe.topk_groups": need("topk_group")})
        if c.get("n_shared_experts"):
            s.update({"moe.num_shared_experts": 1,
                      "moe.shared_ffn_hidden_size": c["moe_intermediate_size"] * c["n_shared_experts"]})
    else:  # the Qwen and OLMoE families
        s.update({"model.ffn_hidden": need("moe_intermediate_size") if arch != "OlmoeForCausalLM"
                  else need("intermediate_size"),
                  "moe.num_experts": need("num_experts", "num_local_experts"), "moe.normalize_topk": bool(c.get("norm_topk_prob", False))})
        if arch != "OlmoeForCausalLM":
            s["model.dense_ffn_hidden"] = need("intermediate_size")
        if arch == "Qwen2MoeForCausalLM":
            s["model.qkv_bias"] = bool(c.get("qkv_bias", True))
            if c.get("shared_expert_intermediate_size"):
                s.update({"moe.num_shared_experts": 1, "moe.shared_expert_gate": True,
                          "moe.shared_ffn_hidden_size": c["shared_expert_intermediate_size"]})
        else:
            bias = bool(c.get("attention_bias", False))
            s.update({"model.qkv_bias": bias, "model.out_bias": bias, "model.qk_norm": True,
                      "model.qk_norm_scope": "head" if arch == "Qwen3MoeForCausalLM" else "all"})
        if arch == "OlmoeForCausalLM":
            refuse("clip_qkv", c.get("clip_qkv") is None, "moesys does not clip q, k, v")
    if arch != "DeepseekV3ForCausalLM":
        n_moe = sum(1 for i in range(c["num_hidden_layers"]) if (i + 1) % s["model.moe_every"] == 0)
        coef = float(c.get("router_aux_loss_coef", 0.0) or 0.0)
        s["moe.aux_loss_coef"] = s["moe.top_k"] * coef / max(1, n_moe)
    return s


def configs_from_settings(s: Dict[str, object]) -> Tuple[DecoderConfig, MoEConfig]:
    """DecoderConfig and MoEConfig of derived settings (the rest at the decoder's defaults)."""
    model = {k[len("model."):]: v for k, v in s.items() if k.startswith("model.") and k != "model.arch"}
    moe = {k[len("moe."):]: v for k, v in s.items() if k.startswith("moe.")}
    ffn = model.pop("ffn_hidden")
    model.setdefault("dense_ffn_hidden", ffn)
    dcfg = DecoderConfig(vocab_size=s["data.vocab_size"], **model)
    return dcfg, MoEConfig(hidden_size=dcfg.d_model, ffn_hidden_size=ffn, **moe)


# ---- safetensors reading ---------------------------------------------------------------------------
class Reader:
    """The tensors of a model directory (one model.safetensors, or shards listed by its index),
    read by name or by slice of the first dimension; counts the bytes it reads."""

    def __init__(self, path: str):
        from safetensors import safe_open  # noqa: F401  (a dependency; checked here for the message)

        self.path = path
        idx = os.path.join(path, INDEX_FILE)
        if os.path.isfile(idx):
            try:
                with open(idx) as f:
                    self.weight_map: Dict[str, str] = json.load(f)["weight_map"]
            except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
                raise HFFormatError(f"{idx} is not a safetensors index (JSON with a weight_map): {e}") from None
        else:
            single = os.path.join(path, SINGLE_FILE)
            if not os.path.isfile(single):
                raise HFFormatError(f"{single}: no such file (and no {INDEX_FILE}): the weights are missing")
            self.weight_map = {k: SINGLE_FILE for k in self._open(SINGLE_FILE).keys()}
        self._files: Dict[str, object] = {}
        self.bytes_read = 0
        self.expert_bytes_read = 0  # the routed experts' part (load_into counts it)

    def _open(self, name: str):
        from safetensors import SafetensorError, safe_open

        f = os.path.join(self.path, name)
        if not os.path.isfile(f):
            raise HFFormatError(f"{f}: no such file (listed in {INDEX_FILE})")
        try:
            return safe_open(f, framework="pt")
        except (SafetensorError, OSError) as e:
            raise HFFormatError(f"{f} is not a readable safetensors file (truncated or corrupt?): {e}") from None

    def _resolve(self, key: str) -> str:
        """`key`, or its transformers in-memory alias (Mixtral's block_sparse_moe.* is mlp.* there)."""
        if key not in self.weight_map and "block_sparse_moe." in key:
            return key.replace("block_sparse_moe.", "mlp.")
        return key

    def _file(self, key: str):
        name = self.weight_map.get(key)
        if name is None:
            raise HFFormatError(f"{self.path}: tensor {key!r} is missing from the checkpoint")
        if name not in self._files:
            self._files[name] = self._open(name)
        return self._files[name]

    def __contains__(self, key: str) -> bool:
        return self._resolve(key) in self.weight_map

    def shape(self, key: str) -> List[int]:
        key = self._resolve(key)
        return list(self._file(key).get_slice(key).get_shape())

    def dtype(self, key: str) -> str:
        """The safetensors dtype of `key` ("F32", "BF16", "F8_E4M3", ...), from the header."""
        key = self._resolve(key)
        return str(self._file(key).get_slice(key).get_dtype())

    def get(self, key: str, rows: Optional[Tuple[int, int]] = None, index: Optional[tuple] = None) -> torch.Tensor:
        """Tensor `key`, or its rows [lo, hi) along the first dimension, or the part `index` (a tuple of
        slices) selects: only that part is read."""
        from safetensors import SafetensorError

        key = self._resolve(key)
        if rows is not None:
            index = (slice(rows[0], rows[1]),)
        try:
            sl = self._file(key).get_slice(key)
            t = sl[index] if index is not None else sl[:]
        except SafetensorError as e:
            raise HFFormatError(f"{self.path}: tensor {key!r} cannot be read (truncated file?): {e}") from None
        self.bytes_read += t.numel() * t.element_size()
        return t


class TensorReader(Reader):
    """The same reads from tensors in memory (e.g. a transformers model's named parameters or grads)."""

    def __init__(self, tensors: Dict[str, torch.Tensor], path: str = "<tensors>"):
        self.path, self.tensors, self.bytes_read, self.expert_bytes_read = path, tensors, 0, 0
        self.weight_map = {k: path for k in tensors}

    def shape(self, key: str) -> List[int]:
        return list(self.tensors[self._resolve(key)].shape)

    def dtype(self, key: str) -> str:
        t = self.tensors[self._resolve(key)]
        return {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}.get(t.dtype, str(t.dtype))

    def get(self, key: str, rows: Optional[Tuple[int, int]] = None, index: Optional[tuple] = None) -> torch.Tensor:
        key = self._resolve(key)
        if key not in self.tensors:
            raise HFFormatError(f"{self.path}: tensor {key!r} is missing")
        t = self.tensors[key]
        if rows is not None:
            index = (slice(rows[0], rows[1]),)
        return t[index] if index is not None else t


# ---- the name and layout map -----------------------------------------------------------------------
@dataclass(frozen=True)
class Entry:
    """One moesys tensor and where it lives in the HF checkpoint.

    kind: "copy" (same tensor), "rows" (rows permuted by `perm`: ours = hf[perm]), "experts" (ours[e]
    = hf(e).T; `hf` is a template with {e}, `fused` the transformers in-memory alternative),
    "shared" (ours = hf.T[None]), "gate_vec" (ours = hf[0], an nn.Linear(D, 1) weight)."""

    ours: str
    kind: str
    hf: str
    perm: Optional[Tuple[int, ...]] = None
    fused: Optional[Tuple[str, int]] = None  # (key, which: 0 gate, 1 up of gate_up_proj; 2 down_proj)


def _deinterleave(R: int) -> List[int]:
    """Interleaved rotary pairs (0,1), (2,3), ... -> the half-split layout (0, 2, ..., 1, 3, ...)."""
    return list(range(0, R, 2)) + list(range(1, R, 2))


def weight_map(arch: str, dcfg: DecoderConfig, moe: MoEConfig, hf_cfg: dict) -> List[Entry]:
    """Every tensor of the Decoder's state dict (experts included, buffers too) and its HF source."""
    out = [Entry("tok_emb.weight", "copy", "model.embed_tokens.weight"), Entry("norm.weight", "copy", "model.norm.weight")]
    if not dcfg.tie_embeddings:
        out.append(Entry("head.weight", "copy", "lm_head.weight"))
    interleave = arch == "DeepseekV3ForCausalLM" and hf_cfg.get("rope_interleave", True)
    for i in range(dcfg.n_layers):
        o, h = f"blocks.{i}.", f"model.layers.{i}."
        out += [Entry(o + "attn_norm.weight", "copy", h + "input_layernorm.weight"),
                Entry(o + "ffn_norm.weight", "copy", h + "post_attention_layernorm.weight")]
        a = h + "self_attn."
        if dcfg.mla:
            H, N, R, L = dcfg.n_heads, dcfg.qk_nope_head_dim, dcfg.qk_rope_head_dim, dcfg.kv_lora_rank
            sub = _deinterleave(R) if interleave else list(range(R))
            q_perm = tuple(hh * (N + R) + (N + sub[j - N] if j >= N else j) for hh in range(H) for j in range(N + R))
            kv_perm = tuple(list(range(L)) + [L + j for j in sub])
            if dcfg.q_lora_rank is None:
                out.append(Entry(o + "attn.q_proj.weight", "rows", a + "q_proj.weight", perm=q_perm))
            else:
                out += [Entry(o + "attn.q_a_proj.weight", "copy", a + "q_a_proj.weight"),
                        Entry(o + "attn.q_a_norm.weight", "copy", a + "q_a_layernorm.weight"),
                        Entry(o + "attn.q_b_proj.weight", "rows", a + "q_b_proj.weight", perm=q_perm)]
            out += [Entry(o + "attn.kv_a_proj.weight", "rows", a + "kv_a_proj_with_mqa.weight", perm=kv_perm),
                    Entry(o + "attn.kv_a_norm.weight", "copy", a + "kv_a_layernorm.weight"),
                    Entry(o + "attn.kv_b_proj.weight", "copy", a + "kv_b_proj.weight"),
                    Entry(o + "attn.o_proj.weight", "copy", a + "o_proj.weight")]
        else:
            for p in ("q", "k", "v", "o"):
                out.append(Entry(o + f"attn.{p}_proj.weight", "copy", a + f"{p}_proj.weight"))
            if dcfg.qkv_bias:
                out += [Entry(o + f"attn.{p}_proj.bias", "copy", a + f"{p}_proj.bias") for p in ("q", "k", "v")]
            if dcfg.out_bias:
                out.append(Entry(o + "attn.o_proj.bias", "copy", a + "o_proj.bias"))
            if dcfg.qk_norm:
                out += [Entry(o + "attn.q_norm.weight", "copy", a + "q_norm.weight"),
                        Entry(o + "attn.k_norm.weight", "copy", a + "k_norm.weight")]
        if not dcfg.is_moe(i):
            out += [Entry(o + f"ffn.{w}.weight", "copy", h + f"mlp.{p}.weight")
                    for w, p in (("w1", "gate_proj"), ("w3", "up_proj"), ("w2", "down_proj"))]
            continue
        m = h + ("block_sparse_moe." if arch == "MixtralForCausalLM" else "mlp.")
        out.append(Entry(o + "moe.router.weight", "copy", m + "gate.weight"))
        if moe.router == "sigmoid_bias":
            out.append(Entry(o + "moe.router.expert_bias", "copy", m + "gate.e_score_correction_bias"))
        names = (("w1", "w1"), ("w3", "w3"), ("w2", "w2")) if arch == "MixtralForCausalLM" else \
            (("w1", "gate_proj"), ("w3", "up_proj"), ("w2", "down_proj"))
        fused = {"w1": ("gate_up_proj", 0), "w3": ("gate_up_proj", 1), "w2": ("down_proj", 2)}
        for w, p in names:
            key, which = fused[w]
            out.append(Entry(o + f"moe.experts.{w}", "experts", m + f"experts.{{e}}.{p}.weight",
                             fused=(h + f"mlp.experts.{key}", which)))
        if moe.num_shared_experts:
            sh = m + ("shared_expert." if arch == "Qwen2MoeForCausalLM" else "shared_experts.")
            out += [Entry(o + f"moe.shared_experts.{w}", "shared", sh + f"{p}.weight")
                    for w, p in (("w1", "gate_proj"), ("w3", "up_proj"), ("w2", "down_proj"))]
            if moe.shared_expert_gate:
                out.append(Entry(o + "moe.shared_experts.gate", "gate_vec", m + "shared_expert_gate.weight"))
    return out


def read_entry(reader: Reader, e: Entry, rows: Optional[Tuple[int, int]] = None, num_experts: int = 0,
               f_range: Optional[Tuple[int, int]] = None, d_range: Optional[Tuple[int, int]] = None) -> torch.Tensor:
    """The moesys tensor of `e`; for experts, only experts [lo, hi) (`rows`) and, when given, only
    their F range (`f_range`: F-sharded experts) and D range (`d_range`: FSDP2 along D) are read."""
    if e.kind == "copy":
        return reader.get(e.hf)
    if e.kind == "rows":
        return reader.get(e.hf)[list(e.perm)]
    if e.kind == "shared":
        return reader.get(e.hf).t().contiguous()[None]
    if e.kind == "gate_vec":
        return reader.get(e.hf)[0].contiguous()
    lo, hi = rows if rows is not None else (0, num_experts)
    key, which = e.fused  # which: 0 gate, 1 up ([F, D] per expert), 2 down ([D, F] per expert)
    per_expert = e.hf.format(e=lo)
    f = slice(None) if f_range is None else slice(*f_range)
    d = slice(None) if d_range is None else slice(*d_range)
    if per_expert in reader:
        index = (f, d) if which < 2 else (d, f)
        return torch.stack([reader.get(e.hf.format(e=j), index=index).t() for j in range(lo, hi)]).contiguous()
    if key not in reader:
        raise HFFormatError(f"{reader.path}: tensor {per_expert!r} (or the fused {key!r}) is missing from the checkpoint")
    if which < 2:  # gate_up_proj [E, 2F, D]: gate rows first, then up
        F = reader.shape(key)[1] // 2
        f0, f1 = f_range if f_range is not None else (0, F)
        t = reader.get(key, index=(slice(lo, hi), slice(which * F + f0, which * F + f1), d))
    else:  # down_proj [E, D, F]
        t = reader.get(key, index=(slice(lo, hi), d, f))
    return t.transpose(1, 2).contiguous()


def hf_tensors(e: Entry, t: torch.Tensor, num_experts: int = 0) -> Iterator[Tuple[str, torch.Tensor]]:
    """(HF name, tensor) pairs of moesys tensor `t` (the inverse of read_entry; experts per expert)."""
    if e.kind == "copy":
        yield e.hf, t
    elif e.kind == "rows":
        inv = torch.empty(len(e.perm), dtype=torch.long)
        inv[torch.tensor(e.perm)] = torch.arange(len(e.perm))
        yield e.hf, t[inv]
    elif e.kind == "shared":
        yield e.hf, t[0].t().contiguous()
    elif e.kind == "gate_vec":
        yield e.hf, t[None].contiguous()
    else:
        for j in range(t.shape[0]):
            yield e.hf.format(e=j), t[j].t().contiguous()


# ---- from_pretrained -----------------------------------------------------------------------------
def check_shapes(reader: Reader, entries: List[Entry], model: torch.nn.Module, where: str) -> None:
    """Every HF tensor has the shape config.json implies, before anything is loaded."""
    sd = model.state_dict()
    for e in entries:
        want = list(sd[e.ours].shape)
        if e.kind == "experts":
            key = e.hf.format(e=0)
            if key in reader:
                got, exp = reader.shape(key), [want[2], want[1]]
            else:
                key = e.fused[0]
                got = reader.shape(key) if key in reader else None
                F = want[2] if e.fused[1] < 2 else want[1]
                exp = [want[0], 2 * F, want[1]] if e.fused[1] < 2 else [want[0], want[2], F]
        elif e.kind == "shared":
            key, got, exp = e.hf, reader.shape(e.hf), [want[2], want[1]]
        elif e.kind == "gate_vec":
            key, got, exp = e.hf, reader.shape(e.hf), [1, want[0]]
        else:
            key, got, exp = e.hf, reader.shape(e.hf), want
        if got is not None and got != exp:
            raise HFFormatError(f"{reader.path}: tensor {key!r} has shape {got}, but {where} implies {exp}")
        per_expert = e.kind == "experts" and e.hf.format(e=0) in reader
        for k in [e.hf.format(e=j) for j in range(want[0])] if per_expert else [key]:
            d = reader.dtype(k) if k in reader else None
            if d is not None and d not in WEIGHT_DTYPES:
                what = " (float8: an FP8-quantized checkpoint)" if d.startswith("F8") else ""
                raise HFFormatError(f"{reader.path}: tensor {k!r} is {d}{what}: moesys loads "
                                    f"{', '.join(WEIGHT_DTYPES)} weights; dequantize the checkpoint to BF16 first")


def check_checkpoint(path: str, hf_cfg: Optional[dict] = None) -> None:
    """Every tensor the model needs is in the directory `path` with the shape config.json implies and
    a float dtype (float8/int refused by name), read from the safetensors headers only: the local check
    moesys-train runs on every rank before any collective (and from_pretrained before loading).
    DeepSeek-V3's multi-token-prediction layers (num_nextn_predict_layers, stored as layers past
    num_hidden_layers) are not loaded, with a warning naming the field, as transformers ignores them."""
    hf_cfg = hf_cfg if hf_cfg is not None else read_config(path)
    where = os.path.join(path, CONFIG_FILE)
    dcfg, moe = configs_from_settings(derive_settings(hf_cfg, where))
    with torch.device("meta"):
        model = Decoder(dcfg, moe)
    entries = weight_map(hf_cfg["architectures"][0], dcfg, moe, hf_cfg)
    reader = Reader(path)
    check_shapes(reader, entries, model, where)
    n = hf_cfg["num_hidden_layers"]
    extra = sorted({int(k.split(".")[2]) for k in reader.weight_map
                    if k.startswith("model.layers.") and k.split(".")[2].isdigit() and int(k.split(".")[2]) >= n})
    if extra:  # DeepSeek-V3's multi-token-prediction module is stored as layers past the last one
        field = f"num_nextn_predict_layers={hf_cfg.get('num_nextn_predict_layers')!r}: " \
            if "num_nextn_predict_layers" in hf_cfg else ""
        warnings.warn(f"{where}: {field}the checkpoint's layers {extra} past num_hidden_layers={n} (multi-token "
                      "prediction) are not loaded; moesys trains and evaluates next-token prediction (transformers "
                      "ignores them too)", UserWarning, stacklevel=2)


def _check_covered(model: Decoder, entries: List[Entry], arch: str) -> None:
    """Every parameter and persistent buffer of `model` has an HF source (the tied head aside)."""
    tied = {"head.weight"} if model.cfg.tie_embeddings else set()
    uncovered = set(model.state_dict()) - {e.ours for e in entries} - tied
    if uncovered:  # a family's map lacks a tensor the model has: a bug here, not bad input
        raise RuntimeError(f"moesys.hf.weight_map({arch}) does not cover {sorted(uncovered)}")


def _zero_unmapped_buffers(model: Decoder, entries: List[Entry]) -> None:
    """Buffers with no HF counterpart are transient (the router's load counted since the last bias
    update) and start at zero, as in a freshly built model; the mapped ones are read afterwards."""
    mapped = {e.ours for e in entries}
    for name, buf in model.named_buffers():
        if name not in mapped:
            buf.zero_()


def from_pretrained(path: str, *, dtype: torch.dtype = torch.float32) -> Decoder:
    """The Decoder of the Hugging Face model directory `path`, its weights loaded (on the CPU)."""
    hf_cfg = read_config(path)
    arch = hf_cfg["architectures"][0]
    settings = derive_settings(hf_cfg, os.path.join(path, CONFIG_FILE))
    dcfg, moe = configs_from_settings(settings)
    reader = Reader(path)
    with torch.device("meta"):
        model = Decoder(dcfg, moe)
    entries = weight_map(arch, dcfg, moe, hf_cfg)
    _check_covered(model, entries, arch)
    check_checkpoint(path, hf_cfg)
    model = model.to_empty(device="cpu")
    with torch.no_grad():
        _zero_unmapped_buffers(model, entries)
        if dcfg.tie_embeddings:
            model.head.weight = model.tok_emb.weight
        sd = model.state_dict()
        for e in entries:
            t = read_entry(reader, e, num_experts=moe.num_experts)
            sd[e.ours].copy_(t)
    return model.to(dtype)


# ---- loading into a built (possibly sharded) model -------------------------------------------------------
def _local_region(p: torch.Tensor, sharding) -> Tuple[torch.Tensor, Tuple[int, ...]]:
    """(the tensor this rank holds, its offset in the global tensor) of parameter or buffer `p`: a
    DTensor's local shard (expert parallelism, FSDP2), DeepSpeed's local experts (`sharding`: the
    experts module's (offset, count) when its weights are plain local tensors), or `p` itself."""
    if hasattr(p, "to_local"):
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        local = p.to_local()
        _, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
        return local, tuple(offset)
    if sharding is not None:
        return p, (sharding[0],) + (0,) * (p.dim() - 1)
    return p, (0,) * p.dim()


@torch.no_grad()
def load_into(model: Decoder, path: str, hf_cfg: Optional[dict] = None) -> Reader:
    """Copy the Hugging Face weights of `path` into `model` as built and sharded on this rank (plain,
    expert-parallel, FSDP2, DeepSpeed's local experts): each rank reads only the experts it holds
    (safetensors slices) and writes straight into its local shards. Every parameter and persistent
    buffer is written, so `model` may come uninitialised from moesys.parallel.materialize (built on
    the meta device: no rank ever holds the whole model); transient buffers start at zero. Returns
    the Reader (bytes_read)."""
    hf_cfg = hf_cfg if hf_cfg is not None else read_config(path)
    arch = hf_cfg["architectures"][0]
    moe_layers = model.moe_layers()
    moe = moe_layers[0][1].cfg if moe_layers else None
    reader = Reader(path)
    entries = weight_map(arch, model.cfg, moe, hf_cfg)
    _check_covered(model, entries, arch)
    _zero_unmapped_buffers(model, entries)
    named = dict(model.named_parameters(remove_duplicate=False))
    named.update(dict(model.named_buffers()))
    for e in entries:
        p = named[e.ours]
        sharding = None
        if e.kind == "experts":
            ex = model.get_submodule(e.ours.rsplit(".", 1)[0])
            if not hasattr(p, "to_local") and ex.num_local_experts < ex.num_experts:
                sharding = (ex.expert_offset, ex.num_local_experts)
        local, offset = _local_region(p, sharding)
        if local.numel() == 0:
            continue
        shape = list(p.shape) if sharding is None else [ex.num_experts, *p.shape[1:]]
        region = tuple(slice(o, o + n) for o, n in zip(offset, local.shape))
        if e.kind == "experts":  # read only experts [lo, hi) and this rank's F and D ranges of them
            f_dim, d_dim = (2, 1) if e.fused[1] < 2 else (1, 2)  # w1, w3 [E, D, F]; w2 [E, F, D]
            t = read_entry(reader, e, rows=(region[0].start, region[0].stop), num_experts=shape[0],
                           f_range=(region[f_dim].start, region[f_dim].stop),
                           d_range=(region[d_dim].start, region[d_dim].stop))
        elif e.kind == "copy":  # rows [lo, hi) only (FSDP2 shards dense weights by rows)
            t = reader.get(e.hf, (region[0].start, region[0].stop) if local.dim() else None)
            t = t[(slice(None),) + region[1:]] if local.dim() > 1 else t
        else:
            t = read_entry(reader, e)[region]
        if list(t.shape) != list(local.shape):
            raise HFFormatError(f"{path}: tensor {e.hf!r} gives {list(t.shape)} for this rank's part of {e.ours} "
                                f"{list(local.shape)}: the checkpoint contradicts config.json")
        local.copy_(t)
        if e.kind == "experts":
            reader.expert_bytes_read += t.numel() * t.element_size()
    return reader
