"""Faults that must not lose work: non-finite steps (skipped on every rank, bounded), corrupt or
truncated checkpoint files (refused by name, resume=auto falls back), and resume semantics."""
import math
import os

import pytest
import torch

from moesys import checkpoint as ckpt
from moesys import train as train_mod
from moesys.trainer import NonFiniteError, lr_at
from fault_helpers import NaNAt, nan_worker
from train_helpers import make_cfg, read_flat_checkpoint

ONE = ("parallel.ep=1", "parallel.simulate_ranks=1")


@pytest.mark.multirank
def test_nan_on_one_rank_skips_that_step_on_every_rank(rank_pool, tmp_path):
    """NaN logits on rank 1 at step 3 (4 ranks, two ep groups): no rank's weights change at step 3,
    training goes on, every weight stays finite and the final checkpoint is written."""
    ov = ["parallel.ep=2", "trainer.steps=5", "trainer.eval_interval=5", "trainer.ckpt_interval=2"]
    res = rank_pool.run(nan_worker, 4, ov, [3], {1}, str(tmp_path / "run"), timeout_s=60)
    for r in res:
        assert r["changed"] == {1: True, 2: True, 3: False, 4: True}, r["changed"]
        assert r["finite"]
        assert math.isnan(r["losses"][3]) and all(math.isfinite(v) for i, v in enumerate(r["losses"]) if i != 3)
    assert res[0]["checkpoint"] and os.path.isdir(res[0]["checkpoint"])


def test_nan_steps_in_a_row_stop_the_run_without_a_bad_checkpoint(tmp_path):
    cb = NaNAt(range(2, 100))
    out = str(tmp_path / "run")
    cfg = make_cfg(*ONE, "trainer.steps=8", "trainer.ckpt_interval=1", "trainer.max_bad_steps=2",
                   "trainer.keep_checkpoints=10", f"trainer.out_dir={out}")
    with pytest.raises(NonFiniteError, match=r"stopping at step 4: 2 steps in a row .*trainer.max_bad_steps=2"):
        train_mod.run(cfg, out, callbacks_fn=lambda c: [cb])
    assert cb.trainer.bad_streak == 2
    # every checkpoint written holds finite weights (steps 1..3; the skipped steps changed nothing)
    root = os.path.join(out, "checkpoints")
    for d in sorted(os.listdir(root)):
        if d.startswith("step_"):
            assert ckpt.verify_checkpoint(os.path.join(root, d))
    flat = read_flat_checkpoint(ckpt.resolve(root))
    assert all(torch.isfinite(v).all() for k, v in flat.items() if isinstance(v, torch.Tensor))


def _two_checkpoints(tmp_path):
    out = str(tmp_path / "run")
    cfg = make_cfg(*ONE, "trainer.steps=4", "trainer.ckpt_interval=2", "trainer.keep_checkpoints=3",
                   f"trainer.out_dir={out}")
    train_mod.run(cfg, out)
    root = os.path.join(out, "checkpoints")
    return out, os.path.join(root, "step_00000002"), os.path.join(root, "step_00000004")


def _data_file(ckpt_dir):
    return os.path.join(ckpt_dir, sorted(f for f in os.listdir(ckpt_dir) if f.endswith(".distcp"))[0])


def test_a_flipped_block_is_refused_and_resume_auto_falls_back(tmp_path, capsys):
    out, older, newest = _two_checkpoints(tmp_path)
    f = _data_file(newest)
    size = os.path.getsize(f)
    with open(f, "r+b") as fh:  # 4 KB overwritten inside the file, same size
        fh.seek(size // 3)
        fh.write(os.urandom(4096))
    assert os.path.getsize(f) == size
    name = os.path.basename(f)
    with pytest.raises(ckpt.CheckpointError, match=rf"step_00000004.*file {name} does not match its SHA-256"):
        train_mod.prepare(make_cfg(*ONE, "trainer.steps=6", f"trainer.resume={newest}"), str(tmp_path / "x"), 1)
    auto = make_cfg(*ONE, "trainer.steps=6", "trainer.resume=auto", f"trainer.out_dir={out}")
    assert train_mod.prepare(auto, out, 1) == older
    err = capsys.readouterr().err
    assert f"file {name} does not match" in err and f"resuming from {older}" in err
    s = train_mod.run(auto, out)  # trains steps 3..6 from the older checkpoint
    assert len(s["train_losses"]) == 6 and s["steps"] == 6


def test_a_truncated_file_is_refused_naming_it(tmp_path):
    out, older, newest = _two_checkpoints(tmp_path)
    for target in (older, newest):
        f = _data_file(target)
        with open(f, "r+b") as fh:
            fh.truncate(os.path.getsize(f) // 2)
    name = os.path.basename(_data_file(newest))
    with pytest.raises(ckpt.CheckpointError, match=rf"file {name} has \d+ bytes, the manifest says \d+"):
        train_mod.prepare(make_cfg(*ONE, f"trainer.resume={newest}"), str(tmp_path / "x"), 1)
    # nothing verifies: resume=auto says so instead of guessing
    with pytest.raises(ckpt.CheckpointError, match="trainer.resume=auto: no checkpoint under .* verifies"):
        train_mod.prepare(make_cfg(*ONE, "trainer.resume=auto", "trainer.steps=6"), out, 1)


class _LR:
    def __init__(self):
        self.lr = {}

    def on_train_start(self, trainer):
        self.trainer = trainer

    def after_optimizer_step(self, step):
        self.lr[step] = self.trainer.optimizer.param_groups[0]["lr"]


def test_resume_keeps_the_lr_horizon_unless_extended_and_nothing_left_evaluates(tmp_path, capsys):
    out = str(tmp_path / "run")
    common = (*ONE, "schedule.warmup_steps=2", "schedule.min_lr_ratio=0.1", "trainer.eval_interval=3")
    first = train_mod.run(make_cfg(*common, "trainer.steps=6", f"trainer.out_dir={out}"), out)
    base = make_cfg(*common).optim.lr
    for extend, total in ((False, 6), (True, 9)):
        b = str(tmp_path / f"b{extend}")
        rec = _LR()
        s = train_mod.run(make_cfg(*common, "trainer.steps=9", f"trainer.resume={out}", f"trainer.out_dir={b}",
                                   f"trainer.extend_schedule={str(extend).lower()}"), b, callbacks_fn=lambda c: [rec])
        assert s["steps"] == 9
        said = capsys.readouterr().out
        assert ("stretched to 9" if extend else "kept at 6; trainer.extend_schedule=true") in said
        for step in (6, 7, 8):
            assert rec.lr[step] == pytest.approx(lr_at(step, lr=base, warmup=2, total=total, min_ratio=0.1))
    # a resume with nothing left: evaluates, trains nothing, says so
    s = train_mod.run(make_cfg(*common, "trainer.steps=6", "trainer.resume=auto", f"trainer.out_dir={out}"), out)
    assert s["nothing_to_train"] and s["train_losses"] == []
    assert s["val_loss_end"] == pytest.approx(first["val_loss_end"], rel=1e-6)
    assert "nothing to train: the checkpoint is at step 6 and trainer.steps is 6" in capsys.readouterr().out


@pytest.mark.slow
def test_deepspeed_engine_skips_a_nan_step_too(tmp_path):
    """ZeRO's own overflow check skips the update; the trainer counts it as a skipped step."""
    cb = NaNAt({2})
    out = str(tmp_path / "ds")
    cfg = make_cfg(*ONE, "trainer.engine=deepspeed", "trainer.zero_stage=1", "trainer.steps=4",
                   "trainer.save_final=false", f"trainer.out_dir={out}")
    s = train_mod.run(cfg, out, callbacks_fn=lambda c: [cb])
    report = cb.trainer.fault_report
    assert report["changed"] == {1: True, 2: False, 3: True}, report
    assert report["finite"] and math.isnan(s["train_losses"][2])
