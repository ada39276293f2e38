"""EvoMoE under DeepSpeed ZeRO-1/2: the diversify step writes the spawned weights into ZeRO's fp32
masters and copies (or resets) the experts' Adam moments, so a DeepSpeed run trains exactly like
the plain engine across the phase boundary."""
import numpy as np
import pytest
import torch

from moesys import checkpoint_state as cstate
from moesys import train as train_mod
from moesys.train import build_callbacks
from train_helpers import build_trainer, make_cfg, pool_run

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


# ---- resume at another EP size, on either side of the phase boundary ------------------------------
# the gate noise is keyed by (seed, step, data-parallel rank), not by the global RNG (re-seeded when the
# world size changes), so a resumed run draws the same noise as an uninterrupted run at its new size
RESHARD = [*EVO[:-2], "trainer.eval_interval=2", "trainer.grad_accum=1"]


def _run(rank_pool, tmp_path, name, ep, *extra):
    return pool_run(rank_pool, make_cfg(*RESHARD, f"parallel.ep={ep}", f"parallel.simulate_ranks={ep}", *extra),
                    str(tmp_path / name))


@pytest.fixture(scope="module")
def ep2_run(rank_pool, tmp_path_factory):
    """EvoMoE at EP=2 (2 gloo ranks) with checkpoints at steps 2 (dense phase) and 4 (after the switch at 3)."""
    tmp = tmp_path_factory.mktemp("ep2")
    summary = _run(rank_pool, tmp, "a", 2, "trainer.ckpt_interval=2", "trainer.keep_checkpoints=5")
    return summary, tmp / "a" / "checkpoints"


@pytest.mark.multirank
def test_dense_phase_checkpoint_at_ep2_resumes_at_ep1_across_the_switch(rank_pool, tmp_path, ep2_run):
    ep2, ckpts = ep2_run
    ep1 = _run(rank_pool, tmp_path, "ep1", 1)
    resumed = _run(rank_pool, tmp_path, "r1", 1, f"trainer.resume={ckpts / 'step_00000002'}")
    assert len(resumed["train_losses"]) == 6
    # steps 0-1 come from the EP=2 run's history: the dense phase is the same function at any EP size
    np.testing.assert_allclose(ep2["train_losses"][:3], ep1["train_losses"][:3], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(resumed["train_losses"], ep1["train_losses"], rtol=1e-5, atol=1e-6)
    assert resumed["val_loss_end"] == pytest.approx(ep1["val_loss_end"], rel=1e-5)


@pytest.mark.multirank
def test_moe_phase_checkpoint_at_ep2_loads_at_ep1_with_the_same_eval_loss(tmp_path, ep2_run, world1):
    ep2, ckpts = ep2_run
    cfg = make_cfg(*RESHARD, "parallel.ep=1", "parallel.simulate_ranks=1")
    tr = build_trainer(cfg, str(tmp_path / "load"))
    tr.load(str(ckpts / "step_00000004"))
    assert tr.step == 4 and all(not layer.in_dense_phase for _, layer in tr.moe_layers())
    val_at_4 = dict((s, v) for s, v in tr.history["val"])[4]
    assert tr.evaluate() == pytest.approx(val_at_4, rel=1e-5)


@pytest.mark.slow
@pytest.mark.multirank
def test_dense_phase_checkpoint_at_ep2_resumes_at_ep4(rank_pool, tmp_path, ep2_run):
    """E=4 at EP=4: one expert per rank. Four data-parallel ranks draw their own noise streams, so the
    reference is an uninterrupted EP=4 run."""
    _, ckpts = ep2_run
    ep4 = _run(rank_pool, tmp_path, "ep4", 4)
    resumed = _run(rank_pool, tmp_path, "r4", 4, f"trainer.resume={ckpts / 'step_00000002'}")
    np.testing.assert_allclose(resumed["train_losses"], ep4["train_losses"], rtol=1e-5, atol=1e-6)
    assert resumed["val_loss_end"] == pytest.approx(ep4["val_loss_end"], rel=1e-5)


def test_deepspeed_expert_params_exclude_the_dense_ffn():
    """EvoMoE's replicated dense FFN is not an expert: its grads must reduce over all dp ranks."""
    from moesys import MoEConfig
    from moesys.evo import EvoMoELayer
    from moesys.integrations.deepspeed import expert_params

    layer = EvoMoELayer(MoEConfig(hidden_size=8, ffn_hidden_size=16, num_experts=4, top_k=2))
    got = {id(p) for p in expert_params(layer)}
    assert got == {id(p) for p in layer.experts.parameters()}
    assert not got & {id(p) for p in layer.dense.parameters()}
