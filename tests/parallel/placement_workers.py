"""Rank-side bodies of tests/parallel/test_placement.py (module-level: the pool's ranks unpickle them)."""
from __future__ import annotations

import copy
import math
import os
import sys
import warnings

import numpy as np
import torch
import torch.distributed as dist

from moesys import MoEConfig, MoELayer
from moesys.parallel import ParallelDims, allreduce_gradients, apply_expert_parallel, apply_fsdp
from moesys.parallel.placement import Placement, apply_placement
from moesys.parallel.placement_control import PlacementController, PlacementSettings
from moesys.parallel.tuner import Machine
from moesys.train import build_callbacks

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "moesys"))
from moe_reference import ffn, reference_routes  # noqa: E402

E, D, F, T = 8, 16, 12, 37  # 37 tokens per rank: the rows per expert are uneven
HOT, COLD = 3, 6
REF_RTOL, REF_ATOL = 1e-5, 1e-6  # against the per-token loop (static_drop_worker)  # the router bias sends ~40% of routes to HOT and none to COLD


def skewed_layer(seed: int = 0, activation: str = "swiglu", num_experts: int = E, ffn: int = F) -> MoELayer:
    """The same layer on every rank (seeded); a sigmoid_bias router whose selection bias makes HOT hot
    and COLD (the last expert when there are fewer) empty (the bias only selects: the combine weights
    and gradients are the scores')."""
    torch.manual_seed(seed)
    cfg = MoEConfig(hidden_size=D, ffn_hidden_size=ffn, num_experts=num_experts, top_k=2, router="sigmoid_bias",
                    activation=activation, capacity_factor=None, aux_loss="none", bias_update_rate=0.0)
    layer = MoELayer(cfg, balance_group="local")
    with torch.no_grad():
        layer.router.expert_bias[HOT] = 0.7
        layer.router.expert_bias[min(COLD, num_experts - 1)] = -100.0
    return layer


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def canonical(w: torch.Tensor, placement: Placement) -> np.ndarray:
    """The full [E, ...] tensor of a slot-ordered DTensor expert weight (or grad), in expert order."""
    return _full(w).detach()[torch.tensor(placement.position())].numpy().copy()


def _random_placement(gen: torch.Generator, world: int, replicas: int, num_experts: int = E) -> Placement:
    """A random permutation, and `replicas` random replica slots a rank (of experts it does not hold)."""
    slots = tuple(torch.randperm(num_experts, generator=gen).tolist())
    L = num_experts // world
    reps = []
    for r in range(world):
        others = [e for e in torch.randperm(num_experts, generator=gen).tolist() if e not in slots[r * L:(r + 1) * L]]
        reps += sorted(others[:replicas])
    return Placement(slots, tuple(reps))


def _snapshot(layer, x, y, placement) -> dict:
    out = {"y": y.detach().numpy().copy(), "x.grad": x.grad.numpy().copy(),
           "router.grad": _full(layer.router.weight.grad).numpy().copy(),
           "router.weight": _full(layer.router.weight).detach().numpy().copy()}
    for name in ("w1", "w2", "w3"):
        w = getattr(layer.experts, name)
        out[f"{name}.grad"] = canonical(w.grad, placement)
        out[f"{name}"] = canonical(w, placement)
    return out


def equivalence_worker(ep: int, steps: int, mode: str, overlap: int, forced: bool, replicas: int = 0,
                       static: float | None = None, dispatcher: str = "padded", fsdp: bool = False,
                       num_experts: int = E, ffn: int = F, reshard: bool = True) -> dict:
    """`steps` AdamW steps of one skewed layer twice, unplaced and placed, on the same tokens.
    forced: a new random placement (the same on every rank: a seeded generator) after every step;
    else the PlacementController (policy auto, interval 1) decides. static: the padded dispatchers'
    static buffer of that factor (`dispatcher`: padded or hierarchical_padded). fsdp: both layers
    under FSDP2 (apply_fsdp: the experts a unit over edp, the layer the root over dp); reshard=False:
    FSDP2 keeps the gathered weights after a forward, and an evaluation forward comes after each
    step, before the move (its gathered weights must not outlive the move). Returns per step, for
    both runs: outputs, input/router/expert gradients and the weights after the step (experts in
    expert order), and (static) the rows each run's buffer dropped."""
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module")  # the layer, as root, returns a view
    dims = ParallelDims.build(ep=ep, timeout_s=60)
    ref = skewed_layer(num_experts=num_experts, ffn=ffn)
    placed = copy.deepcopy(ref)
    ep_opts = {} if static is None else {"dispatcher": dispatcher, "static_capacity_factor": static}
    for layer in (ref, placed):
        apply_expert_parallel(layer, dims.ep_group, dims=dims, mode=mode, overlap=overlap, **ep_opts)
        if fsdp:
            apply_fsdp(layer, dims, blocks=[], reshard_after_forward=reshard)
    opts = [torch.optim.AdamW(layer.parameters(), lr=1e-2) for layer in (ref, placed)]
    ctl = None if forced else PlacementController(PlacementSettings(policy="auto", interval=1, min_gain=0.0,
                                                                    replicas=replicas,
                                                                    payback_steps=10**6),
                                                  [placed])
    if ctl is not None and replicas:
        # the gate on a machine whose compute is slow and communication free (the same on every rank): a
        # replica's weight fetch is then cheaper than the rows it takes off the busiest rank
        placed.runner.tuner.machine = Machine(bandwidth=1e15, latency=0.0, flops=1e6)
    gen = torch.Generator().manual_seed(1234)
    runs: dict = {"ref": [], "placed": []}
    placements, decisions, routes_hot = [], [], []
    rank = dist.get_rank()
    for step in range(steps):
        torch.manual_seed(100 * step + rank)
        x0 = torch.randn(T, D)
        g = torch.randn(T, D)
        for key, layer, opt in (("ref", ref, opts[0]), ("placed", placed, opts[1])):
            x = x0.clone().requires_grad_(True)
            y, aux = layer(x)
            ((y * g).sum() + aux.loss).backward()
            if not fsdp:  # FSDP2 reduce-scattered them in the backward
                allreduce_gradients(layer, dims)
            p = layer.runner.placement
            runs[key].append(_snapshot(layer, x, y, p))
            if static is not None:
                runs[key][-1]["dropped"] = float(layer.runner.last_metrics["overflow_dropped"])
            if key == "placed":
                routes_hot.append(float(aux.tokens_per_expert[HOT]) / float(aux.tokens_per_expert.sum()))
            opt.step()
            if not reshard:
                with torch.no_grad():
                    layer(x0)
            if key == "ref":
                opt.zero_grad(set_to_none=True)
                continue
            if forced:
                apply_placement(layer, _random_placement(gen, ep, replicas, num_experts), opt)
            opt.zero_grad(set_to_none=True)
            if ctl is not None:
                d = ctl.after_step(step, opt)
                decisions.append([(x.moved, x.slots, x.replicas, round(x.imbalance_before, 9),
                                   round(x.imbalance_after, 9)) for x in d])
            placements.append((layer.runner.placement.slots, layer.runner.placement.replicas))
            runs[key][-1]["after"] = {n: canonical(getattr(layer.experts, n), layer.runner.placement)
                                      for n in ("w1", "w2", "w3")}
        runs["ref"][-1]["after"] = {n: canonical(getattr(ref.experts, n), ref.runner.placement)
                                    for n in ("w1", "w2", "w3")}
    return {"runs": runs, "placements": placements, "decisions": decisions, "hot_share": routes_hot,
            "moves": placed.runner.placement_moves,
            "shard": (str(placed.experts.w1.placements), tuple(placed.experts.w1.to_local().shape)),
            "metrics": dict(placed.runner.placement_report),  # what the next forward's runtime/ metrics carry
            "forward_metrics": sorted(k for k in placed.runner.last_metrics if k.startswith("placement"))}


def _canonical_params(tr) -> dict:
    """Every parameter as a full tensor, the experts in expert order (whatever the placement)."""
    placements = {}
    for name, m in tr.model.named_modules():
        if hasattr(m, "runner") and hasattr(m.runner, "placement"):
            placements[f"{name}.experts."] = m.runner.placement
    out = {}
    for n, p in tr.model.named_parameters():
        pre = next((k for k in placements if n.startswith(k)), None)
        if pre is not None:
            out[n] = canonical(p, placements[pre])
        else:
            out[n] = (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().numpy().copy()
    return out


def trainer_worker(cfg_auto, cfg_off, root: str, steps: int, force_after: int | None = None) -> dict:
    """The Trainer with parallel.placement=auto (every re-placement the balancer proposes is taken:
    min_gain 0) and with placement=off, `steps` steps each; then both save a checkpoint (the placed one
    while placed) and take one more step. Returns per step both runs' losses and canonical parameters.
    force_after: after that step, every layer of the placed run is moved to the reversed placement."""
    from train_helpers import build_trainer

    def build(cfg, out_dir):
        tr = build_trainer(cfg, out_dir)
        tr.callbacks = build_callbacks(cfg)  # EvoMoE's schedule (evo.enabled), as moesys-train runs it
        for cb in tr.callbacks:
            cb.on_train_start(tr)
        return tr

    auto = build(cfg_auto, f"{root}/auto")
    auto.placement.settings.min_gain = 0.0  # the same on every rank: take every balancing move
    if cfg_auto.parallel.placement_replicas:  # a machine where replicas pay (as in equivalence_worker)
        for layer in auto.placement.layers:
            layer.runner.tuner.machine = Machine(bandwidth=1e15, latency=0.0, flops=1e6)
    off = build(cfg_off, f"{root}/off")
    assert off.placement is None
    out = {"auto": [], "off": [], "slots": [], "metrics": []}
    saved = {}
    for s in range(steps + 1):
        if s == steps:
            saved = {"auto": auto.save(), "off": off.save(), "slots_at_save": auto.placement.layers[0].runner.placement.slots}
        for key, tr in (("auto", auto), ("off", off)):
            m = tr.train_step()
            if key == "auto":
                auto_metrics = m
            out[key].append({"loss": m["loss"], "params": _canonical_params(tr)})
        if s == force_after:
            for layer in auto.placement.layers:
                apply_placement(layer, Placement(tuple(reversed(range(E)))), auto.optimizer)
        out["slots"].append([layer.runner.placement.slots for layer in auto.placement.layers])
        out["metrics"].append({k: v for k, v in auto_metrics.items() if "placement" in k})
    out["saved"] = saved
    out["phase"] = [int(layer.phase) for layer in auto.placement.layers if hasattr(layer, "phase")]  # EvoMoE's
    out["moves"] = [layer.runner.placement_moves for layer in auto.placement.layers]
    out["replicas"] = [layer.runner.placement.replicas for layer in auto.placement.layers]
    return out


def _per_token_static(x_TD, cfg, p: dict, bias, holders: list, C: int):
    """The documented rule of a static buffer under a placement, per token: each expert e keeps the
    first holders[e] * C of this source rank's routes to it, in token order (the rows past them are
    dropped: they add nothing to the output). p: the layer's parameters in expert order."""
    used = [0] * cfg.num_experts
    rows = [x_TD.new_zeros(cfg.hidden_size) for _ in range(x_TD.shape[0])]
    dropped = 0
    for t, e, w, _ in sorted(reference_routes(x_TD, cfg, p["router.weight"], bias), key=lambda r: (r[0], r[3])):
        used[e] += 1
        if used[e] > holders[e] * C:
            dropped += 1
            continue
        rows[t] = rows[t] + w * ffn(x_TD[t], cfg, p["experts.w1"], p["experts.w2"], p["experts.w3"], e)
    need = max(math.ceil(n / h) for n, h in zip(used, holders)) * cfg.num_experts / (x_TD.shape[0] * cfg.top_k)
    return torch.stack(rows), dropped, need


def static_drop_worker(ep: int, steps: int, mode: str, overlap: int, replicas: int, factor: float) -> dict:
    """One skewed layer with a small static buffer (rows drop) under a new random placement (with
    `replicas` replica slots a rank) every step, against a per-token loop of the documented rule
    (`_per_token_static`, over every rank's tokens in one process, AdamW on plain tensors). Returns,
    per step, the largest relative errors of the outputs, the input, router and expert gradients,
    the weights after the step, and (dropped rows, factor needed) of both."""
    dims = ParallelDims.build(ep=ep, timeout_s=60)
    base = skewed_layer()
    cfg = base.cfg
    placed = copy.deepcopy(base)
    apply_expert_parallel(placed, dims.ep_group, dims=dims, mode=mode, overlap=overlap, dispatcher="padded",
                          static_capacity_factor=factor)
    opt = torch.optim.AdamW(placed.parameters(), lr=1e-2)
    ref = {n: p.detach().clone().requires_grad_(True) for n, p in base.named_parameters()}
    ref_opt = torch.optim.AdamW(list(ref.values()), lr=1e-2)
    bias = base.router.expert_bias.detach().clone()
    W, rank = dist.get_world_size(), dist.get_rank()
    C = max(1, math.ceil(factor * T * cfg.top_k / E))
    gen = torch.Generator().manual_seed(1234)
    apply_placement(placed, _random_placement(gen, ep, replicas), opt)

    def err(got, want):
        """max |got - want| / (ATOL + RTOL |want|): <= 1 passes (the loop sums in another order)."""
        got, want = np.asarray(got, dtype=np.float64), want.detach().numpy().astype(np.float64)
        return float(np.max(np.abs(got - want) / (REF_ATOL + REF_RTOL * np.abs(want))))

    out = []
    for step in range(steps):
        placement = placed.runner.placement
        holders = [len(h) for h in placement.holders(ep)]
        xs = [torch.randn(T, D, generator=torch.Generator().manual_seed(100 * step + r)) for r in range(W)]
        gs = [torch.randn(T, D, generator=torch.Generator().manual_seed(100 * step + r + 50)) for r in range(W)]
        x = xs[rank].clone().requires_grad_(True)
        y, aux = placed(x)
        ((y * gs[rank]).sum() + aux.loss).backward()
        allreduce_gradients(placed, dims)
        got_drop = float(placed.runner.last_metrics["overflow_dropped"])
        got_need = float(placed.runner.last_metrics["static_factor_needed"])
        loss, mine = 0.0, None
        for r in range(W):  # every source rank's tokens: each drops alone (a buffer per source rank)
            xr = xs[r].clone().requires_grad_(True)
            yr, dropped, need = _per_token_static(xr, cfg, ref, bias, holders, C)
            loss = loss + (yr * gs[r]).sum()
            if r == rank:
                mine = (xr, yr, dropped, need)
        loss.backward()
        for p in ref.values():
            p.grad.div_(W)  # the gradient of the mean loss over the dp ranks (allreduce_gradients)
        xr, yr, want_drop, want_need = mine
        e = {"y": err(y.detach(), yr), "x.grad": err(x.grad, xr.grad),
             "router.grad": err(placed.router.weight.grad, ref["router.weight"].grad)}
        for n in ("w1", "w2", "w3"):
            e[f"{n}.grad"] = err(canonical(getattr(placed.experts, n).grad, placement), ref[f"experts.{n}"].grad)
        opt.step()
        ref_opt.step()
        for n in ("w1", "w2", "w3"):
            e[f"{n}.after"] = err(canonical(getattr(placed.experts, n), placement), ref[f"experts.{n}"])
        e["router.after"] = err(placed.router.weight.detach(), ref["router.weight"])
        out.append({"errors": e, "dropped": (got_drop, want_drop), "needed": (got_need, want_need),
                    "holders": holders})
        apply_placement(placed, _random_placement(gen, ep, replicas), opt)
        opt.zero_grad(set_to_none=True)
        ref_opt.zero_grad(set_to_none=True)
    return {"steps": out}


def rerun_worker(runs, root: str, forced: Placement) -> dict:
    """runs: [(name, TrainConfig, place)] trained one after the other (moesys' Trainer.fit); `place`:
    every MoE layer is moved to `forced` (permutation and replicas) before the first step. Returns per
    run the losses, the overflow events, the final factor and the parameters in expert order."""
    from moesys.trainer import Trainer

    out = {}
    dims = None
    for name, cfg, place in runs:
        if dims is None:
            dims = ParallelDims.build(ep=cfg.parallel.ep, tp=1, timeout_s=60, num_experts=cfg.moe.num_experts)
        tr = Trainer(cfg, dims=dims, out_dir=os.path.join(root, name))
        if place:
            for layer in tr.placement.layers:
                apply_placement(layer, forced, tr.optimizer)
        summary = tr.fit(None)
        out[name] = {"losses": summary["train_losses"], "events": list(tr.history.get("overflow_events", [])),
                     "factor": tr.static_capacity_factor, "params": _canonical_params(tr),
                     "placements": [layer.runner.placement for layer in tr.placement.layers] if place else [],
                     # the rows the placement decisions would see (a re-run step counts once)
                     "loads": [layer.runner.take_load().tolist() for layer in tr.placement.layers]
                     if tr.placement is not None else []}
        dist.barrier()
    return out
