"""Router collapse warning: the monitor's streak rule, and the trainer feeding it every step."""
import pytest
import torch

from moesys.collapse import CollapseMonitor
from train_helpers import build_trainer, make_cfg

BALANCED = [25.0, 25.0, 25.0, 25.0]
COLLAPSED = [70.0, 10.0, 10.0, 10.0]  # expert 0: 0.7 of the routes


def _feed(mon, rows, start=1):
    """rows: per step, one [E] load list per layer. Returns {step: [warnings]} for steps that warned."""
    out = {}
    for i, loads in enumerate(rows, start=start):
        w = mon.update(i, torch.tensor(loads))
        if w:
            out[i] = w
    return out


def test_warns_once_when_the_streak_reaches_the_step_count():
    mon = CollapseMonitor(share=0.5, steps=3, blocks=[1, 3])
    rows = [[COLLAPSED, BALANCED]] * 6
    fired = _feed(mon, rows)
    assert list(fired) == [3] and len(fired[3]) == 1  # block 1 only, once, at its third step
    w = fired[3][0]
    assert "block 1" in w and "expert 0" in w and "0.70" in w and "3 steps" in w
    assert "trainer.collapse_share=0.5" in w and "trainer.collapse_steps=3" in w
    assert mon.streak == [6, 0]


def test_a_broken_streak_starts_again_and_may_warn_again():
    mon = CollapseMonitor(share=0.5, steps=2, blocks=[0])
    rows = [[COLLAPSED], [BALANCED], [COLLAPSED], [COLLAPSED], [COLLAPSED], [BALANCED], [COLLAPSED], [COLLAPSED]]
    assert list(_feed(mon, rows)) == [4, 8]


def test_share_must_be_exceeded_and_empty_steps_break_the_streak():
    mon = CollapseMonitor(share=0.5, steps=2, blocks=[0])
    at_share = [50.0, 50.0, 0.0, 0.0]  # exactly 0.5 is not more than 0.5
    assert _feed(mon, [[at_share]] * 4) == {}
    # a layer that routed nothing (EvoMoE's dense phase reports zero loads) is not collapsed
    assert _feed(mon, [[COLLAPSED], [[0.0] * 4], [COLLAPSED]]) == {}
    assert mon.streak == [1]


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="share"):
        CollapseMonitor(share=0.0, steps=3, blocks=[0])
    with pytest.raises(ValueError, match="steps"):
        CollapseMonitor(share=0.5, steps=0, blocks=[0])
    with pytest.raises(ValueError, match="2 MoE layers"):
        CollapseMonitor(share=0.5, steps=1, blocks=[0]).update(1, torch.ones(2, 4))


def test_config_validation_names_the_fields():
    with pytest.raises(ValueError, match="trainer.collapse_share"):
        make_cfg("trainer.collapse_share=1.5").validate(world_size=2)
    with pytest.raises(ValueError, match="trainer.collapse_steps"):
        make_cfg("trainer.collapse_steps=0").validate(world_size=2)


@torch.no_grad()
def _collapse_routers(model):
    """Every MoE layer sees one constant input that its router sends to expert 0 (and the next best)."""
    for _, layer in model.moe_layers():
        blk = next(b for b in model.blocks if b.moe is layer)
        v = torch.zeros_like(blk.ln2.bias)
        v[0] = 1.0
        blk.ln2.weight.zero_()
        blk.ln2.bias.copy_(v)
        layer.router.weight.zero_()
        layer.router.weight[0].copy_(10 * v)


def test_trainer_warns_for_every_collapsed_layer_after_collapse_steps(tmp_path, world1):
    # tiny preset: 2 MoE blocks, 4 experts, top-2; a collapsed router gives expert 0 half the routes
    cfg = make_cfg("parallel.ep=1", "parallel.simulate_ranks=1", "trainer.collapse_share=0.4",
                   "trainer.collapse_steps=3", "trainer.log_interval=10", "optim.lr=1e-9")
    tr = build_trainer(cfg, str(tmp_path))
    _collapse_routers(tr.model)
    warned = {}
    for _ in range(5):  # the check runs every step, not only on logging steps (log_interval=10)
        m = tr.train_step()
        if m["collapse_warnings"]:
            warned[tr.step] = m["collapse_warnings"]
    assert list(warned) == [3]
    assert [w.split(":")[1].strip() for w in warned[3]] == ["router collapse in block 0", "router collapse in block 1"]
    assert all("expert 0 took 0.50" in w for w in warned[3])


def test_trainer_without_the_check(tmp_path, world1):
    cfg = make_cfg("parallel.ep=1", "parallel.simulate_ranks=1", "trainer.collapse_share=0", "optim.lr=1e-9")
    tr = build_trainer(cfg, str(tmp_path))
    _collapse_routers(tr.model)
    assert tr.collapse is None
    assert all("collapse_warnings" not in tr.train_step() for _ in range(3))
