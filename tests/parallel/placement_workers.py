"""Rank-side bodies of tests/parallel/test_placement.py (module-level: the pool's ranks unpickle them)."""
from __future__ import annotations

import copy

import numpy as np
import torch
import torch.distributed as dist

from moesys import MoEConfig, MoELayer
from moesys.parallel import ParallelDims, allreduce_gradients, apply_expert_parallel
from moesys.parallel.placement import Placement, apply_placement
from moesys.parallel.placement_control import PlacementController, PlacementSettings
from moesys.parallel.tuner import Machine
from moesys.train import build_callbacks

E, D, F, T = 8, 16, 12, 37  # 37 tokens per rank: the rows per expert are uneven
HOT, COLD = 3, 6  # the router bias sends ~40% of routes to HOT and none to COLD


def skewed_layer(seed: int = 0, activation: str = "swiglu") -> MoELayer:
    """The same layer on every rank (seeded); a sigmoid_bias router whose selection bias makes HOT hot
    and COLD empty (the bias only selects: the combine weights and gradients are the scores')."""
    torch.manual_seed(seed)
    cfg = MoEConfig(hidden_size=D, ffn_hidden_size=F, num_experts=E, top_k=2, router="sigmoid_bias",
                    activation=activation, capacity_factor=None, aux_loss="none", bias_update_rate=0.0)
    layer = MoELayer(cfg, balance_group="local")
    with torch.no_grad():
        layer.router.expert_bias[HOT] = 0.7
        layer.router.expert_bias[COLD] = -100.0
    return layer


def canonical(w: torch.Tensor, placement: Placement) -> np.ndarray:
    """The full [E, ...] tensor of a slot-ordered DTensor expert weight (or grad), in expert order."""
    full = w.full_tensor() if hasattr(w, "full_tensor") else w
    return full.detach()[torch.tensor(placement.position())].numpy().copy()


def _random_placement(gen: torch.Generator, world: int, replicas: int) -> Placement:
    """A random permutation, and `replicas` random replica slots a rank (of experts it does not hold)."""
    slots = tuple(torch.randperm(E, generator=gen).tolist())
    L = E // world
    reps = []
    for r in range(world):
        others = [e for e in torch.randperm(E, generator=gen).tolist() if e not in slots[r * L:(r + 1) * L]]
        reps += sorted(others[:replicas])
    return Placement(slots, tuple(reps))


def _snapshot(layer, x, y, placement) -> dict:
    out = {"y": y.detach().numpy().copy(), "x.grad": x.grad.numpy().copy(),
           "router.grad": layer.router.weight.grad.numpy().copy(),
           "router.weight": layer.router.weight.detach().numpy().copy()}
    for name in ("w1", "w2", "w3"):
        w = getattr(layer.experts, name)
        out[f"{name}.grad"] = canonical(w.grad, placement)
        out[f"{name}"] = canonical(w, placement)
    return out


def equivalence_worker(ep: int, steps: int, mode: str, overlap: int, forced: bool, replicas: int = 0) -> dict:
    """`steps` AdamW steps of one skewed layer twice, unplaced and placed, on the same tokens.
    forced: a new random placement (the same on every rank: a seeded generator) after every step;
    else the PlacementController (policy auto, interval 1) decides. Returns per step, for both runs:
    outputs, input/router/expert gradients and the weights after the step (experts in expert order)."""
    dims = ParallelDims.build(ep=ep, timeout_s=60)
    ref = skewed_layer()
    placed = copy.deepcopy(ref)
    for layer in (ref, placed):
        apply_expert_parallel(layer, dims.ep_group, dims=dims, mode=mode, overlap=overlap)
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
            allreduce_gradients(layer, dims)
            p = layer.runner.placement
            runs[key].append(_snapshot(layer, x, y, p))
            if key == "placed":
                routes_hot.append(float(aux.tokens_per_expert[HOT]) / float(aux.tokens_per_expert.sum()))
            opt.step()
            if key == "ref":
                opt.zero_grad(set_to_none=True)
                continue
            if forced:
                apply_placement(layer, _random_placement(gen, ep, replicas), opt)
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
