"""EvoMoE under DeepSpeed ZeRO-1/2: the diversify step writes the spawned weights into ZeRO's fp32
masters and copies (or resets) the experts' Adam moments, so a DeepSpeed run trains exactly like
the plain engine across the phase boundary."""
import numpy as np
import pytest
import torch

from moesys import checkpoint_state as cstate
from moesys import train as train_mod
from moesys.train import build_callbacks
from train_helpers import build_trainer, make_cfg

# tiny preset, 6 steps, diversify at step 3; accumulation so engine.step() acts on a boundary
EVO = ["evo=evomoe", "evo.diversify_step=3", "evo.tau_steps=2", "evo.hard_step=5", "trainer.steps=6",
       "trainer.eval_interval=3", "trainer.grad_accum=2", "parallel.ep=1", "parallel.simulate_ranks=1"]
STAGES = [1, pytest.param(2, marks=pytest.mark.slow)]


def _ds(stage):
    return ["trainer.engine=deepspeed", f"trainer.zero_stage={stage}"]


@pytest.mark.parametrize("policy", ["copy", "reset"])
@pytest.mark.parametrize("stage", STAGES)
def test_evomoe_under_deepspeed_equals_the_plain_engine(tmp_path, stage, policy):
    pytest.importorskip("deepspeed")
    common = [*EVO, f"evo.optimizer_state={policy}"]
    plain = train_mod.run(make_cfg(*common), str(tmp_path / "plain"))
    ds = train_mod.run(make_cfg(*common, *_ds(stage)), str(tmp_path / "ds"))
    assert len(ds["train_losses"]) == 6
    np.testing.assert_allclose(ds["train_losses"], plain["train_losses"], rtol=1e-5, atol=1e-6)
    assert ds["val_loss_end"] == pytest.approx(plain["val_loss_end"], rel=1e-5)


@pytest.mark.parametrize("policy", ["copy", "reset"])
def test_deepspeed_masters_and_moments_after_diversify(tmp_path, world1, policy):
    pytest.importorskip("deepspeed")
    cfg = make_cfg(*EVO, *_ds(1), f"evo.optimizer_state={policy}")
    tr = build_trainer(cfg, str(tmp_path / "run"))
    tr.callbacks = build_callbacks(cfg)
    tr._hook("on_train_start", tr)
    for _ in range(3):
        tr.train_step()
    adam = cstate.adam_state(tr.optimizer)
    assert adam.has_master
    layers = [layer for _, layer in tr.moe_layers()]
    stale = [adam.master(layer.experts.w1).clone() for layer in layers]
    dense = [{w: adam.get(getattr(layer.dense, w)) for w in ("w1", "w2")} for layer in layers]
    tr._hook("on_step_start", 3)  # the diversify step
    for layer, old, dst in zip(layers, stale, dense):
        assert not layer.in_dense_phase
        for p in (layer.experts.w1, layer.experts.w2, layer.router.weight):
            torch.testing.assert_close(adam.master(p), p.detach().float(), rtol=0, atol=0)
        assert not torch.equal(adam.master(layer.experts.w1), old)  # the masters did change
        for w in ("w1", "w2"):
            st = adam.get(getattr(layer.experts, w))
            for m in cstate.MOMENTS:
                want = dst[w][m].expand_as(st[m]) if policy == "copy" else torch.zeros_like(st[m])
                torch.testing.assert_close(st[m], want, rtol=0, atol=0)
            assert float(st["step"]) == (3 if policy == "copy" else 0)
        r = adam.get(layer.router.weight)
        assert float(r["step"]) == 3 and not r["exp_avg"].any() and not r["exp_avg_sq"].any()
    # the next ZeRO step starts from the spawned weights: after it the model equals the masters again
    spawned = layers[0].experts.w1.detach().clone()
    tr.train_step()
    moved = layers[0].experts.w1.detach()
    torch.testing.assert_close(adam.master(layers[0].experts.w1), moved.float(), rtol=0, atol=0)
    assert (moved - spawned).abs().max() < 10 * cfg.optim.lr  # one Adam step away, not back to stale masters
