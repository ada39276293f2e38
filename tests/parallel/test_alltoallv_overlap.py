"""The dropless all-to-all-v path: one host read per layer forward, overlapped with the permute
(issue 13 item 4). Real gloo ranks; the experts on torch._grouped_mm with device offsets (no read).

The runner's prefetch, called by the layer right after routing, issues the counts exchange (and on
CUDA the host copy of the splits); the layer's permute (x_TD -> x_ND: an index_select of x) runs
next; only then the runner waits and reads the splits, once, before the rows' all-to-all. Recorded
in issue order under a TorchDispatchMode plus spies on the collectives and the host reads.
"""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))  # spawned ranks import the workers by module name

import static_workers  # noqa: E402

from moesys.parallel import simulate  # noqa: E402

GMM = {"kernel_backend": "grouped_mm"}


@pytest.mark.multirank
@pytest.mark.parametrize("world", [2, 4])
def test_counts_exchange_then_permute_then_the_one_read(rank_pool, world):
    setups = [("c=1", GMM, 1), ("c=2", GMM, 2), ("shared c=1", dict(GMM, num_shared_experts=1), 1)]
    results = rank_pool.run(static_workers.order_worker, world, setups, timeout_s=60)
    for rank, r in enumerate(results):
        for name, got in r.items():
            ev, where = got["events"], f"rank {rank} {name}"
            N, D = got["T"] * got["K"], got["D"]  # dropless: every route is a row
            reads = [i for i, e in enumerate(ev) if e[0] == "read"]
            assert len(reads) == 1 and len(got["runner_reads"]) == 1, f"{where}: host reads {got['runner_reads']}"
            counts = [i for i, e in enumerate(ev) if e == ("exchange", "torch.int64")]
            rows = [i for i, e in enumerate(ev) if e[0] == "exchange" and e[1] != "torch.int64"]
            permute = [i for i, e in enumerate(ev) if e[0] == "op" and e[2] and e[3] == (N, D)]
            assert len(counts) == 1 and rows and len(permute) == 1, f"{where}: {ev}"
            # the exchange is in flight while the layer permutes; the read waits for it, after both
            assert counts[0] < permute[0] < reads[0] < rows[0], f"{where}: {ev}"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_plan_start_copies_into_pinned_memory_on_cuda():
    """On CUDA plan_start leaves the counts in a pinned host buffer behind an event (no sync), and
    plan_finish reads them: the same plan as the synchronous path. One rank over NCCL."""
    results = simulate(static_workers.cuda_plan_worker, 1, backend="nccl", timeout_s=60)
    r = results[0]
    assert r["pinned"] and r["same"], r
