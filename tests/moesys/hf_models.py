"""Tiny random Hugging Face MoE models, built offline from transformers' config classes and saved
with save_pretrained (module-level so spawned ranks can import it). transformers is imported lazily:
the tests that use it skip without it."""
from __future__ import annotations

import importlib

import torch

FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3")
VOCAB = 96


_MODELING = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3")


def import_transformers():
    """transformers with its five MoE modeling modules loaded (the repository root may be on sys.path:
    its kernels/ folder hands a top-level `import kernels` over to Hugging Face's package)."""
    tf = importlib.import_module("transformers")
    for name in _MODELING:
        importlib.import_module(f"transformers.models.{name}.modeling_{name}")
    return tf


def hf_config(family: str, **over):
    tf = import_transformers()

    common = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, num_experts_per_tok=2, max_position_embeddings=256,
                  rope_parameters={"rope_type": "default", "rope_theta": 5000.0}, pad_token_id=None,
                  bos_token_id=None, eos_token_id=None)
    if family == "mixtral":  # every layer MoE, renormalised top-2, tied embeddings
        kw = dict(intermediate_size=24, num_local_experts=4, tie_word_embeddings=True, router_aux_loss_coef=0.02)
        cls = tf.MixtralConfig
    elif family == "qwen2_moe":  # q/k/v biases, a dense first layer, a gated shared expert, no renormalising
        kw = dict(intermediate_size=40, moe_intermediate_size=16, shared_expert_intermediate_size=24, num_experts=4,
                  decoder_sparse_step=2, norm_topk_prob=False, qkv_bias=True)
        cls = tf.Qwen2MoeConfig
    elif family == "qwen3_moe":  # its own head_dim, per-head q/k norm, biases on q/k/v/o
        kw = dict(intermediate_size=40, moe_intermediate_size=16, num_experts=8, head_dim=16, norm_topk_prob=True,
                  attention_bias=True)
        cls = tf.Qwen3MoeConfig
    elif family == "olmoe":  # q/k norm over all heads, no renormalising
        kw = dict(intermediate_size=16, num_experts=8, norm_topk_prob=False, router_aux_loss_coef=0.01)
        cls = tf.OlmoeConfig
    elif family == "deepseek_v3":  # latent attention, a dense first layer, groups, shared expert, scaling 2.5
        kw = dict(intermediate_size=40, moe_intermediate_size=16, n_routed_experts=8, n_group=4, topk_group=2,
                  first_k_dense_replace=1, q_lora_rank=24, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8,
                  v_head_dim=12, n_shared_experts=1, routed_scaling_factor=2.5, norm_topk_prob=True,
                  num_key_value_heads=4, rope_interleave=True)
        cls = tf.DeepseekV3Config
    else:
        raise ValueError(family)
    return cls(**{**common, **kw, **over})


def build_hf(family: str, out_dir: str, seed: int = 0, **over):
    """A random tiny model of `family` saved to out_dir (config.json + model.safetensors); returned in
    fp32 eval mode. Weights are drawn wide enough that routing differs between tokens; norm weights
    and DeepSeek's correction bias are random too, so a mapping that drops them shows."""
    tf = import_transformers()

    cfg = hf_config(family, **over)
    torch.manual_seed(seed)
    cls = {"mixtral": tf.MixtralForCausalLM, "qwen2_moe": tf.Qwen2MoeForCausalLM, "qwen3_moe": tf.Qwen3MoeForCausalLM,
           "olmoe": tf.OlmoeForCausalLM, "deepseek_v3": tf.DeepseekV3ForCausalLM}[family]
    model = cls(cfg).float()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name:
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / max(p.shape[-1], 1) ** 0.5)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.05 * torch.randn(b.shape, generator=g))
    model.save_pretrained(out_dir)
    return model.eval()


def grads_in_moesys_layout(ref, model, path: str) -> dict:
    """transformers' gradients read through the import map: moesys name -> gradient tensor."""
    from moesys import hf

    cfg = hf.read_config(path)
    reader = hf.TensorReader({n: p.grad for n, p in ref.named_parameters() if p.grad is not None})
    entries = hf.weight_map(cfg["architectures"][0], model.cfg, model.blocks[-1].moe.cfg, cfg)
    E = model.blocks[-1].moe.cfg.num_experts
    return {e.ours: hf.read_entry(reader, e, num_experts=E) for e in entries if not e.ours.endswith("expert_bias")}


def sharded_import_worker(paths: dict, x):
    """Rank fn (4 ranks): per family, import at EP 4, EP 2 and EP 2 x FSDP2 (each rank reading only its
    slices straight into its shards) and run the forward on `x`. Returns {(family, layout): (logits
    as numpy, expert bytes this rank read)}."""
    from moesys import hf
    from moesys.decoder import Decoder
    from moesys.parallel import ParallelDims, apply_expert_parallel, apply_fsdp

    out = {}
    dims4 = ParallelDims.build(ep=4, timeout_s=120)
    dims2 = ParallelDims.build(ep=2, timeout_s=120)
    for family, path in paths.items():
        dcfg, moe = hf.configs_from_settings(hf.derive_settings(hf.read_config(path)))
        # fewer experts than ranks: each expert's F split over ep / E ranks (the F-shard mesh)
        ep4 = dims4 if moe.num_experts >= 4 else ParallelDims.build(ep=4, timeout_s=120, num_experts=moe.num_experts)
        for layout, dims in (("ep4", ep4), ("ep2", dims2), ("ep2_fsdp2", dims2)):
            torch.manual_seed(123)  # other weights than the checkpoint's
            model = Decoder(dcfg, moe)
            for _, layer in model.moe_layers():
                layer.set_balance_group(dims.dp_group)
                apply_expert_parallel(layer, dims.ep_group, dims=dims, overlap=1)
            if layout.endswith("fsdp2"):
                apply_fsdp(model, dims)
            reader = hf.load_into(model, path)
            model.eval()
            with torch.no_grad():
                logits = model(x)[0]
            out[(family, layout)] = (logits.numpy().copy(), reader.expert_bytes_read)
    return out


def init_from_worker(cfg, out_dir, x):
    """Rank fn: a Trainer started from model.init_from (this rank's slices only); the logits of `x`
    before training, then the per-step training losses of cfg.trainer.steps steps."""
    from train_helpers import build_trainer

    tr = build_trainer(cfg, out_dir)
    tr.model.eval()
    with torch.no_grad():
        logits = tr.model(x)[0].numpy().copy()
    return logits, tr.fit(None)["train_losses"]


def init_from_footprint_worker(cfg, out_dir, x):
    """Rank fn: a Trainer started from model.init_from, built under a dispatch mode that records the
    shape of every tensor allocated on a real device (DTensor wrappers aside: their local shards are
    the allocations). Returns (the logits of `x`, the full-expert-shaped allocations seen, the bytes of
    this rank's expert storages, the bytes of the whole model's experts)."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves
    from train_helpers import build_trainer

    m, moe = cfg.model, cfg.moe
    full = {(moe.num_experts, m.d_model, m.ffn_hidden), (moe.num_experts, m.ffn_hidden, m.d_model)}

    class Allocations(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.full_expert = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in tree_leaves(out):
                if type(t) in (torch.Tensor, torch.nn.Parameter) and not t.is_meta and tuple(t.shape) in full:
                    self.full_expert.append((str(func), tuple(t.shape)))
            return out

    with Allocations() as seen:
        tr = build_trainer(cfg, out_dir)
    mine = total = 0
    for _, layer in tr.model.moe_layers():
        for name in ("w1", "w2", "w3"):
            p = getattr(layer.experts, name)
            mine += (p.to_local() if hasattr(p, "to_local") else p).untyped_storage().nbytes()
            total += moe.num_experts * m.d_model * m.ffn_hidden * 4  # fp32
    tr.model.eval()
    with torch.no_grad():
        logits = tr.model(x)[0].numpy().copy()
    return logits, seen.full_expert, mine, total


# one MoE layer each, so transformers' balance loss (pooled over the MoE layers' tokens) is the
# per-layer Switch loss moesys sums; a balance coefficient large enough to show in the loss
ONE_MOE_LAYER = {"mixtral": dict(num_hidden_layers=1), "qwen2_moe": {}, "qwen3_moe": dict(decoder_sparse_step=2),
                 "olmoe": dict(num_hidden_layers=1), "deepseek_v3": {}}


def build_hf_one_moe_layer(family: str, out_dir: str, seed: int = 0):
    """build_hf with one MoE layer and transformers' balance loss on (DeepSeek-V3 has none)."""
    over = dict(ONE_MOE_LAYER[family])
    if family != "deepseek_v3":
        over.update(router_aux_loss_coef=0.05, output_router_logits=True)
    return build_hf(family, out_dir, seed=seed, **over)


def training_step_worker(paths: dict, x):
    """Rank fn (4 ranks, one sequence of `x` each): per family, at EP 2 (dp 4: two replicas of each
    expert) and EP 2 x FSDP2, build on the meta device, allocate this rank's shards, load its slices,
    then one training step's forward and backward with the trainer's gradient sync; the balance loss
    is moe.aux_loss=global_batch (the routes counted over the whole batch, as transformers does in one
    process). Returns {(family, layout): (global loss, {name: full gradient} on rank 0 only)}."""
    import dataclasses

    import torch.distributed as dist

    from moesys import hf
    from moesys.decoder import Decoder
    from moesys.model import lm_loss
    from moesys.parallel import ParallelDims, allreduce_gradients, apply_expert_parallel, apply_fsdp, materialize

    dims = ParallelDims.build(ep=2, timeout_s=120)
    rank = dist.get_rank()
    xr = x[rank:rank + 1]
    out = {}
    for family, path in paths.items():
        dcfg, moe = hf.configs_from_settings(hf.derive_settings(hf.read_config(path)))
        if moe.aux_loss != "none":
            moe = dataclasses.replace(moe, aux_loss="global_batch")
        for layout in ("ep2", "ep2_fsdp2"):
            with torch.device("meta"):
                model = Decoder(dcfg, moe)
            for _, layer in model.moe_layers():
                layer.set_balance_group(dims.dp_group)
                apply_expert_parallel(layer, dims.ep_group, dims=dims, mode="ep", overlap=1)
            if layout.endswith("fsdp2"):
                apply_fsdp(model, dims)
            materialize(model, "cpu")
            hf.load_into(model, path)
            model.train()
            logits, aux, _ = model(xr)
            loss = lm_loss(logits[:, :-1], xr[:, 1:]) + aux
            loss.backward()
            if not layout.endswith("fsdp2"):  # FSDP2 reduce-scatters in the backward
                allreduce_gradients(model, dims)
            total = loss.detach().clone()
            dist.all_reduce(total)
            grads = {}
            for name, p in model.named_parameters():  # the same order on every rank: full_tensor is collective
                g = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
                grads[name] = g.numpy().copy()
            out[(family, layout)] = (total.item() / dist.get_world_size(), grads if rank == 0 else None)
    return out
