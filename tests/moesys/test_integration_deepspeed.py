"""DeepSpeed ZeRO-1/2 engine vs. a plain AdamW loop: same losses from the same seed.

Single process (world 1, in this process) and 2 gloo ranks with EP=2 (spawned).
"""
from __future__ import annotations

import datetime
import os
import socket
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

pytest.importorskip("deepspeed")

from moesys import MoEConfig, MoELayer  # noqa: E402
from moesys.integrations import deepspeed as ds_int  # noqa: E402
from train_helpers import FORKED  # noqa: E402

VOCAB, D, FF, E = 32, 16, 24, 4
B, S = 2, 8
STEPS, ACCUM = 5, 2
OPT = dict(lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1, eps=1e-8)
CLIP = 0.5  # small enough that clipping acts on these steps


class TinyMoELM(nn.Module):
    """embedding -> x + MoE(x) -> LayerNorm -> head; forward returns CE + aux loss."""

    def __init__(self, cfg: MoEConfig):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, cfg.hidden_size)
        self.moe = MoELayer(cfg)
        self.norm = nn.LayerNorm(cfg.hidden_size)
        self.head = nn.Linear(cfg.hidden_size, VOCAB)

    def forward(self, idx_BS, tgt_BS):
        h_BSD = self.emb(idx_BS)
        y_BSD, aux = self.moe(h_BSD)
        logits = self.head(self.norm(h_BSD + y_BSD))
        return F.cross_entropy(logits.reshape(-1, VOCAB), tgt_BS.reshape(-1)) + aux.loss


# shared experts (dense, replicated) with Qwen2-MoE's gate, and recompute
SHARED = dict(num_shared_experts=2, shared_ffn_hidden_size=12, shared_expert_gate=True, recompute=True)


def _cfg(**kw) -> MoEConfig:
    return MoEConfig(hidden_size=D, ffn_hidden_size=FF, num_experts=E, top_k=2, activation="swiglu",
                     aux_loss_coef=1e-2, z_loss_coef=1e-3, kernel_backend="torch", **kw)


def _model(dims=None, **kw) -> TinyMoELM:
    torch.manual_seed(0)
    model = TinyMoELM(_cfg(**kw))
    if dims is not None and dims.ep > 1:
        from moesys.parallel import apply_expert_parallel

        apply_expert_parallel(model.moe, dims.ep_group, dims=dims)
    return model


def _batches(rank: int):
    g = torch.Generator().manual_seed(1000 + rank)  # each data-parallel rank sees its own data
    return [(torch.randint(0, VOCAB, (B, S), generator=g), torch.randint(0, VOCAB, (B, S), generator=g))
            for _ in range(STEPS * ACCUM)]


@torch.no_grad()
def _clip_(model, dims, clip: float) -> float:
    """Global-norm clip over dense params and the experts of every ep rank (DeepSpeed's norm)."""
    experts = {id(p) for p in ds_int.expert_params(model)}
    local = lambda t: t.to_local() if hasattr(t, "to_local") else t  # noqa: E731  (DTensor experts: their shard)
    grads = [local(p.grad) for p in model.parameters() if p.grad is not None]
    dense_sq = sum((g.double() ** 2).sum() for p, g in zip(model.parameters(), grads) if id(p) not in experts)
    expert_sq = sum((local(p.grad).double() ** 2).sum() for p in model.parameters() if id(p) in experts)
    expert_sq = torch.as_tensor(expert_sq, dtype=torch.float64)
    if dims is not None and dims.ep > 1:
        dist.all_reduce(expert_sq, group=dims.ep_group)  # experts differ across the ep group
    norm = float((dense_sq + expert_sq).sqrt())
    scale = clip / (norm + 1e-6)
    if scale < 1:
        for g in grads:
            g.mul_(scale)
    return norm


def plain_losses(dims=None, **kw) -> tuple:
    """(loss per micro-step, grad norm per optimizer step)"""
    model = _model(dims, **kw)
    groups = ds_int.moe_param_groups(model, weight_decay=OPT["weight_decay"], group_name="experts")
    opt = torch.optim.AdamW(groups, lr=OPT["lr"], betas=OPT["betas"], eps=OPT["eps"])
    rank = 0 if dims is None else dims.rank
    losses, norms = [], []
    for i, (x, y) in enumerate(_batches(rank)):
        loss = model(x, y)
        (loss / ACCUM).backward()
        losses.append(loss.item())
        if (i + 1) % ACCUM == 0:
            if dims is not None and dims.world_size > 1:
                from moesys.parallel import allreduce_gradients

                allreduce_gradients(model, dims)
            norms.append(_clip_(model, dims, CLIP))
            opt.step()
            opt.zero_grad(set_to_none=True)
    return losses, norms


def ds_losses(zero_stage: int, dims=None, config=None, **kw) -> tuple:
    model = _model(dims, **kw)
    engine = ds_int.build_engine(model, optimizer_cfg=OPT, zero_stage=zero_stage, dims=dims,
                                 grad_accum=ACCUM, clip=CLIP, config=config)
    rank = 0 if dims is None else dims.rank
    losses, norms = [], []
    for x, y in _batches(rank):
        loss = engine(x, y)
        engine.backward(loss)
        boundary = engine.is_gradient_accumulation_boundary()
        engine.step()
        losses.append(loss.item())
        if boundary:
            norms.append(float(engine.get_global_grad_norm()))
    return losses, norms


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def world1():
    """A one-rank gloo world in this process (torn down after the module)."""
    if dist.is_initialized():
        yield
        return
    with tempfile.TemporaryDirectory() as tmp:
        store = dist.FileStore(os.path.join(tmp, "store"), 1)
        dist.init_process_group("gloo", store=store, rank=0, world_size=1,
                                timeout=datetime.timedelta(seconds=120))
        try:
            yield
        finally:
            dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------
def test_ds_config_from_and_launcher_json():
    cfg = ds_int.ds_config_from(zero_stage=2, grad_accum=4, clip=1.0)
    assert cfg["zero_optimization"]["stage"] == 2
    assert cfg["gradient_accumulation_steps"] == 4 and cfg["gradient_clipping"] == 1.0
    assert cfg["zero_optimization"]["contiguous_gradients"] and cfg["zero_optimization"]["reduce_scatter"]
    with pytest.raises(ValueError, match="zero_stage must be 1 or 2"):
        ds_int.ds_config_from(zero_stage=3)
    with pytest.raises(ValueError, match="grad_accum"):
        ds_int.ds_config_from(zero_stage=1, grad_accum=0)
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    for stage in (1, 2):
        path = os.path.join(root, "launchers", f"ds_zero{stage}.json")
        if os.path.exists(path):
            assert ds_int.load_ds_config(path)["zero_optimization"]["stage"] == stage


def test_param_groups_follow_deepspeed_moe_convention():
    from deepspeed.moe.utils import is_moe_param

    model = _model()
    experts = ds_int.mark_expert_params(model, "ep_size_1")
    assert {id(p) for p in experts} == {id(model.moe.experts.w1), id(model.moe.experts.w2), id(model.moe.experts.w3)}
    assert all(is_moe_param(p) and p.group_name == "ep_size_1" for p in experts)
    assert not is_moe_param(model.moe.router.weight)  # the router is replicated: dense
    groups = ds_int.moe_param_groups(model, weight_decay=0.1, group_name="ep_size_1")
    moe = [g for g in groups if g.get("moe")]
    assert len(moe) == 1 and moe[0]["name"] == "ep_size_1" and len(moe[0]["params"]) == 3
    assert all("name" in g for g in groups)
    n_all = sum(len(g["params"]) for g in groups)
    assert n_all == len(list(model.parameters()))
    no_decay = next(g for g in groups if g["name"] == "dense_no_decay")
    assert no_decay["weight_decay"] == 0.0 and all(p.dim() < 2 for p in no_decay["params"])


@pytest.mark.parametrize("zero_stage", [1, 2])
def test_deepspeed_matches_plain_loop_world1(world1, zero_stage):
    ref, ref_norms = plain_losses()
    got, got_norms = ds_losses(zero_stage)
    assert len(got) == STEPS * ACCUM and len(got_norms) == STEPS
    assert ref[-1] < ref[0]  # it trains
    assert min(ref_norms) > CLIP  # clipping acted on every step
    torch.testing.assert_close(torch.tensor(got), torch.tensor(ref), rtol=1e-5, atol=1e-6)
    # Adam hides a uniform grad scale, so check the clip norm itself
    torch.testing.assert_close(torch.tensor(got_norms), torch.tensor(ref_norms), rtol=1e-5, atol=1e-7)


def test_shared_experts_are_dense_for_deepspeed_and_match_plain_loop_world1(world1):
    from deepspeed.moe.utils import is_moe_param

    model = _model(**SHARED)
    experts = ds_int.mark_expert_params(model, "ep_size_1")
    assert len(experts) == 3 and not any(is_moe_param(p) for p in model.moe.shared_experts.parameters())
    ref, ref_norms = plain_losses(**SHARED)
    got, got_norms = ds_losses(2, **SHARED)
    assert ref != plain_losses()[0]  # the shared experts change the model
    torch.testing.assert_close(torch.tensor(got), torch.tensor(ref), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.tensor(got_norms), torch.tensor(ref_norms), rtol=1e-5, atol=1e-7)


ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.parametrize("zero_stage", [1, 2])
def test_shipped_json_config_matches_plain_loop_world1(world1, zero_stage):
    path = os.path.join(ROOT, "configs", "deepspeed", f"zero{zero_stage}.json")
    assert os.path.exists(path), f"{path}: the shipped DeepSpeed config is missing"
    base = ds_int.load_ds_config(path)
    ref, _ = plain_losses()
    got, _ = ds_losses(zero_stage, config=path)
    torch.testing.assert_close(torch.tensor(got), torch.tensor(ref), rtol=1e-5, atol=1e-6)
    merged = ds_int._merge_config(base, ds_int.ds_config_from(zero_stage=zero_stage, grad_accum=ACCUM, clip=CLIP))
    assert merged["zero_optimization"]["stage"] == zero_stage and merged["gradient_clipping"] == CLIP
    for key in ("reduce_bucket_size", "overlap_comm"):  # kept from the file
        if key in base["zero_optimization"]:
            assert merged["zero_optimization"][key] == base["zero_optimization"][key]


def test_engine_uses_expert_data_parallel_group(world1):
    from deepspeed.utils import groups as ds_groups

    model = _model()
    engine = ds_int.build_engine(model, optimizer_cfg=OPT, zero_stage=2, dims=None, grad_accum=1, clip=1.0)
    assert engine.has_moe_layers
    zero = engine.optimizer
    moe_idx = [i for i, g in enumerate(zero.optimizer.param_groups) if g.get("moe")]
    assert moe_idx, "no MoE param group reached the ZeRO optimizer"
    edp = ds_groups._get_expert_data_parallel_group("ep_size_1")
    for i in moe_idx:
        assert zero.real_dp_process_group[i] is edp
    assert getattr(model, ds_int.MARKER_NAME) is not None
    assert not any(k.startswith(ds_int.MARKER_NAME) for k in model.state_dict())


# ---------------------------------------------------------------------------------------------
def _ep2_rank(zero_stage: int, kw=None) -> dict:
    from moesys.parallel import ParallelDims

    dims = ParallelDims.build(ep=2, timeout_s=120)
    from deepspeed.utils import groups as ds_groups

    ref, ref_norms = plain_losses(dims, **(kw or {}))
    got, got_norms = ds_losses(zero_stage, dims, **(kw or {}))
    name = ds_int.expert_group_name(2)
    return {
        "ref": ref,
        "got": got,
        "ref_norms": ref_norms,
        "got_norms": got_norms,
        "ep_ranks": list(ds_groups._get_expert_parallel_group_ranks(name)),
        "edp_ranks": list(ds_groups._get_expert_data_parallel_group_ranks(name)),
    }


@pytest.mark.slow
@pytest.mark.multirank
@pytest.mark.parametrize("zero_stage,kw", [(1, None), (2, None), (2, SHARED)], ids=["zero1", "zero2", "zero2-shared"])
def test_deepspeed_matches_plain_loop_ep2(zero_stage, kw):
    parallel = pytest.importorskip("moesys.parallel")
    if not hasattr(parallel, "simulate") or not hasattr(parallel, "apply_expert_parallel"):
        pytest.skip("moesys.parallel has not landed yet")
    results = parallel.simulate(_ep2_rank, 2, zero_stage, kw, timeout_s=240, preload=FORKED)
    for rank, r in enumerate(results):
        assert r["ep_ranks"] == [0, 1] and r["edp_ranks"] == [rank]
        torch.testing.assert_close(torch.tensor(r["got"]), torch.tensor(r["ref"]), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(torch.tensor(r["got_norms"]), torch.tensor(r["ref_norms"]), rtol=1e-5, atol=1e-7)
    assert results[0]["ref_norms"] == results[1]["ref_norms"]  # one global norm
    assert results[0]["ref"] != results[1]["ref"]  # ranks saw different data
