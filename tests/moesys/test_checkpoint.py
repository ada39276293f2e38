"""Checkpoints: exact resume, atomic save (crash mid-save), reshard EP 2 -> 1 and 2 -> 4, bad checkpoints."""
import json
import os
import shutil

import pytest
import torch

from moesys import checkpoint as ckpt
from moesys import train as train_mod
from moesys.trainer import structure_of
from train_helpers import build_trainer, expert_offset_worker, load_and_probe, make_cfg, pool_run, read_flat_checkpoint


def _snapshot(root):
    out = {}
    for d, _, files in os.walk(root):
        for f in files:
            p = os.path.join(d, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, root)] = fh.read()
    return out


@pytest.mark.slow
def test_resume_reproduces_the_uninterrupted_run(tmp_path):
    """2N steps straight vs N (checkpoint) + resume + N: identical per-step losses (fp32)."""
    common = ["parallel.ep=1", "parallel.simulate_ranks=1", "trainer.steps=8", "moe.jitter_eps=0.05",
              "moe.router=sigmoid_bias", "trainer.eval_interval=4"]
    straight = train_mod.run(make_cfg(*common, "trainer.ckpt_interval=4", "trainer.keep_checkpoints=5",
                                      f"trainer.out_dir={tmp_path}/a"), str(tmp_path / "a"))
    half = str(tmp_path / "a" / "checkpoints" / "step_00000004")
    assert os.path.isdir(half)
    resumed = train_mod.run(make_cfg(*common, f"trainer.resume={half}"), str(tmp_path / "b"))
    assert len(straight["train_losses"]) == len(resumed["train_losses"]) == 8
    assert straight["train_losses"] == resumed["train_losses"]  # exact, not approximate
    assert straight["val_loss_end"] == resumed["val_loss_end"]


def test_atomic_save_survives_a_crash_mid_save(tmp_path, world1, monkeypatch):
    out = str(tmp_path / "run")
    cfg = make_cfg("parallel.ep=1", "parallel.simulate_ranks=1", "trainer.steps=3")
    tr = build_trainer(cfg, out)
    tr.train_step()
    first = tr.save()
    root = tr.ckpt_root
    before = _snapshot(root)
    tr.train_step()

    # 1) crash while DCP writes the data files
    real_save = ckpt.dcp.save

    def dying_save(state, storage_writer):
        real_save({k: v for k, v in list(state.items())[:3]}, storage_writer=storage_writer)
        raise RuntimeError("simulated crash mid-save")

    monkeypatch.setattr(ckpt.dcp, "save", dying_save)
    with pytest.raises(RuntimeError, match="mid-save"):
        tr.save()
    monkeypatch.setattr(ckpt.dcp, "save", real_save)
    assert os.path.isdir(os.path.join(root, ".step_00000002.tmp"))  # the partial write is there...
    assert ckpt.resolve(root) == first  # ...but `latest` still names the previous checkpoint
    assert all(_snapshot(root)[k] == v for k, v in before.items())

    # 2) crash after the data is written, before the rename
    real_rename = os.rename

    def dying_rename(src, dst):
        if os.path.basename(str(src)).startswith(".step_"):  # our publish step; DCP's own renames pass
            raise OSError("simulated crash before rename")
        real_rename(src, dst)

    monkeypatch.setattr(ckpt.os, "rename", dying_rename)
    with pytest.raises(OSError, match="before rename"):
        tr.save()
    monkeypatch.undo()
    assert ckpt.resolve(root) == first

    # the previous checkpoint still loads and fits
    tr2 = build_trainer(cfg, str(tmp_path / "other"))
    tr2.load(ckpt.resolve(root))
    assert tr2.step == 1
    # a later save replaces the stale temporary directory
    second = tr.save()
    assert ckpt.resolve(root) == second and not os.path.exists(os.path.join(root, ".step_00000002.tmp"))


def test_bad_checkpoints_fail_clearly_and_touch_nothing(tmp_path, world1):
    out = str(tmp_path / "run")
    cfg = make_cfg("parallel.ep=1", "parallel.simulate_ranks=1", "trainer.steps=2")
    tr = build_trainer(cfg, out)
    tr.train_step()
    good = tr.save()
    snap = _snapshot(out)
    run_dir = str(tmp_path / "new")

    def prepare(*ov):
        return train_mod.prepare(make_cfg("parallel.ep=1", "parallel.simulate_ranks=1", *ov), run_dir, 1)

    with pytest.raises(ckpt.CheckpointError, match=r"num_experts: checkpoint has 4, this run has 8.*"
                                                   r"\(to resume it, add: moe.num_experts=4\)"):
        prepare(f"trainer.resume={good}", "moe.num_experts=8")
    with pytest.raises(ckpt.CheckpointError, match=r"d_model: checkpoint has 32, this run has 64"):
        prepare(f"trainer.resume={good}", "model.d_model=64")
    # a tied checkpoint resumed with untied embeddings: the hint is the override that resumes it
    tied = make_cfg("parallel.ep=1", "parallel.simulate_ranks=1", "trainer.steps=2", "model.tie_embeddings=true")
    tr_tied = build_trainer(tied, str(tmp_path / "tied"))
    tr_tied.train_step()
    old = tr_tied.save()
    with pytest.raises(ckpt.CheckpointError, match=r"tie_embeddings: checkpoint has True, this run has False "
                                                   r"\(to resume it, add: model.tie_embeddings=true\)"):
        prepare(f"trainer.resume={old}", "model.tie_embeddings=false")
    prepare(f"trainer.resume={old}", "model.tie_embeddings=true")
    with pytest.raises(ckpt.CheckpointError, match="no checkpoint at"):
        prepare(f"trainer.resume={tmp_path}/nowhere")

    bad = str(tmp_path / "bad")
    shutil.copytree(good, bad)
    with open(os.path.join(bad, ".metadata"), "wb") as f:
        f.write(b"garbage")
    with pytest.raises(ckpt.CheckpointError, match=r"corrupt: file \.metadata has 7 bytes, the manifest says"):
        prepare(f"trainer.resume={bad}")
    # a format-1 checkpoint (no checksums) is not verified; the unreadable .metadata is still named
    with open(os.path.join(bad, ckpt.META_FILE)) as f:
        meta = json.load(f)
    del meta["files"]
    with open(os.path.join(bad, ckpt.META_FILE), "w") as f:
        json.dump(meta, f)
    with pytest.raises(ckpt.CheckpointError, match="corrupt: cannot read its DCP .metadata"):
        prepare(f"trainer.resume={bad}")
    with open(os.path.join(bad, ckpt.META_FILE), "w") as f:
        f.write("{not json")
    with pytest.raises(ckpt.CheckpointError, match="corrupt: moesys.json is not valid JSON"):
        prepare(f"trainer.resume={bad}")
    os.remove(os.path.join(bad, ckpt.META_FILE))
    with pytest.raises(ckpt.CheckpointError, match="incomplete: moesys.json is missing"):
        prepare(f"trainer.resume={bad}")
    # an out dir with checkpoints is never trained over without trainer.resume
    with pytest.raises(ValueError, match="already holds checkpoints"):
        train_mod.prepare(cfg, out, 1)
    assert _snapshot(out) == snap  # nothing overwritten


@pytest.mark.slow
@pytest.mark.multirank
def test_reshard_ep2_to_ep1_and_ep4(rank_pool, tmp_path):
    """Save at EP=2 (2 ranks); load at EP=1 (1 rank) and EP=4 (4 ranks): same eval loss, same Adam state."""
    common = ["trainer.steps=4", "trainer.eval_interval=4", "trainer.batch_size=8"]
    out = str(tmp_path / "ep2")
    summary = pool_run(rank_pool, make_cfg(*common, "parallel.ep=2", "parallel.simulate_ranks=2"), out)
    saved = ckpt.resolve(out)
    flat = read_flat_checkpoint(saved)
    key = ("blocks.1.moe.experts", "w1", 3)
    ref = {m: flat[f"optim.blocks.1.moe.experts.w1.{m}"][3] for m in ("exp_avg", "exp_avg_sq")}
    ref["weight"] = flat["model.blocks.1.moe.experts.w1"][3]
    assert ref["exp_avg"].abs().sum() > 0

    for ep in (1, 4):
        cfg = make_cfg(*common, f"parallel.ep={ep}", f"parallel.simulate_ranks={ep}")
        results = rank_pool.run(load_and_probe, ep, cfg, saved, str(tmp_path / f"load{ep}"), key, timeout_s=120)
        losses = {r["loss"] for r in results}
        assert len(losses) == 1
        assert results[0]["loss"] == pytest.approx(summary["val_loss_end"], rel=1e-5, abs=1e-6)
        probes = [r["probe"] for r in results if r["probe"] is not None]
        assert len(probes) == 1  # exactly one rank owns global expert 3
        for m in ("exp_avg", "exp_avg_sq", "weight"):
            torch.testing.assert_close(torch.from_numpy(probes[0][m]), ref[m], rtol=0, atol=0)
        assert probes[0]["step"] == 4.0 and results[0]["step"] == 4



@pytest.mark.multirank
def test_each_rank_loads_its_experts_at_their_global_offset(rank_pool, tmp_path):
    """Save one layer at EP=2; load at EP=2 (rank 1 must read experts 2, 3) and at EP=1 (all four):
    weights and AdamW moments equal the right slices of the global tensors, bit for bit."""
    results = rank_pool.run(expert_offset_worker, 2, str(tmp_path / "ckpt"), timeout_s=60)
    fails = [f for r in results for f in r]
    assert not fails, "\n".join(fails)

def test_checkpoint_meta_records_structure(tmp_path, world1):
    cfg = make_cfg("parallel.ep=1", "parallel.simulate_ranks=1", "trainer.steps=1")
    tr = build_trainer(cfg, str(tmp_path))
    tr.train_step()
    path = tr.save()
    meta = json.load(open(os.path.join(path, ckpt.META_FILE)))
    assert meta["step"] == 1 and meta["structure"]["num_experts"] == 4
    assert open(os.path.join(tr.ckpt_root, ckpt.LATEST)).read().strip() == "step_00000001"


def test_checkpoint_from_before_qk_norm_loads_as_qk_norm_false(tmp_path, world1):
    """A manifest written before model.qk_norm existed lacks the key: it is a model without it, so
    it loads with qk_norm=false and is refused, naming the field, with qk_norm=true."""
    cfg = make_cfg("parallel.ep=1", "parallel.simulate_ranks=1", "trainer.steps=1", "model.qk_norm=false")
    tr = build_trainer(cfg, str(tmp_path))
    tr.train_step()
    path = tr.save()
    meta_path = os.path.join(path, ckpt.META_FILE)
    meta = json.load(open(meta_path))
    del meta["structure"]["qk_norm"]
    with open(meta_path, "w") as f:
        json.dump(meta, f)
    ckpt.check_compatible(path, structure_of(cfg))
    with pytest.raises(ckpt.CheckpointError, match="qk_norm: checkpoint has False, this run has True"):
        ckpt.check_compatible(path, structure_of(make_cfg("model.qk_norm=true")))


def test_kernel_backend_is_not_structural_a_torch_checkpoint_loads_on_grouped_mm(tmp_path, world1):
    """moe.kernel_backend picks kernels, not parameters: a checkpoint trained on the torch path loads
    into a grouped_mm (sync-free) run, which then evaluates it to the same loss."""
    common = ("parallel.ep=1", "parallel.simulate_ranks=1", "trainer.steps=1")
    tr = build_trainer(make_cfg(*common, "moe.kernel_backend=torch"), str(tmp_path / "a"))
    tr.train_step()
    path = tr.save()
    gm = build_trainer(make_cfg(*common, "moe.kernel_backend=grouped_mm"), str(tmp_path / "b"))
    gm.load(path)
    assert gm.step == 1
    assert abs(gm.evaluate() - tr.evaluate()) < 1e-5


def _write_format2(tr, root):
    """A checkpoint as moesys wrote it before experts were DTensors (format 2): one DCP entry per
    expert (`<key>.e<g>`), the rest as today, a manifest with checksums."""
    import pickle

    import torch.distributed.checkpoint as dcp

    from moesys.parallel import expert_parameters

    names = {id(p): n for n, p in tr.model.named_parameters()}
    experts = {names[id(p)] for p in expert_parameters(tr.model)}

    def split(key, fqn, t):
        return {f"{key}.e{g}": t[g].clone() for g in range(t.shape[0])} if fqn in experts else {key: t.clone()}

    state = {}
    for k, v in tr.model.state_dict().items():
        state.update(split(f"model.{k}", k, v))
    for p, st in tr.optimizer.state.items():
        n = names[id(p)]
        for m in ("exp_avg", "exp_avg_sq"):
            state.update({f"{kk}.{m}": vv for kk, vv in split(f"optim.{n}", n, st[m]).items()})
        state[f"optim.{n}.step"] = st["step"].clone()
    state["trainer"] = pickle.dumps(tr.trainer_state())
    path = os.path.join(root, "step_00000002")
    dcp.save(state, storage_writer=dcp.FileSystemWriter(path))
    meta = {"format": 2, "step": 2, "structure": structure_of(tr.cfg), "trainer": tr.trainer_state(),
            "files": ckpt._hash_files(path, 0)}
    with open(os.path.join(path, ckpt.META_FILE), "w") as f:
        json.dump(meta, f, default=str)
    return path


def test_format2_checkpoint_loads_and_a_newer_format_is_refused(tmp_path, world1):
    """A format-2 checkpoint (per-expert entries) loads into today's model: every weight and AdamW
    moment exactly; a manifest from a newer moesys is refused naming its format."""
    cfg = make_cfg("parallel.ep=1", "parallel.simulate_ranks=1", "trainer.steps=2", "moe.activation=swiglu")
    tr = build_trainer(cfg, str(tmp_path / "a"))
    tr.train_step()
    tr.train_step()
    path = _write_format2(tr, str(tmp_path / "old"))
    assert ckpt.verify_checkpoint(path)
    cfg.trainer.seed = 99  # other initial weights than the saved ones
    fresh = build_trainer(cfg, str(tmp_path / "b"))
    assert not torch.equal(fresh.model.blocks[1].moe.experts.w3, tr.model.blocks[1].moe.experts.w3)
    with pytest.raises(ckpt.CheckpointError, match=r"holds pickled entries \(trainer\).*trainer.trust_checkpoint=true"):
        fresh.load(path)  # its trainer entry is a pickle: only behind trainer.trust_checkpoint
    fresh.cfg.trainer.trust_checkpoint = True
    fresh.load(path)
    assert fresh.step == 2
    for (n, p), q in zip(tr.model.named_parameters(), fresh.model.parameters()):
        assert torch.equal(p, q), n
        for m in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(tr.optimizer.state[p][m], fresh.optimizer.state[q][m]), (n, m)
    meta_path = os.path.join(path, ckpt.META_FILE)
    meta = json.load(open(meta_path))
    meta["format"] = ckpt.FORMAT + 1
    with open(meta_path, "w") as f:
        json.dump(meta, f)
    with pytest.raises(ckpt.CheckpointError, match=f"has format {ckpt.FORMAT + 1}; this moesys reads formats 1 to 4"):
        fresh.load(path)


@pytest.mark.slow
@pytest.mark.multirank
@pytest.mark.parametrize("layout", [["parallel.ep=2", "parallel.simulate_ranks=2"],
                                    ["parallel.ep=2", "parallel.simulate_ranks=4", "trainer.engine=fsdp"]],
                         ids=["ep2", "fsdp_ep2x2"])
def test_format2_checkpoint_loads_at_other_layouts(rank_pool, tmp_path, world1, layout):
    """A format-2 checkpoint written by one process loads at ep=2 (DTensor experts) and under FSDP2
    at ep=2 x edp=2: the same evaluation loss, and each rank's expert moments are its part."""
    cfg = make_cfg("parallel.ep=1", "parallel.simulate_ranks=1", "trainer.steps=2")
    tr = build_trainer(cfg, str(tmp_path / "a"))
    tr.train_step()
    tr.train_step()
    want = tr.evaluate()
    path = _write_format2(tr, str(tmp_path / "old"))
    exp_avg = tr.optimizer.state[tr.model.blocks[1].moe.experts.w1]["exp_avg"][3]
    other = make_cfg("trainer.steps=2", "trainer.trust_checkpoint=true", *layout)  # format 2 pickles its trainer
    world = other.parallel.simulate_ranks
    results = rank_pool.run(load_and_probe, world, other, path, str(tmp_path / "b"), ("blocks.1.moe.experts", "w1", 3),
                            timeout_s=240)
    assert {round(r["loss"], 5) for r in results} == {round(want, 5)}
    if "trainer.engine=fsdp" not in layout:  # (under FSDP2 a rank holds part of its experts' rows)
        probes = [r["probe"] for r in results if r["probe"] is not None]
        assert len(probes) == 1
        torch.testing.assert_close(torch.from_numpy(probes[0]["exp_avg"]), exp_avg, rtol=0, atol=0)
