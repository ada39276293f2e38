"""trainer.engine=fsdp (FSDP2 over the job's DeviceMesh, experts over edp): 4 real gloo ranks train
like one process, and its checkpoints resume at other EP layouts and on the other engines."""
import json
import os

import numpy as np
import pytest

from moesys import checkpoint as ckpt
from moesys import train as train_mod
from moesys.errors import ConfigError
from train_helpers import make_cfg, pool_run

# 20 steps, 2 micro-batches per step, a clip that is active on most steps; the runtime in auto mode
# (its tuner tries both modes and several overlap degrees during the run). The balance loss over the
# global batch is the same function of the weights however the batch is split over ranks (a per-rank
# balance loss is not: 4 ranks of one sequence each would differ from one process by ~1e-4)
COMMON = ["trainer.steps=20", "trainer.grad_accum=2", "trainer.clip=0.05", "trainer.log_interval=1",
          "trainer.eval_interval=20", "trainer.save_final=false", "moe.aux_loss=global_batch"]


def _records(out_dir):
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def _norms(out_dir):
    return [r["grad_norm"] for r in _records(out_dir) if "grad_norm" in r]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """The plain engine on one process: the reference curve (losses and clipped grad norms)."""
    out = str(tmp_path_factory.mktemp("ref") / "ref")
    summary = train_mod.run(make_cfg(*COMMON, "parallel.ep=1", "parallel.simulate_ranks=1"), out)
    return summary, _norms(out)


LAYOUTS = {"ep2xedp2_auto": (2, []),  # the runtime's tuner picks (mode, degree) as it goes
           "ep4_sharded_dp_c2": (4, ["parallel.mode=sharded_dp", "parallel.overlap=2"]),  # weights move, 2 chunks
           "fsdp_only": (1, [])}


@pytest.mark.slow
@pytest.mark.multirank
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_fsdp_four_ranks_train_like_one_process(rank_pool, tmp_path, one_process, layout):
    ref, ref_norms = one_process
    assert sum(n > 0.05 for n in ref_norms) >= 10, "the clip must act on most steps for the test to mean anything"
    ep, extra = LAYOUTS[layout]
    out = str(tmp_path / layout)
    got = pool_run(rank_pool, make_cfg(*COMMON, *extra, "trainer.engine=fsdp", f"parallel.ep={ep}",
                                       "parallel.simulate_ranks=4"), out)
    assert got["steps"] == 20
    np.testing.assert_allclose(got["train_losses"], ref["train_losses"], rtol=1e-5)
    np.testing.assert_allclose(_norms(out), ref_norms, rtol=1e-5)
    assert got["val_loss_end"] == pytest.approx(ref["val_loss_end"], rel=1e-5)
    if ep > 1:  # the runtime ran under FSDP (and in the pinned case, in the mode pinned)
        modes = {r[k] for r in _records(out) for k in r if k.endswith("runtime/mode_is_ep")}
        assert modes and (modes == {0.0} if "sharded_dp" in layout else True), modes


@pytest.mark.slow
@pytest.mark.multirank
def test_fsdp_checkpoint_resumes_at_other_layouts_and_engines(rank_pool, tmp_path):
    """An fsdp run at ep=2 x edp=2 (4 ranks) checkpoints at step 4; resuming it at ep=4 (fsdp), ep=1
    (fsdp, 2 ranks), on the plain engine and on DeepSpeed ZeRO-1 gives the same evaluation loss at the
    resume and the same continued losses as the uninterrupted run."""
    common = ["trainer.steps=8", "trainer.eval_interval=4", "trainer.clip=0.05", "trainer.log_interval=1",
              "moe.aux_loss=global_batch",
              "parallel.mode=ep", "parallel.overlap=1"]
    out = str(tmp_path / "a")
    straight = pool_run(rank_pool, make_cfg(*common, "trainer.engine=fsdp", "parallel.ep=2", "parallel.simulate_ranks=4",
                                            "trainer.ckpt_interval=4", "trainer.keep_checkpoints=3"), out)
    half = os.path.join(out, "checkpoints", "step_00000004")
    assert ckpt.read_meta(half)["format"] == ckpt.FORMAT
    val_at_4 = {r["step"]: r["val/loss"] for r in _records(out) if "val/loss" in r}[4]
    layouts = {"fsdp_ep4": ["trainer.engine=fsdp", "parallel.ep=4", "parallel.simulate_ranks=4"],
               "fsdp_ep1": ["trainer.engine=fsdp", "parallel.ep=1", "parallel.simulate_ranks=2"],
               "plain_ep2": ["parallel.ep=2", "parallel.simulate_ranks=2"]}
    import importlib.util

    if importlib.util.find_spec("deepspeed") is not None:
        layouts["deepspeed_ep2"] = ["trainer.engine=deepspeed", "trainer.zero_stage=1", "parallel.ep=2",
                                    "parallel.simulate_ranks=2"]
    for name, extra in layouts.items():
        # DeepSpeed keeps process-wide state (its comm backend): its ranks are spawned, the others pooled
        run = train_mod.run if name.startswith("deepspeed") else lambda c, o: pool_run(rank_pool, c, o)
        resumed = run(make_cfg(*common, *extra, f"trainer.resume={half}"), str(tmp_path / name))
        np.testing.assert_allclose(resumed["train_losses"], straight["train_losses"], rtol=1e-5, err_msg=name)
        assert resumed["val_loss_end"] == pytest.approx(straight["val_loss_end"], rel=1e-5), name
    # the evaluation loss right at the checkpoint, from a fresh model at another layout
    from train_helpers import load_and_probe

    cfg = make_cfg(*common, "trainer.engine=fsdp", "parallel.ep=4", "parallel.simulate_ranks=4")
    results = rank_pool.run(load_and_probe, 4, cfg, half, str(tmp_path / "probe"), ("blocks.1.moe.experts", "w1", 3),
                            timeout_s=300)
    assert {round(r["loss"], 6) for r in results} == {round(val_at_4, 6)}


def test_fsdp_refuses_experts_split_along_f():
    with pytest.raises(ConfigError, match=r"trainer.engine=fsdp with parallel.ep \(4\) > moe.num_experts \(2\)"):
        make_cfg("trainer.engine=fsdp", "parallel.ep=4", "parallel.simulate_ranks=4", "moe.num_experts=2").validate()


@pytest.mark.parametrize("field,value", [("fsdp_param_dtype", "fp16"), ("fsdp_reduce_dtype", "int8")])
def test_fsdp_dtype_fields_are_checked(field, value):
    with pytest.raises(ConfigError, match=f"trainer.{field}"):
        make_cfg("trainer.engine=fsdp", f"trainer.{field}={value}").validate()


@pytest.mark.slow
@pytest.mark.multirank
def test_evomoe_diversify_under_fsdp_trains_like_the_plain_engine(rank_pool, tmp_path):
    """EvoMoE (dense phase, diversify at step 4, DTS gate after) at ep=2 x edp=2: under FSDP2 the
    diversify step writes each rank's shard of the spawned experts and their Adam state; the run
    follows the plain engine's losses on the same ranks."""
    common = ["evo=evomoe", "evo.diversify_step=4", "trainer.steps=9", "trainer.eval_interval=9",
              "trainer.log_interval=1", "trainer.save_final=false", "parallel.ep=2", "parallel.simulate_ranks=4"]
    plain = pool_run(rank_pool, make_cfg(*common), str(tmp_path / "plain"))
    fsdp = pool_run(rank_pool, make_cfg(*common, "trainer.engine=fsdp"), str(tmp_path / "fsdp"))
    assert len(fsdp["train_losses"]) == 9
    np.testing.assert_allclose(fsdp["train_losses"], plain["train_losses"], rtol=1e-5)
    phases = [r.get("moe/block0/evo_phase") for r in _records(str(tmp_path / "fsdp")) if "loss" in r]
    assert phases[0] == 0.0 and phases[-1] == 1.0, phases  # it did switch from dense to sparse
