"""The padded dispatcher's static per-rank capacity (issue 13 item 4): real gloo ranks.

Ample capacity: outputs and every gradient equal the single-process layer (fp32, atol 1e-5).
Small capacity: runtime/overflow_dropped is exactly the rows past C = max(1, ceil(f*T*K/E)) of each
(source rank, expert), counted independently, and the outputs equal a single-process layer that
drops the same rows. ep=2 on 2 ranks, and on 4 ranks (two ep groups of different odd T), every
mode and overlap degree (the chunks are static slot ranges), the tuner in auto mode too.
"""
import math
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))  # spawned ranks import the workers by module name

import static_workers  # noqa: E402

from moesys.parallel import ExpertParallelConfig  # noqa: E402

SMALL = dict(hidden_size=8, ffn_hidden_size=8)
CASES = [
    # (MoEConfig kwargs, static_capacity_factor, ample (compare with the plain layer), unused expert)
    (dict(SMALL, num_experts=4, top_k=2), 4.0, True, False),  # C = 2T: nothing can overflow
    (dict(SMALL, num_experts=4, top_k=1, activation="swiglu"), 8.0, True, True),  # an expert gets no tokens
    (dict(SMALL, num_experts=4, top_k=2), 0.6, False, False),  # small: rows dropped
    (dict(SMALL, num_experts=4, top_k=2, capacity_factor=1.0, min_capacity=1), 0.5, False, False),  # + layer drops
    (dict(SMALL, num_experts=8, top_k=2, kernel_backend="grouped_mm"), 0.7, False, True),  # L=2, device offsets
]
COMBOS = [("ep", 1), ("ep", 2), ("ep", 4), ("sharded_dp", 1), ("auto", "auto")]


@pytest.mark.multirank
@pytest.mark.parametrize("world", [2, 4])
def test_static_capacity_equals_single_process(rank_pool, world):
    results = rank_pool.run(static_workers.equivalence_worker, world, CASES, COMBOS, timeout_s=90, local_world_size=2)
    fails = [f for r in results for f in r["fails"]]
    assert not fails, "\n".join(fails[:20])
    for r in results:
        assert r["checked"] == len(CASES) * len(COMBOS)
    # the small-capacity cases did drop rows somewhere (else they test nothing)
    assert sum(sum(r["drops"]) for r in results) > 0


@pytest.mark.multirank
def test_overflow_error_raises_on_every_rank(rank_pool):
    msgs = rank_pool.run(static_workers.error_worker, 2, timeout_s=30)
    for m in msgs:
        assert "parallel.static_capacity_factor=0.25" in m and "overflowed" in m, m


@pytest.mark.parametrize("kw,text", [
    (dict(static_capacity_factor=1.0), "needs dispatcher='padded'"),
    (dict(dispatcher="padded", static_capacity_factor=0.0), "static_capacity_factor must be a finite number > 0"),
    (dict(dispatcher="padded", static_capacity_factor=float("inf")), "finite number > 0"),
    (dict(dispatcher="padded", static_capacity_factor=1.0, overflow="later"), "overflow='later' is not one of"),
    (dict(dispatcher="padded", overflow="rerun"), "applies to a static buffer only"),
    (dict(dispatcher="padded", overflow="error"), "applies to a static buffer only"),
])
def test_config_refuses(kw, text):
    with pytest.raises(ValueError, match=text.replace("(", r"\(").replace("[", r"\[")):
        ExpertParallelConfig(**kw)


@pytest.mark.multirank
def test_host_reads_per_layer_forward(rank_pool):
    """Host reads (.item/.tolist/.cpu/.numpy, int/float/bool/index of a tensor) while the runner runs,
    per layer forward, pinned ep mode: the dropless all-to-all-v path reads exactly once (the
    splits: the send and received counts in one read after the counts exchange), at overlap 1 and 2;
    the static-capacity padded path reads nothing, also under an expert placement (the slot mapping,
    and replicas: their rows' split and their weights' fetch, are device ops)."""
    static = dict(dispatcher="padded", static_capacity_factor=1.0)
    permuted, replicated = ((1, 3, 0, 2), ()), ((1, 3, 0, 2), (0, 1))
    setups = [("alltoallv", dict(dispatcher="alltoallv", overlap=1)),
              ("alltoallv c=2", dict(dispatcher="alltoallv", overlap=2)),
              ("static", dict(static, overlap=1)),
              ("static c=2", dict(static, overlap=2)),
              ("static placed", dict(static, overlap=1, placement=permuted)),
              ("static replicas c=2", dict(static, overlap=2, placement=replicated))]
    results = rank_pool.run(static_workers.host_reads_worker, 2, setups, timeout_s=30)
    want = {"alltoallv": 1, "alltoallv c=2": 1, "static": 0, "static c=2": 0, "static placed": 0,
            "static replicas c=2": 0}
    for r in results:
        for name, per_forward in r.items():
            for reads in per_forward:
                assert len(reads) == want[name], f"{name}: {len(reads)} host reads:\n" + "\n".join(reads)


@pytest.mark.parametrize("current,needed,limit,want", [
    (0.25, 0.94, None, 1.25),  # 1.25 x 0.94 = 1.175 -> the next multiple of 0.25
    (1.0, 0.5, None, 1.5),  # at least x1.5 the current factor
    (0.5, 1.0, None, 1.25),  # exactly 1.25: not rounded up a step by float error
    (0.25, 1.5, 2.0, 2.0),  # capped at E / K (C = T)
    (1.9, 1.95, 2.0, 2.0),
])
def test_grown_factor(current, needed, limit, want):
    from moesys.parallel.overflow import grown_factor

    got = grown_factor(current, needed, limit)
    assert got == want and got >= needed and (limit is None or got <= limit)


def test_factor_needed_fits_the_largest_count():
    """C(f_needed) = ceil(f * T * K / E) is exactly the largest count (T x K not a multiple of E)."""
    import torch

    from moesys.parallel import ExpertLayout, PaddedDispatcher

    E, K, T = 8, 2, 37
    d = PaddedDispatcher.__new__(PaddedDispatcher)  # the capacity math only: no process group
    d.layout, d.static_capacity_factor, d.top_k = ExpertLayout(world=2, rank=0, num_experts=E, ffn_size=8), 1.0, K
    counts_E = torch.tensor([3, 0, 19, 5, 7, 11, 2, 27])
    f = float(d.factor_needed(counts_E, T))
    assert f == 27 * E / (T * K)
    d.set_static_capacity_factor(f)
    assert d.static_capacity(T) == 27


def _grown_reference(current, needed, limit):
    """The README's growth rule in exact decimal arithmetic: the smallest multiple of 1/4 that is at
    least 1.25 x needed and 1.5 x current, capped at the limit but never below needed."""
    from fractions import Fraction

    c, n = Fraction(str(current)), Fraction(str(needed))
    target = max(Fraction(5, 4) * n, Fraction(3, 2) * c)
    grown = Fraction(math.ceil(target * 4), 4)
    if limit is not None:
        grown = max(min(grown, Fraction(str(limit))), n)
    return float(grown)


@pytest.mark.parametrize("limit", [None, 2.0, 4.0])
def test_grown_factor_follows_the_rule_on_a_grid(limit):
    from moesys.parallel.overflow import grown_factor

    for current in (0.25, 0.5, 1.0, 1.3, 2.75):
        for needed in (0.0, 0.1, 0.94, 1.0, 1.2, 1.6, 2.4, 3.0, 5.0):
            got = grown_factor(current, needed, limit)
            assert got == _grown_reference(current, needed, limit), (current, needed, limit, got)
            assert got >= needed


@pytest.mark.parametrize("current,needed", [(1.0, float("nan")), (1.0, float("inf")), (1.0, -0.5), (0.0, 1.0),
                                            (-1.0, 1.0)])
def test_grown_factor_refuses_bad_input_naming_it(current, needed):
    from moesys.parallel.overflow import grown_factor

    with pytest.raises(ValueError, match=rf"needed={needed}, current={current}"):
        grown_factor(current, needed, 2.0)
