"""Rank functions of tests/parallel/test_fsdp_units.py: apply_fsdp (FSDP2 over the job's mesh) on a
small GPT with expert-parallel MoE blocks, against the same model on one process."""
from __future__ import annotations

import copy
import os
import sys

import torch
import torch.distributed as dist

from moesys import MoEConfig
from moesys.model import GPTConfig, GPTMoE
from moesys.parallel import ParallelDims, apply_expert_parallel, apply_fsdp, clip_grad_norm_

sys.path.insert(0, os.path.dirname(os.path.dirname(__file__)))
from ep_check import close  # noqa: E402

V, S, B = 61, 7, 3  # odd sizes: 7 tokens per sequence, 3 sequences per rank


def _model(activation: str) -> GPTMoE:
    torch.manual_seed(0)
    cfg = MoEConfig(hidden_size=16, ffn_hidden_size=24, num_experts=4, top_k=2, activation=activation,
                    aux_loss="global_batch")
    model = GPTMoE(GPTConfig(vocab_size=V, n_layers=2, d_model=16, n_heads=2, ffn_hidden=24, seq_len=S), cfg)
    with torch.no_grad():  # weights of order one: a gradient off by 2x is far outside atol
        for _, layer in model.moe_layers():
            for p in layer.experts.parameters():
                p.normal_(0, 0.3)
    return model


def _batch(rank: int):
    g = torch.Generator().manual_seed(100 + rank)
    return torch.randint(0, V, (B, S), generator=g), torch.randint(0, V, (B, S), generator=g)


def _loss(model, x, y):
    logits, aux, _ = model(x)
    return torch.nn.functional.cross_entropy(logits.reshape(-1, V), y.reshape(-1)) + aux


def _full(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def grads_worker(ep: int, mode: str, overlap: int, activation: str, reshard: bool, dispatcher: str = "alltoallv") -> dict:
    """One fwd+bwd of the fsdp model (each rank its own batch) and a global-norm clip; every
    parameter's full gradient against one process that sees all ranks' batches (mean loss)."""
    world, rank = dist.get_world_size(), dist.get_rank()
    dims = ParallelDims.build(ep=ep, timeout_s=60)
    base = _model(activation)
    ref = copy.deepcopy(base)
    for _, layer in ref.moe_layers():
        layer.set_balance_group("local")
    xs = [_batch(r) for r in range(world)]
    x_all, y_all = torch.cat([x for x, _ in xs]), torch.cat([y for _, y in xs])
    _loss(ref, x_all, y_all).backward()
    ref_norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.05)

    model = copy.deepcopy(base)
    for _, layer in model.moe_layers():
        if ep > 1:
            apply_expert_parallel(layer, dims.ep_group, dims=dims, mode=mode, overlap=overlap, dispatcher=dispatcher)
        layer.set_balance_group(dims.dp_group)
    apply_fsdp(model, dims, reshard_after_forward=reshard)
    tag = f"ep={ep} {dispatcher} {mode} c={overlap} {activation} reshard={reshard}"
    fails = []
    _loss(model, *xs[rank]).backward()
    # the mean of the ranks' losses is one process's loss over the concatenated batch (equal sizes)
    norm = clip_grad_norm_(model.parameters(), 0.05)
    if abs(float(norm) - float(ref_norm)) > 1e-5 * float(ref_norm):
        fails.append(f"{tag}: grad norm {float(norm)} != {float(ref_norm)}")
    for (n, p), q in zip(model.named_parameters(), ref.parameters()):
        if p.grad is None:
            fails.append(f"{tag}: {n} has no grad")
            continue
        close(f"d {n} (clipped)", _full(p.grad), q.grad, fails, tag)
    experts = model.blocks[0].moe.experts
    placements = tuple(str(x) for x in experts.w1.placements)
    return {"fails": fails, "checked": 1, "expert_placements": placements,
            "local_numel": experts.w1.to_local().numel(), "global_shape": tuple(experts.w1.shape)}


def _sharded_model():
    """A GPT with DTensor experts over ParallelDims' ep mesh (ep=2 x edp=2), one fwd+bwd; the dims go
    out of scope here (they hold their groups as fields: the trainer destroys its group at the end of
    the same scope), the model, its mesh and its outputs do not."""
    import weakref

    dims = ParallelDims.build(ep=2, timeout_s=60)
    model = _model("gelu")
    for _, layer in model.moe_layers():
        apply_expert_parallel(layer, dims.ep_group, dims=dims, mode="ep", overlap=2)
        layer.set_balance_group(dims.dp_group)
    loss = _loss(model, *_batch(dist.get_rank()))
    loss.backward()
    refs = {name: weakref.ref(getattr(dims, name)) for name in ("dp_group", "ep_group", "edp_group")}
    return model, loss, refs


def mesh_groups_worker() -> list:
    """The job's DeviceMesh and the DTensor experts over it borrow their groups: destroy_process_group()
    destroys every group while the sharded model (its DTensors hold the meshes) and its outputs are
    still held. torch's DeviceMesh keeps strong references for torch.compile; moesys drops them
    (parallel.mesh.borrow_groups, issue 11). (FSDP2's units keep theirs: torch's design.)"""
    import weakref

    model, loss, alive = _sharded_model()
    alive["world"] = weakref.ref(dist.group.WORLD)
    mesh = model.blocks[0].moe.experts.w1.device_mesh  # noqa: F841  (held across the destroy on purpose)
    dist.destroy_process_group()
    return [f"{name} outlived destroy_process_group()" for name, ref in alive.items() if ref() is not None]
