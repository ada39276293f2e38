"""The modern decoder (moesys/decoder.py) and moe.routed_scaling_factor.

Logit equality with transformers' five MoE families is tests/moesys/test_hf.py; here: the parts
against obvious references (RoPE, GQA = MHA with repeated key/value heads, the KV cache = the full
forward, causality, tied embeddings, the layer pattern), the config checks, and the tiny presets
training through moesys-train.
"""
import math

import pytest
import torch

from moesys import MoEConfig, MoELayer
from moesys import train as train_mod
from moesys.decoder import Decoder, DecoderConfig, apply_rope, rope_cos_sin
from moesys.model import KVCache
from train_helpers import make_cfg


def _moe(D=32, F=16, E=4, K=2, **kw):
    return MoEConfig(hidden_size=D, ffn_hidden_size=F, num_experts=E, top_k=K, activation="swiglu", **kw)


def _mla(**kw):
    base = dict(vocab_size=50, n_layers=2, d_model=32, n_heads=4, dense_ffn_hidden=40, q_lora_rank=12,
                kv_lora_rank=10, qk_rope_head_dim=6, qk_nope_head_dim=4, v_head_dim=5, first_k_dense=1)
    return DecoderConfig(**{**base, **kw})


def _gqa(**kw):
    base = dict(vocab_size=50, n_layers=2, d_model=32, n_heads=4, n_kv_heads=2, dense_ffn_hidden=40, qk_norm=True,
                qkv_bias=True, moe_every=2)
    return DecoderConfig(**{**base, **kw})


# ---- routed_scaling_factor --------------------------------------------------------------------------
def test_routed_scaling_factor_scales_routed_output_and_gradient_exactly():
    """y = f * routed(x) + shared(x): against a factor-1 copy without shared experts plus the shared
    experts by hand; outputs and every gradient (w2's included, which folding f into w2 gets wrong)."""
    torch.manual_seed(0)
    f = 2.5
    layer = MoELayer(_moe(num_shared_experts=1, routed_scaling_factor=f))
    ref = MoELayer(_moe())
    ref.router.weight.data.copy_(layer.router.weight.data)
    for n in ("w1", "w2", "w3"):
        getattr(ref.experts, n).data.copy_(getattr(layer.experts, n).data)
    x = torch.randn(2, 7, 32)
    g = torch.randn(2, 7, 32)
    y, _ = layer(x)
    r, _ = ref(x)
    want = f * r + layer.shared_experts(x.reshape(-1, 32)).reshape(2, 7, 32).detach()
    torch.testing.assert_close(y, want, rtol=1e-6, atol=1e-6)
    (y * g).sum().backward()
    (f * r * g).sum().backward()
    for n in ("w1", "w2", "w3"):
        torch.testing.assert_close(getattr(layer.experts, n).grad, getattr(ref.experts, n).grad, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(layer.router.weight.grad, ref.router.weight.grad, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("bad", [0, -1.0, float("inf"), float("nan"), True])
def test_routed_scaling_factor_checked(bad):
    with pytest.raises(ValueError, match="MoEConfig.routed_scaling_factor must be a finite number > 0"):
        _moe(routed_scaling_factor=bad)


# ---- RoPE, attention --------------------------------------------------------------------------------
def test_rope_rotates_pairs_by_position_times_frequency():
    """Pair (i, i + d/2) of position p turns by p * theta^(-2i/d): checked on complex numbers."""
    d, theta = 8, 100.0
    x = torch.randn(1, 1, 5, d, dtype=torch.float64)
    cos, sin = rope_cos_sin(torch.arange(5), d, theta)
    got = apply_rope(x, cos.double(), sin.double())
    z = torch.complex(x[..., : d // 2], x[..., d // 2:])
    ang = torch.arange(5, dtype=torch.float64)[:, None] * theta ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    want = z * torch.exp(1j * ang)
    torch.testing.assert_close(got, torch.cat([want.real, want.imag], -1), rtol=1e-6, atol=1e-6)


def test_gqa_equals_mha_with_repeated_kv_heads():
    torch.manual_seed(0)
    moe = _moe()
    gqa = Decoder(_gqa(qkv_bias=True), moe).eval()
    mha = Decoder(_gqa(n_kv_heads=None), moe).eval()
    sd = gqa.state_dict()
    hd = 8
    for k in list(sd):
        if k.endswith(("k_proj.weight", "v_proj.weight", "k_proj.bias", "v_proj.bias")):
            t = sd[k].view(2, hd, *sd[k].shape[1:])  # [G, hd, ...] -> each kv head serves 2 query heads
            sd[k] = t.repeat_interleave(2, dim=0).reshape(4 * hd, *sd[k].shape[1:])
    mha.load_state_dict(sd)
    x = torch.randint(0, 50, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(gqa(x)[0], mha(x)[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("make", [_gqa, _mla, lambda: _gqa(qk_norm_scope="all", tie_embeddings=True)],
                         ids=["gqa", "mla", "qknorm_all_tied"])
def test_kv_cache_equals_full_forward_and_causal(make):
    torch.manual_seed(1)
    m = Decoder(make(), _moe()).eval()
    x = torch.randint(0, 50, (2, 11))
    with torch.no_grad():
        full, _, _ = m(x)
        cache = KVCache(len(m.blocks))
        parts = [m(x[:, :6], cache=cache)[0], m(x[:, 6:7], cache=cache)[0], m(x[:, 7:], cache=cache)[0]]
        torch.testing.assert_close(torch.cat(parts, 1), full, rtol=1e-5, atol=1e-5)
        x2 = x.clone()
        x2[:, 8] = (x2[:, 8] + 1) % 50
        changed, _, _ = m(x2)
    torch.testing.assert_close(changed[:, :8], full[:, :8], rtol=0, atol=1e-6)
    assert not torch.allclose(changed[:, 8], full[:, 8])


def test_layer_pattern_tied_embeddings_and_grads():
    m = Decoder(_mla(n_layers=4, first_k_dense=1, moe_every=1, tie_embeddings=True), _moe())
    assert [i for i, _ in m.moe_layers()] == [1, 2, 3]
    assert m.head.weight is m.tok_emb.weight
    assert [i for i, _ in Decoder(_gqa(n_layers=4, moe_every=2, first_k_dense=2), _moe()).moe_layers()] == [3]
    logits, aux, auxes = m(torch.randint(0, 50, (2, 5)))
    assert logits.shape == (2, 5, 50) and len(auxes) == 3
    (logits.square().mean() + aux).backward()
    missing = [n for n, p in m.named_parameters() if p.grad is None]
    assert not missing, missing


@pytest.mark.parametrize("kw, msg", [
    (dict(n_kv_heads=3), r"model.n_kv_heads \(3\) must divide model.n_heads \(4\)"),
    (dict(qk_norm_scope="x"), "model.qk_norm_scope='x' is not one of head|all"),
    (dict(head_dim=7), r"head dimension \(7"),
    (dict(first_k_dense=5), r"model.first_k_dense must be an integer in \[0, model.n_layers \(2\)\], got 5"),
    (dict(norm_eps=0.0), "model.norm_eps must be a finite number > 0"),
    (dict(v_head_dim=4), "model.v_head_dim=4 needs latent attention"),
])
def test_decoder_config_errors_name_the_field(kw, msg):
    with pytest.raises(ValueError, match=msg):
        _gqa(**kw)


def test_mla_config_errors():
    with pytest.raises(ValueError, match="model.n_kv_heads=2 does not apply to latent attention"):
        _mla(n_kv_heads=2)
    with pytest.raises(ValueError, match=r"model.qk_rope_head_dim \(5\) must be even"):
        _mla(qk_rope_head_dim=5)
    with pytest.raises(ValueError, match="model.v_head_dim must be a positive integer"):
        _mla(v_head_dim=0)


# ---- the presets train -------------------------------------------------------------------------------
@pytest.mark.parametrize("preset", [pytest.param(p, marks=pytest.mark.slow) for p in
                                    ("mixtral_tiny", "qwen3_moe_tiny", "olmoe_tiny")] + ["deepseek_v3_tiny"])
def test_tiny_presets_train_on_the_embedded_corpus(preset, tmp_path):
    cfg = make_cfg(f"preset={preset}", "parallel.ep=1", "parallel.simulate_ranks=1", "trainer.save_final=false")
    assert cfg.model.arch == "decoder"
    s = train_mod.run(cfg, str(tmp_path / "o"))
    assert s["steps"] == 20 and math.isfinite(s["val_loss_end"])
    assert s["val_loss_end"] < s["val_loss_start"] - 0.5


def test_generation_is_not_bound_to_a_window():
    """The decoder samples past any training window with its KV cache, token for token as without it."""
    from moesys.generate import generate

    torch.manual_seed(2)
    m = Decoder(_gqa(), _moe()).eval()
    a = generate(m, [1, 2, 3], max_new_tokens=40, temperature=0, kv_cache=True)
    b = generate(m, [1, 2, 3], max_new_tokens=40, temperature=0, kv_cache=False)
    assert len(a) == 43 and a == b


@pytest.mark.parametrize("preset, total, tol", [("mixtral_8x7b", 46.7e9, 0.01), ("qwen3_30b_a3b", 30.5e9, 0.01),
                                                ("olmoe_1b_7b", 6.92e9, 0.01), ("deepseek_v3_671b", 671e9, 0.01)])
def test_full_size_presets_have_the_published_parameter_counts(preset, total, tol):
    """Config-only presets: the planner builds them on the meta device; their parameter counts are the
    published ones (DeepSeek-V3 without its multi-token-prediction layer)."""
    from moesys.planner.workload import count_params, workload_from_config

    cfg = make_cfg(f"preset={preset}")
    dense, _, expert = count_params(cfg)
    assert abs(dense + expert - total) / total < tol, (dense + expert) / 1e9
    wl = workload_from_config(cfg)
    assert wl.n_moe_layers == cfg.model.n_layers - cfg.model.first_k_dense
