"""Megatron-core integration on CPU: GPTModel with SDPASelfAttention + the moesys MoE MLP.

parallel_state runs on gloo: world 1 in this process, and 2 spawned ranks with
expert_model_parallel_size=2.
"""
from __future__ import annotations

import datetime
import os
import tempfile
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

pytest.importorskip("megatron.core")

from megatron.core import parallel_state  # noqa: E402
from megatron.core.transformer.transformer_config import TransformerConfig  # noqa: E402

from moesys import MoELayer  # noqa: E402
from moesys.integrations import megatron as mg  # noqa: E402
from train_helpers import FORKED  # noqa: E402

H, FF, E, S, B, V = 16, 24, 4, 8, 3, 32


def _tc(**kw) -> TransformerConfig:
    base = dict(num_layers=2, hidden_size=H, num_attention_heads=2, num_moe_experts=E, moe_router_topk=2,
                moe_ffn_hidden_size=FF, ffn_hidden_size=64, gated_linear_unit=True, activation_func=F.silu,
                moe_aux_loss_coeff=1e-2, moe_z_loss_coeff=1e-3, use_cpu_initialization=True,
                hidden_dropout=0.0, attention_dropout=0.0, bias_dropout_fusion=False)
    base.update(kw)
    return TransformerConfig(**base)


@pytest.fixture(scope="module")
def world1():
    """One gloo rank in this process with Megatron's parallel_state initialised (TP=PP=EP=1)."""
    created = False
    tmp = tempfile.TemporaryDirectory()
    if not dist.is_initialized():
        store = dist.FileStore(os.path.join(tmp.name, "store"), 1)
        dist.init_process_group("gloo", store=store, rank=0, world_size=1, timeout=datetime.timedelta(seconds=120))
        created = True
    parallel_state.initialize_model_parallel()
    try:
        yield
    finally:
        parallel_state.destroy_model_parallel()
        if created:
            dist.destroy_process_group()
        tmp.cleanup()


# ---------------------------------------------------------------------------------------------
def test_moe_config_from_megatron():
    tc = _tc(moe_expert_capacity_factor=1.25, moe_token_drop_policy="position", init_method_std=0.01,
             moe_router_load_balancing_type="seq_aux_loss")
    cfg = mg.moe_config_from_megatron(tc)
    assert (cfg.hidden_size, cfg.ffn_hidden_size, cfg.num_experts, cfg.top_k) == (H, FF, E, 2)
    assert cfg.activation == "swiglu" and cfg.router == "topk" and cfg.renormalize_topk
    assert cfg.aux_loss == "seq" and cfg.aux_loss_coef == 1e-2 and cfg.z_loss_coef == 1e-3
    assert cfg.capacity_factor == 1.25 and cfg.drop_policy == "position" and cfg.init_std == 0.01
    dense_ffn = mg.moe_config_from_megatron(_tc(moe_ffn_hidden_size=None, gated_linear_unit=False,
                                                activation_func=F.gelu, moe_router_pre_softmax=True))
    assert dense_ffn.ffn_hidden_size == 64 and dense_ffn.activation == "gelu" and not dense_ffn.renormalize_topk
    assert dense_ffn.capacity_factor is None  # dropless
    biased = mg.moe_config_from_megatron(_tc(moe_router_enable_expert_bias=True, moe_router_score_function="sigmoid",
                                             moe_router_load_balancing_type="none", moe_aux_loss_coeff=0.0))
    assert biased.router == "sigmoid_bias" and biased.aux_loss == "none"
    assert biased.renormalize_topk  # Megatron renormalises sigmoid scores for K > 1, pre_softmax or not
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # K=1 is left to decide by K: no normalize_topk warning
        top1 = mg.moe_config_from_megatron(tc, top_k=1)  # overrides
    assert top1.top_k == 1 and not top1.renormalize_topk
    assert cfg.num_shared_experts == 0 and not cfg.recompute
    shared = mg.moe_config_from_megatron(_tc(moe_shared_expert_intermediate_size=48, moe_shared_expert_gate=True,
                                             moe_shared_expert_overlap=True, moe_token_dispatcher_type="alltoall",
                                             recompute_granularity="selective",
                                             recompute_modules=["core_attn", "moe"]))
    assert (shared.num_shared_experts, shared.shared_ffn_hidden_size, shared.shared_expert_gate) == (1, 48, True)
    assert shared.recompute
    with pytest.raises(ValueError, match="num_moe_experts"):
        mg.moe_config_from_megatron(_tc(num_moe_experts=None, moe_ffn_hidden_size=None))
    with pytest.raises(ValueError, match="gated_linear_unit"):
        mg.moe_config_from_megatron(_tc(activation_func=F.gelu))


def test_moe_config_from_megatron_groups_and_global_aux_loss():
    # DeepSeek-V3's form: sigmoid scores + expert bias, groups scored by their top-2 (4 // 2)
    tc = _tc(num_moe_experts=8, moe_router_topk=4, moe_router_num_groups=4, moe_router_group_topk=2,
             moe_router_score_function="sigmoid", moe_router_enable_expert_bias=True,
             moe_router_load_balancing_type="global_aux_loss")
    cfg = mg.moe_config_from_megatron(tc)
    assert (cfg.router, cfg.num_groups, cfg.topk_groups, cfg.aux_loss) == ("sigmoid_bias", 4, 2, "global_batch")
    pre = mg.moe_config_from_megatron(_tc(num_moe_experts=8, moe_router_topk=2, moe_router_num_groups=4,
                                          moe_router_group_topk=1, moe_router_pre_softmax=True))
    assert (pre.router, pre.num_groups, pre.topk_groups, pre.renormalize_topk) == ("topk", 4, 1, False)
    assert mg.moe_config_from_megatron(_tc()).num_groups is None
    # Megatron ranks softmax groups by logits without pre-softmax: refused, not silently different
    with pytest.raises(ValueError, match="pre_softmax=False.*logits"):
        mg.moe_config_from_megatron(_tc(num_moe_experts=8, moe_router_num_groups=4, moe_router_group_topk=1))
    with pytest.raises(ValueError, match="moe_router_topk_limited_devices is deprecated"):
        mg.moe_config_from_megatron(_tc(moe_router_topk_limited_devices=2))
    # a group score of top-(4 // 4) = top-1 is not moesys's top-2
    with pytest.raises(ValueError, match=r"4 // 4 = 1 scores; moesys by its top 2"):
        mg.moe_config_from_megatron(_tc(num_moe_experts=8, moe_router_topk=4, moe_router_num_groups=4,
                                        moe_router_group_topk=4, moe_router_pre_softmax=True))


@pytest.mark.parametrize("aux_loss,shared", [("switch", False), ("seq", False), ("global_batch", False),
                                             ("switch", True)])
def test_mlp_wrapper_equals_moelayer_on_transposed_input(world1, aux_loss, shared):
    tc = _tc(moe_shared_expert_intermediate_size=24, moe_shared_expert_gate=True) if shared else _tc()
    cfg = mg.moe_config_from_megatron(tc, aux_loss=aux_loss, kernel_backend="torch")
    scale = 0.5
    torch.manual_seed(0)
    mlp = mg.MoesysMLP(tc, moe_config=cfg, aux_loss_scale=scale)
    # global_batch counts over Megatron's data-parallel (+ context-parallel) group
    assert mlp.moe.router.balance_group.group is parallel_state.get_data_parallel_group(with_context_parallel=True)
    torch.manual_seed(0)
    ref = MoELayer(cfg)
    torch.manual_seed(1)
    x_SBH = torch.randn(S, B, H)
    g_SBH = torch.randn(S, B, H)

    x1 = x_SBH.clone().requires_grad_(True)
    out, bias = mlp(x1)
    assert bias is None and out.shape == (S, B, H)
    (out * g_SBH).sum().backward()

    x2 = x_SBH.transpose(0, 1).clone().requires_grad_(True)  # [B, S, H]: moesys's layout
    y, aux = ref(x2)
    ((y * g_SBH.transpose(0, 1)).sum() + scale * aux.loss).backward()

    torch.testing.assert_close(out, y.transpose(0, 1), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(x1.grad, x2.grad.transpose(0, 1), rtol=1e-5, atol=1e-6)
    names = [n for n, _ in ref.named_parameters()]
    assert any(n.startswith("shared_experts.") for n in names) == shared
    for name in names:
        a = mlp.moe.get_parameter(name).grad
        b = ref.get_parameter(name).grad
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7, msg=name)
    assert "aux_loss" in mlp.last_aux_metrics
    # Megatron DDP reduces allreduce=False params over expert-DP: the shared experts are dense
    for name, p in mlp.moe.named_parameters():
        assert getattr(p, "allreduce", True) == (not name.startswith("experts.")), name


def test_aux_loss_scale_reaches_router(world1):
    tc = _tc()
    torch.manual_seed(1)
    x = torch.randn(S, B, H)
    grads = []
    for scale in (0.0, 1.0, 2.0):
        torch.manual_seed(0)
        mlp = mg.MoesysMLP(tc, aux_loss_scale=scale)
        mlp(x)[0].sum().backward()
        grads.append(mlp.moe.router.weight.grad.clone())
    aux_grad = grads[1] - grads[0]
    assert aux_grad.abs().max() > 0
    torch.testing.assert_close(grads[2] - grads[0], 2 * aux_grad, rtol=1e-4, atol=1e-8)
    set_to = mg.MoesysMLP(tc)
    mg.set_aux_loss_scale(torch.nn.Sequential(set_to), 0.25)
    assert set_to.aux_loss_scale == 0.25


def _gpt(tc, seed=0):
    from megatron.core.models.gpt import GPTModel

    torch.manual_seed(seed)
    return GPTModel(config=tc, transformer_layer_spec=mg.moesys_gpt_layer_spec(), vocab_size=V, max_sequence_length=S)


@pytest.mark.parametrize("query_groups", [None, 1])  # multi-head and grouped-query attention
def test_gpt_model_forward_backward_cpu(world1, query_groups):
    model = _gpt(_tc(num_query_groups=query_groups))
    ids = torch.randint(0, V, (B, S), generator=torch.Generator().manual_seed(2))
    pos = torch.arange(S).unsqueeze(0).expand(B, S)
    loss_BS = model(ids, pos, None, labels=ids)
    assert loss_BS.shape == (B, S) and torch.isfinite(loss_BS).all()
    loss_BS.mean().backward()
    for i, layer in enumerate(model.decoder.layers):
        moe = layer.mlp.moe
        for name in ("router.weight", "experts.w1", "experts.w2", "experts.w3"):
            g = moe.get_parameter(name).grad
            assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0, f"layer {i} {name}"
        assert all(p.allreduce is False for p in moe.experts.parameters())  # Megatron DDP: expert params
    # logits through Megatron equal the plain-PyTorch recomputation of the whole network
    model.eval()
    with torch.no_grad():
        logits = model(ids, pos, None)
        torch.testing.assert_close(logits, _plain_gpt_logits(model, ids), rtol=1e-5, atol=1e-5)


def _plain_attention(att, x_SBH):
    S_, B_, _ = x_SBH.shape
    nh, ng, d = att.num_heads, att.num_groups, att.head_dim
    qkv = F.linear(x_SBH, att.linear_qkv.weight, att.linear_qkv.bias)
    q, k, v = qkv.split([nh * d, ng * d, ng * d], dim=-1)
    q = q.reshape(S_, B_, nh, d).permute(1, 2, 0, 3)
    k, v = (t.reshape(S_, B_, ng, 1, d).expand(S_, B_, ng, nh // ng, d).reshape(S_, B_, nh, d).permute(1, 2, 0, 3)
            for t in (k, v))
    scores = q @ k.transpose(-1, -2) / d ** 0.5
    scores = scores.masked_fill(torch.ones(S_, S_, dtype=torch.bool).triu(1), float("-inf"))
    o = (scores.softmax(-1) @ v).permute(2, 0, 1, 3).reshape(S_, B_, nh * d)
    return F.linear(o, att.linear_proj.weight, att.proj_bias)


def _plain_gpt_logits(model, ids):
    """The GPT network in plain torch on the model's own weights (the MoE via MoELayer in [B, S, H])."""
    emb = model.embedding
    pos = torch.arange(ids.shape[1])
    h = (emb.word_embeddings.weight[ids] + emb.position_embeddings.weight[pos]).transpose(0, 1)  # [S, B, H]
    for layer in model.decoder.layers:
        ln1, ln2 = layer.input_layernorm, layer.pre_mlp_layernorm
        h = h + _plain_attention(layer.self_attention, F.layer_norm(h, (H,), ln1.weight, ln1.bias, ln1.eps))
        y_BSH, _ = layer.mlp.moe(F.layer_norm(h, (H,), ln2.weight, ln2.bias, ln2.eps).transpose(0, 1))
        h = h + y_BSH.transpose(0, 1)
    fl = model.decoder.final_layernorm
    h = F.layer_norm(h, (H,), fl.weight, fl.bias, fl.eps)
    return (h @ model.output_layer.weight.t()).transpose(0, 1)  # [B, S, V]


def test_with_moesys_mlp_swaps_only_the_mlp():
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    base = get_gpt_layer_local_spec(num_experts=E)
    spec = mg.with_moesys_mlp(base, aux_loss_scale=0.25)
    assert spec.submodules.mlp.module is mg.MoesysMLP and spec.submodules.mlp.params["aux_loss_scale"] == 0.25
    assert spec.submodules.self_attention is base.submodules.self_attention
    assert spec.submodules.pre_mlp_layernorm is base.submodules.pre_mlp_layernorm
    assert base.submodules.mlp.module is not mg.MoesysMLP  # the input spec is not modified


# ---------------------------------------------------------------------------------------------
def _ep2_rank() -> dict:
    parallel_state.initialize_model_parallel(expert_model_parallel_size=2)
    try:
        rank = dist.get_rank()
        tc = _tc()
        cfg = mg.moe_config_from_megatron(tc, kernel_backend="torch")
        torch.manual_seed(0)
        mlp = mg.MoesysMLP(tc, moe_config=cfg)  # sharded over Megatron's expert-model-parallel group
        torch.manual_seed(0)
        ref = MoELayer(cfg)  # all experts, one process
        xs = [torch.randn(S, B, H, generator=torch.Generator().manual_seed(10 + r)) for r in range(2)]
        gs = [torch.randn(S, B, H, generator=torch.Generator().manual_seed(20 + r)) for r in range(2)]

        out, _ = mlp(xs[rank])
        (out * gs[rank]).sum().backward()

        ref_total = 0.0
        ref_out = None
        for r in range(2):
            y, aux = ref(xs[r].transpose(0, 1))
            ref_total = ref_total + (y.transpose(0, 1) * gs[r]).sum() + aux.loss
            if r == rank:
                ref_out = y.transpose(0, 1).detach()
        ref_total.backward()

        experts = mlp.moe.experts
        lo, n = experts.expert_offset, experts.num_local_experts
        router_grad = mlp.moe.router.weight.grad.clone()
        dist.all_reduce(router_grad)  # each rank's router saw only its tokens
        return {
            "ep": parallel_state.get_expert_model_parallel_world_size(),
            "edp": parallel_state.get_expert_data_parallel_world_size(),
            "num_local": n,
            "out_err": float((out - ref_out).abs().max()),
            "w_err": max(float((experts.get_parameter(w).grad - ref.experts.get_parameter(w).grad[lo:lo + n]).abs().max())
                         for w in ("w1", "w2", "w3")),
            "router_err": float((router_grad - ref.router.weight.grad).abs().max()),
        }
    finally:
        parallel_state.destroy_model_parallel()


def _ep2_groups_global_rank() -> dict:
    """EP=2 through Megatron's groups: DeepSeek-V3 routing (sigmoid + bias, one of two groups per
    token) and global_aux_loss, against one process holding both ranks' tokens."""
    parallel_state.initialize_model_parallel(expert_model_parallel_size=2)
    try:
        rank = dist.get_rank()
        tc = _tc(moe_router_num_groups=2, moe_router_group_topk=1, moe_router_score_function="sigmoid",
                 moe_router_enable_expert_bias=True, moe_router_load_balancing_type="global_aux_loss",
                 moe_aux_loss_coeff=0.5)
        cfg = mg.moe_config_from_megatron(tc, kernel_backend="torch")
        torch.manual_seed(0)
        mlp = mg.MoesysMLP(tc, moe_config=cfg)
        torch.manual_seed(0)
        ref = MoELayer(cfg, balance_group="local")
        with torch.no_grad():
            for m in (mlp.moe, ref):
                m.router.expert_bias.copy_(torch.tensor([0.1, -0.2, 0.05, 0.0]))
        xs = [torch.randn(S, B, H, generator=torch.Generator().manual_seed(10 + r)) for r in range(2)]
        gs = [torch.randn(S, B, H, generator=torch.Generator().manual_seed(20 + r)) for r in range(2)]
        out, _ = mlp(xs[rank])
        (out * gs[rank]).sum().backward()
        y, aux = ref(torch.cat(xs, 1).transpose(0, 1))  # [2B, S, H]: both ranks' sequences
        ((y.transpose(0, 1) * torch.cat(gs, 1)).sum() + 2 * aux.loss).backward()  # each rank adds its aux loss
        router_grad = mlp.moe.router.weight.grad.clone()
        dist.all_reduce(router_grad)
        routing, _ = mlp.moe.route(xs[rank].transpose(0, 1).reshape(-1, H), seq_len=S)
        return {"out_err": float((out - y.transpose(0, 1)[:, rank * B:(rank + 1) * B]).abs().max()),
                "router_err": float((router_grad - ref.router.weight.grad).abs().max()),
                "same_group": bool(((routing.expert_idx_R.view(-1, 2) // 2).diff(dim=1) == 0).all())}
    finally:
        parallel_state.destroy_model_parallel()


@pytest.mark.slow
@pytest.mark.multirank
def test_megatron_groups_and_global_aux_loss_ep2_match_one_process():
    results = pytest.importorskip("moesys.parallel").simulate(_ep2_groups_global_rank, 2, timeout_s=180,
                                                                         preload=FORKED)
    for r in results:
        assert r["out_err"] < 1e-5 and r["router_err"] < 1e-5, r
        assert r["same_group"], r  # one group (= one EP rank) per token


@pytest.mark.slow
@pytest.mark.multirank
def test_megatron_expert_parallel_ep2_matches_single_process():
    parallel = pytest.importorskip("moesys.parallel")
    if not hasattr(parallel, "simulate") or not hasattr(parallel, "apply_expert_parallel"):
        pytest.skip("moesys.parallel has not landed yet")
    results = parallel.simulate(_ep2_rank, 2, timeout_s=180, preload=FORKED)
    for r in results:
        assert r["ep"] == 2 and r["edp"] == 1 and r["num_local"] == E // 2
        assert r["out_err"] < 1e-5, r
        assert r["w_err"] < 1e-5, r
        assert r["router_err"] < 1e-5, r
