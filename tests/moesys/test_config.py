"""MoEConfig: exact capacity, and the validation of the fields issue 15 added or changed."""
import math
from fractions import Fraction

import pytest
import torch

from moesys import MoEConfig, MoELayer
from moesys.moe.routers import ExpertChoiceRouter

CFS = (0.5, 1.0, 1.1, 1.25, 1.3, 2.0, 0.7)


def _exact(cf, K, T, E):
    return math.ceil(Fraction(str(cf)) * K * T / E)  # 1.1 means 11/10


@pytest.mark.parametrize("min_capacity", [0, 4])
def test_capacity_grid_is_exact(min_capacity):
    # T 1..600, E 1..9, K 1..3 (K <= E), 7 factors: 100800 cases per min_capacity; in floats
    # 339 of them came out one too high (cf 1.1: 246, cf 1.3: 93), e.g. T=400, E=4, K=1, cf=1.1: 111
    for cf in CFS:
        for E in range(1, 10):
            for K in range(1, min(3, E) + 1):
                cfg = MoEConfig(hidden_size=4, ffn_hidden_size=4, num_experts=E, top_k=K,
                                capacity_factor=cf, min_capacity=min_capacity)
                got = [cfg.capacity(T) for T in range(1, 601)]
                want = [max(min_capacity, _exact(cf, K, T, E)) for T in range(1, 601)]
                assert got == want, (cf, E, K, next(i + 1 for i, (g, w) in enumerate(zip(got, want)) if g != w))


def test_capacity_issue_example_and_the_layer_uses_it():
    cfg = MoEConfig(hidden_size=8, ffn_hidden_size=8, num_experts=4, top_k=1, capacity_factor=1.1)
    assert cfg.capacity(400) == 110 and cfg.capacity_ratio() == (11, 10)
    changed = MoEConfig(hidden_size=8, ffn_hidden_size=8, num_experts=4, top_k=1, capacity_factor=1.1)
    changed.capacity_factor = 1.3  # set after construction: the ratio follows the field
    assert changed.capacity_ratio() == (13, 10) and changed.capacity(400) == 130
    assert changed.to_dict()["capacity_factor"] == 1.3 and "_cf_ratio" not in changed.to_dict()
    with pytest.raises(ValueError, match=r"MoEConfig.capacity_factor must be a finite number > 0 or None .*got 0"):
        changed.capacity_factor = 0  # a bad value set after construction: the same error as at construction
    assert changed.capacity_factor == 1.3 and changed.capacity(400) == 130  # and the config is unchanged
    changed.capacity_factor = None
    assert changed.capacity(400) is None
    torch.manual_seed(0)
    layer = MoELayer(cfg)
    with torch.no_grad():
        layer.router.weight.zero_()
        layer.router.weight[0, 0] = 1.0  # every token with x[:, 0] > 0 prefers expert 0
    x = torch.randn(400, 8).abs()
    _, plan = layer.route(x, 400)
    assert plan.capacity == 110 and int(plan.counts_E[0]) == 110 and int(plan.dropped) == 400 - 110
    assert cfg.capacity(0) == 4  # no tokens: the minimum rule still holds


def test_expert_choice_capacity_is_exact_and_at_most_T():
    for cf, K, T, E in ((1.1, 1, 400, 4), (1.3, 2, 170, 9), (None, 2, 61, 7), (2.0, 3, 5, 3)):
        cfg = MoEConfig(hidden_size=4, ffn_hidden_size=4, num_experts=E, top_k=K, router="expert_choice",
                        capacity_factor=cf, min_capacity=1, allow_noncausal=True)
        want = min(T, max(1, _exact(cf if cf is not None else 1, K, T, E)))
        assert ExpertChoiceRouter(cfg).capacity(T) == want


@pytest.mark.parametrize("cf", [0.0, -1.0, float("inf"), float("nan"), True, "1.1"])
def test_bad_capacity_factor_names_the_field(cf):
    with pytest.raises(ValueError, match=r"MoEConfig.capacity_factor must be a finite number > 0 or None"):
        MoEConfig(hidden_size=4, ffn_hidden_size=4, num_experts=4, capacity_factor=cf)
