"""The combinations the multi-rank tests sweep (shared by the 2- and 4-rank tests)."""
from moesys.parallel import DISPATCHERS

DEGREES = (1, 2, 4, 8)
# sharded_dp keeps tokens local, so the dispatcher does not matter there: sweep it once
COMBOS = [(d, "ep", c) for d in DISPATCHERS for c in DEGREES] + [("alltoallv", "sharded_dp", c) for c in DEGREES]


def cases(world: int) -> list:
    """(MoEConfig kwargs, token rule, unused-expert flag)."""
    small = dict(hidden_size=8, ffn_hidden_size=8)
    out = [
        (dict(small, num_experts=4, top_k=2), "uneven", False),  # dropless, uneven T per rank
        (dict(small, num_experts=4, top_k=2, capacity_factor=1.0, min_capacity=1), "uneven", False),  # drops
        (dict(small, num_experts=4, top_k=1, activation="swiglu"), "even", True),  # an unused expert
        (dict(small, num_experts=4, top_k=2), "zero", False),  # a rank with no tokens
        (dict(small, num_experts=world // 2, top_k=1), "uneven", False),  # E < P: F-sharded experts
        (dict(small, num_experts=4, top_k=2, router="dts"), "uneven", False),  # variable K (N > T*K possible)
        # kernel_backend=grouped_mm: the reference (one process) takes the sync-free path; under EP the
        # runner keeps the host plan and runs its local experts on torch._grouped_mm (whole or F-sliced)
        (dict(small, num_experts=4, top_k=2, capacity_factor=1.0, min_capacity=1, kernel_backend="grouped_mm"),
         "uneven", False),
        (dict(small, num_experts=max(world // 2, 1), top_k=1, kernel_backend="grouped_mm"), "uneven", False),
    ]
    if world == 4:
        out.append((dict(small, num_experts=8, top_k=2, capacity_factor=2.0), "uneven", False))  # L = 2, ample
    return out
