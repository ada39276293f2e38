"""apply_fsdp (FSDP2 over the job's DeviceMesh, experts an FSDP unit over edp) on 4 real gloo ranks:
every parameter's gradient, after a global-norm clip, equals one process's over all ranks' batches,
at ep=2 x edp=2 (two ep groups), ep=4 (edp=1) and ep=1 (pure FSDP), in both runtime modes, with
overlap chunks (the experts unit is gathered once however many chunks run inside it) and through
every dispatcher."""
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))  # spawned ranks import the workers by module name

import fsdp_workers  # noqa: E402


CASES = [(2, "ep", 2, "swiglu", True, "alltoallv"), (2, "sharded_dp", 2, "gelu", False, "alltoallv"),
         (4, "ep", 1, "gelu", True, "alltoallv"), (4, "sharded_dp", 1, "swiglu", True, "alltoallv"),
         (1, "ep", 1, "gelu", True, "alltoallv"),
         # the other dispatchers (the hierarchical one across 2 simulated nodes of 2 ranks)
         (2, "ep", 2, "gelu", True, "padded"), (2, "ep", 1, "swiglu", True, "allgather"),
         (4, "ep", 2, "gelu", True, "hierarchical")]


@pytest.mark.multirank
@pytest.mark.parametrize("ep,mode,overlap,activation,reshard,dispatcher", CASES)
def test_fsdp_grads_equal_one_process(rank_pool, ep, mode, overlap, activation, reshard, dispatcher):
    results = rank_pool.run(fsdp_workers.grads_worker, 4, ep, mode, overlap, activation, reshard, dispatcher,
                            timeout_s=180, local_world_size=2 if dispatcher == "hierarchical" else None)
    fails = [f for r in results for f in r["fails"]]
    assert not fails, "\n".join(fails[:20])
    assert all(r["checked"] == 1 for r in results)
    # every rank holds 1/4 of each expert weight: sharded over ep and (edp) by FSDP
    assert {r["global_shape"] for r in results} == {(4, 16, 24)}
    assert {r["local_numel"] for r in results} == {4 * 16 * 24 // 4}
