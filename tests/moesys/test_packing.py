"""pack_consecutive: the one greedy pack of consecutive items under a size cap (gradient buckets,
safetensors shard files)."""
from __future__ import annotations

import random

import pytest

from moesys.moe.packing import pack_consecutive


def test_odd_sizes_pack_greedily_in_order():
    sizes = [7, 3, 5, 1, 9, 2, 2, 11, 4]
    # cap 10: 7+3 | 5+1 (+9 would pass) | 9 | 2+2 (+11 would pass) | 11 (alone, over the cap) | 4
    assert pack_consecutive(sizes, 10, size=int) == [[7, 3], [5, 1], [9], [2, 2], [11], [4]]


def test_an_item_bigger_than_the_cap_is_a_group_of_its_own():
    assert pack_consecutive([2, 50, 3], 10, size=int) == [[2], [50], [3]]
    assert pack_consecutive([50], 10, size=int) == [[50]]
    assert pack_consecutive([50, 60], 10, size=int) == [[50], [60]]


def test_no_items_no_groups():
    assert pack_consecutive([], 10, size=int) == []
    assert pack_consecutive(iter(()), 10, size=int, first_cap=1) == []


def test_the_first_group_has_its_own_cap():
    sizes = [4, 4, 4, 4, 4, 4, 4]
    assert pack_consecutive(sizes, 12, size=int, first_cap=5) == [[4], [4, 4, 4], [4, 4, 4]]
    # a first cap larger than the rest's: only the first group gets it
    assert pack_consecutive(sizes, 8, size=int, first_cap=20) == [[4, 4, 4, 4, 4], [4, 4]]


def test_items_of_any_kind_with_a_size_function():
    items = [("a", 3), ("b", 3), ("c", 5), ("d", 0)]
    assert pack_consecutive(items, 6, size=lambda it: it[1]) == [[("a", 3), ("b", 3)], [("c", 5), ("d", 0)]]


@pytest.mark.parametrize("seed", range(20))
def test_random_packs_keep_every_item_and_are_greedy(seed):
    """Against the definition: the groups concatenate to the items; each group is within its cap
    unless it is one item; and no group could have taken the next group's first item."""
    rng = random.Random(seed)
    sizes = [rng.choice([0, 1, 2, 3, 5, 8, 13, 40]) for _ in range(rng.randrange(0, 30))]
    cap, first = rng.randrange(1, 30), rng.randrange(1, 30)
    groups = pack_consecutive(sizes, cap, size=int, first_cap=first)
    assert [n for g in groups for n in g] == sizes
    for i, g in enumerate(groups):
        limit = first if i == 0 else cap
        assert g and (sum(g) <= limit or len(g) == 1), (groups, cap, first)
        if i + 1 < len(groups):
            assert sum(g) + groups[i + 1][0] > limit, (groups, cap, first)
