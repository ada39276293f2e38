"""Structured (typed) Hydra configs of `moesys-train`.

Every group is a dataclass registered in Hydra's ConfigStore, so an override with a wrong type or an
unknown key is rejected by Hydra itself before anything runs. `TrainConfig.validate()` adds the
cross-field checks (EP divides E and the world size, the data file exists, ...) and runs on every
rank before the process group is created, so a bad config never reaches a collective.

`MoESection` mirrors every field of `moesys.MoEConfig` except the two sizes that come from the model
(hidden_size, ffn_hidden_size); it is derived from MoEConfig itself so the two never drift apart.
"""
from __future__ import annotations

import dataclasses
import os
import typing
from dataclasses import dataclass, field
from typing import Any, List, Optional

from hydra.core.config_store import ConfigStore

from moesys.config import MoEConfig
from moesys.evo.schedule import EvoConfig

# ---- moe: every MoEConfig field but the sizes the model owns -------------------------------------
_MODEL_OWNED = ("hidden_size", "ffn_hidden_size")
_MOE_DEFAULTS = {"num_experts": 8, "top_k": 2}


def _moe_section_fields() -> list:
    hints = typing.get_type_hints(MoEConfig)
    out = []
    for f in dataclasses.fields(MoEConfig):
        if f.name in _MODEL_OWNED:
            continue
        if f.name in _MOE_DEFAULTS:
            default = _MOE_DEFAULTS[f.name]
        elif f.default is not dataclasses.MISSING:
            default = f.default
        else:
            raise TypeError(f"MoEConfig.{f.name} has no default; give it one in configs/schema.py")
        out.append((f.name, hints[f.name], field(default=default)))
    return out


MoESection = dataclasses.make_dataclass("MoESection", _moe_section_fields())
MoESection.__doc__ = "moe.*: the MoEConfig fields (see moesys/config.py); sizes come from model.*"
MoESection.__module__ = __name__


@dataclass
class ModelConfig:
    """model.*: a decoder-only GPT whose FFNs are MoE layers."""

    n_layers: int = 4
    d_model: int = 128
    n_heads: int = 4
    ffn_hidden: int = 256  # F of each expert and of the dense FFNs
    seq_len: int = 128
    moe_every: int = 1  # 1: every layer is MoE; 2: every other layer (1, 3, ...); 0: dense model
    dropout: float = 0.0
    tie_embeddings: bool = True


@dataclass
class ParallelConfig:
    """parallel.*: expert parallelism and the runtime's choices."""

    ep: int = 2  # expert-parallel degree; must divide moe.num_experts and the world size
    simulate_ranks: int = 2  # without torchrun: spawn this many local gloo ranks (1 = single process)
    dispatcher: str = "alltoallv"  # alltoallv | padded | hierarchical | allgather
    mode: str = "auto"  # auto (adaptive) | ep | sharded_dp
    overlap: str = "auto"  # auto | 1 | 2 | 4 | 8  (chunks of dispatch/compute overlap)
    backend: str = "auto"  # auto: nccl on CUDA, gloo on CPU
    timeout_s: float = 300.0
    # check every collective's fingerprint (op, shapes, dtypes) across ranks before it runs: a
    # mismatch then fails at once naming both sides, not deep in gloo or as an NCCL hang (slow: debug)
    debug_collectives: bool = False


@dataclass
class DataConfig:
    """data.*: the default is the embedded corpus (CPython's pydoc topics), byte-level."""

    path: Optional[str] = None  # None: embedded corpus; *.bin: token memmap; anything else: text file
    dtype: str = "uint16"  # for .bin files: uint16 | uint32
    vocab_size: int = 256  # 256 for byte-level text; set it for .bin files
    val_fraction: float = 0.1  # the last fraction of the tokens is the validation split


@dataclass
class OptimConfig:
    """optim.*: AdamW."""

    lr: float = 3e-3
    betas: List[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    weight_decay: float = 0.1


@dataclass
class ScheduleConfig:
    """schedule.*: linear warmup then cosine decay to min_lr_ratio * lr."""

    warmup_steps: int = 30
    min_lr_ratio: float = 0.1


@dataclass
class TrainerConfig:
    """trainer.*: the loop."""

    steps: int = 300
    batch_size: int = 16  # global sequences per optimizer step (over all data-parallel ranks)
    grad_accum: int = 1  # micro-batches per step; each rank's micro-batch = batch_size/(dp*grad_accum)
    clip: float = 1.0  # max global grad norm; 0 disables
    precision: str = "fp32"  # fp32 | bf16 (autocast)
    seed: int = 1234
    eval_interval: int = 50
    eval_batches: int = 4  # validation batches of batch_size sequences each
    log_interval: int = 10
    ckpt_interval: int = 0  # 0: only at the end (when save_final)
    save_final: bool = True
    keep_checkpoints: int = 2
    resume: Optional[str] = None  # None | auto | path to an out dir or a checkpoint dir
    extend_schedule: bool = False  # on resume: stretch the LR schedule to trainer.steps (default: keep the run's)
    max_bad_steps: int = 3  # stop after this many steps in a row with a non-finite loss / grad norm (each skipped)
    # warn when, in an MoE layer, one expert takes more than collapse_share of the (kept) routes for
    # collapse_steps optimizer steps in a row (moesys/collapse.py); 0 turns the check off. At top-k an
    # expert takes at most 1/k of the routes (0.5 at top-2), so keep the share below 1/k
    collapse_share: float = 0.4
    collapse_steps: int = 10
    out_dir: Optional[str] = None  # None: Hydra's run dir
    engine: str = "plain"  # plain | deepspeed
    zero_stage: int = 1  # deepspeed only: 1 | 2
    ds_config: Optional[str] = None  # deepspeed only: a base JSON (e.g. launchers/ds_zero2.json); trainer.* wins
    deterministic: bool = True
    plots: bool = True
    cpu_buffer_cache: bool = True  # CPU: reuse the MoE layers' large buffers across steps (moesys.kernels.workspace)
    cpu_buffer_cache_keep_scratch: bool = False  # CPU: keep step buffers across layers (faster, more memory)


@dataclass
class LoggingConfig:
    """logging.*: JSONL always; W&B offline unless told otherwise; tqdm on rank 0."""

    wandb_mode: str = "offline"  # offline | online | disabled
    wandb_project: str = "moesys"
    run_name: Optional[str] = None
    tqdm: bool = True


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    moe: MoESection = field(default_factory=MoESection)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    evo: EvoConfig = field(default_factory=EvoConfig)  # EvoMoE schedule (configs/evo/*.yaml)

    # ------------------------------------------------------------------------------------------
    def moe_config(self) -> MoEConfig:
        """The MoEConfig of every MoE layer (validates the moe.* fields)."""
        kw = {f.name: getattr(self.moe, f.name) for f in dataclasses.fields(self.moe)}
        return MoEConfig(hidden_size=self.model.d_model, ffn_hidden_size=self.model.ffn_hidden, **kw)

    def validate(self, world_size: Optional[int] = None) -> None:
        """Cross-field checks; raises ValueError / FileNotFoundError naming the field.

        Runs on every rank before any collective. `world_size` is the world the job will run in
        (None: derive from torchrun's WORLD_SIZE or parallel.simulate_ranks).
        """
        m, p, d, t = self.model, self.parallel, self.data, self.trainer
        moe = self.moe_config()
        if world_size is None:
            world_size = int(os.environ.get("WORLD_SIZE", p.simulate_ranks))
        for name in ("n_layers", "d_model", "n_heads", "ffn_hidden", "seq_len"):
            if getattr(m, name) <= 0:
                raise ValueError(f"model.{name} must be > 0, got {getattr(m, name)}")
        if m.d_model % m.n_heads:
            raise ValueError(f"model.d_model ({m.d_model}) must be divisible by model.n_heads ({m.n_heads})")
        if m.moe_every < 0:
            raise ValueError(f"model.moe_every must be >= 0, got {m.moe_every}")
        if moe.router == "expert_choice" and not moe.allow_noncausal:
            raise ValueError(
                "moe.router=expert_choice is not causal (each expert picks tokens from the whole batch, "
                "so a token's output depends on later tokens); set moe.allow_noncausal=true to use it "
                "in this decoder anyway"
            )
        if p.ep <= 0:
            raise ValueError(f"parallel.ep must be > 0, got {p.ep}")
        if p.simulate_ranks <= 0:
            raise ValueError(f"parallel.simulate_ranks must be > 0, got {p.simulate_ranks}")
        if p.ep <= moe.num_experts and moe.num_experts % p.ep:
            raise ValueError(
                f"moe.num_experts ({moe.num_experts}) must be divisible by parallel.ep ({p.ep})"
            )
        if p.ep > moe.num_experts:  # each expert's F is split over ep / num_experts ranks
            if p.ep % moe.num_experts:
                raise ValueError(f"parallel.ep ({p.ep}) > moe.num_experts ({moe.num_experts}) needs parallel.ep "
                                 "divisible by moe.num_experts (each expert's FFN is split over ep/num_experts ranks)")
            if m.ffn_hidden % (p.ep // moe.num_experts):
                raise ValueError(f"model.ffn_hidden ({m.ffn_hidden}) must be divisible by parallel.ep / "
                                 f"moe.num_experts ({p.ep // moe.num_experts})")
        if world_size % p.ep:
            raise ValueError(f"world size ({world_size}) must be divisible by parallel.ep ({p.ep})")
        if p.dispatcher not in ("alltoallv", "padded", "hierarchical", "allgather"):
            raise ValueError(f"parallel.dispatcher={p.dispatcher!r} is not one of alltoallv|padded|hierarchical|allgather")
        if p.mode not in ("auto", "ep", "sharded_dp"):
            raise ValueError(f"parallel.mode={p.mode!r} is not one of auto|ep|sharded_dp")
        if str(p.overlap) not in ("auto", "1", "2", "4", "8"):
            raise ValueError(f"parallel.overlap={p.overlap!r} is not one of auto|1|2|4|8")
        if p.backend not in ("auto", "gloo", "nccl"):
            raise ValueError(f"parallel.backend={p.backend!r} is not one of auto|gloo|nccl")
        dp = world_size  # ep is a sub-axis of dp (tp = 1 here)
        if t.batch_size % (dp * t.grad_accum):
            raise ValueError(
                f"trainer.batch_size ({t.batch_size}) must be divisible by data-parallel size ({dp}) x "
                f"trainer.grad_accum ({t.grad_accum})"
            )
        if t.steps <= 0 or t.eval_interval <= 0 or t.log_interval <= 0 or t.eval_batches <= 0:
            raise ValueError("trainer.steps, eval_interval, log_interval and eval_batches must be > 0")
        if t.precision not in ("fp32", "bf16"):
            raise ValueError(f"trainer.precision={t.precision!r} is not one of fp32|bf16")
        if t.engine not in ("plain", "deepspeed"):
            raise ValueError(f"trainer.engine={t.engine!r} is not one of plain|deepspeed")
        if t.engine == "deepspeed" and t.zero_stage not in (1, 2):
            raise ValueError(f"trainer.zero_stage must be 1 or 2 with MoE, got {t.zero_stage}")
        if t.ds_config is not None and not os.path.isfile(t.ds_config):
            raise FileNotFoundError(f"trainer.ds_config={t.ds_config!r}: no such file")
        if t.clip < 0:
            raise ValueError(f"trainer.clip must be >= 0, got {t.clip}")
        if t.max_bad_steps < 1:
            raise ValueError(f"trainer.max_bad_steps must be >= 1, got {t.max_bad_steps}")
        if not 0 <= t.collapse_share <= 1:
            raise ValueError(f"trainer.collapse_share must be in [0, 1] (0: no collapse check), got {t.collapse_share}")
        if t.collapse_steps < 1:
            raise ValueError(f"trainer.collapse_steps must be >= 1, got {t.collapse_steps}")
        if len(self.optim.betas) != 2:
            raise ValueError(f"optim.betas must have two values, got {list(self.optim.betas)}")
        if self.logging.wandb_mode not in ("offline", "online", "disabled"):
            raise ValueError(f"logging.wandb_mode={self.logging.wandb_mode!r} is not one of offline|online|disabled")
        if not 0 < d.val_fraction < 1:
            raise ValueError(f"data.val_fraction must be in (0, 1), got {d.val_fraction}")
        if d.dtype not in ("uint16", "uint32"):
            raise ValueError(f"data.dtype={d.dtype!r} is not one of uint16|uint32")
        if d.path is not None:
            if not os.path.isfile(d.path):
                raise FileNotFoundError(f"data.path={d.path!r}: no such file")
            if not d.path.endswith(".bin") and d.vocab_size != 256:
                raise ValueError(f"data.path={d.path!r} is a text file (byte-level): data.vocab_size must be 256, got {d.vocab_size}")
        if d.vocab_size <= 0:
            raise ValueError(f"data.vocab_size must be > 0, got {d.vocab_size}")


def register() -> None:
    """Register the structured configs with Hydra's ConfigStore (idempotent)."""
    cs = ConfigStore.instance()
    cs.store(name="train_schema", node=TrainConfig)
