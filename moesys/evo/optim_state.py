"""Optimizer state of the experts and router spawned at EvoMoE's diversify step, for both engines.

Legend: D hidden, F ffn hidden (F/S on an F-sharded rank), L local experts.

Works on the per-parameter view of `moesys.checkpoint_state.adam_state`: torch AdamW (plain engine)
or DeepSpeed ZeRO-1/2's flat fp32 partitions, gathered / scattered per parameter by the same code
the checkpoints use.

At the diversify step, after `EvoMoELayer.diversify` has written the spawned weights:
- ZeRO only: the fp32 MASTER weights of the experts and the router receive the spawned weights.
  ZeRO's optimizer step updates its masters and copies them over the model's parameters, so stale
  masters would silently undo the diversification.
- experts, policy "copy": Adam's exp_avg / exp_avg_sq of the dense FFN [1, D, F] tiled to the L
  local experts (F-sliced when experts are F-sharded); step = the dense FFN's step.
- experts, policy "reset": zero moments, step 0 (Adam's bias correction starts over).
- router (and act-DTS gate bias), either policy: zero moments, step = the dense FFN's step.
Steps under ZeRO: torch AdamW keeps one step per flat partition (one per param group). The experts
share theirs with the retired dense FFN only (checked), so "reset" sets that group's step to 0. The
router shares its group with the model's other dense weights, so it keeps their step; the plain
engine gives the router the same step so that both engines train identically.
"""
from __future__ import annotations

import torch

from moesys import checkpoint_state as cstate
from moesys.moe.experts import copy_global_, full_value, slice_ffn

WEIGHTS = ("w1", "w2", "w3")


def _weights(module) -> dict:
    return {w: getattr(module, w) for w in WEIGHTS if getattr(module, w, None) is not None}


@torch.no_grad()
def transfer_optimizer_state(optimizer, layers, policy: str) -> None:
    """Masters, moments and steps of the spawned experts and routers of `layers` (module docstring).

    All layers diversified at this step go in one call: every dense FFN's state is read before any
    expert's is written (under ZeRO the experts of all layers share one step with the dense FFNs).
    Collective under ZeRO with data parallelism: every rank calls it with the same layers in order.

    Args:
        optimizer: torch AdamW, or DeepSpeed's ZeRO-1/2 optimizer around one.
        layers: EvoMoELayers right after `diversify()` (one layer or a list).
        policy: "copy" or "reset" (evo.optimizer_state).
    """
    if policy not in ("copy", "reset"):
        raise ValueError(f"evo.optimizer_state={policy!r} is not one of ['copy', 'reset']")
    if not (isinstance(optimizer, torch.optim.Optimizer) or hasattr(optimizer, "bit16_groups")):
        raise TypeError(f"EvoMoE's optimizer-state transfer needs torch AdamW or DeepSpeed's ZeRO-1/2 optimizer, "
                        f"got {type(optimizer).__name__}")
    layers = list(layers) if isinstance(layers, (list, tuple)) else [layers]
    adam = cstate.adam_state(optimizer)
    # the dense FFNs' state, full [1, D, F] (collectives over their data-parallel group under ZeRO,
    # and under FSDP2, whose states are sharded like the parameters)
    srcs = [{w: {k: full_value(v) for k, v in adam.get(p).items()} for w, p in _weights(layer.dense).items()
             if adam.holds(p)} for layer in layers]
    if policy == "reset" and adam.has_master:
        _check_step_peers(adam, layers)
    for layer, src in zip(layers, srcs):
        _write(adam, layer, src, policy)


def _zero_state(p: torch.Tensor, step: torch.Tensor) -> dict:
    return {"step": step, **{m: torch.zeros_like(p, dtype=torch.float32) for m in cstate.MOMENTS}}


def _write(adam, layer, src: dict, policy: str) -> None:
    experts = _weights(layer.experts)
    router = list(layer.router.parameters())
    if adam.has_master:
        for p in (*experts.values(), *router):
            if adam.holds(p):
                adam.set_master(p, p.detach().float())
    step = next(iter(src.values()))["step"] if src else torch.zeros((), dtype=torch.float32)
    for p in router:
        if adam.holds(p):
            adam.set(p, _zero_state(p, step))
    f_slice = layer.experts.ffn_slice()
    for w, p in experts.items():
        if not adam.holds(p):
            continue
        if policy == "reset" or w not in src:
            adam.set(p, _zero_state(p, torch.zeros((), dtype=torch.float32)))
            continue
        st = {"step": src[w]["step"]}
        if hasattr(p, "device_mesh"):  # DTensor experts: tile to all E, each rank keeps its part
            E = layer.experts.num_experts
            for m in cstate.MOMENTS:
                st[m] = torch.zeros_like(p, dtype=torch.float32)
                copy_global_(st[m], src[w][m].expand(E, *src[w][m].shape[1:]).contiguous())
            adam.set(p, st)
            continue
        for m in cstate.MOMENTS:  # [1, D, F] tiled to [L, D, F], then this rank's F-slice
            t = slice_ffn(w, src[w][m].expand(p.shape[0], *src[w][m].shape[1:]), f_slice)
            if t.shape != p.shape:
                raise RuntimeError(f"optimizer state of experts.{w}: {tuple(t.shape)} vs parameter {tuple(p.shape)}")
            st[m] = t.contiguous()
        adam.set(p, st)


def _check_step_peers(adam, layers) -> None:
    """ZeRO "reset": the experts' flat group step goes to 0, so it must hold only the experts and dense
    FFNs of the layers diversified now."""
    ok = {id(p) for lay in layers for m in (lay.experts, lay.dense) for p in _weights(m).values()}
    for p in (q for lay in layers for q in _weights(lay.experts).values() if adam.holds(q)):
        peers = adam.zo.bit16_groups[adam.group_of[id(p)]]
        others = [q for q in peers if id(q) not in ok]
        if others:
            raise RuntimeError(f"evo.optimizer_state=reset under ZeRO: the experts share Adam's step with {len(others)} "
                               "other parameter(s) of shapes " + ", ".join(str(tuple(q.shape)) for q in others[:3])
                               + "; use evo.optimizer_state=copy")
