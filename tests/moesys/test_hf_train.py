"""moesys-train model.init_from=HF_DIR: the config from config.json (contradicting overrides are
errors naming both values), the weights read per rank; at EP 2 on real gloo ranks the starting
logits equal transformers' and training runs from there."""
import shutil

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_module

pytest.importorskip("transformers")

import moesys.train  # noqa: E402,F401  (registers the schema)
from moesys import hf  # noqa: E402
from moesys.configs import schema  # noqa: E402
from moesys.errors import ConfigError  # noqa: E402
from moesys.parallel import simulate  # noqa: E402
from hf_models import build_hf, init_from_footprint_worker, init_from_worker  # noqa: E402
from train_helpers import FORKED  # noqa: E402

RUN = ["trainer.steps=3", "trainer.batch_size=4", "model.seq_len=16", "trainer.eval_batches=1",
       "trainer.log_interval=1", "trainer.eval_interval=3", "trainer.plots=false", "trainer.save_final=false",
       "logging.wandb_mode=disabled", "logging.tqdm=false", "schedule.warmup_steps=1"]


def _cfg(*overrides):
    with initialize_config_module("moesys.configs", version_base="1.3"):
        return schema.from_composed(compose("train", overrides=list(overrides)))


@pytest.fixture(scope="module")
def ds_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("hf") / "ds")
    return path, build_hf("deepseek_v3", path, vocab_size=256)  # byte-level: the embedded corpus fits


def test_config_comes_from_config_json(ds_dir):
    cfg = _cfg(f"model.init_from={ds_dir[0]}", *RUN)
    m, moe = cfg.model, cfg.moe
    assert (m.arch, m.kv_lora_rank, m.first_k_dense, moe.routed_scaling_factor, moe.router) == \
        ("decoder", 16, 1, 2.5, "sigmoid_bias")
    cfg.validate(world_size=2)
    with pytest.raises(ConfigError, match=r"model.d_model=64 contradicts model.init_from=.*, whose config.json gives "
                                          r"model.d_model=32"):
        _cfg(f"model.init_from={ds_dir[0]}", "model.d_model=64")
    cfg.moe.num_experts = 4  # a config built another way still has to agree
    with pytest.raises(ConfigError, match="moe.num_experts=4 contradicts"):
        cfg.validate(world_size=2)
    with pytest.raises(ConfigError, match="model.init_from='/nowhere': no such directory"):
        _cfg("model.init_from=/nowhere")


@pytest.mark.slow
@pytest.mark.multirank
@pytest.mark.parametrize("engine", ["plain", "fsdp", "deepspeed"])
def test_init_from_at_ep2_starts_at_transformers_logits_and_trains(ds_dir, tmp_path, engine):
    """Every engine: DTensor shards (plain, FSDP2) and DeepSpeed's local expert tensors."""
    path, ref = ds_dir
    cfg = _cfg(f"model.init_from={path}", "parallel.ep=2", "parallel.simulate_ranks=2", f"trainer.engine={engine}", *RUN)
    x = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = ref(x).logits.numpy()
    for logits, losses in simulate(init_from_worker, 2, cfg, str(tmp_path / "run"), x, timeout_s=120, preload=FORKED):
        np.testing.assert_allclose(logits, want, rtol=1e-5, atol=1e-5)
        assert len(losses) == 3 and all(np.isfinite(losses))


@pytest.mark.slow
@pytest.mark.multirank
def test_init_from_never_holds_the_whole_model(ds_dir, tmp_path, rank_pool):
    """model.init_from builds on the meta device: at EP 4 (plain) and EP 2 x FSDP 2 no rank allocates
    a tensor of a whole expert weight's shape, its experts' storage is a quarter of the model's, and
    the logits are transformers'. (Before: every rank built all experts, then sliced them.)"""
    path, ref = ds_dir
    x = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = ref(x).logits.numpy()
    for engine in ("plain", "fsdp"):
        ep = 4 if engine == "plain" else 2
        cfg = _cfg(f"model.init_from={path}", f"parallel.ep={ep}", "parallel.simulate_ranks=4",
                   f"trainer.engine={engine}", *RUN)
        for rank, (logits, full, mine, total) in enumerate(
                rank_pool.run(init_from_footprint_worker, 4, cfg, str(tmp_path / engine), x, timeout_s=120)):
            np.testing.assert_allclose(logits, want, rtol=1e-5, atol=1e-5, err_msg=f"{engine} rank {rank}")
            assert full == [], (engine, rank, full[:3])
            assert mine == total // 4, (engine, rank, mine, total)


def test_bad_weights_refused_before_any_collective(ds_dir, tmp_path):
    """moesys.train.prepare (every rank, before the process group exists) reads the safetensors headers
    of model.init_from: a float8 tensor or a tensor of the wrong shape is named there, not in a rank."""
    from safetensors.torch import load_file, save_file

    from moesys.train import prepare

    key = "model.layers.0.mlp.down_proj.weight"  # the dense first layer's [D, F] = [32, 40]
    for name, edit, msg in (("fp8", lambda t: t.to(torch.float8_e4m3fn), rf"{key}' is F8_E4M3 \(float8"),
                            ("shape", lambda t: t[:-1], rf"{key}' has shape \[31, 40\], but .*config.json implies "
                                                        r"\[32, 40\]")):
        d = tmp_path / name
        shutil.copytree(ds_dir[0], d)
        tensors = load_file(d / "model.safetensors")
        tensors[key] = edit(tensors[key])
        save_file(tensors, d / "model.safetensors", metadata={"format": "pt"})
        cfg = _cfg(f"model.init_from={d}", *RUN)
        with pytest.raises(hf.HFFormatError, match=msg):
            prepare(cfg, str(tmp_path / f"run_{name}"), 2)
