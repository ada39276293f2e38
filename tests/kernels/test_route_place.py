"""route_place (histogram + scan + slot per route + keep): torch reference and Triton kernels
(interpreter) against a per-route Python loop, at 601 tokens over 7 experts with an empty one."""
from __future__ import annotations

import pytest
import torch

from moesys.kernels.route_place import route_place, route_place_op, route_place_reference
from moesys.kernels.route_place_triton import launch_route_place


def loop_place(expert_TK, order, E, C, priority):
    """Visit the routes in priority order with one counter per expert (route_place.py's table)."""
    T, K = expert_TK.shape
    R = T * K
    ex = expert_TK.reshape(-1).tolist()
    od = order.tolist() if order is not None else None
    if priority == "token":
        route_P = list(range(R))
    elif priority == "choice":
        route_P = [t * K + k for k in range(K) for t in range(T)]
    elif priority == "tokens_ranked":
        route_P = [od[i] * K + k for k in range(K) for i in range(T)]
    else:
        route_P = od
    total = [0] * E
    for r in route_P:
        total[ex[r]] += 1
    starts = [sum(total[:e]) for e in range(E)]
    M = R if C is None else E * C
    seen = [0] * E
    dest, row_route = [M] * R, [R] * M
    for r in route_P:
        e = ex[r]
        pos = seen[e]
        seen[e] += 1
        if C is None:
            dest[r] = starts[e] + pos
        elif pos < C:
            dest[r] = e * C + pos
        else:
            continue
        row_route[dest[r]] = r
    kept = total if C is None else [min(n, C) for n in total]
    offs = [sum(total[: e + 1]) for e in range(E)] if C is None else [(e + 1) * C for e in range(E)]
    return (torch.tensor(dest, dtype=torch.int64), torch.tensor(row_route, dtype=torch.int64),
            torch.tensor(offs, dtype=torch.int32), torch.tensor(kept, dtype=torch.int64),
            torch.tensor(R - sum(kept), dtype=torch.int64))


def routes(T, K, E, empty=1, seed=0):
    """[T, K] distinct experts per token, skewed, expert `empty` never chosen."""
    g = torch.Generator().manual_seed(seed)
    scores = torch.rand(T, E, generator=g) + torch.linspace(0, 0.6, E)
    scores[:, empty] = -1.0
    return scores.topk(K, dim=1).indices


def order_for(priority, T, K, seed=1):
    g = torch.Generator().manual_seed(seed)
    if priority == "tokens_ranked":
        return torch.randperm(T, generator=g)
    if priority == "routes_ranked":
        return torch.randperm(T * K, generator=g)
    return None


NAMES = ("dest_R", "row_route_M", "offs_E", "counts_E", "dropped")
CASES = [("token", None), ("choice", 60), ("tokens_ranked", 60), ("routes_ranked", 60), ("choice", 200),
         ("choice", 0), ("routes_ranked", None)]


def check_same(got, want):
    for name, a, b in zip(NAMES, got, want):
        assert a.dtype == b.dtype and a.shape == b.shape, f"{name}: {a.dtype} {tuple(a.shape)} vs {b.dtype} {tuple(b.shape)}"
        assert torch.equal(a, b), f"{name} differs"


def loop_case(priority, C, T=601, K=2, E=7):
    """601 tokens' routes over 7 experts (one empty), their order for `priority`, E and the loop's placement."""
    ex = routes(T, K, E)
    order = order_for(priority, T, K)
    return ex, order, E, loop_place(ex, order, E, C, priority)


@pytest.mark.parametrize("priority,C", CASES)
def test_torch_reference_matches_the_loop(priority, C):
    ex, order, E, want = loop_case(priority, C)
    check_same(route_place_reference(ex, order, E, C, priority), want)
    check_same(route_place(ex, E, C, priority, order), want)  # the op: CPU takes the reference
    if C == 60:
        assert int(want[4]) > 0 and int(want[3][1]) == 0  # drops happen; the empty expert keeps none


@pytest.mark.parametrize("priority,C", CASES)
def test_triton_matches_the_loop(priority, C):
    """Interpreter; block_r=64 puts the 1202 routes in 19 blocks (the prefix crosses blocks)."""
    ex, order, E, want = loop_case(priority, C)
    check_same(launch_route_place(ex, order, E, C, priority, block_r=64), want)
    # 76 blocks of 16 positions, scanned 16 blocks at a time
    check_same(launch_route_place(ex, order, E, C, priority, block_r=16, scan_block=16), want)


@pytest.mark.parametrize("T,K,E,C", [(5, 3, 4, 1), (1, 1, 1, 3), (0, 2, 3, 2), (0, 2, 3, None), (33, 1, 5, 4)])
def test_triton_small_and_empty_shapes(T, K, E, C):
    ex = routes(T, K, E, empty=E - 1) if T else torch.zeros(0, K, dtype=torch.int64)
    want = loop_place(ex, None, E, C, "choice")
    check_same(launch_route_place(ex, None, E, C, "choice", block_r=16), want)
    check_same(route_place_reference(ex, None, E, C, "choice"), want)


def test_cpu_takes_torch_even_when_interpreting(monkeypatch):
    """The op picks Triton on CUDA only; TRITON_INTERPRET=1 (set by conftest) does not change that."""
    import moesys.kernels.route_place_triton as rpt

    def fail(*a, **k):
        raise AssertionError("the CPU op launched the Triton kernel")

    monkeypatch.setattr(rpt, "launch_route_place", fail)
    ex = routes(9, 2, 4)
    check_same(route_place(ex, 4, 3, "choice"), loop_place(ex, None, 4, 3, "choice"))


def test_bad_arguments_are_clear_errors():
    ex = routes(6, 2, 4)
    with pytest.raises(ValueError, match="priority 'tokens_ranked' needs an order"):
        route_place(ex, 4, 3, "tokens_ranked")
    with pytest.raises(ValueError, match=r"needs an int64 order of shape \(12,\)"):
        route_place(ex, 4, 3, "routes_ranked", torch.arange(6))
    with pytest.raises(ValueError, match="capacity must be >= 0"):
        route_place(ex, 4, -2, "choice")
    with pytest.raises(ValueError, match="2-D int64"):
        route_place(ex.int(), 4, 3, "choice")


def test_opcheck():
    ex = routes(13, 2, 5)
    for args in [(ex, None, 5, 4, "choice"), (ex, None, 5, -1, "token"), (ex, torch.randperm(13), 5, 3, "tokens_ranked")]:
        torch.library.opcheck(route_place_op, args, test_utils=("test_schema", "test_faketensor"))
