"""The run directory holds the resolved config (config.yaml); with trainer.out_dir set, moesys-train
leaves no Hydra outputs/<date>/<time>/.hydra behind; without it, Hydra's run dir is the run dir."""
import glob
import os
import subprocess
import sys

import pytest
from omegaconf import OmegaConf

from moesys.configs.apps import saved_run_config

TINY = ["preset=tiny", "parallel.ep=1", "parallel.simulate_ranks=1", "trainer.steps=2", "trainer.eval_interval=2",
        "model.n_layers=1", "moe.num_experts=3", "moe.top_k=1"]


def _train(cwd, *overrides):
    r = subprocess.run([sys.executable, "-m", "moesys.train", *TINY, *overrides], cwd=cwd, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]


def _saved(run_dir):
    """The TrainConfig read back from <run_dir>/config.yaml (as moesys-eval reads it)."""
    return saved_run_config(os.path.join(run_dir, "checkpoints", "step_00000002"), {})


@pytest.mark.slow
def test_out_dir_run_saves_config_and_leaves_no_hydra_dirs(tmp_path):
    _train(tmp_path, "trainer.out_dir=runs/a", "trainer.plots=true")
    assert sorted(os.listdir(tmp_path)) == ["runs"]  # no outputs/<date>/<time>/
    run = tmp_path / "runs" / "a"
    assert not (run / ".hydra").exists()
    assert sorted(os.listdir(run)) == ["checkpoints", "config.yaml", "expert_load.png", "loss.png", "metrics.jsonl",
                                       "routing.png"]
    cfg = _saved(str(run))
    assert (cfg.trainer.steps, cfg.moe.num_experts, cfg.moe.top_k, cfg.model.n_layers) == (2, 3, 1, 1)
    assert cfg.trainer.out_dir == "runs/a" and cfg.moe.router == "topk"  # every field, defaults included
    assert OmegaConf.load(run / "config.yaml").model.d_model == 32  # the preset's, resolved


@pytest.mark.slow
def test_hydra_run_dir_is_the_run_dir_and_holds_the_config(tmp_path):
    _train(tmp_path, "moe.num_experts=5")
    runs = glob.glob(str(tmp_path / "outputs" / "*" / "*"))
    assert len(runs) == 1, runs
    assert {"config.yaml", ".hydra", "checkpoints", "metrics.jsonl"} <= set(os.listdir(runs[0]))
    assert _saved(runs[0]).moe.num_experts == 5


def test_a_config_saved_before_model_arch_existed_is_the_gpt(tmp_path):
    """Runs before issue 23 saved no model.arch and all trained the GPT: their config reads back as
    model.arch=gpt, not as today's default (the decoder); a saved arch is kept."""
    from moesys.configs.schema import TrainConfig

    assert TrainConfig().model.arch == "decoder"
    old = OmegaConf.to_container(OmegaConf.structured(TrainConfig))
    del old["model"]["arch"]
    assert saved_run_config("ckpt", {"config": old}).model.arch == "gpt"
    run = tmp_path / "run"
    (run / "checkpoints" / "step_00000002").mkdir(parents=True)
    OmegaConf.save(OmegaConf.create(old), run / "config.yaml")
    assert _saved(str(run)).model.arch == "gpt"
    new = OmegaConf.to_container(OmegaConf.structured(TrainConfig))
    assert saved_run_config("ckpt", {"config": new}).model.arch == "decoder"
    new["model"]["arch"] = "gpt"
    assert saved_run_config("ckpt", {"config": new}).model.arch == "gpt"
