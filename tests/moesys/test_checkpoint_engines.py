"""Checkpoints across engines and layouts: DeepSpeed ZeRO-1/2 resume exactly, DeepSpeed <-> plain
resume each other's checkpoints, and F-sharded experts (EP > num_experts) reshard to EP <= E and back."""
import os

import numpy as np
import pytest
import torch

from moesys import checkpoint as ckpt
from moesys import train as train_mod
from train_helpers import load_and_probe, make_cfg, pool_run, read_flat_checkpoint

# 4 steps, a checkpoint after 2; accumulation and an active clip make the optimizer state matter
DS_COMMON = ["parallel.ep=1", "parallel.simulate_ranks=1", "trainer.steps=4", "trainer.eval_interval=2",
             "trainer.grad_accum=2", "trainer.clip=0.05", "moe.jitter_eps=0.05"]


def _ds(stage):
    return ["trainer.engine=deepspeed", f"trainer.zero_stage={stage}"]


def _straight_and_half(tmp_path, name, *engine):
    straight = train_mod.run(make_cfg(*DS_COMMON, *engine, "trainer.ckpt_interval=2", "trainer.keep_checkpoints=5"),
                             str(tmp_path / name))
    half = str(tmp_path / name / "checkpoints" / "step_00000002")
    assert os.path.isfile(os.path.join(half, ckpt.META_FILE)) and ckpt.resolve(str(tmp_path / name)).endswith("04")
    return straight, half


# ZeRO-1 runs in the fast set; ZeRO-2 (another DeepSpeed code path, same adapter) in the slow one
STAGES = [1, pytest.param(2, marks=pytest.mark.slow)]


@pytest.mark.parametrize("stage", STAGES)
def test_deepspeed_resume_reproduces_the_uninterrupted_run(tmp_path, stage):
    pytest.importorskip("deepspeed")
    straight, half = _straight_and_half(tmp_path, "a", *_ds(stage))
    # the DeepSpeed checkpoint is ours: the same per-parameter entries as the plain engine writes
    flat = read_flat_checkpoint(half)
    assert flat["optim.blocks.1.moe.experts.w1.exp_avg"][3].abs().sum() > 0
    assert float(flat["optim.blocks.1.moe.experts.w1.step"]) == 2.0
    resumed = train_mod.run(make_cfg(*DS_COMMON, *_ds(stage), f"trainer.resume={half}"), str(tmp_path / "b"))
    assert len(resumed["train_losses"]) == 4
    assert straight["train_losses"] == resumed["train_losses"]  # exact
    assert straight["val_loss_end"] == resumed["val_loss_end"]


@pytest.mark.parametrize("stage", STAGES)
def test_deepspeed_and_plain_resume_each_others_checkpoints(tmp_path, stage):
    pytest.importorskip("deepspeed")
    ds, ds_half = _straight_and_half(tmp_path, "ds", *_ds(stage))
    plain, plain_half = _straight_and_half(tmp_path, "plain")
    np.testing.assert_allclose(ds["train_losses"], plain["train_losses"], rtol=1e-5, atol=1e-6)
    plain_from_ds = train_mod.run(make_cfg(*DS_COMMON, f"trainer.resume={ds_half}"), str(tmp_path / "p2"))
    ds_from_plain = train_mod.run(make_cfg(*DS_COMMON, *_ds(stage), f"trainer.resume={plain_half}"),
                                  str(tmp_path / "d2"))
    for run in (plain_from_ds, ds_from_plain):
        np.testing.assert_allclose(run["train_losses"], plain["train_losses"], rtol=1e-5, atol=1e-6)
        assert run["val_loss_end"] == pytest.approx(plain["val_loss_end"], rel=1e-5)


@pytest.mark.slow
@pytest.mark.multirank
def test_deepspeed_ep2_two_ranks_resume(tmp_path):
    """2 ranks, EP=2, ZeRO-2: dense states partitioned over 2 ranks, experts over their edp group;
    resumed by DeepSpeed (exact) and by the plain engine."""
    pytest.importorskip("deepspeed")
    common = ["parallel.ep=2", "parallel.simulate_ranks=2", "trainer.steps=4", "trainer.eval_interval=2",
              *_ds(2)]
    straight = train_mod.run(make_cfg(*common, "trainer.ckpt_interval=2", "trainer.keep_checkpoints=5"),
                             str(tmp_path / "a"))
    half = str(tmp_path / "a" / "checkpoints" / "step_00000002")
    resumed = train_mod.run(make_cfg(*common, f"trainer.resume={half}"), str(tmp_path / "b"))
    np.testing.assert_allclose(resumed["train_losses"], straight["train_losses"], rtol=1e-6, atol=1e-7)
    assert resumed["val_loss_end"] == pytest.approx(straight["val_loss_end"], rel=1e-6)
    # the plain engine continues from the same checkpoint: the partitions were assembled correctly
    plain = train_mod.run(make_cfg(*common[:-2], f"trainer.resume={half}"), str(tmp_path / "c"))
    np.testing.assert_allclose(plain["train_losses"], straight["train_losses"], rtol=1e-5, atol=1e-6)


# ---- EP larger than the number of experts: F-sharded experts ---------------------------------------
F_COMMON = ["trainer.steps=3", "trainer.eval_interval=3", "trainer.batch_size=8", "moe.num_experts=2"]
PROBE = ("blocks.1.moe.experts", "w2", 1)  # w2: F is dim 0 of one expert's [F, D]


def _full_probe(results):
    """One expert's tensors from the ranks that hold it: whole, or F-slices concatenated in order."""
    probes = [r["probe"] for r in results if r["probe"] is not None]
    shards = sorted(probes, key=lambda p: (p["ffn_shard"] or (0, 1))[0])
    assert len(shards) == (shards[0]["ffn_shard"] or (0, 1))[1]
    return {m: torch.cat([torch.from_numpy(p[m]) for p in shards], dim=0) for m in ("exp_avg", "exp_avg_sq", "weight")}


def _ref(saved):
    flat = read_flat_checkpoint(saved)
    # format 3: one entry per expert weight, the global [E, F, D] (written in parts by the ranks)
    ref = {m: flat[f"optim.blocks.1.moe.experts.w2.{m}"][1] for m in ("exp_avg", "exp_avg_sq")}
    ref["weight"] = flat["model.blocks.1.moe.experts.w2"][1]
    assert ref["weight"].shape == (64, 32) and ref["exp_avg"].abs().sum() > 0  # the full expert [F, D]
    return ref


def _load_at(rank_pool, tmp_path, ep, saved, ref, val_loss):
    cfg = make_cfg(*F_COMMON, f"parallel.ep={ep}", f"parallel.simulate_ranks={ep}")
    results = rank_pool.run(load_and_probe, ep, cfg, saved, str(tmp_path / f"load{ep}"), PROBE, timeout_s=180)
    assert len({r["loss"] for r in results}) == 1 and results[0]["step"] == 3
    assert results[0]["loss"] == pytest.approx(val_loss, rel=1e-5, abs=1e-6)
    got = _full_probe(results)
    for m in ("exp_avg", "exp_avg_sq", "weight"):
        torch.testing.assert_close(got[m], ref[m], rtol=0, atol=0)


@pytest.mark.slow
@pytest.mark.multirank
def test_f_sharded_experts_reshard_ep4_to_ep2_and_ep1(rank_pool, tmp_path):
    """E=2 at EP=4 (each expert's F over 2 ranks) -> EP=2 and EP=1: same eval loss, same Adam state."""
    out = str(tmp_path / "ep4")
    summary = pool_run(rank_pool, make_cfg(*F_COMMON, "parallel.ep=4", "parallel.simulate_ranks=4"), out)
    saved = ckpt.resolve(out)
    ref = _ref(saved)
    for ep in (2, 1):
        _load_at(rank_pool, tmp_path, ep, saved, ref, summary["val_loss_end"])


@pytest.mark.slow
@pytest.mark.multirank
def test_ep1_checkpoint_loads_f_sharded_at_ep4(rank_pool, tmp_path):
    out = str(tmp_path / "ep1")
    summary = train_mod.run(make_cfg(*F_COMMON, "parallel.ep=1", "parallel.simulate_ranks=1"), out)
    saved = ckpt.resolve(out)
    _load_at(rank_pool, tmp_path, 4, saved, _ref(saved), summary["val_loss_end"])
