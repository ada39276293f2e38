"""`plan`: for each EP size, the predicted time of every mode x dispatcher x overlap degree, the
runtime's choice, per-rank memory, and the step time; the Python side of `moesys-plan`.

    from moesys.planner import plan, load_hardware, workload_from_config
    result = plan(workload_from_config(train_cfg), load_hardware("a100_dgx", "bf16"), world=256)
    result.recommended.ep, result.recommended.best.key, result.recommended.step_best.total

Per EP size (ep ranks per expert-parallel group, edp = world / ep replicas):
  * routing statistics from the tokens per rank, mean experts per token and the skew (hottest expert
    / mean load; a capacity factor caps it): cost_model.expected_stats;
  * every candidate priced by cost_model.layer_time (the live tuner's model);
  * the runtime's choice: what the tuner ranks first for the config's dispatcher (and its pins:
    parallel.mode / parallel.overlap); it then times its top few and keeps the fastest measured;
  * the best candidate over every dispatcher whose memory fits (the recommendation; the runtime
    uses the dispatcher the config names, so switching it is parallel.dispatcher=...; recommended
    only when predicted >= 5% faster than the runtime's choice, less is within the model's error);
  * the static baseline: ep mode, flat all-to-all-v, no overlap (c = 1);
  * the step: grad_accum micro-steps of (n_moe x the layer + the dense part: 6 x GEMM params x tokens
    + causal attention 6 t s d a layer) plus the gradient reduction's exposed part (dense over dp,
    experts over edp). The plain engine with parallel.grad_overlap launches bucketed reductions
    during the last micro-step's backward: only what outlasts that backward's compute shows, and at
    least the last bucket's reduction, times the hardware's overlap (exposed_grad_sync); otherwise all of it (flat, after the
    backward; fsdp's and deepspeed's reductions are priced unhidden too).
A layout fits when its estimated memory (memory.py) is within 90% of the device memory.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Union

from moesys.parallel.cost_model import (
    DEGREES,
    DISPATCHERS,
    MODES,
    PADDED,
    Breakdown,
    Stats,
    candidates,
    expected_stats,
    rank,
)
from moesys.parallel.cost_network import Hardware, allreduce

from . import memory as mem
from .workload import PlanError, Workload, check_ep, ep_sizes

FIT_FRACTION = 0.9  # of device memory: CUDA context, allocator slack
SWITCH_MARGIN = 0.05  # recommend another dispatcher than the config's only when it is predicted this much faster


@dataclass(frozen=True)
class StepTime:
    moe: float  # the MoE layers, every micro-step
    dense: float  # attention, dense FFNs, head, every micro-step
    grad_sync: float  # gradient reduction once per step: the exposed part (all of it without overlap)
    grad_sync_full: float = 0.0  # the whole reduction, hidden or not

    @property
    def total(self) -> float:
        return self.moe + self.dense + self.grad_sync


@dataclass(frozen=True)
class EPPlan:
    ep: int
    edp: int
    stats: Stats
    ranked: tuple  # every candidate's Breakdown, fastest first
    runtime: Breakdown  # the tuner's first choice for the config's dispatcher and pins
    best: Breakdown  # fastest over every dispatcher among the modes whose memory fits
    baseline: Breakdown  # ep, alltoallv, c = 1
    memory: dict  # mode -> memory.Memory
    fits: dict  # mode -> bool
    step_runtime: StepTime
    step_best: StepTime
    step_baseline: StepTime

    def speedup(self, which: str = "best", per: str = "layer") -> float:
        """Predicted speedup of `which` ("best" | "runtime") over the static baseline."""
        chosen = getattr(self, which)
        if per == "layer":
            return self.baseline.total / chosen.total
        return self.step_baseline.total / getattr(self, f"step_{which}").total


@dataclass(frozen=True)
class PlanResult:
    workload: Workload
    hardware: Hardware
    world: int
    plans: tuple  # EPPlan per EP size
    recommended: Optional[EPPlan]  # the fastest step among layouts that fit (None: nothing fits)


def dense_seconds(wl: Workload, world: int, hw: Hardware) -> float:
    """Forward + backward of everything but the MoE layers, one micro-step, one rank."""
    t = wl.tokens_per_rank(world)
    flops = 6 * t * wl.dense_matmul_params + 6 * t * wl.seq_len * wl.d_model * wl.n_layers
    return hw.gemm_seconds(flops, t)


def grad_sync_seconds(wl: Workload, world: int, ep: int, hw: Hardware) -> float:
    """All-reduce of the dense gradients over dp = world and of the expert gradients over edp.
    fsdp: an all-gather of the weights in the forward and again in the backward, and a
    reduce-scatter of the gradients, each moving (n-1)/n of the bytes where the all-reduce moves
    2 (n-1)/n: 1.5x the all-reduce's time (not overlapped here, as the rest)."""
    g = 2 if (wl.engine == "deepspeed" and wl.precision == "bf16") else 4
    dense = allreduce(wl.dense_params * g, world, hw)
    # an edp group takes one rank of each ep group: gpus_per_node / ep of them share a node
    edp_hw = hw.with_(gpus_per_node=max(1, hw.gpus_per_node // ep))
    experts = allreduce(wl.n_moe_layers * wl.expert_params_per_layer / ep * g, world // ep, edp_hw)
    return (dense + experts) * (1.5 if wl.engine == "fsdp" else 1.0)


def last_bucket_seconds(wl: Workload, world: int, ep: int, hw: Hardware) -> float:
    """The reduction that cannot hide: each group's last bucket (at most parallel.grad_bucket_mb; the
    dense one holds the embeddings, ready when the backward ends), the slower of the two groups."""
    g, cap = 4, wl.grad_bucket_mb * 1024 ** 2  # the plain engine reduces fp32 gradients
    edp_hw = hw.with_(gpus_per_node=max(1, hw.gpus_per_node // ep))
    experts = wl.n_moe_layers * wl.expert_params_per_layer / ep * g
    return max(allreduce(min(cap, wl.dense_params * g), world, hw), allreduce(min(cap, experts), world // ep, edp_hw))


def exposed_grad_sync(sync: float, backward: float, tail: float, overlap: float = 1.0) -> float:
    """Exposed seconds of a reduction of `sync` seconds launched bucket by bucket during a backward of
    `backward` seconds of compute: the reductions run behind it, all but the last bucket (`tail`
    seconds, launched when the backward ends) and whatever outlasts the backward; `overlap` (the
    Hardware's, as in cost_network.pipelined) is the fraction of that the machine really hides.
    With overlap 1: max(tail, sync - backward)."""
    return sync - overlap * max(0.0, min(backward, sync - min(tail, sync)))


def _step(wl: Workload, layer: Breakdown, dense: float, sync: float, tail: float, overlap: float) -> StepTime:
    exposed = sync
    if wl.grad_overlap and wl.engine == "plain":
        # the last micro-step's backward compute: 2/3 of fwd+bwd (dense part, expert GEMMs, routing)
        backward = 2 / 3 * (dense + wl.n_moe_layers * (layer.compute + layer.local))
        exposed = exposed_grad_sync(sync, backward, tail, overlap)
    return StepTime(moe=wl.grad_accum * wl.n_moe_layers * layer.total, dense=wl.grad_accum * dense, grad_sync=exposed,
                    grad_sync_full=sync)


def plan_ep(wl: Workload, hw: Hardware, world: int, ep: int, dispatchers: Sequence[str] = DISPATCHERS,
            degrees: Sequence[int] = DEGREES) -> EPPlan:
    check_ep(wl, world, ep)
    shape = wl.shape(ep)
    T = round(wl.tokens_per_rank(world))
    stats = expected_stats(T, shape, wl.active_k, wl.skew, wl.moe.capacity_factor)
    capacity = wl.moe.capacity(T)
    disp = tuple(dict.fromkeys([*dispatchers, wl.dispatcher, "alltoallv"]))
    ranked = tuple(rank(stats, shape, hw, candidates(disp, MODES, tuple(dict.fromkeys([*degrees, 1]))), capacity))
    rows = {"ep": stats.max_rank_rows, "sharded_dp": stats.max_local_rows}
    if wl.dispatcher in PADDED and capacity is not None:
        rows["ep"] = max(1, wl.moe.num_experts // ep) * ep * capacity
    memory = {m: mem.estimate(wl, world, ep, stats, m, rows[m]) for m in MODES}
    fits = {m: memory[m].total <= FIT_FRACTION * hw.memory_bytes for m in MODES}

    def allowed_runtime(b: Breakdown) -> bool:
        return ((b.mode == "sharded_dp" or b.dispatcher == wl.dispatcher) and (wl.mode in (None, b.mode))
                and (wl.overlap in (None, b.degree)) and b.degree in degrees)

    runtime = next(b for b in ranked if allowed_runtime(b))
    in_scope = [b for b in ranked if b.degree in degrees and (b.mode == "sharded_dp" or b.dispatcher in dispatchers)]
    best = next((b for b in in_scope if fits[b.mode]), in_scope[0])
    if fits[runtime.mode] and runtime.total <= (1 + SWITCH_MARGIN) * best.total:
        best = runtime  # within the model's accuracy: keep the configured dispatcher
    baseline = next(b for b in ranked if b.key == ("ep", "alltoallv", 1))
    dense, sync = dense_seconds(wl, world, hw), grad_sync_seconds(wl, world, ep, hw)
    tail = last_bucket_seconds(wl, world, ep, hw)
    return EPPlan(ep=ep, edp=world // ep, stats=stats, ranked=ranked, runtime=runtime, best=best, baseline=baseline,
                  memory=memory, fits=fits, step_runtime=_step(wl, runtime, dense, sync, tail, hw.overlap),
                  step_best=_step(wl, best, dense, sync, tail, hw.overlap),
                  step_baseline=_step(wl, baseline, dense, sync, tail, hw.overlap))


def plan(wl: Workload, hw: Union[Hardware, Callable[[int], Hardware]], world: int, eps: Optional[Sequence[int]] = None,
         dispatchers: Sequence[str] = DISPATCHERS, degrees: Sequence[int] = DEGREES,
         require_fit: bool = True) -> PlanResult:
    """Plan `wl` on `world` devices of `hw` (or of `hw(ep)`: this machine is probed per EP size);
    eps: the EP sizes to price (default every valid one).

    Raises PlanError naming the field and value: an EP size that does not divide E or the world, a
    batch that does not split over the world, or (require_fit) no layout whose memory fits."""
    if world < 1:
        raise PlanError(f"--gpus must be >= 1, got {world}")
    for d in dispatchers:
        if d not in DISPATCHERS:
            raise PlanError(f"--dispatchers: {d!r} is not one of {', '.join(DISPATCHERS)}")
    for c in degrees:
        if c not in DEGREES:
            raise PlanError(f"--degrees: {c} is not one of {', '.join(map(str, DEGREES))}")
    sizes = list(eps) if eps else ep_sizes(wl, world)
    if not sizes:
        raise PlanError(f"no EP size lays out moe.num_experts ({wl.moe.num_experts}) on {world} GPUs")
    for ep in sizes:
        check_ep(wl, world, ep)
    hw_of = hw if callable(hw) else (lambda ep: hw)
    plans = tuple(plan_ep(wl, hw_of(ep), world, ep, dispatchers, degrees) for ep in sizes)
    fitting = [p for p in plans if p.fits[p.best.mode]]
    recommended = min(fitting, key=lambda p: (p.step_best.total, p.ep)) if fitting else None
    if recommended is None and require_fit:
        smallest = min(plans, key=lambda p: min(m.total for m in p.memory.values()))
        mode = min(smallest.memory, key=lambda m: smallest.memory[m].total)
        raise PlanError(
            f"no layout fits in {hw.memory_bytes / 1024 ** 3:.0f} GiB per GPU ({FIT_FRACTION:.0%} usable): the smallest, "
            f"parallel.ep={smallest.ep} in {mode} mode, needs {smallest.memory[mode].gib()}; lower trainer.batch_size, "
            f"raise trainer.grad_accum or use more GPUs")
    shown = hw_of((recommended or plans[0]).ep)
    return PlanResult(workload=wl, hardware=shown, world=world, plans=plans, recommended=recommended)
