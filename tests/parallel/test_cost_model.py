"""The cost model's pure functions against hand-computed cases (single process, no torch.distributed)."""
import math

import pytest

from moesys.parallel.cost_model import (Shape, Stats, candidates, expected_stats, hierarchical_counts, layer_time,
                                        padded_capacity, rank)
from moesys.parallel.cost_network import (Hardware, Link, allgather_ring, alltoall_2d, alltoall_flat, allreduce,
                                          pipelined, reduce_scatter_ring)
from moesys.parallel.probe import half_rows_from, hidden_fraction
from moesys.parallel.tuner import Machine, chunked, predict

# two nodes of 8: NVLink-like 100 GB/s, 2 us, 1 us a peer; NIC-like 10 GB/s, 10 us, 3 us a peer
HW = Hardware(name="test", gpus_per_node=8, intra=Link(100e9, 2e-6, 1e-6), inter=Link(10e9, 10e-6, 3e-6),
              gemm_flops=100e12, overlap=0.0)


def test_balanced_flat_alltoall_on_two_nodes():
    # 16 MB per rank over 16 ranks: 1 MB to each peer; 7 peers in the node, 8 across
    intra = 7 * (1e-6 + 1e6 / 100e9)  # 7.7e-5
    inter = 8 * (3e-6 + 1e6 / 10e9)  # 8.24e-4: the NIC bounds it
    assert alltoall_flat(16e6, 16, HW) == pytest.approx(10e-6 + max(intra, inter), rel=1e-12)
    assert alltoall_flat(16e6, 16, HW) == pytest.approx(8.34e-4, rel=1e-12)
    # one node: only the intra link and its latency
    assert alltoall_flat(8e6, 8, HW) == pytest.approx(2e-6 + 7 * (1e-6 + 1e6 / 100e9), rel=1e-12)
    assert alltoall_flat(1e9, 1, HW) == 0.0


def test_2d_alltoall_sends_fewer_larger_messages_across_nodes():
    hw = HW.with_(mem_bandwidth=1e12)
    # stage 1: 7 local peers, 16 MB / 8 each; stage 2: 1 remote node, 16 MB / 2; permutes 4 x 16 MB
    expected = 4 * 16e6 / 1e12 + (2e-6 + 7 * (1e-6 + 2e6 / 100e9)) + (10e-6 + 1 * (3e-6 + 8e6 / 10e9))
    assert alltoall_2d(16e6, 16, hw) == pytest.approx(expected, rel=1e-12)  # 1.026e-3
    assert alltoall_2d(16e6, 16, hw) > alltoall_flat(16e6, 16, hw)  # large messages, 2 nodes: flat wins
    # small messages: 2-D pays 1 remote gap instead of 8
    small = alltoall_2d(16e3, 16, hw)
    assert small == pytest.approx(4 * 16e3 / 1e12 + 2e-6 + 7 * (1e-6 + 2e3 / 100e9) + 10e-6 + 3e-6 + 8e3 / 10e9,
                                  rel=1e-12)
    assert small < alltoall_flat(16e3, 16, hw)
    # many nodes, tiny messages: the gain tends to the ranks per node (8x fewer remote messages)
    ratio = alltoall_flat(1e3, 2048, HW) / alltoall_2d(1e3, 2048, HW)
    assert 6 < ratio < 8


def test_hierarchical_counts_exchange_by_hand():
    # 4 nodes of 8 (P = 32), E = 64 (L = 2), c = 2 chunks: each rank's [c, P, L] int64 send counts,
    # V = 2 * 32 * 2 * 8 = 1024 B, through the two stages; no device permutes (host index math)
    shape = Shape(world=32, num_experts=64, hidden=512, ffn=1024, matrices=2, dtype_bytes=2)
    stage1 = 2e-6 + 7 * (1e-6 + 1024 / 8 / 100e9)  # [c, Nn, L] = 128 B to each of 7 local peers
    stage2 = 10e-6 + 3 * (3e-6 + 1024 / 4 / 10e9)  # [c, Lw, L] = 256 B to each of 3 other nodes
    assert hierarchical_counts(2, shape, HW.with_(mem_bandwidth=1e9)) == pytest.approx(stage1 + stage2, rel=1e-12)
    s = expected_stats(1024, shape, active_k=2, skew=1.0)
    assert layer_time("ep", "hierarchical", 2, s, shape, HW).plan == pytest.approx(stage1 + stage2, rel=1e-12)
    # what it replaced: a ring all-gather of the [c, E] counts, 31 steps across the NIC
    ring = 31 * (10e-6 + 2 * 64 * 8 / 10e9)
    assert ring > 5 * (stage1 + stage2)
    # one node: stage 2 is the identity; one rank per node: stage 1 is
    one_node = Shape(world=8, num_experts=8, hidden=512, ffn=1024, matrices=2, dtype_bytes=2)
    assert hierarchical_counts(1, one_node, HW) == pytest.approx(2e-6 + 7 * (1e-6 + 8 * 8 / 8 / 100e9), rel=1e-12)
    spread = HW.with_(gpus_per_node=1)
    assert hierarchical_counts(1, shape, spread) == pytest.approx(10e-6 + 31 * (3e-6 + 32 * 2 * 8 / 32 / 10e9),
                                                                  rel=1e-12)


def test_padded_2d_is_padded_with_the_2d_exchange():
    # the same rows, capacity and plan (one tiny all-reduce) as padded; each all-to-all a 2-D one
    shape = Shape(world=32, num_experts=64, hidden=512, ffn=1024, matrices=2, dtype_bytes=2)
    s = expected_stats(1024, shape, active_k=2, skew=1.0)
    hw = HW.with_(mem_bandwidth=1e12)
    for c in (1, 2):
        p = layer_time("ep", "padded", c, s, shape, hw, capacity=40)
        h = layer_time("ep", "hierarchical_padded", c, s, shape, hw, capacity=40)
        v = 2 * 32 * math.ceil(40 / c) * 512 * 2  # L * P * ceil(C / c) rows of D * b bytes a chunk
        assert h.plan == p.plan == pytest.approx(allreduce(16, 32, hw))
        assert h.compute == p.compute
        # 2 all-to-alls a chunk, forward and backward (HW: nothing overlapped)
        assert h.total - p.total == pytest.approx(2 * 2 * c * (alltoall_2d(v, 32, hw) - alltoall_flat(v, 32, hw)))


def test_rings_and_allreduce():
    assert allgather_ring(1e6, 4, HW) == pytest.approx(3 * (2e-6 + 1e6 / 100e9), rel=1e-12)  # in one node
    assert allgather_ring(1e6, 16, HW) == pytest.approx(15 * (10e-6 + 1e6 / 10e9), rel=1e-12)  # the NIC
    big = allreduce(1e9, 16, HW)
    assert big == pytest.approx(min(2 * 15 * (10e-6 + 1e9 / 16 / 10e9), 2 * 4 * 10e-6 + 2e9 / 10e9), rel=1e-12)
    assert allreduce(8, 1024, HW) == pytest.approx(2 * 10 * 10e-6 + 16 / 10e9, rel=1e-9)  # tiny: the tree


def test_pipelining_and_gemm_rate():
    assert pipelined(3.0, 5.0, 1, 1.0) == 8.0
    assert pipelined(3.0, 5.0, 4, 1.0) == pytest.approx(5.0 + 3.0 / 4)
    assert pipelined(3.0, 5.0, 4, 0.0) == 8.0  # nothing hidden
    assert chunked(3.0, 5.0, 4, 0.1) == pytest.approx(5.75 + 0.3)  # the tuner's old helper, kept
    hw = HW.with_(gemm_half_rows=100)
    assert hw.gemm_seconds(1e12, 100) == pytest.approx(2 * 1e12 / 100e12)  # half rate at 100 rows
    assert hw.gemm_seconds(1e12, 1e9) == pytest.approx(1e12 / 100e12, rel=1e-6)


def test_skewed_statistics_load_the_busiest_rank():
    shape = Shape(world=4, num_experts=8, hidden=1024, ffn=4096, matrices=2, dtype_bytes=2)
    s = expected_stats(1000, shape, active_k=2, skew=2.0)
    # 8000 routes, 1000 per expert; the busiest rank holds the hot expert (2000) and one more (1000)
    assert s == Stats(tokens=4000, rows=8000, max_rank_rows=3000, max_local_rows=2000)
    assert expected_stats(1000, shape, 2, skew=2.0, capacity_factor=1.25).max_rank_rows == 2250  # capped
    assert padded_capacity(s, shape) == 500  # skew 2 x 250 rows per expert of the busiest source


def test_skewed_ep_layer_by_hand():
    shape = Shape(world=4, num_experts=8, hidden=1024, ffn=4096, matrices=2, dtype_bytes=2)
    s = expected_stats(1000, shape, active_k=2, skew=2.0)
    hw = HW  # one node for 4 ranks; no overlap, no host overheads, infinite memory bandwidth
    b = layer_time("ep", "alltoallv", 1, s, shape, hw)
    V = 3000 * 1024 * 2  # the busiest rank receives 3000 rows (it sends 2000)
    a2a = 2e-6 + 3 * (1e-6 + V / 4 / 100e9)
    comp = 2 * 2 * 1024 * 4096 * 3000 / 100e12  # forward GEMMs of 3000 rows
    plan = 2e-6 + 3 * (1e-6 + 2 * 8 / 100e9)  # counts: [P, L] int64
    router = 3 * 2 * 1000 * 1024 * 8 / 100e12
    assert b.compute == pytest.approx(3 * comp)
    assert b.comm == pytest.approx(4 * a2a)
    assert b.plan == pytest.approx(plan)
    assert b.total == pytest.approx(router + plan + 4 * a2a + 3 * comp, rel=1e-12)
    assert b.bytes_fwd == 2 * V and b.collectives == 5
    # two chunks, perfect overlap: forward max + min / 2 of (2 chunks of 2 all-to-alls of V/2, comp)
    b2 = layer_time("ep", "alltoallv", 2, s, shape, hw.with_(overlap=1.0))
    comm2 = 2 * 2 * (2e-6 + 3 * (1e-6 + V / 2 / 4 / 100e9))
    plan2 = 2e-6 + 3 * (1e-6 + 4 * 8 / 100e9)
    expect = router + plan2 + (comp + comm2 / 2) + (2 * comp + comm2 / 2)
    assert b2.total == pytest.approx(expect, rel=1e-12)


def test_sharded_dp_moves_weights_and_pads_nothing():
    shape = Shape(world=4, num_experts=8, hidden=1024, ffn=4096, matrices=2, dtype_bytes=2)
    s = expected_stats(1000, shape, active_k=2)
    b = layer_time("sharded_dp", "alltoallv", 1, s, shape, HW)
    w = 2 * 1024 * 4096 * 2  # one matrix of this rank's 2 experts
    gather = 3 * (2e-6 + w / 100e9)
    assert b.comm == pytest.approx(2 * 2 * gather)  # 2 all-gathers forward, 2 reduce-scatters backward
    assert b.compute == pytest.approx(3 * 2 * 2 * 1024 * 4096 * 2000 / 100e12)
    assert b.dispatcher == "-" and b.bytes_fwd == 3 * 2 * w


def test_dispatchers_rank_as_their_bytes_say():
    shape = Shape(world=64, num_experts=64, hidden=4096, ffn=8192, matrices=2, dtype_bytes=2)
    s = expected_stats(4096, shape, active_k=2, skew=1.0)
    hw = HW.with_(mem_bandwidth=2e12)
    t = {d: layer_time("ep", d, 1, s, shape, hw).total for d in ("alltoallv", "padded", "hierarchical", "allgather")}
    assert t["allgather"] > t["alltoallv"]  # P - 1 times the bytes
    # padded with capacity factor 2: twice the rows moved and computed
    assert layer_time("ep", "padded", 1, s, shape, hw, capacity=256).total > t["alltoallv"]
    order = rank(s, shape, hw, candidates())
    assert order == sorted(order, key=lambda r: r.total) and len(order) == 5 * 4 + 4


def test_tuner_predicts_with_the_shared_model():
    m = Machine(bandwidth=1e9, latency=1e-4, flops=1e10, half_rows=32, overlap=0.5)
    shape = Shape(world=4, num_experts=8, hidden=256, ffn=512, matrices=3, dtype_bytes=4)
    s = Stats(tokens=1024, rows=2048, max_rank_rows=600, max_local_rows=520)
    for mode in ("ep", "sharded_dp"):
        for c in (1, 4):
            for d in ("alltoallv", "padded", "hierarchical", "hierarchical_padded", "allgather"):
                assert predict(mode, c, s, shape, m, d) == layer_time(mode, d, c, s, shape, m.hardware(4)).total


def test_probe_fits():
    # t(r) proportional to r + h: 128 + h = 2 (16 + h) at a ratio of 2 -> h = 96
    assert half_rows_from(2.0, 1.0) == pytest.approx(96.0)
    assert half_rows_from(8.0, 1.0) == 0.0  # perfectly linear in rows
    assert hidden_fraction(1.0, 2.0, 2.5) == pytest.approx(0.5)
    assert hidden_fraction(1.0, 2.0, 3.5) == 0.0 and hidden_fraction(1.0, 2.0, 2.0) == 1.0


def test_hardware_from_this_machines_probe():
    from moesys import MoEConfig
    from moesys.planner.probe_host import EXPERT_ROWS, hardware_from_probe

    cfg = MoEConfig(hidden_size=128, ffn_hidden_size=256, num_experts=8, top_k=2)
    B = 1e-5  # 10 us a row of the rank's L = 2 experts
    call, expert = 4e-4, 1e-4  # an expert call costs 0.4 ms plus 0.1 ms an expert in it
    ep = [1e-3 + call + 2 * expert + B * r for r in EXPERT_ROWS]
    ep_x8 = ep[-1] + 7 * (call + 2 * expert)
    sdp_1 = 5e-3
    sdp_x8 = sdp_1 + 7 * (call + 8 * expert)
    m = {"allgather": 3e-4, "a2a_tiny": 4e-4, "a2a_1mb": 1.4e-3, "overlap": 0.5, "layer": 5e-3,
         "copy": 1e-3, "experts": ep + [ep[-1], ep_x8, sdp_1, sdp_x8], "bytes_1mb": 1 << 20, "copy_bytes": 16e6,
         "flops_per_row": 6 * 2 * 128 * 256 * 2, "local_experts": 2}
    hw = hardware_from_probe(m, 4, 1, 256, cfg)
    assert hw.intra.latency == pytest.approx(1e-4)  # 3 ring steps
    assert hw.intra.gap == pytest.approx(1e-4)  # (4e-4 - 1e-4) / 3
    assert hw.intra.bandwidth == pytest.approx((1 << 20) * 3 / 4 / 1e-3)
    assert hw.gemm_flops == pytest.approx(6 * 2 * 128 * 256 * 2 / B) and hw.gemm_half_rows == 0
    assert hw.chunk_overhead_s == pytest.approx(call) and hw.expert_overhead_s == pytest.approx(expert)
    assert hw.call_seconds(2, 8) == pytest.approx(2 * (call + 8 * expert))
    assert hw.overlap == pytest.approx(0.5) and hw.mem_bandwidth == pytest.approx(16e9)
    assert 0 < hw.layer_overhead_s < 5e-3 and not math.isinf(hw.memory_bytes)
    assert hw.allgather_factor == 1.0 and hw.reduce_scatter_factor == 1.0  # not probed: the ring as the link says
    # a 1 MB all-gather and reduce-scatter over the 4 ranks: each rank holds 256 kB; the link's ring
    # is 3 steps of (1e-4 s latency + 256 kB at the probed bandwidth)
    ring = 3 * (1e-4 + (1 << 18) / ((1 << 20) * 3 / 4 / 1e-3))
    probed = hardware_from_probe({**m, "ag_1mb": 1.5 * ring, "rs_1mb": 3.0 * ring}, 4, 1, 256, cfg)
    assert probed.allgather_factor == pytest.approx(1.5) and probed.reduce_scatter_factor == pytest.approx(3.0)
    assert allgather_ring(1 << 18, 4, probed) == pytest.approx(1.5 * ring)
    assert reduce_scatter_ring(1 << 18, 4, probed) == pytest.approx(3.0 * ring)


def test_sharded_dp_backward_pays_the_reduce_scatter():
    """sharded_dp by hand (P=2, E=4, no overlap): forward c*G all-gathers of the weight chunk,
    backward c*G reduce-scatters; a reduce-scatter twice the ring adds exactly its excess."""
    shape = Shape(world=2, num_experts=4, hidden=8, ffn=16, matrices=3, dtype_bytes=4)
    stats = Stats(tokens=20, rows=40, max_rank_rows=22, max_local_rows=20)
    base = HW.with_(overlap=0.0)
    w_chunk = 2 * 8 * 16 * 4 / 2  # L=2 experts' D x F slice of one matrix, c=2 chunks
    t1 = layer_time("sharded_dp", "alltoallv", 2, stats, shape, base)
    t2 = layer_time("sharded_dp", "alltoallv", 2, stats, shape, base.with_(reduce_scatter_factor=2.0))
    ring = allgather_ring(w_chunk, 2, base)
    assert ring == pytest.approx(base.intra.latency + w_chunk / base.intra.bandwidth)
    assert t1.comm == pytest.approx(2 * 2 * 3 * ring)
    assert t2.total - t1.total == pytest.approx(2 * 3 * ring) and t2.comm == pytest.approx(3 * 2 * 3 * ring)
    # the allgather dispatcher's backward reduce-scatters the rows' gradients: c chunks of N/c rows
    a1 = layer_time("ep", "allgather", 2, stats, shape, base)
    a2 = layer_time("ep", "allgather", 2, stats, shape, base.with_(reduce_scatter_factor=2.0))
    assert a2.total - a1.total == pytest.approx(2 * allgather_ring(20 / 2 * 8 * 4, 2, base))
    for disp in ("alltoallv", "padded", "hierarchical", "hierarchical_padded"):  # no reduce-scatter in them
        assert (layer_time("ep", disp, 2, stats, shape, base.with_(reduce_scatter_factor=2.0)).total
                == pytest.approx(layer_time("ep", disp, 2, stats, shape, base).total))


@pytest.mark.parametrize("kw, msg", [(dict(gpus_per_node=0), "gpus_per_node"), (dict(overlap=1.5), "overlap"),
                                     (dict(gemm_flops=0.0), "gemm_flops")])
def test_hardware_is_validated(kw, msg):
    base = dict(name="x", gpus_per_node=8, intra=Link(1e9, 1e-6), inter=Link(1e9, 1e-6), gemm_flops=1e12)
    with pytest.raises(ValueError, match=msg):
        Hardware(**{**base, **kw})
    with pytest.raises(ValueError, match="bandwidth"):
        Link(0.0, 1e-6)
    with pytest.raises(ValueError, match="dispatcher='nccl'"):
        layer_time("ep", "nccl", 1, Stats(1, 1, 1, 1), Shape(2, 2, 8, 8, 2, 4), HW)


def test_oversubscribed_host_prices_the_total_work():
    """Ranks that share cores (core_share < 1: gemm_flops at that share) compute for the longer of the
    total work over all ranks (mean rows at gemm_flops) and the busiest rank alone on a whole core
    (its rows x core_share at gemm_flops): by hand, 4 ranks on 2 cores."""
    link = Link(bandwidth=1e9, latency=1e-5)
    shape = Shape(world=4, num_experts=8, hidden=64, ffn=128, matrices=2, dtype_bytes=4)
    flops = 2 * 2 * 64 * 128  # FLOPs of one row through one expert, fwd (2 matrices)
    for busiest, rows_comp in ((2200, 1100), (1500, 1000)):  # max(mean 1000, busiest x 0.5)
        hw = Hardware(name="t", gpus_per_node=4, intra=link, inter=link, gemm_flops=1e9, core_share=0.5)
        st = Stats(tokens=2000, rows=4000, max_rank_rows=busiest, max_local_rows=1000)
        b = layer_time("ep", "alltoallv", 1, st, shape, hw)
        assert b.compute == pytest.approx(3 * flops * rows_comp / 1e9, rel=1e-9)  # fwd + 2x bwd
        own = layer_time("ep", "alltoallv", 1, st, shape, hw.with_(core_share=1.0))
        assert own.compute == pytest.approx(3 * flops * busiest / 1e9, rel=1e-9)
