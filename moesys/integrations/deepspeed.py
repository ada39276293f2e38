"""DeepSpeed integration: a ZeRO-1/2 engine around a moesys model (`trainer.engine=deepspeed`).

    deepspeed --num_gpus 8 -m moesys.train trainer.engine=deepspeed ...   # or torchrun --nproc_per_node 8
    # configs/deepspeed/zero1.json, configs/deepspeed/zero2.json hold the same config dicts `ds_config_from` builds

In code (after `dist.init_process_group`, `dims = ParallelDims.build(ep=...)`,
`apply_expert_parallel(...)` on every MoE layer):

    engine = build_engine(model, optimizer_cfg=dict(lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1, eps=1e-8),
                          zero_stage=2, dims=dims, grad_accum=4, clip=1.0)
    loss = engine(x)...; engine.backward(loss); engine.step()   # step() acts every grad_accum micro-steps

How moesys experts meet DeepSpeed's MoE conventions (read from deepspeed/moe/utils.py,
deepspeed/utils/groups.py, runtime/zero/stage_1_and_2.py of 0.19.8):
- Every expert parameter (`moesys.parallel.expert_parameters`: the weights of each MoE layer's
  `experts`) gets `allreduce = False` and `group_name = "ep_size_<ep>"`; DeepSpeed's `is_moe_param`
  keys on exactly these two attributes. ZeRO flattens parameter storage, so expert weights that
  `apply_expert_parallel` made DTensors are turned back into their plain local shards first
  (`moesys.parallel.localize_experts`; their `sharding` keeps the layout for checkpoints).
- The optimizer's param groups put those parameters in groups `{"moe": True, "name": "ep_size_<ep>"}`,
  so ZeRO partitions them over (and reduces their gradients in) the expert-data-parallel group of
  that name only; dense parameters stay in groups reduced over the whole data-parallel group.
- DeepSpeed's group tables (`groups._EXPERT_PARALLEL_GROUP[name]` and the expert-data-parallel twin)
  are filled with *our* `ParallelDims.ep_group` / `edp_group` before `deepspeed.initialize`, so
  DeepSpeed and moesys agree on the layout by construction (no second set of communicators, no
  assumption that DeepSpeed's consecutive/strided rank order equals ours). These tables are
  DeepSpeed's module-level state; we write them because DeepSpeed reads nothing else.
- DeepSpeed turns its MoE code paths on only when the model holds a `deepspeed.moe.layer.MoE`
  module (`engine.has_moe_layers`). `build_engine` therefore attaches one parameter-free
  `DeepSpeedMoEMarker` (a subclass of that class with no experts, no gate, no forward) as the
  child `moesys_ds_moe_marker` of the model. It holds no parameters or buffers, so `state_dict` is
  unchanged.
Gradient semantics (ZeRO 1/2): every gradient is divided by the data-parallel world size, dense
gradients are summed over the data-parallel group, expert gradients over the expert-data-parallel
group; the clip norm is the global norm over dense parameters and all experts of all ranks. This is
the same as a plain loop that averages dense grads over dp and sums-then-divides-by-dp expert grads
over edp (what `moesys.parallel.allreduce_gradients` does).

Not supported here: ZeRO-3 (DeepSpeed's ZeRO-3 MoE path is tied to its own AutoEP layers), tensor
parallelism inside experts (dims.tp must be 1), pipeline parallelism. DeepSpeed's own
`save_checkpoint` is untested with moesys experts; use moesys checkpoints.
"""
from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Optional, Union

import torch
import torch.nn as nn

from moesys.moe.layer import MoELayer
from moesys.parallel import ParallelDims, expert_parameters, localize_experts

__all__ = [
    "build_engine",
    "ds_config_from",
    "load_ds_config",
    "expert_group_name",
    "expert_params",
    "mark_expert_params",
    "moe_param_groups",
    "register_expert_groups",
    "DeepSpeedMoEMarker",
]

MARKER_NAME = "moesys_ds_moe_marker"


def expert_group_name(ep: int) -> str:
    """DeepSpeed's name for the expert groups of expert-parallel size `ep` (`MoE.expert_group_name`)."""
    return f"ep_size_{ep}"


# ---------------------------------------------------------------------------------------------
# config
def ds_config_from(
    *,
    zero_stage: int,
    grad_accum: int = 1,
    clip: float = 1.0,
    micro_batch_size: int = 1,
    dtype: str = "fp32",
    reduce_bucket_size: int = 500_000_000,
    overlap_comm: bool = False,
    steps_per_print: int = 1_000_000,
) -> dict:
    """The DeepSpeed config dict for moesys: ZeRO stage 1 or 2, client (torch) optimizer.

    Args:
        zero_stage: 1 (optimizer states partitioned) or 2 (also gradients).
        grad_accum: micro-steps per optimizer step (`engine.step()` acts on the boundary).
        clip: global gradient-norm clip; 0 turns clipping off.
        micro_batch_size: sequences per rank per micro-step (DeepSpeed only logs/validates it).
        dtype: "fp32", "bf16" or "fp16" (fp16 uses DeepSpeed's dynamic loss scale).
    Returns:
        a JSON-serialisable dict for `deepspeed.initialize(config=...)`.
    """
    if zero_stage not in (1, 2):
        raise ValueError(f"ds_config_from: zero_stage must be 1 or 2, got {zero_stage!r} "
                         "(ZeRO-3 is not supported with moesys experts)")
    if isinstance(grad_accum, bool) or not isinstance(grad_accum, int) or grad_accum < 1:
        raise ValueError(f"ds_config_from: grad_accum must be an integer >= 1, got {grad_accum!r}")
    if not clip >= 0:
        raise ValueError(f"ds_config_from: clip must be >= 0, got {clip}")
    if dtype not in ("fp32", "bf16", "fp16"):
        raise ValueError(f"ds_config_from: dtype must be one of fp32, bf16, fp16, got {dtype!r}")
    return {
        "train_micro_batch_size_per_gpu": int(micro_batch_size),
        "gradient_accumulation_steps": int(grad_accum),
        "gradient_clipping": float(clip),
        "steps_per_print": int(steps_per_print),
        "wall_clock_breakdown": False,
        # the optimizer is torch.optim.AdamW built here with MoE param groups (see build_engine)
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": dtype == "bf16"},
        "fp16": {"enabled": dtype == "fp16", "loss_scale": 0, "initial_scale_power": 16},
        "zero_optimization": {
            "stage": int(zero_stage),
            # DeepSpeed's MoE path asserts both for ZeRO-2 (stage_1_and_2._configure_moe_settings)
            "contiguous_gradients": True,
            "reduce_scatter": True,
            "overlap_comm": bool(overlap_comm),
            "reduce_bucket_size": int(reduce_bucket_size),
            "allgather_bucket_size": int(reduce_bucket_size),
        },
    }


def load_ds_config(path: Union[str, Path]) -> dict:
    """Read a DeepSpeed JSON config (e.g. configs/deepspeed/zero2.json)."""
    with open(path) as f:
        return json.load(f)


# ---------------------------------------------------------------------------------------------
# parameters
def expert_params(model: nn.Module) -> list:
    """Expert parameters of `model` (moesys.parallel.expert_parameters: the weights of every MoE layer's
    `experts`, each once). EvoMoE's replicated dense FFN (`layer.dense`) is not one: its grads reduce
    over the whole data-parallel group."""

    return expert_parameters(model)


def mark_expert_params(model: nn.Module, group_name: str) -> list:
    """Mark expert params the way DeepSpeed's `is_moe_param` expects; returns them."""
    params = expert_params(model)
    for p in params:
        p.allreduce = False  # DeepSpeed: "not reduced over the whole data-parallel group"
        p.group_name = group_name  # DeepSpeed: key of the expert(-data)-parallel group tables
    return params


def moe_param_groups(model: nn.Module, *, weight_decay: float, group_name: str, lr: Optional[float] = None) -> list:
    """Optimizer param groups in DeepSpeed's MoE convention.

    Dense params: "dense_decay" (dim >= 2, weight decay) and "dense_no_decay" (biases, norms).
    Expert params: one group {"moe": True, "name": group_name} (experts are 3-D: decayed), or two
    when some expert params are 1-D. Empty groups are left out. Every group has a "name".
    """
    experts = {id(p) for p in expert_params(model)}
    dense_decay, dense_no_decay, moe_decay, moe_no_decay = [], [], [], []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        decay = p.dim() >= 2
        if id(p) in experts:
            (moe_decay if decay else moe_no_decay).append(p)
        else:
            (dense_decay if decay else dense_no_decay).append(p)
    extra = {} if lr is None else {"lr": lr}
    groups = [
        {"name": "dense_decay", "params": dense_decay, "weight_decay": weight_decay, **extra},
        {"name": "dense_no_decay", "params": dense_no_decay, "weight_decay": 0.0, **extra},
        {"name": group_name, "moe": True, "params": moe_decay, "weight_decay": weight_decay, **extra},
        {"name": group_name, "moe": True, "params": moe_no_decay, "weight_decay": 0.0, **extra},
    ]
    return [g for g in groups if g["params"]]


# ---------------------------------------------------------------------------------------------
# process groups
def register_expert_groups(dims, group_name: str) -> None:
    """Put our expert-parallel / expert-data-parallel groups into DeepSpeed's group tables.

    With `dims=None` (one process) both groups are a one-rank group of the world. Overwrites an
    entry of the same name: the latest `build_engine` call owns it.
    """
    import torch.distributed as dist
    from deepspeed.utils import groups as ds_groups

    if dims is None:
        if dist.get_world_size() != 1:
            raise ValueError(
                f"build_engine: dims=None means one process, but the world has {dist.get_world_size()} ranks; "
                "pass the ParallelDims built with moesys.parallel.ParallelDims.build(ep=...)"
            )

        one = ParallelDims.build(ep=1)  # the one-rank groups come from a mesh too
        ep_group, edp_group = one.ep_group, one.edp_group
    else:
        if getattr(dims, "tp", 1) != 1:
            raise ValueError(f"build_engine: tensor parallelism (dims.tp={dims.tp}) is not supported with DeepSpeed")
        if dims.dp != dist.get_world_size():
            raise ValueError(
                f"build_engine: DeepSpeed reduces dense grads over the whole world ({dist.get_world_size()} ranks) "
                f"but dims.dp is {dims.dp}"
            )
        ep_group, edp_group = dims.ep_group, dims.edp_group
    ep_ranks = dist.get_process_group_ranks(ep_group)
    edp_ranks = dist.get_process_group_ranks(edp_group)
    if dims is not None and (len(ep_ranks) != dims.ep or len(edp_ranks) != dims.edp):
        raise ValueError(f"build_engine: dims.ep={dims.ep}, dims.edp={dims.edp} but the groups hold "
                         f"{len(ep_ranks)} and {len(edp_ranks)} ranks")
    # DeepSpeed caches groups in module globals; a process that destroyed its process group and
    # made a new one (a second run in one process) would otherwise reach for dead groups.
    for table in (ds_groups._EXPERT_PARALLEL_GROUP, ds_groups._EXPERT_PARALLEL_GROUP_RANKS,
                  ds_groups._EXPERT_DATA_PARALLEL_GROUP, ds_groups._EXPERT_DATA_PARALLEL_GROUP_RANKS,
                  ds_groups._ALL_TO_ALL_GROUP):
        table.clear()
    ds_groups._WORLD_GROUP = None
    ds_groups._DATA_PARALLEL_GROUP = None
    ds_groups._ZERO_PARAM_INTRA_PARALLEL_GROUP = None
    ds_groups._EXPERT_PARALLEL_GROUP[group_name] = ep_group
    ds_groups._EXPERT_PARALLEL_GROUP_RANKS[group_name] = ep_ranks
    ds_groups._EXPERT_DATA_PARALLEL_GROUP[group_name] = edp_group
    ds_groups._EXPERT_DATA_PARALLEL_GROUP_RANKS[group_name] = edp_ranks


def _marker_class():
    from deepspeed.moe.layer import MoE

    class DeepSpeedMoEMarker(MoE):
        """Tells DeepSpeed's engine the model has MoE layers; holds nothing, computes nothing.

        `MoE.__init__` builds DeepSpeed's own gate and experts, so it is skipped: only the
        attributes DeepSpeed's engine reads are set.
        """

        def __init__(self, *, num_experts: int, ep_size: int, group_name: str):
            nn.Module.__init__(self)
            self.use_residual = False
            self.enable_expert_tensor_parallelism = False
            self.ep_size = ep_size
            self.expert_group_name = group_name
            self.num_experts = num_experts
            self.num_local_experts = num_experts // ep_size

        def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False) -> None:
            # groups were registered from ParallelDims by build_engine; nothing to create
            from deepspeed.utils import groups as ds_groups

            if self.expert_group_name not in ds_groups._get_expert_data_parallel_group_dict():
                raise RuntimeError(f"DeepSpeed expert group {self.expert_group_name!r} was not registered; "
                                   "build the engine with moesys.integrations.deepspeed.build_engine")

        def forward(self, *args, **kwargs):
            raise RuntimeError("DeepSpeedMoEMarker is a flag for DeepSpeed's engine, not a layer")

    return DeepSpeedMoEMarker


def __getattr__(name):
    # DeepSpeedMoEMarker subclasses deepspeed's MoE: build it lazily so importing this module
    # does not import deepspeed.
    if name == "DeepSpeedMoEMarker":
        return _marker_class_cached()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


_MARKER_CLS: list = []


def _marker_class_cached():
    if not _MARKER_CLS:
        _MARKER_CLS.append(_marker_class())
    return _MARKER_CLS[0]


def _num_experts(model: nn.Module) -> int:
    counts = {m.cfg.num_experts for m in model.modules() if isinstance(m, MoELayer)}
    return max(counts) if counts else 0


# keys the build_engine arguments decide; everything else (bucket sizes, overlap_comm, ...) comes
# from the base config when one is given
_ARG_KEYS = ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "gradient_clipping",
             "zero_allow_untested_optimizer", "bf16", "fp16")
_MOE_ZERO_KEYS = ("stage", "contiguous_gradients", "reduce_scatter")  # DeepSpeed's MoE path needs these


def _merge_config(base: dict, ours: dict) -> dict:
    """`base` (e.g. configs/deepspeed/zero2.json, which may say "auto") with the argument-decided keys of `ours`."""
    merged = copy.deepcopy(base)
    merged.pop("train_batch_size", None)  # recomputed by DeepSpeed from micro batch x accumulation x dp
    for key in _ARG_KEYS:
        merged[key] = copy.deepcopy(ours[key])
    zero = dict(merged.get("zero_optimization", {}))
    for key in _MOE_ZERO_KEYS:
        zero[key] = ours["zero_optimization"][key]
    for key, value in ours["zero_optimization"].items():
        zero.setdefault(key, value)
    merged["zero_optimization"] = zero
    autos = [k for k, v in merged.items() if v == "auto"] + [f"zero_optimization.{k}" for k, v in zero.items() if v == "auto"]
    if autos:
        raise ValueError(f"build_engine: config entries {autos} are 'auto' and no argument sets them")
    return merged


# ---------------------------------------------------------------------------------------------
def build_engine(
    model: nn.Module,
    *,
    optimizer_cfg: dict,
    zero_stage: int,
    dims=None,
    grad_accum: int = 1,
    clip: float = 1.0,
    lr_scheduler=None,
    micro_batch_size: int = 1,
    dtype: str = "fp32",
    config: Optional[Union[dict, str, Path]] = None,
):
    """Wrap `model` in a DeepSpeed ZeRO-1/2 engine with moesys experts in DeepSpeed MoE groups.

    Call after `torch.distributed.init_process_group` (and after `apply_expert_parallel` on the
    MoE layers when EP > 1), on every rank.

    Args:
        model: the (already expert-sharded) model.
        optimizer_cfg: {"lr", "betas", "weight_decay", "eps"} for torch.optim.AdamW.
        zero_stage: 1 or 2.
        dims: the `moesys.parallel.ParallelDims` (None: one process, world size 1).
        grad_accum: micro-steps per optimizer step.
        clip: global grad-norm clip (0: off).
        lr_scheduler: a torch LR scheduler or a callable(optimizer) -> scheduler; DeepSpeed steps
            it on every optimizer step.
        micro_batch_size, dtype: see `ds_config_from`.
        config: a base DeepSpeed config (dict or JSON path, e.g. configs/deepspeed/zero2.json); the
            arguments above override its micro batch, accumulation, clip, bf16/fp16 and zero stage
            entries (and force contiguous_gradients / reduce_scatter, which DeepSpeed's MoE path
            asserts); its other entries (bucket sizes, overlap_comm, ...) are kept.
    Returns:
        the DeepSpeedEngine (`engine.optimizer` is the ZeRO optimizer, `engine.lr_scheduler`).
    """
    import torch.distributed as dist

    if not dist.is_initialized():
        raise RuntimeError("build_engine: call torch.distributed.init_process_group first "
                           "(world size 1 for a single process)")
    missing = {"lr", "betas", "weight_decay", "eps"} - set(optimizer_cfg)
    if missing:
        raise ValueError(f"build_engine: optimizer_cfg lacks {sorted(missing)}; got {sorted(optimizer_cfg)}")
    if dist.get_world_size() == 1:
        # DeepSpeed asserts LOCAL_RANK is set (torchrun / the deepspeed launcher set it); a plain
        # one-process `python` run has none.
        os.environ.setdefault("LOCAL_RANK", "0")
    import deepspeed

    ds_config = ds_config_from(zero_stage=zero_stage, grad_accum=grad_accum, clip=clip,
                               micro_batch_size=micro_batch_size, dtype=dtype)
    if config is not None:
        ds_config = _merge_config(load_ds_config(config) if not isinstance(config, dict) else config, ds_config)

    ep = 1 if dims is None else int(dims.ep)
    name = expert_group_name(ep)
    num_experts = _num_experts(model)

    localize_experts(model)  # ZeRO flattens parameter storage: plain local shards, not DTensors
    experts = mark_expert_params(model, name)
    if experts:
        register_expert_groups(dims, name)
        if not any(isinstance(m, _marker_class_cached()) for m in model.modules()):
            model.add_module(MARKER_NAME, _marker_class_cached()(num_experts=num_experts, ep_size=ep, group_name=name))
    groups = moe_param_groups(model, weight_decay=float(optimizer_cfg["weight_decay"]), group_name=name)
    optimizer = torch.optim.AdamW(
        groups,
        lr=float(optimizer_cfg["lr"]),
        betas=tuple(float(b) for b in optimizer_cfg["betas"]),
        eps=float(optimizer_cfg["eps"]),
        weight_decay=float(optimizer_cfg["weight_decay"]),
    )
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=lr_scheduler,
                                           config=ds_config, dist_init_required=False)
    return engine
