"""Upcycling a dense checkpoint of our own trainer into a GPT-MoE, and EvoMoE inside the trainer:
logged metrics, resume across the phase boundary (DCP checkpoints), EP=2."""
import json
import os

import pytest
import torch

from moesys import MoEConfig
from moesys import checkpoint as ckpt
from moesys import train as train_mod
from moesys.evo import upcycle_model
from moesys.model import lm_loss
from moesys.trainer import build_model, structure_of
from train_helpers import build_trainer, make_cfg, pool_run


def test_upcycled_dense_checkpoint_has_the_same_loss(tmp_path, world1):
    cfg = make_cfg("model.moe_every=0", "parallel.ep=1", "parallel.simulate_ranks=1", "trainer.steps=3")
    tr = build_trainer(cfg, str(tmp_path / "dense"))
    for _ in range(3):
        tr.train_step()
    path = tr.save()
    dense = build_model(cfg)
    ckpt.load_checkpoint(path, model=dense, optimizer=None, structure=structure_of(cfg), restore_rng=False)
    m = cfg.model
    x = torch.randint(0, 256, (4, m.seq_len), generator=torch.Generator().manual_seed(0))
    moe_cfg = MoEConfig(hidden_size=m.d_model, ffn_hidden_size=m.ffn_hidden, num_experts=4, top_k=2, router="topk",
                        normalize_topk=True)
    for mode in ("eval", "train"):
        up = upcycle_model(dense, moe_cfg, seed=0, spawn="copy")
        getattr(dense, mode)()
        getattr(up, mode)()
        with torch.no_grad():
            l_dense = lm_loss(dense(x)[0], x)
            logits, aux, auxes = up(x)
            l_up = lm_loss(logits, x)
        assert abs(float(l_up) - float(l_dense)) < 1e-6, mode
        assert all(a.tokens_per_expert.sum() == 2 * x.numel() for a in auxes)  # it really routes top-2
    # drop-upcycling changes the function; the spawned experts are seeded, so the result is reproducible
    a = upcycle_model(dense, moe_cfg, seed=0, spawn="drop_upcycle").eval()
    b = upcycle_model(dense, moe_cfg, seed=0, spawn="drop_upcycle").eval()
    with torch.no_grad():
        la, lb = lm_loss(a(x)[0], x), lm_loss(b(x)[0], x)
    assert float(la) == float(lb) and abs(float(la) - float(l_dense)) > 1e-4


def test_upcycle_refuses_a_mismatched_config():
    from moesys.model import GPTConfig, GPTMoE

    g = GPTConfig(vocab_size=16, n_layers=1, d_model=8, n_heads=2, ffn_hidden=12, seq_len=4, moe_every=0)
    dense = GPTMoE(g, MoEConfig(hidden_size=8, ffn_hidden_size=12, num_experts=2))
    with pytest.raises(ValueError, match="ffn"):
        upcycle_model(dense, MoEConfig(hidden_size=8, ffn_hidden_size=16, num_experts=2), seed=0)
    with pytest.raises(ValueError, match="GELU"):
        upcycle_model(dense, MoEConfig(hidden_size=8, ffn_hidden_size=12, num_experts=2, activation="relu"), seed=0)


EVO = ["evo=evomoe", "evo.diversify_step=3", "evo.tau_steps=3", "evo.hard_step=6", "trainer.steps=8",
       "trainer.log_interval=1", "trainer.eval_interval=4", "moe.num_experts=4"]


def _records(out_dir):
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.mark.slow
@pytest.mark.parametrize("stop, arch", [(2, "gpt"), (4, "gpt"), (4, "decoder")])  # checkpoint before / after
def test_trainer_resume_across_the_phase_boundary(tmp_path, stop, arch):            # the diversify step (3)
    common = [*EVO, "parallel.ep=1", "parallel.simulate_ranks=1", f"model.arch={arch}"]
    straight = train_mod.run(make_cfg(*common, f"trainer.ckpt_interval={stop}", "trainer.keep_checkpoints=5",
                                      f"trainer.out_dir={tmp_path}/a"), str(tmp_path / "a"))
    half = str(tmp_path / "a" / "checkpoints" / f"step_{stop:08d}")
    resumed = train_mod.run(make_cfg(*common, f"trainer.resume={half}"), str(tmp_path / "b"))
    assert straight["train_losses"] == resumed["train_losses"]  # exact
    assert straight["val_loss_end"] == resumed["val_loss_end"]
    # record n holds the metrics of step n - 1 (steps are 0-based; diversify at step 3, hard at 6)
    recs = {r["step"]: r for r in _records(str(tmp_path / "a")) if "moe/block0/tau" in r}
    assert recs[3]["moe/block0/evo_phase"] == 0 and recs[4]["moe/block0/evo_phase"] == 1
    assert recs[4]["moe/block0/tau"] == pytest.approx(2.0)
    assert recs[5]["moe/block0/tau"] == pytest.approx(2.0 * (0.3 / 2.0) ** (1 / 3), rel=1e-5)
    assert recs[4]["moe/block0/max_experts_per_token"] > 1  # soft DTS: several experts per token
    assert recs[8]["moe/block0/experts_per_token"] == 1  # after the hard switch


@pytest.mark.slow
@pytest.mark.multirank
@pytest.mark.parametrize("arch", ["gpt", "decoder"])
def test_trainer_evomoe_at_ep2_logs_gate_and_runtime(rank_pool, tmp_path, arch):
    out = str(tmp_path / "ep2")
    s = pool_run(rank_pool, make_cfg(*EVO, "parallel.ep=2", "parallel.simulate_ranks=2", f"model.arch={arch}"), out)
    assert s["steps"] == 8 and s["val_loss_end"] < s["val_loss_start"]
    recs = [r for r in _records(out) if "moe/block0/tau" in r]
    last = recs[-1]
    for k in ("tau", "experts_per_token", "max_experts_per_token", "evo_phase"):
        assert f"moe/block1/{k}" in last
    assert any(k.startswith("moe/block0/runtime/") for k in last), "the runtime's decisions are logged"
