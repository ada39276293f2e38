"""The guards of the checkpoint and supervisor modules that no other test reaches (issue 29, item 2):
each test fails when its guard is removed or its condition inverted.

- rng_state refuses generator states it cannot store as tensors (numpy's non-MT19937 generator, a
  Python random state of another version) instead of saving something it cannot restore;
- a format-2 checkpoint that lacks an entry this run needs (one expert of a stacked weight, or a
  dense weight) is refused naming that entry;
- a format-4 manifest without its trainer state is refused before any tensor is read;
- run_ranks: ranks that the parent's forwarded SIGTERM ends while they start are a stop (stopped_by
  set, "while starting"), while a rank SIGTERMed by someone else is a failure naming the signal;
- the trainer in one process (survivors of the mutation check, docs/fault-tolerance.md): a NaN
  gradient under a finite loss and an infinite aux loss under finite gradients are each skipped on
  their own flag (no weight and no expert-bias step); a SIGINT stop writes nothing and names the
  latest checkpoint (or the interval's of that very step); a saving stop with a non-finite weight
  writes nothing and says so; a stop in the last step lets the run finish with its final checkpoint.
"""
import json
import math
import os
import random
import re
import signal
import threading
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.distributed.checkpoint as dcp

from moesys import checkpoint as ckpt
from moesys import train as train_mod
from moesys.supervise import RankFailedError, run_ranks
from moesys.trainer import NonFiniteError, structure_of
from fault_helpers import GradNaNAt, NaNAt, starting_rank
from fault_helpers import alive as _alive
from stop_helpers import COMMON, SignalAt, signal_at
from test_checkpoint import _write_format2
from train_helpers import FORKED, build_trainer, make_cfg

ONE = ("parallel.ep=1", "parallel.simulate_ranks=1")


# ---- RNG states that cannot be stored -----------------------------------------------------------
def test_rng_state_refuses_generators_it_cannot_store(monkeypatch):
    st = ckpt.rng_state()  # the normal case: three tensors that set_rng_state restores exactly
    assert st["numpy"].shape == (627,) and st["python"].shape == (627,)
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    monkeypatch.setattr(np.random, "get_state", lambda: ("PCG64", keys, pos, has_gauss, gauss))
    with pytest.raises(ValueError, match=r"rng_state: numpy's global generator is 'PCG64', expected 'MT19937'"):
        ckpt.rng_state()
    monkeypatch.undo()
    version, words, gauss_next = random.getstate()
    monkeypatch.setattr(random, "getstate", lambda: (2, words, gauss_next))
    with pytest.raises(ValueError, match=r"rng_state: Python's random state version 2, expected 3"):
        ckpt.rng_state()


# ---- a format-2 checkpoint that lacks what this run needs -----------------------------------------
def test_a_format2_checkpoint_lacking_an_entry_is_refused_naming_it(tmp_path, world1):
    tr = build_trainer(make_cfg(*ONE, "trainer.steps=2"), str(tmp_path / "a"))
    tr.train_step()
    tr.train_step()
    path = _write_format2(tr, str(tmp_path / "old"))
    saved = dict(dcp.FileSystemReader(path).read_metadata().state_dict_metadata)
    want, stacks = ckpt._legacy_request(tr.model, tr.optimizer, saved)  # complete: every entry asked for
    w1 = "model.blocks.1.moe.experts.w1"
    E = tr.model.blocks[1].moe.experts.num_experts
    assert stacks[w1] == [f"{w1}.e{g}" for g in range(E)] and set(want) <= set(saved)
    for gone in (f"{w1}.e{E - 1}", "optim.blocks.1.moe.experts.w2.e0.exp_avg_sq", "model.ln_f.weight"):
        with pytest.raises(ckpt.CheckpointError,
                           match=re.escape(f"format-2 checkpoint lacks entry {gone!r} that this run needs")):
            ckpt._legacy_request(tr.model, tr.optimizer, {k: v for k, v in saved.items() if k != gone})


# ---- a format-4 manifest without its trainer state ------------------------------------------------
@pytest.mark.parametrize("trainer_entry", ["absent", "a string"])
def test_a_manifest_without_its_trainer_state_is_refused(tmp_path, world1, trainer_entry):
    tr = build_trainer(make_cfg(*ONE), str(tmp_path / "run"))
    tr.train_step()
    path = tr.save()
    meta_path = os.path.join(path, ckpt.META_FILE)
    meta = json.load(open(meta_path))
    assert isinstance(meta["trainer"], dict)
    if trainer_entry == "absent":
        del meta["trainer"]
    else:
        meta["trainer"] = json.dumps(meta["trainer"])
    with open(meta_path, "w") as f:
        json.dump(meta, f)
    before = [p.detach().clone() for p in tr.model.parameters()]
    with torch.no_grad():
        for p in tr.model.parameters():
            p.add_(1.0)
    with pytest.raises(ckpt.CheckpointError,
                       match=re.escape(f"checkpoint {path!r} is corrupt: moesys.json lacks the trainer state ('trainer')")):
        ckpt.load_checkpoint(path, model=tr.model, optimizer=tr.optimizer, structure=structure_of(tr.cfg))
    # refused before any tensor was read: the weights are still the changed ones
    assert all(torch.equal(p, b + 1.0) for p, b in zip(tr.model.parameters(), before))


# ---- run_ranks: a stop while the ranks start, and a rank killed from outside -----------------------
def _when_started(work, world, then):
    pids = [os.path.join(work, f"rank{r}.pid") for r in range(world)]

    def go():
        deadline = time.time() + 120
        while not all(os.path.exists(f) for f in pids) and time.time() < deadline:
            time.sleep(0.05)
        if all(os.path.exists(f) for f in pids):
            then([int(open(f).read()) for f in pids])

    t = threading.Thread(target=go, daemon=True)
    t.start()
    return t


def test_sigterm_forwarded_while_the_ranks_start_is_a_stop(tmp_path):
    """The parent gets SIGTERM while its ranks have no handler yet: it forwards it, they die of it,
    and that is reported as a stop by SIGTERM (stopped_by), not as a failed rank."""
    work = str(tmp_path)
    t = _when_started(work, 2, lambda pids: os.kill(os.getpid(), signal.SIGTERM))
    with pytest.raises(RankFailedError) as e:
        run_ranks(starting_rank, 2, (work,), poll_s=0.2)
    t.join()
    assert e.value.stopped_by == signal.SIGTERM and e.value.exitcode == -signal.SIGTERM and e.value.error is None
    assert str(e.value).startswith("the ranks were stopped by SIGTERM while starting, before their first step")


def test_a_rank_sigtermed_by_someone_else_is_a_failure_naming_the_signal(tmp_path):
    """SIGTERM sent to rank 1 directly (the parent forwarded nothing): rank 1 failed, killed by
    SIGTERM, and the other rank is stopped; it is not reported as a stop of the job."""
    work = str(tmp_path)
    t = _when_started(work, 2, lambda pids: os.kill(pids[1], signal.SIGTERM))
    t0 = time.time()
    with pytest.raises(RankFailedError) as e:
        run_ranks(starting_rank, 2, (work,), poll_s=0.2)
    t.join()
    assert e.value.rank == 1 and e.value.exitcode == -signal.SIGTERM and e.value.stopped_by is None
    assert str(e.value).startswith("rank 1 of 2 was killed by SIGTERM") and time.time() - t0 < 120
    assert not _alive(int(open(os.path.join(work, "rank0.pid")).read()))


def test_the_rank_that_failed_first_is_named_even_when_it_exits_last(tmp_path):
    """Rank 1 records its error first and is still exiting when rank 0, failing because of it, has
    already ended: the parent names rank 1 (its error and exit code), not rank 0's consequence. (Seen
    under load in the CLI test of a raising rank: the parent named rank 0's gloo error.) The ranks
    are forked, as a CPU job's are (parallel.rank_start=auto)."""
    from fault_helpers import slow_to_exit_rank

    with pytest.raises(RankFailedError) as e:
        run_ranks(slow_to_exit_rank, 2, (str(tmp_path),), poll_s=0.05, preload=FORKED)
    assert e.value.rank == 1 and e.value.exitcode == 1, str(e.value)
    assert str(e.value).startswith("rank 1 of 2 failed (exit code 1): ValueError: injected failure on rank 1")


# ---- load_checkpoint's defaults are the safe ones ---------------------------------------------------
def test_load_checkpoint_refuses_pickles_and_restores_rng_unless_told_otherwise(tmp_path, world1):
    """Called without trust_pickle, a checkpoint with a pickled entry is refused (the caller must opt
    in); called without restore_rng, the saved RNG states are restored (a resumed run draws what the
    uninterrupted one would)."""
    from test_checkpoint_security import _plant

    tr = build_trainer(make_cfg(*ONE), str(tmp_path / "run"))
    tr.train_step()
    structure = structure_of(tr.cfg)
    evil = _plant(tr, str(tmp_path / "evil"), "trainer", 3, str(tmp_path / "payload_ran"))
    with pytest.raises(ckpt.CheckpointError, match=r"holds pickled entries \(rng.rank0, trainer\)"):
        ckpt.load_checkpoint(evil, model=tr.model, optimizer=tr.optimizer, structure=structure)
    assert not os.path.exists(tmp_path / "payload_ran")
    torch.manual_seed(5)
    rng_then = torch.get_rng_state().clone()
    path = tr.save()
    torch.manual_seed(6)
    st = ckpt.load_checkpoint(path, model=tr.model, optimizer=tr.optimizer, structure=structure)
    assert st["rng_restored"] and torch.equal(torch.get_rng_state(), rng_then)


# ---- the trainer's non-finite guard in one process (the mutation check's selection) -----------------
def _steps_with(tr, cb, n):
    """n optimizer steps of `tr` with callback `cb` (hooks as fit() calls them): the steps' metrics."""
    tr.callbacks.append(cb)
    cb.on_train_start(tr)
    return [tr.train_step() for _ in range(n)]


def test_a_nan_gradient_under_a_finite_loss_skips_the_step_in_one_process(tmp_path, world1):
    """One weight's gradient turns NaN in step 1's backward while the loss stays finite: the step is
    skipped by the grad-norm flag alone (no weight and no expert bias changes, the streak counts it),
    and the next step trains and resets the streak. (The multi-rank case is test_fault_paths.py's.)"""
    tr = build_trainer(make_cfg(*ONE, "moe.router=sigmoid_bias"), str(tmp_path / "run"))
    biases = [b for n, b in tr.model.named_buffers() if n.endswith("expert_bias")]
    cb = GradNaNAt({1}, ranks={0})
    seen = []
    tr.callbacks.append(SimpleNamespace(after_optimizer_step=lambda s: seen.append([b.clone() for b in biases])))
    m = _steps_with(tr, cb, 2)
    assert math.isfinite(m[1]["loss"]) and math.isnan(m[1]["grad_norm"]) and m[1]["skipped"] == 1.0
    assert tr.bad_streak == 1
    m.append(tr.train_step())
    assert m[2]["skipped"] == 0.0 and math.isfinite(m[2]["grad_norm"]) and tr.bad_streak == 0
    assert cb.report() == {"changed": {1: False, 2: True}, "finite": True}
    assert biases and all(torch.equal(a, b) for a, b in zip(seen[0], seen[1]))  # the skipped step: no bias step
    assert not all(torch.equal(a, b) for a, b in zip(seen[1], seen[2]))


class _InfAuxAt:
    """Adds +inf to the model's aux loss at the steps in `steps` (a forward hook): the step's reported
    loss is not finite, while every gradient stays finite (a constant adds nothing to them)."""

    def __init__(self, steps):
        self.steps, self.handle, self.after = set(steps), None, {}

    def on_train_start(self, trainer) -> None:
        self.trainer = trainer

    def on_step_start(self, step: int) -> None:
        if step in self.steps:
            self.handle = self.trainer.model.register_forward_hook(
                lambda m, a, out: (out[0], out[1] + float("inf"), *out[2:]))

    def after_optimizer_step(self, step: int) -> None:
        if self.handle is not None:
            self.handle.remove()
            self.handle = None
        self.after[step] = [p.detach().clone() for p in self.trainer.model.parameters()]


def test_a_non_finite_aux_loss_under_finite_gradients_skips_the_step(tmp_path, world1):
    """The loss check on its own: the aux loss is +inf at step 1 but no gradient is (the grad-norm
    flag stays 0), and the step is still skipped on the reported loss."""
    tr = build_trainer(make_cfg(*ONE), str(tmp_path / "run"))
    cb = _InfAuxAt({1})
    m = _steps_with(tr, cb, 3)
    assert math.isfinite(m[1]["loss"]) and m[1]["aux_loss"] == float("inf") and math.isfinite(m[1]["grad_norm"])
    assert [x["skipped"] for x in m] == [0.0, 1.0, 0.0] and tr.bad_streak == 0
    assert all(torch.equal(a, b) for a, b in zip(cb.after[0], cb.after[1]))
    assert not all(torch.equal(a, b) for a, b in zip(cb.after[1], cb.after[2]))


# ---- a stop in one process: what it saves and which checkpoint it names ----------------------------
@pytest.mark.parametrize("at,steps,saved", [(2, 3, False), (1, 2, True)])
def test_sigint_in_one_process_writes_nothing_and_names_the_latest_checkpoint(tmp_path, capsys, at, steps, saved):
    """SIGINT is a stop that writes nothing (SIGTERM and SIGUSR1 save), exit code 130. Stopped after
    step 3 (trainer.ckpt_interval=2): no checkpoint of step 3, and the latest (step 2) is named. Stopped
    after step 2: the interval's checkpoint of that very step is the one written."""
    out, before = str(tmp_path / "run"), signal.getsignal(signal.SIGINT)
    cfg = make_cfg(*ONE, "trainer.steps=5", "trainer.ckpt_interval=2", f"trainer.out_dir={out}", *COMMON)
    s = train_mod.run(cfg, out, callbacks_fn=signal_at(at, 0, signal.SIGINT))
    step2 = os.path.join(out, "checkpoints", "step_00000002")
    assert s["stopped"] == {"signal": "SIGINT", "exit_code": 130, "step": steps, "checkpoint": step2, "saved": saved}
    assert s["steps"] == steps and s["checkpoint"] == (step2 if saved else None)
    assert sorted(d for d in os.listdir(os.path.join(out, "checkpoints")) if d.startswith("step_")) == ["step_00000002"]
    assert signal.getsignal(signal.SIGINT) is before
    assert "a weight is not finite" not in capsys.readouterr().out  # the interval's save succeeded


def test_a_stop_during_the_last_step_lets_the_run_finish(tmp_path):
    """A SIGINT that lands in the last step stops nothing: the run is complete, with its final
    checkpoint (trainer.save_final), and the summary reports no stop."""
    out = str(tmp_path / "run")
    cfg = make_cfg(*ONE, "trainer.steps=2", "trainer.ckpt_interval=0", f"trainer.out_dir={out}", *COMMON)
    s = train_mod.run(cfg, out, callbacks_fn=signal_at(1, 0, signal.SIGINT))
    assert "stopped" not in s and s["steps"] == 2
    assert s["checkpoint"] == os.path.join(out, "checkpoints", "step_00000002") and ckpt.verify_checkpoint(s["checkpoint"])


class _InfWeightAfter:
    """Sets one expert weight to +inf after optimizer step `step` (the weights a stop would save)."""

    def __init__(self, step):
        self.step = step

    def on_train_start(self, trainer) -> None:
        self.trainer = trainer

    def after_optimizer_step(self, step: int) -> None:
        if step == self.step:
            with torch.no_grad():
                dict(self.trainer.model.named_parameters())["blocks.1.moe.experts.w1"][0, 0, 0] = float("inf")


def test_a_saving_stop_with_a_non_finite_weight_writes_no_checkpoint_and_says_so(tmp_path, capsys):
    """SIGUSR1 asks for a checkpoint, but a weight is not finite: none is written (the last good one
    stays the newest), the log says why, and the summary says nothing was saved."""
    out = str(tmp_path / "run")
    cfg = make_cfg(*ONE, "trainer.steps=5", "trainer.ckpt_interval=0", f"trainer.out_dir={out}", *COMMON)
    s = train_mod.run(cfg, out, callbacks_fn=lambda c: [SignalAt(0, 0, signal.SIGUSR1, "self"), _InfWeightAfter(0)])
    assert s["stopped"] == {"signal": "SIGUSR1", "exit_code": 143, "step": 1, "checkpoint": None, "saved": False}
    assert "step 1: a weight is not finite: checkpoint not written" in capsys.readouterr().out
    assert not os.path.isdir(os.path.join(out, "checkpoints")) or not any(
        d.startswith("step_") for d in os.listdir(os.path.join(out, "checkpoints")))


def test_a_run_whose_weights_turn_non_finite_writes_no_checkpoint_and_says_so(tmp_path, capsys):
    """A weight turns +inf after step 0: the interval's save of step 1 and the final save of step 2
    write nothing (the last good checkpoint would rotate away) and each says so in the log."""
    out = str(tmp_path / "run")
    cfg = make_cfg(*ONE, "trainer.steps=2", "trainer.ckpt_interval=1", "trainer.max_bad_steps=5",
                   f"trainer.out_dir={out}", *COMMON)
    s = train_mod.run(cfg, out, callbacks_fn=lambda c: [_InfWeightAfter(0)])
    said = capsys.readouterr().out
    assert "step 1: a weight is not finite: checkpoint not written" in said
    assert "step 2: a weight is not finite: final checkpoint not written" in said
    assert s["checkpoint"] is None and s["steps"] == 2
    assert not os.path.isdir(os.path.join(out, "checkpoints")) or not any(
        d.startswith("step_") for d in os.listdir(os.path.join(out, "checkpoints")))


def test_a_streak_stop_before_any_checkpoint_says_there_is_none(tmp_path):
    """trainer.max_bad_steps reached in a run that has written no checkpoint: the error says so."""
    out = str(tmp_path / "run")
    cfg = make_cfg(*ONE, "trainer.steps=6", "trainer.max_bad_steps=2", "trainer.ckpt_interval=0",
                   f"trainer.out_dir={out}", *COMMON)
    with pytest.raises(NonFiniteError, match=r"stopping at step 3: 2 steps in a row .*; last checkpoint: none\. Lower"):
        train_mod.run(cfg, out, callbacks_fn=lambda c: [NaNAt({1, 2})])
