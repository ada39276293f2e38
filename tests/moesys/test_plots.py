"""The end-of-run figures carry what a reader needs: one colour scale for every layer's load with 1/E
marked and every expert labelled (E <= 16), drop rate and router entropy over steps, the EvoMoE
switch marked on the loss curve. Checked on the matplotlib objects, not on pixels."""
import math
import os

import numpy as np
import pytest

from moesys import plots
from moesys.evo.schedule import EvoConfig


def _loads(E, blocks, steps, seed=0):
    rng = np.random.default_rng(seed)
    out = {}
    for i, b in enumerate(blocks):
        w = rng.random((len(steps), E)) ** (3 + 2 * i)  # later blocks more skewed: another range
        out[b] = (w / w.sum(1, keepdims=True)).tolist()
    return out


def _images(fig):
    return [im for ax in fig.axes for im in ax.get_images()]


@pytest.mark.parametrize("E", [7, 16])
def test_expert_load_shares_one_colour_scale_marks_1_over_E_and_labels_every_expert(E):
    steps = [5, 10, 15, 20]
    loads = _loads(E, [0, 2, 3], steps)
    fig = plots.expert_load_figure(steps, loads)
    ims = _images(fig)
    assert len(ims) == 3
    norm = ims[0].norm
    assert all(im.norm is norm for im in ims)  # one Normalize object: the same colour is the same share
    top = max(max(max(row) for row in v) for v in loads.values())
    assert norm.vmin == 0 and norm.vcenter == pytest.approx(1 / E) and norm.vmax == pytest.approx(max(top, 2 / E))
    for im, b in zip(ims, [0, 2, 3]):  # each panel shows its own layer, experts down, steps across
        np.testing.assert_allclose(im.get_array(), np.asarray(loads[b]).T)
        ax = im.axes
        assert [t.get_text() for t in ax.get_yticklabels()] == [str(e) for e in range(E)]
        assert f"block {b}" in ax.get_ylabel()
    cbar_ax = [ax for ax in fig.axes if not ax.get_images()]
    assert len(cbar_ax) == 1  # one colour bar for the figure
    labels = [t.get_text() for t in cbar_ax[0].get_yticklabels()]
    assert f"1/E = {1 / E:.3f}" in labels
    assert any(np.allclose(line.get_ydata(), 1 / E) for line in cbar_ax[0].get_lines())
    plots._plt().close(fig)


def test_many_experts_are_not_labelled_one_by_one():
    fig = plots.expert_load_figure([1, 2], _loads(40, [0], [1, 2]))
    assert len(_images(fig)[0].axes.get_yticklabels()) < 40
    plots._plt().close(fig)


def test_routing_panel_shows_drop_rate_and_entropy_per_layer():
    steps = [10, 20, 30]
    drop = {0: [0.1, 0.05, 0.0], 1: [0.2, 0.1, 0.02]}
    ent = {0: [1.9, 1.8, 1.7], 1: [1.5, 1.2, 1.0]}
    fig = plots.routing_figure(steps, drop, ent, num_experts=7)
    ax_d, ax_h = fig.axes
    d_lines = {ln.get_label(): ln for ln in ax_d.get_lines()}
    np.testing.assert_allclose(d_lines["block 1"].get_ydata(), [20, 10, 2])  # percent
    np.testing.assert_allclose(d_lines["block 0"].get_xdata(), steps)
    h_lines = {ln.get_label(): ln for ln in ax_h.get_lines()}
    np.testing.assert_allclose(h_lines["block 0"].get_ydata(), ent[0])
    uniform = [ln for lbl, ln in h_lines.items() if lbl.startswith("ln E")]
    assert len(uniform) == 1 and np.allclose(uniform[0].get_ydata(), math.log(7))
    assert "%" in ax_d.get_ylabel() and "nats" in ax_h.get_ylabel()
    plots._plt().close(fig)


def test_loss_plot_marks_the_evomoe_switch_only_when_there_is_one():
    train = [(s, 5 - s / 50) for s in range(1, 101)]
    val = [(0, 5.0), (50, 4.0), (100, 3.2)]
    evo = EvoConfig(enabled=True, diversify_step=40, hard_step=80)
    marks = plots.evo_marks(evo, last_step=100)
    assert marks == {"EvoMoE switch: dense -> experts": 40, "hard top-1": 80}
    fig = plots.loss_figure(train, val, marks)
    ax = fig.axes[0]
    vlines = {ln.get_label(): ln for ln in ax.get_lines() if "step" in ln.get_label()}
    switch = vlines["EvoMoE switch: dense -> experts (step 40)"]
    assert list(switch.get_xdata()) == [40, 40]
    assert "EvoMoE switch: dense -> experts (step 40)" in [t.get_text() for t in ax.get_legend().get_texts()]
    plots._plt().close(fig)
    # no switch: a run without EvoMoE, or one that stopped before the switch
    assert plots.evo_marks(EvoConfig(enabled=False), 100) == {}
    assert plots.evo_marks(EvoConfig(enabled=True, diversify_step=400), 100) == {}
    fig = plots.loss_figure(train, val, {})
    assert [ln.get_label() for ln in fig.axes[0].get_lines()] == ["train", "validation"]
    plots._plt().close(fig)


def test_write_all_writes_the_three_figures(tmp_path):
    steps = [5, 10]
    hist = {"train": [(1, 3.0), (10, 2.0)], "val": [(0, 3.1), (10, 2.2)], "load_steps": steps,
            "load": _loads(5, [0, 1], steps), "drop_rate": {0: [0.0, 0.1], 1: [0.0, 0.0]},
            "router_entropy": {0: [1.5, 1.4], 1: [1.6, 1.5]}}
    paths = plots.write_all(str(tmp_path), hist, num_experts=5, marks={"EvoMoE switch: dense -> experts": 6})
    assert [os.path.basename(p) for p in paths] == ["expert_load.png", "routing.png", "loss.png"]
    assert all(os.path.getsize(p) > 5000 for p in paths)
