"""parallel.rank_start=auto: the trainer's ranks are forked from a server that imported moesys and
torch once (parallel/spawn.py, start_ranks' `preload`) instead of spawned interpreters. A forked rank
must see what a spawned one sees (the launcher's environment of now, working directory, sys.path,
stdout and stderr), die with its launcher (test_preemption's SIGKILLed parent), and train the same."""
import os
import sys

import pytest
import torch

from moesys import supervise
from moesys import train as train_mod
from moesys.errors import ConfigError
from moesys.parallel import spawn
from fault_helpers import how_i_started
from train_helpers import make_cfg, read_flat_checkpoint

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux") or not spawn.forkserver_available(),
                                reason="reads /proc; needs a forkserver")


@pytest.mark.multirank
def test_a_forked_rank_sees_what_a_spawned_rank_sees(tmp_path, monkeypatch, capfd):
    monkeypatch.chdir(tmp_path)
    with capfd.disabled():  # the server starts (if no test started it) with other streams than the ones checked
        supervise.run_ranks(how_i_started, 1, (os.getpid(), "MOESYS_TEST_RANK_START", False),
                            preload=("moesys.train",))
    got = {}
    for how, preload in (("spawned", ()), ("forked", ("moesys.train",))):
        # set after any server started: a forked rank must take the launcher's value of now
        monkeypatch.setenv("MOESYS_TEST_RANK_START", f"value for the {how} ranks")
        got[how] = supervise.run_ranks(how_i_started, 2, (os.getpid(), "MOESYS_TEST_RANK_START"), preload=preload)
        out, err = capfd.readouterr()
        assert sorted(ln for ln in out.splitlines() if ln.startswith("rank ")) == [
            "rank 0 on stdout", "rank 1 on stdout"], (how, out)
        assert sorted(ln for ln in err.splitlines() if ln.startswith("rank ")) == [
            "rank 0 on stderr", "rank 1 on stderr"], (how, err)
    for how in ("spawned", "forked"):
        assert [r["rank"] for r in got[how]] == [0, 1]
        assert all(r["forked"] == (how == "forked") for r in got[how]), got[how]
        assert all(r["value"] == f"value for the {how} ranks" for r in got[how]), got[how]
        assert all(r["cwd"] == str(tmp_path) and r["sys_path_has_helpers"] for r in got[how]), got[how]


def test_a_server_started_with_another_import_time_environment_is_refused(monkeypatch):
    """What the preloaded modules read at import (TRITON_INTERPRET) cannot follow the launcher: a
    rank forked from a server started with another value fails at once, naming the way out."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    with pytest.raises(RuntimeError, match=r"TRITON_INTERPRET='1'.*launcher has TRITON_INTERPRET=None.*"
                                           r"parallel.rank_start=spawn"):
        spawn._FromLauncher._apply(env, None, None, None)
    assert os.environ["TRITON_INTERPRET"] == "1"  # nothing was applied


def test_rank_start_is_checked_and_picks_the_forkserver_on_cpu():
    cfg = make_cfg()
    assert cfg.parallel.rank_start == "auto"
    want = () if torch.cuda.is_available() else ("moesys.train", "torch._dynamo")
    assert train_mod.rank_preload(cfg, "moesys.train") == want
    assert train_mod.rank_preload(make_cfg("parallel.rank_start=spawn"), "moesys.train") == ()
    with pytest.raises(ConfigError, match=r"parallel.rank_start='fork' is not one of auto\|spawn"):
        make_cfg("parallel.rank_start=fork").validate(2)


@pytest.mark.multirank
def test_forked_ranks_train_like_spawned_ranks(tmp_path):
    """The same tiny run (2 ranks, ep 2) with its ranks forked and spawned: equal losses and weights."""
    out = {}
    for how in ("auto", "spawn"):
        cfg = make_cfg("parallel.ep=2", "parallel.simulate_ranks=2", "trainer.steps=3", "trainer.eval_interval=3",
                       f"parallel.rank_start={how}")
        out[how] = train_mod.run(cfg, str(tmp_path / how))
    assert out["auto"]["train_losses"] == out["spawn"]["train_losses"]
    a, b = (read_flat_checkpoint(out[how]["checkpoint"]) for how in ("auto", "spawn"))
    weights = [k for k in a if k.startswith("model.")]
    assert weights and a.keys() == b.keys()
    for k in weights:
        assert torch.equal(a[k], b[k]), k
