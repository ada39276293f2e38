"""Megatron-core integration: the moesys MoE layer as the MLP of Megatron's `TransformerLayer`.

Legend: S sequence, B batch, H hidden (Megatron's [S, B, H] layout); moesys works in [B, S, H].

GPU (Megatron's own Transformer-Engine attention, our MoE):

    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec
    from megatron.core.models.gpt import GPTModel
    from moesys.integrations.megatron import with_moesys_mlp
    # num_experts makes Megatron pick a separate pre-MLP norm (TENorm) instead of fusing it into a dense fc1
    spec = with_moesys_mlp(get_gpt_layer_with_transformer_engine_spec(num_experts=cfg.num_moe_experts),
                           aux_loss_scale=1.0 / num_microbatches)
    model = GPTModel(config=cfg, transformer_layer_spec=spec, vocab_size=V, max_sequence_length=S)
    # after parallel_state.initialize_model_parallel(tensor_model_parallel_size=1,
    #                                                expert_model_parallel_size=EP) (NCCL)

CPU / no Transformer Engine (what the tests run): `moesys_gpt_layer_spec()` builds a layer with
`SDPASelfAttention` (torch's scaled_dot_product_attention, Megatron's attention call signature)
and torch norms. Megatron's own attention (`DotProductAttention` allocates a CUDA buffer) and MoE
(router/dispatchers call CUDA) are not used; `model_parallel_cuda_manual_seed` must not be called
on CPU; build the model with `TransformerConfig(use_cpu_initialization=True)`.

Expert parallelism: `MoesysMLP` shards its experts over Megatron's
`parallel_state.get_expert_model_parallel_group()` with `moesys.parallel.apply_expert_parallel`,
through a `ParallelDims` assembled from Megatron's groups (`parallel_dims_from_megatron`). Expert
params get `allreduce = False`, the mark Megatron's DistributedDataParallel uses to reduce them
over the expert-data-parallel group instead of the data-parallel group.

Aux loss: `MoesysMLP` adds the layer's balance loss to the training loss without any global list:
an autograd function passes the output through unchanged in forward and, in backward, feeds
`aux_loss_scale` as the aux loss's gradient (what Megatron's `MoEAuxLossAutoScaler` does with a
class-wide scale; here the scale is per module, `set_aux_loss_scale(model, s)` sets all). With
Megatron's pipeline schedules, whose loss is divided by the number of micro-batches, use
`aux_loss_scale = 1 / num_microbatches`.

Limits: tensor parallelism and sequence parallelism are not supported inside `MoesysMLP`
(tensor_model_parallel_size must be 1; experts are not TP-sharded); `SDPASelfAttention` supports
TP=1, causal or padding masks, GQA and RoPE (through Megatron's `apply_rotary_pos_emb`; untested on
CPU, where Megatron's `RotaryEmbedding` itself moves its frequencies to CUDA), not packed sequences
or KV-cache inference.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_config import TransformerConfig

from moesys.moe.config import MoEConfig
from moesys.moe.layer import MoELayer
from moesys.parallel import ParallelDims, apply_expert_parallel, expert_parameters

__all__ = [
    "moe_config_from_megatron",
    "MoesysMLP",
    "SDPASelfAttention",
    "moesys_mlp_spec",
    "with_moesys_mlp",
    "moesys_gpt_layer_spec",
    "parallel_dims_from_megatron",
    "set_aux_loss_scale",
    "AttachAuxLoss",
]


# ---------------------------------------------------------------------------------------------
# config adapter
def _activation(tc: TransformerConfig) -> str:
    fn = tc.activation_func
    if tc.gated_linear_unit:
        if fn is F.silu:
            return "swiglu"
        raise ValueError(f"moe_config_from_megatron: gated_linear_unit with activation_func={fn!r}; "
                         "moesys supports the gated form only with silu (swiglu)")
    for name, f in (("gelu", F.gelu), ("relu", F.relu), ("silu", F.silu)):
        if fn is f:
            return name
    raise ValueError(f"moe_config_from_megatron: activation_func={fn!r} is not one of F.gelu, F.relu, F.silu")


def _one(value, name: str):
    """Megatron allows per-type lists for some MoE fields; moesys takes one value."""
    if isinstance(value, (list, tuple)):
        if len(value) != 1:
            raise ValueError(f"moe_config_from_megatron: {name}={value!r}: moesys takes one value")
        return value[0]
    return value


def _check_groups_like_megatron(tc: TransformerConfig, num_groups: int, group_topk) -> None:
    """Group-limited routing maps only where moesys picks the same groups as Megatron."""
    if not group_topk:
        raise ValueError(f"moe_config_from_megatron: moe_router_num_groups={num_groups} needs moe_router_group_topk")
    E, K = tc.num_moe_experts, tc.moe_router_topk
    per_group = E // num_groups if E % num_groups == 0 else None
    # Megatron scores a group by the sum of its top-(topk // group_topk) scores; moesys (DeepSeek-V3)
    # by its top-2 (its top-1 when a group holds one expert)
    if per_group is not None and K // group_topk != min(2, per_group):
        raise ValueError(
            f"moe_config_from_megatron: Megatron scores a group by its top moe_router_topk // "
            f"moe_router_group_topk = {K} // {group_topk} = {K // group_topk} scores; moesys by its top "
            f"{min(2, per_group)} (DeepSeek-V3), so the groups chosen would differ")
    if tc.moe_router_score_function == "softmax" and not tc.moe_router_pre_softmax:
        raise ValueError(
            "moe_config_from_megatron: with moe_router_score_function='softmax' and moe_router_pre_softmax=False "
            "Megatron ranks groups by their logits, moesys by the softmax probabilities (the groups can differ): "
            "set moe_router_pre_softmax=True, or sigmoid scores with moe_router_enable_expert_bias")


def moe_config_from_megatron(tc: TransformerConfig, **overrides) -> MoEConfig:
    """MoEConfig from a Megatron TransformerConfig (MegaBlocks `Arguments.from_megatron` style).

    Mapping: num_moe_experts -> num_experts; moe_router_topk -> top_k; moe_ffn_hidden_size (else
    ffn_hidden_size) -> ffn_hidden_size; moe_router_load_balancing_type aux_loss / seq_aux_loss /
    none -> aux_loss switch / seq / none; moe_router_enable_expert_bias (with sigmoid score) ->
    router="sigmoid_bias", moe_router_bias_update_rate -> bias_update_rate; moe_aux_loss_coeff,
    moe_z_loss_coeff -> aux_loss_coef, z_loss_coef; moe_expert_capacity_factor -> capacity_factor
    (None = dropless); moe_token_drop_policy -> drop_policy; moe_router_pre_softmax=True ->
    normalize_topk=False, else None (renormalise for K > 1: Megatron's softmax over the top-k
    scores; it refuses K = 1 without pre-softmax), and None for sigmoid scores (Megatron
    renormalises those for K > 1 whatever pre_softmax says); gated_linear_unit + silu -> swiglu; moe_input_jitter_eps -> jitter_eps;
    init_method_std -> init_std; moe_router_num_groups, moe_router_group_topk -> num_groups,
    topk_groups (where moesys picks the same groups: a group's score is the sum of its top-2 scores,
    i.e. moe_router_topk // moe_router_group_topk == 2, and softmax scores need pre-softmax: Megatron
    ranks groups by logits otherwise; else it raises); moe_router_load_balancing_type
    global_aux_loss -> aux_loss global_batch, coefficient unchanged (moesys's per-rank loss is Qwen's
    form, whose mean over the data-parallel ranks is the Switch loss of the whole batch; Megatron's
    per-rank value is that divided by its reduce group's size, and it pools the counts of the
    gradient-accumulation micro-batches, which moesys does not; Megatron counts the un-limited top-k
    choices for its aux losses, moesys the routes taken). moe_shared_expert_intermediate_size I -> one shared expert of width I
    (num_shared_experts=1, shared_ffn_hidden_size=I: Megatron runs its shared experts as one MLP of the
    total width, which is the sum of S experts of width I/S), moe_shared_expert_gate -> shared_expert_gate
    (moe_shared_expert_overlap is accepted either way: moesys always overlaps them with the dispatch under
    expert parallelism); recompute_granularity="selective" with "moe" or "moe_act" in recompute_modules ->
    recompute. Keyword `overrides` replace any field.
    Unsupported settings (sinkhorn balancing, top-k scaling factor) raise.
    """
    if not tc.num_moe_experts:
        raise ValueError("moe_config_from_megatron: TransformerConfig.num_moe_experts is not set")
    balancing = _one(tc.moe_router_load_balancing_type, "moe_router_load_balancing_type")
    aux_map = {"aux_loss": "switch", "seq_aux_loss": "seq", "global_aux_loss": "global_batch", "none": "none"}
    if balancing not in aux_map:
        raise ValueError(f"moe_config_from_megatron: moe_router_load_balancing_type={balancing!r} "
                         f"is not one of {list(aux_map)}")
    num_groups, group_topk = getattr(tc, "moe_router_num_groups", None), getattr(tc, "moe_router_group_topk", None)
    if getattr(tc, "moe_router_topk_limited_devices", None):
        raise ValueError("moe_config_from_megatron: moe_router_topk_limited_devices is deprecated in Megatron; "
                         "set moe_router_num_groups (= EP size) and moe_router_group_topk instead")
    if num_groups:
        _check_groups_like_megatron(tc, num_groups, group_topk)
    if getattr(tc, "moe_router_topk_scaling_factor", None) not in (None, 1.0):
        raise ValueError("moe_config_from_megatron: moe_router_topk_scaling_factor is not supported")
    router = "topk"
    if tc.moe_router_enable_expert_bias:
        if tc.moe_router_score_function != "sigmoid":
            raise ValueError("moe_config_from_megatron: moe_router_enable_expert_bias needs "
                             "moe_router_score_function='sigmoid' (moesys router 'sigmoid_bias')")
        router = "sigmoid_bias"
    elif tc.moe_router_score_function != "softmax":
        raise ValueError(f"moe_config_from_megatron: moe_router_score_function={tc.moe_router_score_function!r} "
                         "without expert bias is not supported")
    fields = dict(
        hidden_size=tc.hidden_size,
        ffn_hidden_size=tc.moe_ffn_hidden_size or tc.ffn_hidden_size,
        num_experts=tc.num_moe_experts,
        top_k=tc.moe_router_topk,
        router=router,
        normalize_topk=False if (tc.moe_router_pre_softmax and router == "topk") else None,
        jitter_eps=float(tc.moe_input_jitter_eps or 0.0),
        bias_update_rate=float(tc.moe_router_bias_update_rate),
        activation=_activation(tc),
        init_std=float(tc.init_method_std),
        capacity_factor=tc.moe_expert_capacity_factor,
        drop_policy=tc.moe_token_drop_policy,
        aux_loss=aux_map[balancing],
        aux_loss_coef=float(_one(tc.moe_aux_loss_coeff, "moe_aux_loss_coeff") or 0.0),
        z_loss_coef=float(tc.moe_z_loss_coeff or 0.0),
        num_groups=num_groups or None,
        topk_groups=group_topk if num_groups else None,
    )
    shared = getattr(tc, "moe_shared_expert_intermediate_size", None)
    if shared:
        fields.update(num_shared_experts=1, shared_ffn_hidden_size=int(shared),
                      shared_expert_gate=bool(getattr(tc, "moe_shared_expert_gate", False)))
    modules = getattr(tc, "recompute_modules", None) or ()
    if getattr(tc, "recompute_granularity", None) == "selective" and {"moe", "moe_act"} & set(modules):
        fields["recompute"] = True
    fields.update(overrides)
    return MoEConfig(**fields)


# ---------------------------------------------------------------------------------------------
# aux loss through autograd
class AttachAuxLoss(torch.autograd.Function):
    """y = output (unchanged); backward gives aux_loss the gradient `scale`.

    The aux loss so joins the training loss's backward as if `scale * aux_loss` had been added to
    it, without being added to (or logged in) the loss value itself.
    """

    @staticmethod
    def forward(ctx, output: torch.Tensor, aux_loss: torch.Tensor, scale: float):
        ctx.save_for_backward(aux_loss)
        ctx.scale = scale
        return output.view_as(output)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        (aux_loss,) = ctx.saved_tensors
        return grad_output, torch.full_like(aux_loss, ctx.scale), None


def set_aux_loss_scale(model: nn.Module, scale: float) -> None:
    """Set the aux-loss gradient scale of every MoesysMLP in `model`."""
    for m in model.modules():
        if isinstance(m, MoesysMLP):
            m.aux_loss_scale = float(scale)


# ---------------------------------------------------------------------------------------------
def parallel_dims_from_megatron(timeout_s: float = 300.0):
    """A moesys `ParallelDims` whose groups are Megatron's parallel_state groups (TP must be 1)."""
    import torch.distributed as dist

    tp = parallel_state.get_tensor_model_parallel_world_size()
    if tp != 1:
        raise ValueError(f"MoesysMLP: tensor_model_parallel_size={tp}; moesys experts under Megatron need TP=1")
    ep = parallel_state.get_expert_model_parallel_world_size()
    edp = parallel_state.get_expert_data_parallel_world_size()
    dp = parallel_state.get_data_parallel_world_size()
    return ParallelDims(
        world_size=dist.get_world_size(), rank=dist.get_rank(), tp=1, dp=dp, ep=ep, edp=edp,
        ep_rank=parallel_state.get_expert_model_parallel_rank(),
        local_world_size=dist.get_world_size(), timeout_s=timeout_s,
        dp_group=parallel_state.get_data_parallel_group(),
        ep_group=parallel_state.get_expert_model_parallel_group(),
        edp_group=parallel_state.get_expert_data_parallel_group(),
    )


class MoesysMLP(MegatronModule):
    """Megatron MLP slot filled by a moesys MoELayer: forward(hidden [S, B, H]) -> (output, None).

    Args:
        config: Megatron's TransformerConfig (given by `build_module`).
        moe_config: a MoEConfig, or None to derive it with `moe_config_from_megatron(config)`.
        aux_loss_scale: gradient given to the layer's aux loss (see module docstring).
        ep_options: keyword options for `moesys.parallel.apply_expert_parallel` (dispatcher, mode, ...).
    Attributes:
        moe: the MoELayer; last_aux_metrics: detached metrics of the last forward (for logging).
    """

    def __init__(self, config: TransformerConfig, moe_config: Optional[MoEConfig] = None,
                 aux_loss_scale: float = 1.0, ep_options: Optional[dict] = None, **unused):
        super().__init__(config=config)
        if parallel_state.model_parallel_is_initialized() and parallel_state.get_tensor_model_parallel_world_size() != 1:
            raise ValueError("MoesysMLP: tensor_model_parallel_size must be 1 (experts are not TP-sharded)")
        if config.sequence_parallel:
            raise ValueError("MoesysMLP: sequence_parallel is not supported")
        cfg = moe_config if moe_config is not None else moe_config_from_megatron(config)
        if cfg.hidden_size != config.hidden_size:
            raise ValueError(f"MoesysMLP: MoEConfig.hidden_size ({cfg.hidden_size}) != "
                             f"TransformerConfig.hidden_size ({config.hidden_size})")
        self.aux_loss_scale = float(aux_loss_scale)
        self.layer_number: Optional[int] = None
        self.last_aux_metrics: dict = {}
        # aux_loss=global_batch: counts over the data-parallel ranks (with context parallelism: its
        # ranks too; TP is 1), i.e. the whole batch; one process when parallel_state is not set up
        balance_group = (parallel_state.get_data_parallel_group(with_context_parallel=True)
                         if parallel_state.model_parallel_is_initialized() else None)
        self.moe = MoELayer(cfg, balance_group=balance_group)
        ep = parallel_state.get_expert_model_parallel_world_size() if parallel_state.model_parallel_is_initialized() else 1
        if ep > 1:
            dims = parallel_dims_from_megatron()
            # Megatron's DDP flattens parameter storage into its buffers: the experts stay plain local
            # shards (their `sharding` still says where they sit in the global [E, D, F])
            apply_expert_parallel(self.moe, dims.ep_group, dims=dims, **{"dtensor": False, **(ep_options or {})})

        for p in expert_parameters(self.moe):
            # Megatron DDP: params with allreduce=False are expert params, reduced over expert-DP
            p.allreduce = False

    def set_layer_number(self, layer_number: int) -> None:
        self.layer_number = layer_number

    def forward(self, hidden_states: torch.Tensor, padding_mask=None, **kwargs):
        """hidden_states [S, B, H] -> (output [S, B, H], bias None).

        Padding tokens are routed like any other (moesys has no token mask); padding_mask is
        accepted for Megatron's call signature.
        """
        x_BSH = hidden_states.transpose(0, 1)  # moesys groups tokens by sequence (seq aux loss, drop order)
        y_BSH, aux = self.moe(x_BSH)
        self.last_aux_metrics = aux.metrics
        y_SBH = y_BSH.transpose(0, 1).contiguous()
        if self.training and torch.is_grad_enabled() and aux.loss.requires_grad:
            y_SBH = AttachAuxLoss.apply(y_SBH, aux.loss, self.aux_loss_scale)
        return y_SBH, None


# ---------------------------------------------------------------------------------------------
class SDPASelfAttention(MegatronModule):
    """Causal (or padding-masked) self-attention on torch SDPA with Megatron's SelfAttention signature.

    forward(hidden_states [S, B, H], attention_mask, ...) -> (output [S, B, H], bias or None).
    Weights: linear_qkv [(nh + 2*ng) * d, H] (q heads, then k, then v), linear_proj [H, nh * d].
    """

    def __init__(self, config: TransformerConfig, submodules=None, layer_number: int = 1,
                 attn_mask_type: AttnMaskType = AttnMaskType.causal, pg_collection=None, **unused):
        super().__init__(config=config)
        self.layer_number = layer_number
        self.attn_mask_type = attn_mask_type
        self.num_heads = config.num_attention_heads
        self.num_groups = config.num_query_groups or config.num_attention_heads
        self.head_dim = config.kv_channels or config.hidden_size // config.num_attention_heads
        H, d = config.hidden_size, self.head_dim
        self.linear_qkv = nn.Linear(H, (self.num_heads + 2 * self.num_groups) * d,
                                    bias=config.add_bias_linear or config.add_qkv_bias)
        self.linear_proj = nn.Linear(self.num_heads * d, H, bias=False)
        # Megatron returns the projection bias apart, for the fused bias-dropout-add
        self.proj_bias = nn.Parameter(torch.zeros(H)) if config.add_bias_linear else None
        with torch.no_grad():
            config.init_method(self.linear_qkv.weight)
            config.output_layer_init_method(self.linear_proj.weight)
            if self.linear_qkv.bias is not None:
                self.linear_qkv.bias.zero_()

    def forward(self, hidden_states, attention_mask=None, key_value_states=None, inference_context=None,
                rotary_pos_emb=None, rotary_pos_cos=None, rotary_pos_sin=None, rotary_pos_cos_sin=None,
                attention_bias=None, packed_seq_params=None, sequence_len_offset=None, **kwargs):
        if key_value_states is not None or packed_seq_params is not None or inference_context is not None:
            raise NotImplementedError("SDPASelfAttention: cross-attention, packed sequences and inference "
                                      "contexts are not supported")
        S, B, _ = hidden_states.shape
        nh, ng, d = self.num_heads, self.num_groups, self.head_dim
        qkv = self.linear_qkv(hidden_states)  # [S, B, (nh + 2 ng) d]
        q, k, v = qkv.split([nh * d, ng * d, ng * d], dim=-1)
        q, k, v = q.view(S, B, nh, d), k.view(S, B, ng, d), v.view(S, B, ng, d)
        if rotary_pos_emb is not None:
            from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb

            q_emb, k_emb = rotary_pos_emb if isinstance(rotary_pos_emb, tuple) else (rotary_pos_emb, rotary_pos_emb)
            q = apply_rotary_pos_emb(q, q_emb, config=self.config)
            k = apply_rotary_pos_emb(k, k_emb, config=self.config)
        q, k, v = (t.permute(1, 2, 0, 3) for t in (q, k, v))  # [B, heads, S, d]
        if ng != nh:
            k, v = k.repeat_interleave(nh // ng, dim=1), v.repeat_interleave(nh // ng, dim=1)
        mask, causal = None, self.attn_mask_type == AttnMaskType.causal
        if not causal and attention_mask is not None:
            mask = ~attention_mask.bool()  # Megatron: True = masked out; SDPA: True = attend
        p = self.config.attention_dropout if self.training else 0.0
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p, is_causal=causal)
        o = o.permute(2, 0, 1, 3).reshape(S, B, nh * d)  # [S, B, nh d]
        return self.linear_proj(o), self.proj_bias


# ---------------------------------------------------------------------------------------------
# specs
def moesys_mlp_spec(moe_config: Optional[MoEConfig] = None, *, aux_loss_scale: float = 1.0,
                    ep_options: Optional[dict] = None) -> ModuleSpec:
    """ModuleSpec of `MoesysMLP` for `TransformerLayerSubmodules.mlp`."""
    params = {"aux_loss_scale": aux_loss_scale}
    if moe_config is not None:
        params["moe_config"] = moe_config
    if ep_options:
        params["ep_options"] = dict(ep_options)
    return ModuleSpec(module=MoesysMLP, params=params)


def with_moesys_mlp(layer_spec: ModuleSpec, moe_config: Optional[MoEConfig] = None, *,
                    aux_loss_scale: float = 1.0, ep_options: Optional[dict] = None) -> ModuleSpec:
    """A copy of a Megatron TransformerLayer spec with its MLP replaced by `MoesysMLP`.

    Build `layer_spec` with Megatron's MoE settings (e.g. `num_experts=...`) so it has a separate
    pre-MLP norm (dense TE specs fuse that norm into fc1 and leave `pre_mlp_layernorm` an identity).
    """
    submodules = dataclasses.replace(
        layer_spec.submodules,
        mlp=moesys_mlp_spec(moe_config, aux_loss_scale=aux_loss_scale, ep_options=ep_options),
    )
    return dataclasses.replace(layer_spec, submodules=submodules)


def moesys_gpt_layer_spec(moe_config: Optional[MoEConfig] = None, *, aux_loss_scale: float = 1.0,
                          ep_options: Optional[dict] = None) -> ModuleSpec:
    """TransformerLayer spec for CPU / no-TE use: torch norms, SDPASelfAttention, MoesysMLP."""
    from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
    from megatron.core.transformer.torch_norm import WrappedTorchNorm
    from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=WrappedTorchNorm,
            self_attention=ModuleSpec(module=SDPASelfAttention, params={"attn_mask_type": AttnMaskType.causal}),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=WrappedTorchNorm,
            mlp=moesys_mlp_spec(moe_config, aux_loss_scale=aux_loss_scale, ep_options=ep_options),
            mlp_bda=get_bias_dropout_add,
        ),
    )
