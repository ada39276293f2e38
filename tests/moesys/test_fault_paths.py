"""Fault paths beyond the easy case (issue 29): each test fails when its handling is removed or inverted.

- resume=auto with three checkpoints: the newest that verifies is taken, not the oldest;
- a non-finite gradient under a finite loss (real gloo ranks): the step is skipped on every rank;
- trainer.max_bad_steps counts bad steps in a row: a good step in between resets the count;
- different stop signals on different ranks in one step (real gloo ranks, real signals): a save
  request wins over a plain stop, on every rank, and the checkpoint is written;
- the parent's second SIGINT kills the ranks at once;
- trainer.clip=0 means no clipping; a checkpoint is never written from non-finite weights.
"""
import json
import os
import re
import shutil
import signal
import threading
import time
from types import SimpleNamespace

import pytest
import torch

from moesys import checkpoint as ckpt
from moesys import preemption
from moesys import train as train_mod
from moesys.parallel import simulate
from moesys.supervise import RankFailedError, run_ranks
from moesys.trainer import NonFiniteError, structure_of
from fault_helpers import NaNAt, exiting_rank, paths_worker, sleeping_rank
from fault_helpers import alive as _alive
from train_helpers import FORKED, build_trainer, make_cfg

ONE = ("parallel.ep=1", "parallel.simulate_ranks=1")
INT, TERM, USR1 = int(signal.SIGINT), int(signal.SIGTERM), int(signal.SIGUSR1)


# ---- resume=auto: the newest checkpoint that verifies ---------------------------------------------
def _corrupt(ckpt_dir):
    f = os.path.join(ckpt_dir, sorted(n for n in os.listdir(ckpt_dir) if n.endswith(".distcp"))[0])
    with open(f, "r+b") as fh:  # same size, other bytes: only the checksum can tell
        fh.seek(os.path.getsize(f) // 3)
        fh.write(os.urandom(4096))


def test_resume_auto_takes_the_newest_checkpoint_that_verifies_not_the_oldest(tmp_path, capsys):
    out = str(tmp_path / "run")
    cfg = make_cfg(*ONE, "trainer.steps=6", "trainer.ckpt_interval=2", "trainer.keep_checkpoints=3",
                   "trainer.eval_interval=100", f"trainer.out_dir={out}")
    train_mod.run(cfg, out)
    root = os.path.join(out, "checkpoints")
    s2, s4, s6 = (os.path.join(root, f"step_0000000{i}") for i in (2, 4, 6))
    assert ckpt.resolve_verified(root) == (s6, [])
    _corrupt(s6)
    found, notes = ckpt.resolve_verified(root)
    assert found == s4 and len(notes) == 1 and "step_00000006" in notes[0] and "SHA-256" in notes[0]
    auto = make_cfg(*ONE, "trainer.steps=8", "trainer.resume=auto", f"trainer.out_dir={out}")
    assert train_mod.prepare(auto, out, 1) == s4
    assert f"resuming from {s4}" in capsys.readouterr().err
    _corrupt(s4)
    found, notes = ckpt.resolve_verified(root)
    assert found == s2 and ["step_00000006" in notes[0], "step_00000004" in notes[1]] == [True, True]
    # without `latest` the directories are searched, newest first, and the missing pointer is noted
    os.remove(os.path.join(root, ckpt.LATEST))
    found, notes = ckpt.resolve_verified(root)
    assert found == s2 and len(notes) == 3 and "no checkpoint at" in notes[0]


def test_checkpoint_guards_name_what_is_wrong(tmp_path, world1):
    """The refusals no other test reaches: a data file gone, `latest` naming a directory that is
    gone, a manifest without its step, an entry this run needs missing or of another shape."""
    tr = build_trainer(make_cfg(*ONE), str(tmp_path / "run"))
    tr.train_step()
    good, root = tr.save(), tr.ckpt_root
    gone = str(tmp_path / "gone")
    shutil.copytree(good, gone)
    name = sorted(f for f in os.listdir(gone) if f.endswith(".distcp"))[0]
    os.remove(os.path.join(gone, name))
    with pytest.raises(ckpt.CheckpointError,
                       match=rf"checkpoint '{re.escape(gone)}' is corrupt: file {re.escape(name)} is missing"):
        ckpt.verify_checkpoint(gone)
    with open(os.path.join(root, ckpt.LATEST), "w") as f:
        f.write("step_00000009\n")
    with pytest.raises(ckpt.CheckpointError, match=r"latest points to 'step_00000009', which does not exist"):
        ckpt.resolve(root)
    assert ckpt.newest_checkpoint(root) is None
    found, notes = ckpt.resolve_verified(root)  # the directories are searched instead
    assert found == good and len(notes) == 1 and "points to 'step_00000009'" in notes[0]
    stepless = str(tmp_path / "stepless")
    shutil.copytree(good, stepless)
    meta = ckpt.read_meta(stepless)
    del meta["step"]
    with open(os.path.join(stepless, ckpt.META_FILE), "w") as f:
        json.dump(meta, f)
    with pytest.raises(ckpt.CheckpointError, match=r"is corrupt: moesys.json lacks 'structure'/'step'"):
        ckpt.read_meta(stepless)
    saved = dict(ckpt.check_compatible(good, structure_of(tr.cfg))["_keys"])
    k = "model.ln_f.weight"
    shape = tuple(dict(tr.model.named_parameters())["ln_f.weight"].shape)
    with pytest.raises(ckpt.CheckpointError, match=re.escape(f"checkpoint lacks entry '{k}' (shape {shape})")):
        ckpt.build_load_state(tr.model, tr.optimizer, {n: v for n, v in saved.items() if n != k}, 0)
    other = (shape[0] - 1,)
    with pytest.raises(ckpt.CheckpointError, match=re.escape(f"entry '{k}' has shape {other}, this run needs {shape}")):
        ckpt.build_load_state(tr.model, tr.optimizer, {**saved, k: SimpleNamespace(size=other)}, 0)
    want, has_rng = ckpt.build_load_state(tr.model, tr.optimizer, saved, 0)
    assert has_rng and {"rng.rank0.torch", "rng.rank0.numpy", "rng.rank0.python"} <= set(want) and k in want


# ---- non-finite steps -------------------------------------------------------------------------------
def test_a_good_step_between_bad_steps_resets_the_streak(tmp_path, capsys):
    """NaN at steps 1, 2, 4, 5 with trainer.max_bad_steps=3: never 3 in a row, so the run finishes;
    counting bad steps without the reset would stop it at step 4."""
    cb = NaNAt({1, 2, 4, 5})
    out = str(tmp_path / "run")
    cfg = make_cfg(*ONE, "trainer.steps=7", "trainer.max_bad_steps=3", "trainer.eval_interval=100",
                   "trainer.save_final=false", f"trainer.out_dir={out}")
    s = train_mod.run(cfg, out, callbacks_fn=lambda c: [cb])
    assert s["steps"] == 7 and cb.trainer.bad_streak == 0
    said = capsys.readouterr().out
    for step, streak in ((2, 1), (3, 2), (5, 1), (6, 2)):
        assert f"step {step}: non-finite loss nan or grad norm nan: optimizer step skipped on every rank " \
               f"({streak} in a row, limit trainer.max_bad_steps=3)" in said
    assert "(3 in a row" not in said
    report = cb.trainer.fault_report
    assert report["changed"] == {1: False, 2: False, 3: True, 4: False, 5: False, 6: True} and report["finite"]


def test_the_streak_limit_is_reached_exactly_and_names_the_last_checkpoint(tmp_path):
    cb = NaNAt({1, 2, 3})
    out = str(tmp_path / "run")
    cfg = make_cfg(*ONE, "trainer.steps=8", "trainer.max_bad_steps=3", "trainer.ckpt_interval=1",
                   "trainer.keep_checkpoints=10", "trainer.eval_interval=100", f"trainer.out_dir={out}")
    last = os.path.join(out, "checkpoints", "step_00000003")  # steps 4 and on are never saved
    with pytest.raises(NonFiniteError, match=rf"stopping at step 4: 3 steps in a row .*last checkpoint: {last}\."):
        train_mod.run(cfg, out, callbacks_fn=lambda c: [cb])


def test_save_refuses_non_finite_weights_and_keeps_the_last_good_checkpoint(tmp_path, world1, capsys):
    tr = build_trainer(make_cfg(*ONE, "trainer.keep_checkpoints=1"), str(tmp_path / "run"))
    tr.train_step()
    good = tr.save()
    assert good and ckpt.verify_checkpoint(good)
    with torch.no_grad():
        dict(tr.model.named_parameters())["blocks.1.moe.experts.w1"][0, 0, 0] = float("inf")
    tr.step += 1
    assert not tr.weights_finite() and tr.save() is None
    root = tr.ckpt_root
    assert sorted(os.listdir(root)) == ["latest", "step_00000001"] and ckpt.resolve(root) == good


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    """One spawn of 2 gloo ranks (ep 2) runs every multi-rank scenario (fault_helpers.paths_worker)."""
    ov = ["parallel.ep=2", "trainer.steps=3", "trainer.eval_interval=100", "trainer.log_interval=100",
          "trainer.save_final=false"]
    return simulate(paths_worker, 2, ov, str(tmp_path_factory.mktemp("paths")), timeout_s=120, preload=FORKED)


@pytest.mark.multirank
def test_a_nan_gradient_under_a_finite_loss_skips_the_step_on_every_rank(paths):
    """Rank 1's gradient of one weight turns NaN in the backward of step 1 (its loss is finite): the
    agreed grad-norm flag skips the update on both ranks; no NaN reaches the optimizer."""
    for r in paths:
        g = r["grad_nan"]
        assert g["changed"] == {1: False, 2: True}, g["changed"]
        assert g["finite"] and all(v == v and abs(v) < 1e9 for v in g["losses"])  # every loss finite


@pytest.mark.multirank
@pytest.mark.parametrize("case,winner", [("int_term", "SIGTERM"), ("usr1_int", "SIGUSR1")])
def test_a_save_request_on_one_rank_wins_over_sigint_on_another(paths, case, winner):
    """SIGINT reaches one rank and SIGTERM (or SIGUSR1) the other in the same step: every rank
    adopts the saving signal, stops after that step and writes its checkpoint together (exit 143)."""
    for r in paths:
        st = r[case]["stopped"]
        assert st["signal"] == winner and st["exit_code"] == 143 and st["step"] == 2 and st["saved"], st
        assert st["checkpoint"].endswith(os.path.join("checkpoints", "step_00000002"))
        assert r[case]["dirs"] == ["latest", "step_00000002"]


# ---- signal precedence (one rank) and the parent's second SIGINT ----------------------------------
@pytest.mark.parametrize("order,want", [
    ((INT, TERM), TERM), ((TERM, INT), TERM), ((INT, USR1), USR1), ((USR1, TERM), USR1), ((INT, INT), INT),
    ((TERM,), TERM), ((), None)])
def test_a_rank_keeps_its_first_saving_signal_over_sigint(order, want):
    stop = preemption.StopSignal()
    for s in order:
        stop.request(s)
    assert stop.signum == want and stop.requested == (want is not None)


@pytest.mark.parametrize("ranks,want", [
    ([None, None], None), ([INT, None], INT), ([INT, INT], INT), ([INT, TERM], TERM), ([USR1, INT], USR1),
    ([USR1, TERM], TERM), ([None, USR1], USR1)])
def test_the_agreed_signal_of_summed_flags(ranks, want):
    summed = torch.tensor([preemption.flags_of(s) for s in ranks]).sum(0)
    assert preemption.agreed_signal(summed) == want
    assert preemption.flags_of(USR1) == [0.0, 0.0, 1.0] and preemption.flags_of(None) == [0.0, 0.0, 0.0]


def test_exit_codes_and_the_handlers_installed_and_put_back():
    assert [preemption.exit_code(s) for s in (INT, TERM, USR1)] == [130, 143, 143]
    before = {s: signal.getsignal(s) for s in preemption.STOP_SIGNALS}
    with preemption.StopSignal() as stop:
        os.kill(os.getpid(), signal.SIGUSR1)  # a real signal: recorded, nothing else happens
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.signum == USR1
    assert {s: signal.getsignal(s) for s in preemption.STOP_SIGNALS} == before
    seen = []
    t = threading.Thread(target=lambda: seen.append(preemption.StopSignal().__enter__()._previous))
    t.start()
    t.join()
    assert seen == [{}]  # off the main thread nothing is installed (Python delivers signals there only)


def test_a_second_sigint_to_the_parent_kills_the_ranks_at_once(tmp_path):
    """run_ranks forwards the first SIGINT to its ranks (which stop at their next step boundary:
    here they never reach one); the second kills them with SIGKILL and raises KeyboardInterrupt."""
    work = str(tmp_path)
    pids = [os.path.join(work, f"rank{r}.pid") for r in range(2)]
    noted = [os.path.join(work, f"rank{r}.sigint") for r in range(2)]
    sent = []

    def interrupt():
        deadline = time.time() + 120
        for files in (pids, noted):
            while not all(os.path.exists(f) for f in files) and time.time() < deadline:
                time.sleep(0.05)
            if not all(os.path.exists(f) for f in files):
                return
            sent.append(time.time())
            os.kill(os.getpid(), signal.SIGINT)

    t = threading.Thread(target=interrupt, daemon=True)
    t.start()
    with pytest.raises(KeyboardInterrupt, match="a second SIGINT: the ranks were killed without a checkpoint"):
        run_ranks(sleeping_rank, 2, (work,), poll_s=0.2)
    t.join()
    assert len(sent) == 2 and time.time() - sent[1] < 30  # at once, not after the ranks' 600 s sleep
    ranks = [int(open(p).read()) for p in pids]
    assert not any(_alive(p) for p in ranks)


def test_a_rank_that_exits_without_an_error_is_named_with_its_exit_code(tmp_path):
    """os._exit(3) in rank 1 (no Python error to record): the parent names the rank and its exit
    code, and kills rank 0, asleep, at once."""
    t0 = time.time()
    with pytest.raises(RankFailedError) as e:
        run_ranks(exiting_rank, 2, (str(tmp_path),), poll_s=0.2)
    assert e.value.rank == 1 and e.value.exitcode == 3 and e.value.error is None
    assert str(e.value).startswith("rank 1 of 2 exited with code 3 before its error could be recorded")
    assert "the other ranks were stopped" in str(e.value) and time.time() - t0 < 120
    pid0 = os.path.join(str(tmp_path), "rank0.pid")
    assert not os.path.exists(pid0) or not _alive(int(open(pid0).read()))


# ---- trainer.clip=0 --------------------------------------------------------------------------------
def test_clip_zero_does_not_clip(tmp_path, world1):
    """clip=0 ("no clipping") trains exactly like a bound no gradient reaches (1e9); a clip that took
    0 as the bound would zero every gradient. A binding bound (1e-3) trains differently."""
    runs = {}
    for clip in ("0", "1e9", "1e-3"):
        tr = build_trainer(make_cfg(*ONE, f"trainer.clip={clip}"), str(tmp_path / clip))
        m = [tr.train_step() for _ in range(2)]
        runs[clip] = ([x["grad_norm"] for x in m], [p.detach().clone() for p in tr.model.parameters()])
    (n0, w0), (n9, w9), (_, w3) = runs["0"], runs["1e9"], runs["1e-3"]
    assert n0 == n9 and all(n > 1e-2 for n in n0)  # the norm is measured, and it is far above 1e-3
    assert all(torch.equal(a, b) for a, b in zip(w0, w9))
    assert not all(torch.equal(a, b) for a, b in zip(w0, w3))
