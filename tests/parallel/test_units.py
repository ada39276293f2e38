"""Single-process unit tests: layout and index math, mesh arithmetic, tuner, option validation."""
import pytest
import torch

from moesys.parallel import ExpertLayout, ExpertParallelConfig, Machine, Stats, Tuner, TunerSettings, mesh_ranks
from moesys.parallel.dispatch_base import block_permutation, inverse_permutation
from moesys.parallel.layout import chunk_rows, expand_rows, split_counts
from moesys.parallel.sharded_dp import f_chunks
from moesys.parallel.tuner import Shape, predict


# -- layout --------------------------------------------------------------------------------------
def test_layout_whole_experts():
    lay = ExpertLayout(world=4, rank=2, num_experts=8, ffn_size=16)
    assert (lay.local_experts, lay.shards, lay.expert_slice, lay.f_slice) == (2, 1, slice(4, 6), None)
    assert lay.dest_experts().tolist() == list(range(8))


def test_layout_f_sharded_when_more_ranks_than_experts():
    lay = ExpertLayout(world=4, rank=3, num_experts=2, ffn_size=8)
    assert (lay.local_experts, lay.shards, lay.expert_slice, lay.f_slice) == (1, 2, slice(1, 2), slice(4, 8))
    assert lay.dest_experts().tolist() == [0, 0, 1, 1]


@pytest.mark.parametrize("world,E,F,msg", [(4, 6, 8, r"num_experts \(6\).*\(4\)"), (8, 3, 8, r"\(8\) > num_experts \(3\)"),
                                           (4, 1, 6, r"ffn_hidden_size \(6\).*\(4 ")])
def test_layout_errors_name_the_numbers(world, E, F, msg):
    with pytest.raises(ValueError, match=msg):
        ExpertLayout(world=world, rank=0, num_experts=E, ffn_size=F)


def _naive_blocks(sizes_AB):
    A, B = sizes_AB.shape
    starts, s = {}, 0
    for a in range(A):
        for b in range(B):
            starts[a, b] = s
            s += int(sizes_AB[a, b])
    return [starts[a, b] + i for b in range(B) for a in range(A) for i in range(int(sizes_AB[a, b]))]


def test_block_permutation_and_inverse():
    g = torch.Generator().manual_seed(0)
    for shape in [(3, 4), (1, 5), (4, 1), (2, 2)]:
        sizes = torch.randint(0, 3, shape, generator=g)
        idx = block_permutation(sizes)
        assert idx.tolist() == _naive_blocks(sizes)
        if idx.numel():
            assert torch.equal(idx[inverse_permutation(idx)], torch.arange(idx.numel()))


def test_expand_rows_repeats_expert_blocks():
    counts = torch.tensor([2, 0, 3])
    assert expand_rows(counts, torch.tensor([0, 0, 2, 1])).tolist() == [0, 1, 0, 1, 2, 3, 4]
    assert expand_rows(torch.zeros(3, dtype=torch.long), torch.tensor([0, 1])).numel() == 0


def test_chunks_cover_every_row_once_grouped_by_expert():
    counts = torch.tensor([5, 0, 2, 7])
    parts = split_counts(counts, 4)
    assert torch.equal(sum(parts), counts)
    rows = chunk_rows(counts, parts)
    assert sorted(torch.cat(rows).tolist()) == list(range(14))
    expert_of_row = torch.repeat_interleave(torch.arange(4), counts)
    for r, c in zip(rows, parts):
        assert torch.equal(expert_of_row[r], torch.repeat_interleave(torch.arange(4), c))  # still grouped


def test_f_chunks_use_whole_16_byte_units():
    assert f_chunks(8, 8) == [slice(0, 4), slice(4, 8)]
    assert f_chunks(16, 4) == [slice(0, 4), slice(4, 8), slice(8, 12), slice(12, 16)]
    assert f_chunks(6, 8) == [slice(0, 2), slice(2, 4), slice(4, 6)]
    assert f_chunks(4, 1) == [slice(0, 4)]



def test_f_chunks_tile_any_width():
    # widths the chunks do not divide: the last span must still end at the width
    for width in [*range(1, 41), 1408]:
        for chunks in range(1, 9):
            spans = f_chunks(width, chunks)
            tag = f"f_chunks({width}, {chunks}) = {spans}"
            assert 1 <= len(spans) <= chunks, tag
            assert spans[0].start == 0 and spans[-1].stop == width, tag
            assert all(a.stop == b.start for a, b in zip(spans, spans[1:])), tag
            assert all(s.stop > s.start for s in spans), tag
            # the CPU grouped GEMM rejects a 1-wide operand; 4-aligned widths stay in 16-byte units
            assert width < 2 or all(s.stop - s.start >= 2 for s in spans), tag
            assert width % 4 or all(s.start % 4 == 0 for s in spans), tag

# -- mesh ----------------------------------------------------------------------------------------
def test_mesh_ranks_ep_edp_tp():
    r = mesh_ranks(8, ep=2, tp=2)
    assert r["dp"] == [[0, 2, 4, 6], [1, 3, 5, 7]]
    assert r["ep"] == [[0, 2], [4, 6], [1, 3], [5, 7]]
    assert r["edp"] == [[0, 4], [2, 6], [1, 5], [3, 7]]
    h = mesh_ranks(8, ep=8, local_world_size=2)
    assert h["ep_node"] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert h["ep_cross"] == [[0, 2, 4, 6], [1, 3, 5, 7]]
    assert mesh_ranks(4, ep=2, local_world_size=4)["ep_node"] == []  # ep group inside one node


@pytest.mark.parametrize("kw,msg", [(dict(world_size=6, ep=4), r"ep \(4\) must divide dp = .*6"),
                                    (dict(world_size=6, ep=1, tp=4), r"tp \(4\) must divide world_size \(6\)"),
                                    (dict(world_size=8, ep=8, local_world_size=3), r"local_world_size \(3\)"),
                                    (dict(world_size=4, ep=0), r"ep must be a positive integer")])
def test_mesh_errors_name_the_numbers(kw, msg):
    with pytest.raises(ValueError, match=msg):
        mesh_ranks(**kw)


# -- tuner ---------------------------------------------------------------------------------------
MACHINE = Machine(bandwidth=1e9, latency=1e-4, flops=1e10)


def test_cost_model_prefers_moving_the_smaller_thing():
    shape = Shape(world=4, num_experts=8, hidden=1024, ffn=4096, matrices=2, dtype_bytes=4)  # 268 MB of experts
    few = Stats(tokens=4 * 256, rows=4 * 512, max_rank_rows=512, max_local_rows=512)  # 8 MB of rows
    many = Stats(tokens=4 * 2 ** 18, rows=4 * 2 ** 19, max_rank_rows=2 ** 19, max_local_rows=2 ** 19)  # 8 GB
    assert predict("ep", 1, few, shape, MACHINE) < predict("sharded_dp", 1, few, shape, MACHINE)
    assert predict("sharded_dp", 1, many, shape, MACHINE) < predict("ep", 1, many, shape, MACHINE)
    # overlap pays when comm and compute are comparable and latency is small
    assert predict("ep", 4, few, shape, MACHINE) < predict("ep", 1, few, shape, MACHINE)
    # ... and not when latency dominates
    slow_net = Machine(bandwidth=1e12, latency=1.0, flops=1e10)
    assert predict("ep", 1, few, shape, slow_net) < predict("ep", 4, few, shape, slow_net)


def _tuner(**kw):
    shape = Shape(world=2, num_experts=4, hidden=64, ffn=128, matrices=2, dtype_bytes=4)
    return Tuner(settings=TunerSettings(**kw), shape=shape, machine=MACHINE, group=None)


def test_tuner_explores_then_keeps_the_fastest_measured():
    t = _tuner(warmup_steps=1, top_candidates=3, trials=1)
    stats = Stats(tokens=64, rows=128, max_rank_rows=64, max_local_rows=64)
    fake = {}
    last = None
    picks = []
    for step in range(8):
        pick = t.choose(stats, last)
        picks.append(pick)
        fake.setdefault(pick, 1.0 + 0.1 * len(fake))  # the first candidate timed is the fastest
        last = fake[pick]
    tried = picks[1:4]
    assert len(set(tried)) == 3 and t.phase == "exploit"
    assert picks[-1] == tried[0] and t.decisions_made == 1


def test_tuner_always_times_the_no_overlap_degree_and_every_mode():
    # a cheap network: the model ranks every overlap degree of ep above c=1
    t = _tuner(warmup_steps=0, top_candidates=3, trials=1)
    t.machine = Machine(bandwidth=1e9, latency=1e-9, flops=1e10)
    stats = Stats(tokens=64, rows=128, max_rank_rows=64, max_local_rows=64)
    ranked = t.ranked(stats)
    assert ranked[0][1] > 1 and ranked.index((ranked[0][0], 1)) >= 3  # c=1 is not in the model's top 3
    first = t.choose(stats, None)
    tried = list(dict.fromkeys([first] + t.queue))
    assert tried[0] == ranked[0] and (ranked[0][0], 1) in tried
    assert {m for m, _ in tried} == {"ep", "sharded_dp"} and len(tried) == 3
    # so a measured c=1 that beats the predicted best wins
    times = {k: (0.5 if k == (ranked[0][0], 1) else 1.0) for k in tried}
    last = times[first]
    for _ in range(4):
        last = times.get(t.choose(stats, last), 1.0)
    assert t.phase == "exploit" and t.decision == (ranked[0][0], 1)


@pytest.mark.parametrize("cut", [0, 2, 3, 5, 9, 12, 16])
def test_tuner_state_round_trips_mid_schedule(cut):
    """A tuner restored from state_dict() (through JSON, as a checkpoint holds it) after `cut` steps
    picks what the uninterrupted one picks at every later step, whatever phase it was cut in."""
    import json

    stats = [Stats(tokens=64, rows=128, max_rank_rows=64, max_local_rows=64)] * 10 + \
        [Stats(tokens=64, rows=256, max_rank_rows=128, max_local_rows=128)] * 10  # a shift: re-decide
    times = lambda k: 1.0 + 0.1 * (k[1] + (k[0] == "ep"))  # noqa: E731
    whole, picks = _tuner(warmup_steps=1, top_candidates=3, trials=2, check_every=1), []
    last = None
    for s in stats:
        pick = whole.choose(s, last)
        picks.append(pick)
        last = times(pick)
    assert whole.decisions_made == 2  # the run spans warmup, explore, exploit and a re-decision
    first = _tuner(warmup_steps=1, top_candidates=3, trials=2, check_every=1)
    last = None
    for s in stats[:cut]:
        last = times(first.choose(s, last))
    resumed = _tuner(warmup_steps=1, top_candidates=3, trials=2, check_every=1)
    assert resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    assert resumed.state_dict() == first.state_dict()
    again = []
    for s in stats[cut:]:
        pick = resumed.choose(s, last)
        again.append(pick)
        last = times(pick)
    assert again == picks[cut:]
    assert resumed.decision == whole.decision and resumed.decisions_made == whole.decisions_made


def test_tuner_state_for_other_candidates_is_not_loaded():
    t = _tuner(warmup_steps=0)
    t.choose(Stats(tokens=64, rows=128, max_rank_rows=64, max_local_rows=64), None)
    pinned = _tuner(mode="ep")
    before = pinned.state_dict()
    assert not pinned.load_state_dict(t.state_dict()) and pinned.state_dict() == before
    with pytest.raises(ValueError, match="state version 0"):
        pinned.load_state_dict({**t.state_dict(), "version": 0})


def test_tuner_re_decides_when_routing_shifts():
    t = _tuner(warmup_steps=0, top_candidates=1, trials=1, retune_rel_change=0.3)
    s1 = Stats(tokens=64, rows=128, max_rank_rows=64, max_local_rows=64)
    t.choose(s1, None)
    t.choose(s1, 1.0)
    assert t.phase == "exploit" and t.decisions_made == 1
    t.choose(s1, 1.0)
    assert t.phase == "exploit"
    dense = Stats(tokens=64, rows=64 * 4, max_rank_rows=128, max_local_rows=128)  # active K 2 -> 4
    t.choose(dense, 1.0)
    assert t.phase == "explore"
    t.choose(dense, 1.0)
    assert t.decisions_made == 2


def test_pinned_tuner_never_measures():
    t = _tuner(mode="sharded_dp", degree=4)
    assert t.pinned and t.choose(None, None) == ("sharded_dp", 4)


def test_options_are_validated():
    with pytest.raises(ValueError, match="dispatcher='nccl'"):
        ExpertParallelConfig(dispatcher="nccl")
    with pytest.raises(ValueError, match="overlap=3"):
        ExpertParallelConfig(overlap=3)
    with pytest.raises(ValueError, match="mode='tp'"):
        ExpertParallelConfig(mode="tp")
    c = ExpertParallelConfig(mode="ep", overlap=2, tuner={"trials": 2})
    assert (c.tuner.mode, c.tuner.degree, c.tuner.trials) == ("ep", 2, 2)


def test_pinned_tuner_reports_what_runs():
    """runtime/mode_is_ep and runtime/degree of a pinned layer are the pinned ones (they said ("ep", 1)
    whatever was pinned, so a pinned sharded_dp run logged mode_is_ep=1)."""
    t = _tuner(mode="sharded_dp", degree=2)
    assert t.pinned and t.choose(None, None) == ("sharded_dp", 2)
    assert t.report()["mode_is_ep"] == 0.0 and t.report()["degree"] == 2.0
