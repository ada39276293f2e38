"""Issue 27: a checkpoint carries no pickled code of ours, and loading never unpickles one unasked.

Format 4 keeps the trainer state as JSON in moesys.json and the RNG states as integer tensors; a
checkpoint holding any pickled entry (formats 1 to 3 wrote `trainer` and `rng.rank<r>` as pickles,
or one planted by someone else) is refused by name unless trainer.trust_checkpoint=true. The planted
pickles here write a file when unpickled: that file must not appear.
"""
import json
import os
import pickle
import random

import numpy as np
import pytest
import torch
import torch.distributed.checkpoint as dcp

from moesys import checkpoint as ckpt
from moesys import train as train_mod
from moesys.configs.apps import EvalConfig
from moesys.errors import ConfigError
from moesys.evaluate import prepare as eval_prepare
from moesys.generate import load_model
from moesys.trainer import structure_of
from train_helpers import build_trainer, make_cfg

COMMON = ("parallel.ep=1", "parallel.simulate_ranks=1", "trainer.steps=2")


class WritesAFile:
    """Unpickling this runs code: it writes `path` (what a hostile checkpoint could do)."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return exec, (f"open({self.path!r}, 'w').write('ran')",)


def test_rng_state_is_integer_tensors_and_restores_every_generator():
    torch.manual_seed(3)
    np.random.seed(4)
    random.seed(5)
    np.random.standard_normal()  # numpy caches the second Gaussian of a pair: it must survive too
    random.gauss(0, 1)  # so does Python's gauss_next
    st = ckpt.rng_state()
    assert st["torch"].dtype == torch.uint8 and st["numpy"].dtype == torch.int64 and st["python"].dtype == torch.int64
    want = (torch.rand(3), np.random.standard_normal(3), np.random.randint(0, 1 << 30, 3), random.random(),
            random.gauss(0, 1))
    native = (np.random.get_state(), random.getstate())
    torch.manual_seed(0)
    np.random.seed(0)
    random.seed(0)
    ckpt.set_rng_state(st)
    got = (torch.rand(3), np.random.standard_normal(3), np.random.randint(0, 1 << 30, 3), random.random(),
           random.gauss(0, 1))
    assert torch.equal(want[0], got[0]) and np.array_equal(want[1], got[1]) and np.array_equal(want[2], got[2])
    assert want[3:] == got[3:]
    assert random.getstate() == native[1]
    assert all(np.array_equal(a, b) if isinstance(a, np.ndarray) else a == b
               for a, b in zip(np.random.get_state(), native[0]))


def test_a_checkpoint_holds_tensors_only_and_the_trainer_state_as_json(tmp_path, world1):
    tr = build_trainer(make_cfg(*COMMON), str(tmp_path / "a"))
    tr.train_step()
    torch.manual_seed(11)
    rng_then = torch.get_rng_state()
    path = tr.save()
    meta = ckpt.check_compatible(path, structure_of(tr.cfg))
    assert meta["format"] == 4 and ckpt.pickled_entries(meta["_keys"]) == []
    assert {"rng.rank0.torch", "rng.rank0.numpy", "rng.rank0.python"} <= set(meta["_keys"])
    assert meta["trainer"] == json.loads(json.dumps(tr.trainer_state()))
    fresh = build_trainer(make_cfg(*COMMON, "trainer.seed=99"), str(tmp_path / "b"))
    torch.manual_seed(0)
    st = fresh.load(path)
    assert st["rng_restored"] and torch.equal(torch.get_rng_state(), rng_then)
    assert fresh.step == 1 and fresh.history["train"] == [list(x) for x in tr.history["train"]]
    for p, q in zip(tr.model.parameters(), fresh.model.parameters()):
        assert torch.equal(p, q)


def _plant(tr, root, name, fmt, marker):
    """A checkpoint like tr.save()'s, but entry `name` is a pickle that writes `marker` when loaded, and
    moesys.json says format `fmt` (3: as moesys wrote it before; 4: today's)."""
    state = ckpt.flat_entries(*ckpt.engine_state(tr.model, tr.optimizer))
    if fmt == 4:
        state.update(ckpt.rng_entries(0, ckpt.rng_state()))
    else:
        state["trainer"] = pickle.dumps(tr.trainer_state())
        state["rng.rank0"] = pickle.dumps({"torch": torch.get_rng_state(), "numpy": np.random.get_state(),
                                           "python": random.getstate()})
    state[name] = WritesAFile(marker)  # DCP stores a non-tensor with torch.save, i.e. pickled
    path = os.path.join(root, "step_00000001")
    dcp.save(state, storage_writer=dcp.FileSystemWriter(path))
    meta = {"format": fmt, "step": 1, "structure": structure_of(tr.cfg), "trainer": tr.trainer_state(),
            "files": ckpt._hash_files(path, 0), "config": _config(tr)}
    with open(os.path.join(path, ckpt.META_FILE), "w") as f:
        json.dump(meta, f)
    with open(os.path.join(root, ckpt.LATEST), "w") as f:
        f.write("step_00000001\n")
    return path


def _config(tr):
    """The run config as moesys.json stores it, but saying trust_checkpoint=true (as a hostile
    checkpoint would): moesys-eval and moesys-generate must not take it from there."""
    from omegaconf import OmegaConf

    config = json.loads(json.dumps(OmegaConf.to_container(OmegaConf.structured(tr.cfg))))
    config["trainer"]["trust_checkpoint"] = True
    return config


@pytest.mark.parametrize("name,fmt", [("trainer", 3), ("rng.rank0", 3), ("trainer", 4), ("rng.rank0", 4)])
def test_a_planted_pickle_is_refused_by_name_and_never_runs(tmp_path, world1, name, fmt):
    """In place of each formerly pickled entry, under an old and today's manifest: Trainer.load,
    moesys-train's resume checks, moesys-eval's and moesys-generate's loaders all refuse it naming the
    entry, and the payload's file is not written. Trusted, the old format's does run (the payload is
    live: the refusal is what stopped it); today's format never reads a non-tensor entry at all."""
    tr = build_trainer(make_cfg(*COMMON), str(tmp_path / "a"))
    tr.train_step()
    marker = str(tmp_path / "payload_ran")
    path = _plant(tr, str(tmp_path / "evil" / "checkpoints"), name, fmt, marker)
    refused = rf"holds pickled entries \({'rng.rank0, trainer' if fmt == 3 else name}\).*trust_checkpoint=true"
    fresh = build_trainer(make_cfg(*COMMON), str(tmp_path / "b"))
    with pytest.raises(ckpt.CheckpointError, match=refused):
        fresh.load(path)
    with pytest.raises(train_mod.ResumeError, match=refused):
        train_mod.prepare(make_cfg(*COMMON, f"trainer.resume={path}"), str(tmp_path / "c"), 1)
    with pytest.raises(ConfigError, match=refused):
        eval_prepare(EvalConfig(checkpoint=path))
    with pytest.raises(ConfigError, match=refused):
        load_model(path)
    assert not os.path.exists(marker), "a planted pickle ran"
    fresh.cfg.trainer.trust_checkpoint = True
    if fmt == 3:  # trusted, the old format's pickles are read: the payload is live
        with pytest.raises(Exception):  # (it returns None where a trainer state / RNG dict belongs)
            fresh.load(path)
        assert os.path.exists(marker)
    else:  # today's loader reads tensors only: even trusted, a planted entry is never unpickled
        fresh.load(path)
        assert fresh.step == 1 and not os.path.exists(marker)


def test_a_format3_checkpoint_loads_behind_trust_with_a_one_line_warning(tmp_path, world1, capfd):
    """As moesys wrote before format 4 (pickled trainer and RNG entries): refused by default, loaded
    exactly with trainer.trust_checkpoint=true (weights, step, this rank's RNG), warning in one line."""
    tr = build_trainer(make_cfg(*COMMON), str(tmp_path / "a"))
    tr.train_step()
    torch.manual_seed(7)
    rng_then = torch.get_rng_state()
    state = ckpt.flat_entries(*ckpt.engine_state(tr.model, tr.optimizer))
    state["trainer"] = pickle.dumps(tr.trainer_state())
    state["rng.rank0"] = pickle.dumps({"torch": rng_then, "numpy": np.random.get_state(), "python": random.getstate()})
    path = str(tmp_path / "old" / "step_00000001")
    dcp.save(state, storage_writer=dcp.FileSystemWriter(path))
    with open(os.path.join(path, ckpt.META_FILE), "w") as f:
        json.dump({"format": 3, "step": 1, "structure": structure_of(tr.cfg), "trainer": tr.trainer_state(),
                   "files": ckpt._hash_files(path, 0)}, f)
    fresh = build_trainer(make_cfg(*COMMON, "trainer.seed=99"), str(tmp_path / "b"))
    with pytest.raises(ckpt.CheckpointError, match=r"format 3\) holds pickled entries \(rng.rank0, trainer\)"):
        fresh.load(path)
    capfd.readouterr()
    fresh.cfg.trainer.trust_checkpoint = True
    torch.manual_seed(0)
    st = fresh.load(path)
    warned = [line for line in capfd.readouterr().err.splitlines() if "trust_checkpoint" in line]
    assert warned == [f"warning: trainer.trust_checkpoint=true: unpickling rng.rank0, trainer of {path}"]
    assert fresh.step == 1 and st["rng_restored"] and torch.equal(torch.get_rng_state(), rng_then)
    for p, q in zip(tr.model.parameters(), fresh.model.parameters()):
        assert torch.equal(p, q)


def test_trust_checkpoint_is_a_config_field_in_help_and_warned_without_resume():
    cfg = make_cfg(*COMMON, "trainer.trust_checkpoint=true")
    assert cfg.trainer.trust_checkpoint is True
    assert any("trainer.trust_checkpoint=true without trainer.resume" in w for w in cfg.warnings())
    with pytest.raises(Exception, match="trust_checkpoint"):
        make_cfg(*COMMON, "trainer.trust_checkpoint=maybe")
