"""moesys-eval equals the run's own final evaluation at EP=1 and EP=2; moesys-generate loads an EP=2
checkpoint and an EvoMoE dense-phase checkpoint on one process; bad input is one line, exit code 2."""
import json
import math
import os
import sys

import pytest
import torch

from moesys import data as data_mod
from moesys import train as train_mod
from moesys.configs.apps import EvalConfig
from moesys.configs.schema import ParallelConfig
from moesys.errors import ConfigError
from moesys.evaluate import evaluate_checkpoint
from moesys.generate import generate, load_model
from moesys.model import lm_loss
from train_helpers import make_cfg, pool_run

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _final_val_loss(out_dir):
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        recs = [json.loads(line) for line in f]
    return [r for r in recs if "val/loss" in r][-1]["val/loss"]


@torch.no_grad()
def _loss_of_loaded_model(model, cfg):
    """The validation loss of a model loaded by moesys.generate, computed here from the same fixed
    batches the trainer evaluates (one process: the global batches)."""
    tokens = data_mod.load_tokens(cfg.data.path, cfg.data.dtype, cfg.data.vocab_size)
    _, val = data_mod.train_val_split(tokens, cfg.data.val_fraction, cfg.model.seq_len)
    tot, n = 0.0, 0
    for x, y in data_mod.eval_batches(val, seq_len=cfg.model.seq_len, batch_size=cfg.trainer.batch_size,
                                      n_batches=cfg.trainer.eval_batches, dp_rank=0, dp_size=1):
        logits, _, _ = model(x)
        tot += float(lm_loss(logits, y, reduction="sum"))
        n += y.numel()
    return tot / n


@pytest.fixture(scope="module")
def ep2_run(rank_pool, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("ep2run") / "run")
    pool_run(rank_pool, make_cfg("parallel.ep=2", "parallel.simulate_ranks=2", "trainer.steps=4",
                                 "trainer.eval_interval=2", "moe.num_experts=6", "moe.top_k=2"), out)
    return out


@pytest.mark.slow
@pytest.mark.multirank
def test_eval_equals_the_runs_final_evaluation_at_ep1_and_ep2(ep2_run):
    want = _final_val_loss(ep2_run)
    ep1 = evaluate_checkpoint(EvalConfig(checkpoint=ep2_run))
    ep2 = evaluate_checkpoint(EvalConfig(checkpoint=ep2_run, parallel=ParallelConfig(ep=2, simulate_ranks=2)))
    assert ep1["step"] == ep2["step"] == 4 and (ep1["ep"], ep2["ep"]) == (1, 2)
    assert ep2["val_loss"] == pytest.approx(want, rel=1e-6)  # the run's layout: the same number
    assert ep1["val_loss"] == pytest.approx(want, rel=1e-5)  # another layout: the same up to summation order
    tokens = 2 * 8 * 32  # tiny preset: eval_batches x batch_size x seq_len
    for r in (ep1, ep2):
        assert r["tokens"] == tokens
        assert r["perplexity"] == pytest.approx(math.exp(r["val_loss"]))
        assert r["bits_per_byte"] == pytest.approx(r["val_loss"] / math.log(2)) and r["byte_level"]
        assert sorted(r["expert_load"]) == ["0", "1"]
        for blk in r["expert_load"].values():
            assert len(blk["routes"]) == 6 and sum(blk["routes"]) == 2 * tokens  # dropless top-2: every route
            assert sum(blk["share"]) == pytest.approx(1.0)
    assert ep1["expert_load"]["0"]["routes"] == ep2["expert_load"]["0"]["routes"]
    # the run's config is saved in the run dir and in the checkpoint
    assert os.path.isfile(os.path.join(ep2_run, "config.yaml"))
    ckpt = ep1["checkpoint"]
    with open(os.path.join(ckpt, "moesys.json")) as f:
        assert json.load(f)["config"]["moe"]["num_experts"] == 6


@pytest.mark.slow
@pytest.mark.multirank
def test_generate_loads_an_ep2_checkpoint_on_one_process(ep2_run):
    model, cfg, _ = load_model(ep2_run)
    assert cfg.parallel.ep == 2 and cfg.moe.num_experts == 6
    assert all(layer.experts.w1.shape[0] == 6 for _, layer in model.moe_layers())  # every expert local
    assert _loss_of_loaded_model(model, cfg) == pytest.approx(_final_val_loss(ep2_run), rel=1e-5)
    a = generate(model, list(b"The "), max_new_tokens=12, temperature=0.9, top_k=20, seed=3)
    assert a == generate(model, list(b"The "), max_new_tokens=12, temperature=0.9, top_k=20, seed=3, kv_cache=False)
    assert len(a) == 16 and all(0 <= t < 256 for t in a)


@pytest.mark.slow
def test_evomoe_dense_phase_checkpoint_evaluates_and_generates(tmp_path):
    out = str(tmp_path / "evo")
    train_mod.run(make_cfg("evo=evomoe", "evo.diversify_step=50", "evo.hard_step=60", "parallel.ep=1",
                           "parallel.simulate_ranks=1", "trainer.steps=3", "trainer.eval_interval=3"), out)
    model, cfg, _ = load_model(out)
    assert cfg.evo.enabled and all(layer.in_dense_phase for _, layer in model.moe_layers())
    want = _final_val_loss(out)
    assert _loss_of_loaded_model(model, cfg) == pytest.approx(want, rel=1e-5)
    assert evaluate_checkpoint(EvalConfig(checkpoint=out))["val_loss"] == pytest.approx(want, rel=1e-6)
    ids = generate(model, list(b"def "), max_new_tokens=6, temperature=0)
    assert len(ids) == 10


def test_missing_checkpoint_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match=r"checkpoint='.*nowhere': no checkpoint at"):
        evaluate_checkpoint(EvalConfig(checkpoint=str(tmp_path / "nowhere")))
    with pytest.raises(ConfigError, match=r"checkpoint='.*nowhere': no checkpoint at"):
        load_model(str(tmp_path / "nowhere"))


_SLOW = pytest.mark.slow  # a process each: the fast set keeps one case of each app
SCRIPTS = {"moesys.evaluate": "moesys-eval", "moesys.generate": "moesys-generate"}


@pytest.mark.parametrize("module, args, line", [
    ("moesys.evaluate", [], "moesys-eval: error: checkpoint=PATH is required"),
    pytest.param("moesys.evaluate", ["checkpoint=nowhere"], "moesys-eval: error: checkpoint='nowhere': no checkpoint at",
                 marks=_SLOW),
    ("moesys.generate", ["checkpoint=x", "prompt=a", "top_p=0"], "moesys-generate: error: top_p must be in (0, 1]"),
    pytest.param("moesys.generate", ["checkpoint=x"], "moesys-generate: error: the prompt is empty", marks=_SLOW),
    pytest.param("moesys.generate", ["checkpoint=nowhere", "prompt=a"],
                 "moesys-generate: error: checkpoint='nowhere': no checkpoint", marks=_SLOW),
    pytest.param("moesys.generate", ["checkpoint=x", "prompt=a", "bogus=1"],
                 "moesys-generate: error: Could not override 'bogus'", marks=_SLOW),
])
def test_cli_bad_input_is_one_line_exit_2(tmp_path, forked, module, args, line):
    """The installed console script as a process of its own, forked from the session's server that
    imported the apps (tests/conftest.py; test_readme_commands checks that a forked command is the
    console script's process: exit code, stdout, stderr and files)."""
    script = os.path.join(os.path.dirname(sys.executable), SCRIPTS[module])
    r = forked.run(script, args, tmp_path, os.environ, timeout=120)
    assert r.returncode == 2 and r.stdout == "", r.stderr[-2000:]
    assert len(r.stderr.splitlines()) == 1 and r.stderr.startswith(line), r.stderr
    assert os.listdir(tmp_path) == []  # no outputs/, no .hydra/
