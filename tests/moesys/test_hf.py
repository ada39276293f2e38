"""Hugging Face import (moesys.hf) against transformers itself: tiny random models of the five
families built offline from transformers' config classes and saved with save_pretrained.

Per family: logits after import equal transformers' (fp32, rtol 1e-5, atol 1e-5), and one training
step's loss and every gradient equal transformers' (mapped through the same layout map). The balance
loss: transformers adds router_aux_loss_coef x E x sum_i f_i P_i (f_i summing to K), which is K x
moesys's Switch loss for one MoE layer; checked on Qwen2-MoE, whose tiny model has one MoE layer.
"""
import json
import os

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from moesys import hf  # noqa: E402
from moesys.model import lm_loss  # noqa: E402
from hf_models import FAMILIES, VOCAB, build_hf, grads_in_moesys_layout  # noqa: E402


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    """family -> (directory, transformers model), built once for the module."""
    root = tmp_path_factory.mktemp("hf")
    return {f: (str(root / f), build_hf(f, str(root / f))) for f in FAMILIES}


def _tokens(seed=0, B=2, S=12):
    return torch.randint(0, VOCAB, (B, S), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_equal_transformers(family, hf_dirs):
    path, ref = hf_dirs[family]
    model = hf.from_pretrained(path).eval()
    x = _tokens()
    with torch.no_grad():
        want = ref(x).logits
        got, _, _ = model(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_training_step_loss_and_grads_equal_transformers(family, hf_dirs):
    path, ref = hf_dirs[family]
    model = hf.from_pretrained(path).train()
    ref.train()
    ref.zero_grad(set_to_none=True)
    x = _tokens(seed=1)
    want = ref(x, labels=x).loss  # transformers shifts the labels itself; no aux loss (output_router_logits off)
    want.backward()
    logits, _, _ = model(x)
    got = lm_loss(logits[:, :-1], x[:, 1:])
    got.backward()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    ref_grads = grads_in_moesys_layout(ref, model, path)
    ours = dict(model.named_parameters())
    assert set(ref_grads) == set(ours), set(ref_grads) ^ set(ours)
    for name, g in ref_grads.items():
        torch.testing.assert_close(ours[name].grad, g, rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")
    ref.eval()


def test_aux_loss_is_k_times_switch(tmp_path):
    """One MoE layer (Qwen2-MoE, decoder_sparse_step=2 of 2 layers): transformers' loss with
    router_aux_loss_coef c equals moesys's with moe.aux_loss_coef = K x c; gradients too."""
    ref = build_hf("qwen2_moe", str(tmp_path), seed=3, router_aux_loss_coef=0.3, output_router_logits=True).train()
    model = hf.from_pretrained(str(tmp_path)).train()
    layer = model.blocks[1].moe
    assert layer.cfg.aux_loss == "switch" and layer.cfg.aux_loss_coef == pytest.approx(2 * 0.3)
    x = _tokens(seed=2)
    out = ref(x, labels=x)
    out.loss.backward()
    logits, aux, _ = model(x)
    got = lm_loss(logits[:, :-1], x[:, 1:]) + aux
    got.backward()
    assert out.aux_loss.item() > 0
    torch.testing.assert_close(aux, 0.3 * out.aux_loss, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(got, out.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(layer.router.weight.grad, ref.model.layers[1].mlp.gate.weight.grad, rtol=1e-4, atol=1e-7)


def test_settings_derived_from_config_json(hf_dirs):
    s = hf.derive_settings(hf.read_config(hf_dirs["deepseek_v3"][0]))
    assert s["moe.routed_scaling_factor"] == 2.5 and s["moe.router"] == "sigmoid_bias"
    assert (s["moe.num_groups"], s["moe.topk_groups"], s["model.first_k_dense"]) == (4, 2, 1)
    assert s["moe.num_shared_experts"] == 1 and s["moe.shared_ffn_hidden_size"] == 16
    s = hf.derive_settings(hf.read_config(hf_dirs["olmoe"][0]))
    assert s["moe.normalize_topk"] is False and s["model.qk_norm_scope"] == "all"  # spelled out, never left to K
    assert s["moe.activation"] == "swiglu"


# ---- bad input: one error naming the file or field -----------------------------------------------------
def _copy(src, dst):
    os.makedirs(dst)
    for n in os.listdir(src):
        with open(os.path.join(src, n), "rb") as f, open(os.path.join(dst, n), "wb") as g:
            g.write(f.read())
    return dst


def _edit_config(path, **kv):
    f = os.path.join(path, "config.json")
    with open(f) as fh:
        c = json.load(fh)
    c.update(kv)
    with open(f, "w") as fh:
        json.dump(c, fh)


def test_unsupported_architecture_named(hf_dirs, tmp_path):
    d = _copy(hf_dirs["mixtral"][0], str(tmp_path / "m"))
    _edit_config(d, architectures=["LlamaForCausalLM"])
    with pytest.raises(hf.HFFormatError, match=r"\['LlamaForCausalLM'\] is not supported; moesys reads "
                                                r"MixtralForCausalLM, Qwen2MoeForCausalLM"):
        hf.from_pretrained(d)


@pytest.mark.parametrize("edit, msg", [
    (dict(sliding_window=64), "sliding_window=64 is not supported"),
    (dict(rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}), "rope_parameters.rope_type='yarn'"),
    # DeepSeek-V3's published config.json: the older key, yarn with factor 40
    (dict(rope_parameters=None, rope_theta=1e4, rope_scaling={"type": "yarn", "factor": 40, "mscale": 1.0}),
     "rope_scaling.type='yarn'"),
    (dict(rope_parameters={"rope_type": "linear", "rope_theta": 1e4, "factor": 2.0}), "rope_type='linear'"),
    (dict(quantization_config={"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128]}),
     r"quantization_config \(quant_method='fp8'\) is not supported"),
    (dict(hidden_act="gelu"), "hidden_act='gelu' is not supported"),
    (dict(num_local_experts=None), "num_local_experts is missing"),
])
def test_refused_config_fields_named(hf_dirs, tmp_path, edit, msg):
    d = _copy(hf_dirs["mixtral"][0], str(tmp_path / "m"))
    _edit_config(d, **edit)
    with pytest.raises(hf.HFFormatError, match=f"config.json: .*{msg}"):
        hf.from_pretrained(d)


def test_missing_truncated_and_contradicting_files(hf_dirs, tmp_path):
    src = hf_dirs["qwen3_moe"][0]
    d = _copy(src, str(tmp_path / "missing"))
    os.remove(os.path.join(d, "model.safetensors"))
    with pytest.raises(hf.HFFormatError, match="model.safetensors: no such file"):
        hf.from_pretrained(d)
    d = _copy(src, str(tmp_path / "truncated"))
    f = os.path.join(d, "model.safetensors")
    size = os.path.getsize(f)
    with open(f, "r+b") as fh:
        fh.truncate(size // 2)
    with pytest.raises(hf.HFFormatError, match="model.safetensors is not a readable safetensors file"):
        hf.from_pretrained(d)
    d = _copy(src, str(tmp_path / "shapes"))
    _edit_config(d, moe_intermediate_size=8)
    with pytest.raises(hf.HFFormatError, match=r"tensor 'model.layers.0.mlp.experts.0.gate_proj.weight' has shape "
                                                r"\[16, 32\], but .*config.json implies \[8, 32\]"):
        hf.from_pretrained(d)
    d = _copy(src, str(tmp_path / "vocab"))
    _edit_config(d, vocab_size=VOCAB + 1)
    with pytest.raises(hf.HFFormatError, match=r"tensor 'model.embed_tokens.weight' has shape \[96, 32\], but"):
        hf.from_pretrained(d)
    d = _copy(src, str(tmp_path / "no_config"))
    os.remove(os.path.join(d, "config.json"))
    with pytest.raises(hf.HFFormatError, match="config.json: no such file"):
        hf.from_pretrained(d)


# ---- export ------------------------------------------------------------------------------------------
def _tensors(path):
    from safetensors import safe_open

    out = {}
    for name in sorted(os.listdir(path)):
        if name.endswith(".safetensors"):
            with safe_open(os.path.join(path, name), "pt") as f:
                out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_export_round_trips_bitwise_and_loads_in_transformers(family, hf_dirs, tmp_path):
    """export(import(files)) holds the original tensors bit for bit (sharded: a shard per ~4 KB, with
    its index), import(export(model)) the model's; AutoModelForCausalLM loads the export to the same logits."""
    from hf_models import import_transformers

    from moesys.hf_export import save_pretrained

    path, _ = hf_dirs[family]
    model = hf.from_pretrained(path).eval()
    out = save_pretrained(model, str(tmp_path / "out"), max_shard_bytes=4096)
    assert os.path.isfile(os.path.join(out, "model.safetensors.index.json"))
    assert sorted(os.listdir(tmp_path)) == ["out"]  # no temporary directory left behind
    orig, new = _tensors(path), _tensors(out)
    assert set(new) == set(orig), set(new) ^ set(orig)
    for k in orig:
        assert torch.equal(new[k], orig[k]), k
    back = hf.from_pretrained(out)
    for k, v in model.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k
    tf = import_transformers()
    auto = tf.AutoModelForCausalLM.from_pretrained(out).float().eval()
    x = _tokens(seed=5)
    with torch.no_grad():
        torch.testing.assert_close(auto(x).logits, model(x)[0], rtol=1e-5, atol=1e-5)


def test_export_refuses_what_no_family_has(tmp_path):
    from moesys import MoEConfig
    from moesys.decoder import Decoder, DecoderConfig
    from moesys.hf_export import save_pretrained
    from moesys.model import GPTConfig, GPTMoE

    moe = MoEConfig(hidden_size=16, ffn_hidden_size=8, num_experts=4, top_k=2, activation="swiglu")
    gpt = GPTMoE(GPTConfig(vocab_size=32, n_layers=1, d_model=16, n_heads=2, ffn_hidden=8, seq_len=8), moe)
    with pytest.raises(hf.HFFormatError, match="learned absolute positions have no Hugging Face equivalent"):
        save_pretrained(gpt, str(tmp_path / "a"))
    dcfg = DecoderConfig(vocab_size=32, n_layers=1, d_model=16, n_heads=2, dense_ffn_hidden=8)
    ec = MoEConfig(hidden_size=16, ffn_hidden_size=8, num_experts=4, top_k=2, activation="swiglu",
                   router="expert_choice", allow_noncausal=True)
    with pytest.raises(hf.HFFormatError, match="moe.router='expert_choice' .* has no Hugging Face equivalent"):
        save_pretrained(Decoder(dcfg, ec), str(tmp_path / "b"))
    with pytest.warns(UserWarning, match="moe.capacity_factor=1.0: transformers' MoE blocks never drop tokens"):
        save_pretrained(Decoder(dcfg, MoEConfig(hidden_size=16, ffn_hidden_size=8, num_experts=4, top_k=2,
                                                activation="swiglu", normalize_topk=True, capacity_factor=1.0)),
                        str(tmp_path / "c"))
    assert not os.path.exists(tmp_path / "a") and not os.path.exists(tmp_path / "b")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("keep")
    with pytest.raises(hf.HFFormatError, match="full: exists and is not an empty directory"):
        save_pretrained(Decoder(dcfg, moe), str(tmp_path / "full"))
    assert os.listdir(tmp_path / "full") == ["x"]


def test_a_shard_missing_from_the_index_is_named(hf_dirs, tmp_path):
    from moesys.hf_export import save_pretrained

    out = save_pretrained(hf.from_pretrained(hf_dirs["olmoe"][0]), str(tmp_path / "out"), max_shard_bytes=4096)
    shards = sorted(f for f in os.listdir(out) if f.endswith(".safetensors"))
    os.remove(os.path.join(out, shards[1]))
    with pytest.raises(hf.HFFormatError, match=f"{shards[1]}: no such file \\(listed in model.safetensors.index.json\\)"):
        hf.from_pretrained(out)


def _rewrite_tensors(path, edit):
    """Rewrite model.safetensors of `path` through edit(dict of tensors) (in place)."""
    from safetensors.torch import load_file, save_file

    f = os.path.join(path, "model.safetensors")
    tensors = load_file(f)
    edit(tensors)
    save_file(tensors, f, metadata={"format": "pt"})


def test_float8_tensors_refused_by_name(hf_dirs, tmp_path):
    """An FP8 checkpoint whose config.json lost its quantization_config: the float8 tensor is named,
    from the safetensors header, before anything is loaded."""
    d = _copy(hf_dirs["deepseek_v3"][0], str(tmp_path / "fp8"))
    key = "model.layers.1.mlp.experts.3.up_proj.weight"

    def to_fp8(t):
        if key not in t:  # the fused in-memory layout: quantize it instead
            k = "model.layers.1.mlp.experts.gate_up_proj"
            t[k] = t[k].to(torch.float8_e4m3fn)
        else:
            t[key] = t[key].to(torch.float8_e4m3fn)
    _rewrite_tensors(d, to_fp8)
    with pytest.raises(hf.HFFormatError, match=r"model\.layers\.1\.mlp\.experts\..* is F8_E4M3 \(float8: an "
                                                r"FP8-quantized checkpoint\): moesys loads F32, BF16, F16 weights"):
        hf.from_pretrained(d)
    with pytest.raises(hf.HFFormatError, match="is F8_E4M3"):
        hf.check_checkpoint(d)


def test_deepseek_mtp_layers_ignored_with_a_warning(hf_dirs, tmp_path):
    """DeepSeek-V3's multi-token-prediction module (num_nextn_predict_layers=1: a layer past the last,
    model.layers.2.* here) is not loaded, with a warning naming the field; the logits stay transformers'."""
    path, ref = hf_dirs["deepseek_v3"]
    d = _copy(path, str(tmp_path / "mtp"))
    _edit_config(d, num_nextn_predict_layers=1)

    def add_mtp(t):
        t["model.layers.2.eh_proj.weight"] = torch.randn(32, 64)
        t["model.layers.2.enorm.weight"] = torch.ones(32)
    _rewrite_tensors(d, add_mtp)
    with pytest.warns(UserWarning, match=r"num_nextn_predict_layers=1: the checkpoint's layers \[2\] past "
                                         r"num_hidden_layers=2 \(multi-token prediction\) are not loaded"):
        model = hf.from_pretrained(d).eval()
    x = _tokens()
    with torch.no_grad():
        torch.testing.assert_close(model(x)[0], ref(x).logits, rtol=1e-5, atol=1e-5)
