"""Per-rank memory of a moesys-train job: parameters, gradients, optimizer state, activations.

An estimate for sizing (no allocator fragmentation, no workspace beyond what is listed; not yet
checked against a measured GPU peak). Engines (trainer.engine):
    plain       AdamW on every rank's parameters: fp32 weights (4 B), fp32 grads (4 B), two fp32
                moments (8 B); bf16 is autocast (weights stay fp32)
    fsdp        FSDP2 (ZeRO-3): weights, grads and moments all sharded, dense over dp = world, experts
                over edp on top of ep (each rank holds 1/world of every tensor), plus one gathered
                block's weights at a time (the largest unit: a block's dense weights and its local
                experts, in trainer.fsdp_param_dtype); benchmarks/memory.py measures 1.00x of the
                sharded part on CPU
    deepspeed   ZeRO-1: optimizer state (moments, and the fp32 master copy when weights are bf16)
                split over the data-parallel ranks (dense: dp = world, experts: edp = world / ep);
                ZeRO-2 also splits the gradients
Activations of one micro-step (trainer.grad_accum splits the batch), b = 2 under bf16 else 4:
    attention block   ~7 t d b  (ln1 in/out, q k v, attention out, proj in; flash attention: no s^2)
    dense FFN         t (d + 2 F) b
    MoE layer         router logits and probs 8 t E (fp32), permuted rows, expert intermediates
                      (G + 1) F per row and outputs, on the rows this rank computes (ep: R, the
                      busiest rank's; sharded_dp: its own N), plus received rows in ep mode
    sharded_dp        every MoE layer's gathered expert weights stay saved for the backward:
                      n_moe * E * G * D * F * b  (why sharded_dp can be the fastest and not fit)
    output            logits t V (fp32) and their gradient
"""
from __future__ import annotations

from dataclasses import dataclass

from moesys.parallel.cost_model import Stats

from .workload import Workload

GIB = 1024 ** 3


@dataclass(frozen=True)
class Memory:
    params: float  # bytes per rank
    grads: float
    optimizer: float
    activations: float

    @property
    def total(self) -> float:
        return self.params + self.grads + self.optimizer + self.activations

    def gib(self) -> str:
        """The four parts and the total, in GiB (MiB for a job under 1 GiB a rank)."""
        scale, unit = (GIB, "GiB") if self.total >= GIB else (1024 ** 2, "MiB")
        return (f"params {self.params / scale:.1f} + grads {self.grads / scale:.1f} + optimizer "
                f"{self.optimizer / scale:.1f} + activations {self.activations / scale:.1f} = "
                f"{self.total / scale:.1f} {unit}")


def model_state(wl: Workload, world: int, ep: int) -> tuple:
    """(params, grads, optimizer) bytes per rank."""
    experts = wl.n_moe_layers * wl.expert_params_per_layer / ep  # E/ep whole experts, or one F-slice of 1/ep
    dense = float(wl.dense_params)
    dp, edp = world, world // ep
    if wl.engine == "fsdp":
        sharded = dense / dp + experts / edp
        per_block = dense / max(wl.n_layers, 1) + experts / max(wl.n_moe_layers, 1)
        gathered = (2 if wl.fsdp_param_dtype == "bf16" else 4) * per_block
        return 4 * sharded + gathered, 4 * sharded, 8 * sharded
    if wl.engine != "deepspeed":
        n = dense + experts
        return 4 * n, 4 * n, 8 * n
    w = 2 if wl.precision == "bf16" else 4  # ZeRO keeps bf16 weights and an fp32 master copy
    state = 8 + (4 if w == 2 else 0)
    opt = state * (dense / dp + experts / edp)
    grads = w * (dense / dp + experts / edp) if wl.zero_stage >= 2 else w * (dense + experts)
    return w * (dense + experts), grads, opt


def activations(wl: Workload, world: int, ep: int, stats: Stats, mode: str, rows_computed: float) -> float:
    """Bytes of one micro-step's saved activations on the busiest rank."""
    b = 2 if wl.precision == "bf16" else 4
    t = wl.tokens_per_rank(world)
    d, F, E, G = wl.d_model, wl.moe.ffn_hidden_size, wl.moe.num_experts, wl.matrices
    S = max(1, ep // E)
    n_dense_ffn = wl.n_layers - wl.n_moe_layers
    attn = wl.n_layers * 7 * t * d * b
    dense_ffn = n_dense_ffn * t * (d + 2 * F) * b
    n_local = stats.max_local_rows
    if mode == "ep":
        rows, f = rows_computed, F / S
        moved = rows * d * b  # received rows (and their outputs before the combine)
    else:
        rows, f = n_local, F
        moved = 0.0
    per_moe = 8 * t * E + 2 * t * d * b + 2 * n_local * d * b + rows * ((G + 1) * f + d) * b + moved
    moe = wl.n_moe_layers * per_moe
    if mode == "sharded_dp":
        moe += wl.n_moe_layers * E * G * d * F * b
    head = 2 * t * wl.vocab * 4
    return attn + dense_ffn + moe + head


def estimate(wl: Workload, world: int, ep: int, stats: Stats, mode: str, rows_computed: float) -> Memory:
    params, grads, opt = model_state(wl, world, ep)
    return Memory(params, grads, opt, activations(wl, world, ep, stats, mode, rows_computed))
