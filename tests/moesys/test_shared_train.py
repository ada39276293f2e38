"""Shared experts and MoE recompute through the trainer (`moesys-train` fields) and its checkpoints."""
import pytest
import torch

from moesys import checkpoint as ckpt
from moesys import train as train_mod
from train_helpers import build_trainer, make_cfg, pool_run, read_flat_checkpoint

SHARED = ["moe.num_shared_experts=2", "moe.shared_ffn_hidden_size=24", "moe.shared_expert_gate=true"]
QUIET = ["logging.wandb_mode=disabled", "trainer.plots=false", "logging.tqdm=false"]


def _steps(cfg, out, n):
    tr = build_trainer(cfg, out)
    return tr, [float(tr.train_step()["loss"]) for _ in range(n)]


def test_recompute_trains_identically_and_shared_experts_are_dense_and_saved(tmp_path, world1):
    """moe.recompute=true gives the same losses, bit for bit, as without (gradients equal); the
    shared experts are whole dense parameters, saved as such, and their gradients are nonzero."""
    common = ["parallel.ep=1", "parallel.simulate_ranks=1", "trainer.steps=3", *SHARED, *QUIET]
    tr0, plain = _steps(make_cfg(*common), str(tmp_path / "a"), 3)
    tr1, recomputed = _steps(make_cfg(*common, "moe.recompute=true"), str(tmp_path / "b"), 3)
    assert plain == recomputed
    for (n, p0), (_, p1) in zip(tr0.model.named_parameters(), tr1.model.named_parameters()):
        assert torch.equal(p0, p1), n
    sh = tr1.model.blocks[1].moe.shared_experts
    assert sh.w1.shape == (2, 32, 24) and sh.w2.shape == (2, 24, 32) and sh.gate.shape == (32,)
    assert sh.w1.grad is not None and sh.w1.grad.abs().sum() > 0 and sh.gate.grad.abs().sum() > 0
    flat = read_flat_checkpoint(tr1.save())
    assert flat["model.blocks.1.moe.shared_experts.w1"].shape == (2, 32, 24)  # whole, not per expert
    assert not any(k.startswith("model.blocks.1.moe.shared_experts.w1.e") for k in flat)
    assert flat["optim.blocks.1.moe.shared_experts.gate.exp_avg"].abs().sum() > 0


def test_checkpoint_without_shared_experts_does_not_fit(tmp_path, world1):
    cfg = make_cfg("parallel.ep=1", "parallel.simulate_ranks=1", "trainer.steps=1", *QUIET)
    tr = build_trainer(cfg, str(tmp_path / "run"))
    tr.train_step()
    good = tr.save()

    def prepare(*ov):
        return train_mod.prepare(make_cfg("parallel.ep=1", "parallel.simulate_ranks=1", *ov), str(tmp_path / "n"), 1)

    with pytest.raises(ckpt.CheckpointError, match=r"num_shared_experts: checkpoint has 0, this run has 1"):
        prepare(f"trainer.resume={good}", "moe.num_shared_experts=1")
    with pytest.raises(ckpt.CheckpointError, match=r"shared_ffn_hidden: checkpoint has 0, this run has 64"):
        prepare(f"trainer.resume={good}", "moe.num_shared_experts=1")


@pytest.mark.slow
@pytest.mark.multirank
def test_ep2_resume_with_shared_experts_reproduces_the_uninterrupted_run(rank_pool, tmp_path):
    """EP=2 on 2 ranks, shared experts + gate + recompute: 4 steps straight vs 2 + resume + 2."""
    common = ["parallel.ep=2", "parallel.simulate_ranks=2", "trainer.steps=4", "trainer.eval_interval=2",
              "moe.recompute=true", *SHARED, *QUIET]
    straight = pool_run(rank_pool, make_cfg(*common, "trainer.ckpt_interval=2", "trainer.keep_checkpoints=3"),
                        str(tmp_path / "a"))
    half = str(tmp_path / "a" / "checkpoints" / "step_00000002")
    resumed = pool_run(rank_pool, make_cfg(*common, f"trainer.resume={half}"), str(tmp_path / "b"))
    assert straight["train_losses"] == resumed["train_losses"] and len(resumed["train_losses"]) == 4
    assert straight["val_loss_end"] == resumed["val_loss_end"]


@pytest.mark.slow
@pytest.mark.multirank
def test_readme_shared_experts_command(tmp_path):
    """The README's `moesys-train moe.num_shared_experts=1 moe.shared_expert_gate=true moe.recompute=true`
    (default parallel.ep=2 on 2 ranks) at the tiny preset's sizes."""
    import math

    s = train_mod.run(make_cfg("moe.num_shared_experts=1", "moe.shared_expert_gate=true", "moe.recompute=true",
                               "trainer.steps=3", "trainer.save_final=false", *QUIET), str(tmp_path / "o"))
    assert s["steps"] == 3 and all(math.isfinite(v) for v in s["train_losses"])
