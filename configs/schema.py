"""Structured (typed) Hydra configs of `moesys-train`.

Every group is a dataclass registered in Hydra's ConfigStore, so an override with a wrong type or an
unknown key is rejected by Hydra itself before anything runs. `TrainConfig.validate()` checks every
field's range and the fields against each other (EP divides E and the world size, the data holds a
window of model.seq_len, the device runs the precision, ...) and raises `ConfigError` naming the field
and the value. `moesys-train` runs it in the parent before Hydra's run dir or any rank exists, and
every rank runs it again before the process group is created, so a bad config never reaches a
collective. `from_composed` turns Hydra's composed config into a TrainConfig (keys added with `+`
that the schema lacks are errors).

`MoESection` mirrors every field of `moesys.MoEConfig` except the two sizes that come from the model
(hidden_size, ffn_hidden_size); it is derived from MoEConfig itself so the two never drift apart.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os
import typing
from dataclasses import dataclass, field
from typing import Any, List, Optional

from hydra.core.config_store import ConfigStore

from moesys import data as data_mod
from moesys import hf
from moesys import tokens as tokens_mod
from moesys.decoder import DECODER_FIELDS, DecoderConfig
from moesys.errors import ConfigError, ConfigFileNotFoundError
from moesys.evo.schedule import EvoConfig
from moesys.kernels import backend
from moesys.moe.config import MoEConfig

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
MoESection.__doc__ = "moe.*: the MoEConfig fields (see moesys/moe/config.py); sizes come from model.*"
MoESection.__module__ = __name__


@dataclass
class ModelConfig:
    """model.*: the decoder-only model whose FFNs are MoE layers (model.arch: gpt or the modern decoder)."""

    n_layers: int = 4
    d_model: int = 128
    n_heads: int = 4
    ffn_hidden: int = 256  # F of each expert and of the dense FFNs
    seq_len: int = 128
    moe_every: int = 1  # 1: every layer is MoE; 2: every other layer (1, 3, ...); 0: dense model
    dropout: float = 0.0
    tie_embeddings: bool = True
    qk_norm: bool = False  # RMSNorm of each head's q and k before the dot product (README, "Training stability")
    # gpt: learned positions, LayerNorm, GELU dense FFN (moesys/model.py); decoder: RMSNorm, RoPE, GQA or
    # latent attention, SwiGLU dense FFN (moesys/decoder.py; the default since issue 23's comparison,
    # docs/huggingface.md). The fields below are the decoder's only
    arch: str = "decoder"
    # a Hugging Face model directory (config.json + safetensors) to start from: its config.json sets the
    # model.*/moe.* fields it determines (an override that contradicts one is an error naming both values)
    # and every rank reads its own slices of the weights (moesys/hf.py)
    init_from: Optional[str] = None
    n_kv_heads: Optional[int] = None  # key/value heads (grouped-query attention); null: n_heads
    head_dim: Optional[int] = None  # null: d_model / n_heads
    norm_eps: float = 1e-6  # RMSNorm epsilon
    rope_theta: float = 10000.0  # rotary base
    qkv_bias: bool = False  # biases on the q, k, v projections (Qwen2-MoE)
    out_bias: bool = False  # bias on the attention output projection
    qk_norm_scope: str = "head"  # with qk_norm: head (over each head, Qwen3-MoE) | all (over all heads, OLMoE)
    dense_ffn_hidden: Optional[int] = None  # width of the dense SwiGLU FFNs; null: ffn_hidden
    first_k_dense: int = 0  # the first k blocks are dense (DeepSeek-V3)
    # multi-head latent attention (DeepSeek-V3): on when kv_lora_rank is set
    q_lora_rank: Optional[int] = None
    kv_lora_rank: Optional[int] = None
    qk_rope_head_dim: int = 0
    qk_nope_head_dim: int = 0
    v_head_dim: int = 0


@dataclass
class ParallelConfig:
    """parallel.*: expert parallelism and the runtime's choices."""

    ep: int = 2  # expert-parallel degree; must divide moe.num_experts and the world size
    simulate_ranks: int = 2  # without torchrun: spawn this many local gloo ranks (1 = single process)
    # how those ranks start: auto (CPU jobs: forked from a server that imported moesys and torch once,
    # ~0.1 s a rank instead of seconds of imports; CUDA jobs and platforms without one: spawn) | spawn
    # (a fresh interpreter each, as torch.multiprocessing.spawn)
    rank_start: str = "auto"
    # alltoallv | padded | hierarchical | hierarchical_padded | allgather (the 2-D ones: within the node,
    # then across nodes; hierarchical_padded: padded's fixed-capacity buffers, no counts exchange)
    dispatcher: str = "alltoallv"
    mode: str = "auto"  # auto (adaptive) | ep | sharded_dp
    overlap: str = "auto"  # auto | 1 | 2 | 4 | 8  (chunks of dispatch/compute overlap)
    # dispatcher=padded or hierarchical_padded only: a static buffer of ceil(f * T * K / E) rows per
    # (source rank, expert), so the dispatch needs no per-step agreement collective and no host read
    # (null: agreed per step)
    static_capacity_factor: Optional[float] = None
    # rows past the static buffer: drop (counted: runtime/overflow_dropped) | error (every rank raises) |
    # rerun (a step that overflowed anywhere is re-run once with a grown factor: parallel/overflow.py)
    overflow: str = "drop"
    backend: str = "auto"  # auto: nccl on CUDA, gloo on CPU
    timeout_s: float = 300.0
    # check every collective's fingerprint (op, shapes, dtypes) across ranks before it runs: a
    # mismatch then fails at once naming both sides, not deep in gloo or as an NCCL hang (slow: debug)
    debug_collectives: bool = False
    # trainer.engine=plain: all-reduce the gradients in buckets launched by their accumulate hooks while
    # the backward runs (parallel/grad_overlap.py; the same math); false: one flat all-reduce after the
    # backward. fsdp reduce-scatters in its backward and deepspeed reduces in its own buckets: not read
    grad_overlap: bool = True
    grad_bucket_mb: float = 25.0  # grad_overlap's bucket cap, MiB (DDP's default; the first bucket <= 1 MiB)
    # expert placement that follows the load (parallel/placement.py): off | static (measure and log
    # runtime/placement_imbalance, never move) | auto (every placement_interval steps, permute experts
    # over the ep ranks when the cost model says the gain repays moving weights and AdamW moments
    # within placement_payback_steps steps; the same math, checkpoints in expert order)
    placement: str = "off"
    placement_interval: int = 20
    placement_payback_steps: int = 100
    # replica slots a rank for the hottest experts (0: permute only): their rows split between the
    # holders, the replica's weights fetched from the owner each step and its gradient summed back
    placement_replicas: int = 0

    def on_cuda(self, cuda_available: bool) -> bool:
        """Whether the job trains on CUDA GPUs (nccl), given whether this machine has them."""
        return self.backend == "nccl" or (self.backend == "auto" and cuda_available)


@dataclass
class DataConfig:
    """data.*: the default is the embedded corpus (CPython's pydoc topics), byte-level."""

    path: Optional[str] = None  # None: embedded corpus; *.bin: token memmap; anything else: text file
    dtype: str = "uint16"  # for .bin files: uint16 | uint32
    vocab_size: int = 256  # 256 for byte-level text; set it for .bin files
    val_fraction: float = 0.1  # the last fraction of the tokens is the validation split
    # a tokenizer.json (or a directory holding one; `tokenizers` library): data.path's text (a file or a
    # folder; null: the embedded corpus) is tokenized once into a cached token file (moesys/tokens.py)
    tokenizer: Optional[str] = None
    cache_dir: Optional[str] = None  # where the token cache goes; null: ~/.cache/moesys/tokens


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

    # 60, not 30: at 3e-3 the model leaves its bigram plateau (steps ~15-30) at an LR past the edge of
    # stability and spikes (docs/stability.md; benchmarks/spike_probe.py)
    warmup_steps: int = 60
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
    # load a checkpoint with pickled entries (moesys before checkpoint format 4), which can run code
    # its author chose: only for checkpoints you or someone you trust wrote (README "Security")
    trust_checkpoint: bool = False
    extend_schedule: bool = False  # on resume: stretch the LR schedule to trainer.steps (default: keep the run's)
    max_bad_steps: int = 3  # stop after this many steps in a row with a non-finite loss / grad norm (each skipped)
    # warn when, in an MoE layer, one expert takes more than collapse_share of the (kept) routes for
    # collapse_steps optimizer steps in a row (moesys/collapse.py); 0 turns the check off. At top-k an
    # expert takes at most 1/k of the routes (0.5 at top-2), so keep the share below 1/k
    collapse_share: float = 0.4
    collapse_steps: int = 10
    out_dir: Optional[str] = None  # None: Hydra's run dir
    engine: str = "plain"  # plain | fsdp | deepspeed
    zero_stage: int = 1  # deepspeed only: 1 | 2
    # fsdp only (FSDP2, parallel/fsdp.py): free gathered weights after each block's forward (ZeRO-3);
    # the dtype weights are gathered and computed in (bf16: FSDP2's mixed precision), and the
    # gradient reduce-scatter's
    fsdp_reshard_after_forward: bool = True
    fsdp_param_dtype: str = "fp32"  # fp32 | bf16
    fsdp_reduce_dtype: str = "fp32"  # fp32 | bf16
    ds_config: Optional[str] = None  # deepspeed only: a base JSON (e.g. configs/deepspeed/zero2.json); trainer.* wins
    deterministic: bool = True
    plots: bool = True
    cpu_buffer_cache: bool = True  # CPU: reuse the MoE layers' large buffers across steps (moesys.kernels.workspace)
    cpu_buffer_cache_keep_scratch: bool = False  # CPU: keep step buffers across layers (faster, more memory)
    cpu_gemm_batch: bool = True  # CPU: the experts' small fp32 GEMMs in one batched MKL call (moesys.kernels.cpu_blas)
    debug: bool = False  # moesys-train: a bad config prints its traceback too (default: one line, exit code 2)


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
        """The MoEConfig of every MoE layer (validates the moe.* fields).

        Raises ConfigError with MoEConfig's message in the trainer's names (moe.top_k, model.d_model).
        """
        kw = {f.name: getattr(self.moe, f.name) for f in dataclasses.fields(self.moe)}
        try:
            return MoEConfig(hidden_size=self.model.d_model, ffn_hidden_size=self.model.ffn_hidden, **kw)
        except ValueError as e:  # MoEConfig.__post_init__: every check there raises ValueError
            raise ConfigError(_trainer_names(str(e))) from e

    def decoder_config(self):
        """The DecoderConfig of model.arch=decoder (validates the model.* fields)."""
        m = self.model
        try:
            return DecoderConfig(
                vocab_size=self.data.vocab_size, n_layers=m.n_layers, d_model=m.d_model, n_heads=m.n_heads,
                dense_ffn_hidden=m.dense_ffn_hidden if m.dense_ffn_hidden is not None else m.ffn_hidden,
                **{name: getattr(m, name) for name in DECODER_FIELDS if name != "dense_ffn_hidden"},
                moe_every=m.moe_every, tie_embeddings=m.tie_embeddings, qk_norm=m.qk_norm, dropout=m.dropout)
        except ValueError as e:
            raise ConfigError(str(e)) from e

    def apply_init_from(self) -> None:
        """Set the fields model.init_from's config.json determines. A field set away from its default to
        another value is an error naming both (config.json wins nothing silently)."""
        path = self.model.init_from
        if path is None:
            return
        if not os.path.isdir(path):
            raise ConfigFileNotFoundError(f"model.init_from={path!r}: no such directory")
        derived = hf.derive_settings(hf.read_config(path), os.path.join(path, hf.CONFIG_FILE))
        defaults = TrainConfig()
        for key, want in derived.items():
            group, name = key.split(".")
            cur = getattr(getattr(self, group), name)
            if cur == want:
                continue
            if cur != getattr(getattr(defaults, group), name):
                raise ConfigError(f"{key}={cur!r} contradicts model.init_from={path!r}, whose config.json gives "
                                  f"{key}={want!r}; drop the override")
            setattr(getattr(self, group), name, want)
        if self.data.tokenizer is None and os.path.isfile(os.path.join(path, tokens_mod.TOKENIZER_FILE)):
            self.data.tokenizer = path  # the model's own tokenizer

    def validate(self, world_size: Optional[int] = None) -> None:
        """Checks every field and the fields against each other; raises ConfigError naming the field and value.

        Runs in moesys-train's parent before anything is written or started, and on every rank before
        any collective. Reads file sizes only (data.path, trainer.ds_config), never the tokens; the token
        ids and the checkpoint to resume are checked by moesys.train.prepare. `world_size` is the
        world the job will run in (None: torchrun's WORLD_SIZE or parallel.simulate_ranks).
        """
        m, p, d, t = self.model, self.parallel, self.data, self.trainer
        o, s, lg = self.optim, self.schedule, self.logging
        if world_size is None:
            world_size = int(os.environ.get("WORLD_SIZE", p.simulate_ranks))
        _check_finite(self)
        # ---- model --------------------------------------------------------------------------------
        for name in ("n_layers", "d_model", "n_heads", "ffn_hidden", "seq_len"):
            _check(getattr(m, name) > 0, f"model.{name} must be > 0, got {getattr(m, name)}")
        if m.arch == "gpt" and m.d_model % m.n_heads:
            raise ConfigError(f"model.d_model ({m.d_model}) must be divisible by model.n_heads ({m.n_heads})")
        _check(m.moe_every >= 0, f"model.moe_every must be >= 0, got {m.moe_every}")
        _check(m.moe_every <= m.n_layers, f"model.moe_every ({m.moe_every}) > model.n_layers ({m.n_layers}): no layer "
                                          "would be an MoE layer (model.moe_every=0 is the dense model)")
        _check(0 <= m.dropout < 1, f"model.dropout must be in [0, 1), got {m.dropout}")
        _one_of("model.arch", m.arch, ("gpt", "decoder"))
        if m.arch == "gpt":
            if m.init_from is not None:
                raise ConfigError(f"model.init_from={m.init_from!r} starts the modern decoder: model.arch must be "
                                  "decoder (moesys-train sets it from config.json)")
            defaults = ModelConfig()
            for name in DECODER_FIELDS:
                if getattr(m, name) != getattr(defaults, name):
                    raise ConfigError(f"model.{name}={getattr(m, name)!r} is a field of the modern decoder only: set "
                                      "model.arch=decoder, or leave it at its default")
        else:
            self.decoder_config()
            if m.init_from is not None:
                probe = dataclasses.replace(self, model=dataclasses.replace(m), moe=dataclasses.replace(self.moe),
                                            data=dataclasses.replace(self.data))
                probe.apply_init_from()  # raises on a contradiction
                if probe != self:
                    raise ConfigError(f"model.init_from={m.init_from!r}: the config does not hold its config.json's "
                                      "settings (build it with TrainConfig.apply_init_from)")
            if m.first_k_dense >= m.n_layers and m.moe_every > 0:
                raise ConfigError(f"model.first_k_dense ({m.first_k_dense}) >= model.n_layers ({m.n_layers}): no "
                                  "layer would be an MoE layer (model.moe_every=0 is the dense model)")
        # ---- moe: MoEConfig's own checks, under the moe.* names ---------------------------------------
        moe = self.moe_config()
        if moe.router == "expert_choice" and not moe.allow_noncausal:
            raise ConfigError(
                "moe.router=expert_choice is not causal (each expert picks tokens from the whole batch, "
                "so a token's output depends on later tokens); set moe.allow_noncausal=true to use it "
                "in this decoder anyway"
            )
        # ---- parallel -----------------------------------------------------------------------------
        _check(p.ep > 0, f"parallel.ep must be > 0, got {p.ep}")
        _check(p.simulate_ranks > 0, f"parallel.simulate_ranks must be > 0, got {p.simulate_ranks}")
        _one_of("parallel.rank_start", p.rank_start, ("auto", "spawn"))
        if p.ep <= moe.num_experts and moe.num_experts % p.ep:
            raise ConfigError(
                f"moe.num_experts ({moe.num_experts}) must be divisible by parallel.ep ({p.ep})"
            )
        if p.ep > moe.num_experts:  # each expert's F is split over ep / num_experts ranks
            if p.ep % moe.num_experts:
                raise ConfigError(f"parallel.ep ({p.ep}) > moe.num_experts ({moe.num_experts}) needs parallel.ep "
                                  "divisible by moe.num_experts (each expert's FFN is split over ep/num_experts ranks)")
            if m.ffn_hidden % (p.ep // moe.num_experts):
                raise ConfigError(f"model.ffn_hidden ({m.ffn_hidden}) must be divisible by parallel.ep / "
                                  f"moe.num_experts ({p.ep // moe.num_experts})")
        if world_size % p.ep:
            raise ConfigError(f"world size ({world_size}) must be divisible by parallel.ep ({p.ep})")
        _one_of("parallel.dispatcher", p.dispatcher,
                ("alltoallv", "padded", "hierarchical", "hierarchical_padded", "allgather"))
        _one_of("parallel.mode", p.mode, ("auto", "ep", "sharded_dp"))
        _one_of("parallel.overlap", str(p.overlap), ("auto", "1", "2", "4", "8"))
        _one_of("parallel.backend", p.backend, ("auto", "gloo", "nccl"))
        _check(p.timeout_s > 0, f"parallel.timeout_s must be > 0, got {p.timeout_s}")
        _check(isinstance(p.grad_overlap, bool), f"parallel.grad_overlap must be true or false, got {p.grad_overlap!r}")
        _check(p.grad_bucket_mb > 0, f"parallel.grad_bucket_mb must be > 0 (MiB), got {p.grad_bucket_mb}")
        self._validate_placement(moe)
        f = p.static_capacity_factor
        if f is not None:
            _check(math.isfinite(f) and f > 0, f"parallel.static_capacity_factor must be a finite number > 0 or null, "
                                               f"got {f}")
            if p.dispatcher not in ("padded", "hierarchical_padded"):
                raise ConfigError(f"parallel.static_capacity_factor={f} needs parallel.dispatcher=padded or "
                                  f"hierarchical_padded (a fixed buffer), got parallel.dispatcher={p.dispatcher!r}")
            if moe.variable_k:
                raise ConfigError(f"parallel.static_capacity_factor={f} needs a fixed number of experts per token "
                                  f"(C = f*T*K/E); moe.router={moe.router!r} routes a variable number")
        _one_of("parallel.overflow", p.overflow, ("drop", "error", "rerun"))
        if p.overflow != "drop" and f is None:
            raise ConfigError(f"parallel.overflow={p.overflow!r} applies to a static buffer only: set "
                              "parallel.static_capacity_factor too (with parallel.dispatcher=padded or "
                              "hierarchical_padded)")
        if p.overflow == "rerun":
            if p.ep == 1:
                raise ConfigError("parallel.overflow='rerun' re-runs a step whose expert-parallel static buffer "
                                  "overflowed, and parallel.ep=1 dispatches nothing: set parallel.ep > 1")
            if t.engine == "deepspeed":
                raise ConfigError("parallel.overflow='rerun' needs trainer.engine=plain or fsdp: trainer.engine="
                                  "deepspeed steps the optimizer inside each micro-batch, before the step's overflow "
                                  "is known, so the step cannot be re-run")
        # ---- device and precision -----------------------------------------------------------------
        cuda = _cuda_available()
        if p.backend == "nccl" and not cuda:
            raise ConfigError("parallel.backend='nccl' needs CUDA GPUs and this machine has none; use "
                              "parallel.backend=auto (gloo on the CPU)")
        on_cuda = p.on_cuda(cuda)
        if t.precision not in ("fp32", "bf16"):
            raise ConfigError(f"trainer.precision={t.precision!r} is not one of fp32|bf16 (bf16 autocast runs on the "
                              "CPU and on GPUs; fp16 is not supported: it needs a loss scale)")
        if moe.kernel_backend in ("triton", "triton_persistent") and not (on_cuda or _triton_interpreted()):
            raise ConfigError(f"moe.kernel_backend={moe.kernel_backend!r} needs a CUDA device and this run trains on "
                              f"the CPU (parallel.backend={p.backend!r}); use moe.kernel_backend=auto or torch")
        # ---- trainer ------------------------------------------------------------------------------
        for name in ("steps", "batch_size", "grad_accum", "eval_interval", "eval_batches", "log_interval"):
            _check(getattr(t, name) > 0, f"trainer.{name} must be > 0, got {getattr(t, name)}")
        dp = world_size  # ep is a sub-axis of dp (tp = 1 here)
        if t.batch_size % (dp * t.grad_accum):
            raise ConfigError(
                f"trainer.batch_size ({t.batch_size}) must be divisible by data-parallel size ({dp}) x "
                f"trainer.grad_accum ({t.grad_accum})"
            )
        _check(t.ckpt_interval >= 0, f"trainer.ckpt_interval must be >= 0 (0: only at the end), got {t.ckpt_interval}")
        _check(t.keep_checkpoints >= 1, f"trainer.keep_checkpoints must be >= 1, got {t.keep_checkpoints}")
        _check(0 <= t.seed < 2**32, f"trainer.seed must be in [0, 2**32), got {t.seed}")
        _check(t.clip >= 0, f"trainer.clip must be >= 0 (0 disables), got {t.clip}")
        _check(t.max_bad_steps >= 1, f"trainer.max_bad_steps must be >= 1, got {t.max_bad_steps}")
        _check(0 <= t.collapse_share <= 1, f"trainer.collapse_share must be in [0, 1] (0: no collapse check), got {t.collapse_share}")
        _check(t.collapse_steps >= 1, f"trainer.collapse_steps must be >= 1, got {t.collapse_steps}")
        _one_of("trainer.engine", t.engine, ("plain", "fsdp", "deepspeed"))
        _one_of("trainer.fsdp_param_dtype", t.fsdp_param_dtype, ("fp32", "bf16"))
        _one_of("trainer.fsdp_reduce_dtype", t.fsdp_reduce_dtype, ("fp32", "bf16"))
        if t.engine == "fsdp":
            E, ep = moe.num_experts, p.ep
            if ep > E:
                raise ConfigError(
                    f"trainer.engine=fsdp with parallel.ep ({ep}) > moe.num_experts ({E}): each expert would be "
                    "split along F over ep/E ranks (a 2-D DTensor), which FSDP2 does not compose with; use "
                    f"parallel.ep <= {E} (the edp dim then shards the experts) or trainer.engine=plain")
        if t.zero_stage not in (1, 2):
            raise ConfigError(f"trainer.zero_stage must be 1 or 2 with MoE, got {t.zero_stage}")
        if t.engine == "deepspeed" and importlib.util.find_spec("deepspeed") is None:
            raise ConfigError("trainer.engine='deepspeed' needs the deepspeed package, which is not installed")
        if t.ds_config is not None:
            if t.engine != "deepspeed":
                raise ConfigError(f"trainer.ds_config={t.ds_config!r} is only read by trainer.engine=deepspeed "
                                  f"(trainer.engine={t.engine!r})")
            _check_json_object("trainer.ds_config", t.ds_config)
        if t.resume == "":
            raise ConfigError("trainer.resume='' is empty: use null (a new run), auto or a checkpoint path")
        if t.out_dir and os.path.exists(t.out_dir) and not os.path.isdir(t.out_dir):
            raise ConfigError(f"trainer.out_dir={t.out_dir!r} exists and is not a directory")
        # ---- optim and schedule -------------------------------------------------------------------
        _check(o.lr > 0, f"optim.lr must be > 0, got {o.lr}")
        if len(o.betas) != 2:
            raise ConfigError(f"optim.betas must have two values, got {list(o.betas)}")
        for i, b in enumerate(o.betas):
            _check(0 <= b < 1, f"optim.betas[{i}] must be in [0, 1), got {b}")
        _check(o.eps > 0, f"optim.eps must be > 0, got {o.eps}")
        _check(o.weight_decay >= 0, f"optim.weight_decay must be >= 0, got {o.weight_decay}")
        _check(s.warmup_steps >= 0, f"schedule.warmup_steps must be >= 0, got {s.warmup_steps}")
        _check(0 <= s.min_lr_ratio <= 1, f"schedule.min_lr_ratio must be in [0, 1], got {s.min_lr_ratio}")
        # ---- logging ------------------------------------------------------------------------------
        _one_of("logging.wandb_mode", lg.wandb_mode, ("offline", "online", "disabled"))
        if lg.wandb_mode != "disabled" and not lg.wandb_project.strip():
            raise ConfigError(f"logging.wandb_project must not be empty with logging.wandb_mode={lg.wandb_mode!r}")
        if lg.run_name is not None and not lg.run_name.strip():
            raise ConfigError("logging.run_name='' is empty: use null (W&B picks a name) or a name")
        # ---- evo ----------------------------------------------------------------------------------
        self._validate_evo(moe)
        # ---- data: file sizes only, the token ids are checked when the tokens are loaded ------------
        _check(0 < d.val_fraction < 1, f"data.val_fraction must be in (0, 1), got {d.val_fraction}")
        _one_of("data.dtype", d.dtype, ("uint16", "uint32"))
        _check(d.vocab_size > 0, f"data.vocab_size must be > 0, got {d.vocab_size}")
        if d.tokenizer is not None:  # the token count is known once tokenized (moesys.train.prepare)
            if d.path is not None and d.path.endswith(".bin"):
                raise ConfigError(f"data.tokenizer={d.tokenizer!r} tokenizes text; data.path={d.path!r} is already "
                                  "tokens (drop data.tokenizer)")
            if d.path is not None and not os.path.exists(d.path):
                raise ConfigFileNotFoundError(f"data.path={d.path!r}: no such file or folder")
            tv = tokens_mod.vocab_size(d.tokenizer)
            if d.vocab_size < tv:
                raise ConfigError(f"data.vocab_size ({d.vocab_size}) < the vocabulary of data.tokenizer="
                                  f"{d.tokenizer!r} ({tv}): set data.vocab_size={tv} (or larger)")
            return
        if d.path is not None and not os.path.isfile(d.path):
            raise ConfigFileNotFoundError(f"data.path={d.path!r}: no such file")
        if d.path is None and d.vocab_size != 256:
            raise ConfigError(f"data.path=null (the embedded corpus) is byte-level: data.vocab_size must be 256, "
                              f"got {d.vocab_size}")
        if d.path is not None and not d.path.endswith(".bin") and d.vocab_size != 256:
            raise ConfigError(f"data.path={d.path!r} is a text file (byte-level): data.vocab_size must be 256, "
                              f"got {d.vocab_size}")
        data_mod.check_split(data_mod.count_tokens(d.path, d.dtype), d.val_fraction, m.seq_len)

    def _validate_placement(self, moe: MoEConfig) -> None:
        p, t = self.parallel, self.trainer
        _one_of("parallel.placement", p.placement, ("off", "static", "auto"))
        _check(isinstance(p.placement_interval, int) and p.placement_interval >= 1,
               f"parallel.placement_interval must be an integer >= 1 (steps), got {p.placement_interval!r}")
        _check(isinstance(p.placement_payback_steps, int) and p.placement_payback_steps >= 1,
               f"parallel.placement_payback_steps must be an integer >= 1 (steps), got {p.placement_payback_steps!r}")
        _check(isinstance(p.placement_replicas, int) and p.placement_replicas >= 0,
               f"parallel.placement_replicas must be an integer >= 0, got {p.placement_replicas!r}")
        if p.placement == "off":
            if p.placement_replicas:
                raise ConfigError(f"parallel.placement_replicas={p.placement_replicas} needs parallel.placement=auto "
                                  "(or static), got parallel.placement='off'")
            return
        why = None
        if p.ep == 1:
            why = "parallel.ep=1 holds every expert on every rank: there is nothing to place; set parallel.ep > 1"
        elif p.ep > moe.num_experts:
            why = (f"parallel.ep ({p.ep}) > moe.num_experts ({moe.num_experts}) splits each expert over ranks; "
                   "placement moves whole experts")
        elif t.engine == "deepspeed":
            why = ("trainer.engine='deepspeed': placement moves the experts' rows and AdamW moments of the plain and "
                   "fsdp engines (DeepSpeed flattens them into its own buffers); use trainer.engine=plain or fsdp")
        if why is not None:
            raise ConfigError(f"parallel.placement={p.placement!r}: {why}")
        free = moe.num_experts - moe.num_experts // p.ep  # the experts a rank does not hold
        if p.placement_replicas > free:
            raise ConfigError(f"parallel.placement_replicas ({p.placement_replicas}) must be <= the experts a rank does "
                              f"not hold: moe.num_experts ({moe.num_experts}) - moe.num_experts / parallel.ep "
                              f"({moe.num_experts // p.ep}) = {free}")

    def _validate_evo(self, moe: MoEConfig) -> None:
        e = self.evo
        try:  # EvoConfig checks itself at construction; a replace() re-runs them on the current values
            dataclasses.replace(e)
        except ValueError as err:
            raise ConfigError(str(err)) from err
        if e.seed is not None:
            _check(0 <= e.seed < 2**32, f"evo.seed must be null or in [0, 2**32), got {e.seed}")
        if not e.enabled:
            return
        if self.model.moe_every == 0:
            raise ConfigError("evo.enabled=true needs MoE layers, but model.moe_every=0 (a dense model)")
        if moe.routed_scaling_factor != 1.0:
            raise ConfigError(f"evo.enabled=true does not support moe.routed_scaling_factor="
                              f"{moe.routed_scaling_factor} (EvoMoE's layer does not scale its routed output)")
        if moe.num_shared_experts:
            raise ConfigError(f"evo.enabled=true does not support shared experts (moe.num_shared_experts="
                              f"{moe.num_shared_experts}): EvoMoE's dense phase and its spawn have no place for "
                              "them; set moe.num_shared_experts=0")
        try:
            e.moe_config(moe)
        except ValueError as err:
            raise ConfigError(f"evo.gate={e.gate!r}: the layer after the switch is invalid: "
                              f"{_trainer_names(str(err))}") from err

    def warnings(self) -> List[str]:
        """Settings that are valid but probably not meant (the run logs them as it starts)."""
        s, t, e = self.schedule, self.trainer, self.evo
        out = []
        if s.warmup_steps > t.steps:
            out.append(f"schedule.warmup_steps ({s.warmup_steps}) > trainer.steps ({t.steps}): the learning rate "
                       f"never reaches optim.lr ({self.optim.lr})")
        m, p = self.moe, self.parallel
        if m.num_groups is not None and m.topk_groups is not None and m.topk_groups < m.num_groups and p.ep > 1:
            if m.num_groups % p.ep and p.ep % m.num_groups:
                out.append(f"moe.num_groups ({m.num_groups}) and parallel.ep ({p.ep}): groups are not aligned with "
                           f"the expert-parallel ranks, so a token can reach more than moe.topk_groups "
                           f"({m.topk_groups}) ranks; a num_groups that is a multiple of ep aligns them")
        if t.trust_checkpoint and t.resume is None:
            out.append("trainer.trust_checkpoint=true without trainer.resume: there is no checkpoint to trust")
        if e.enabled and e.diversify_step is not None and e.diversify_step >= t.steps:
            out.append(f"evo.diversify_step ({e.diversify_step}) >= trainer.steps ({t.steps}): the run ends in the "
                       "dense phase, before any expert is spawned")
        return out


# ---- checks ----------------------------------------------------------------------------------------
def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _one_of(name: str, value: Any, options: tuple) -> None:
    _check(value in options, f"{name}={value!r} is not one of {'|'.join(options)}")


def _check_finite(cfg: TrainConfig) -> None:
    """Every float setting (and float list entry) is finite: nan passes no comparison the range checks
    below make, but inf does (capacity_factor, timeout_s, clip ...)."""
    for group in dataclasses.fields(cfg):
        node = getattr(cfg, group.name)
        for f in dataclasses.fields(node):
            v = getattr(node, f.name)
            items = list(enumerate(v)) if isinstance(v, (list, tuple)) else [(None, v)]
            for i, x in items:
                if isinstance(x, float) and not math.isfinite(x):
                    where = f"{group.name}.{f.name}" + ("" if i is None else f"[{i}]")
                    raise ConfigError(f"{where} must be a finite number, got {x}")


def _check_json_object(name: str, path: str) -> None:
    if not os.path.isfile(path):
        raise ConfigFileNotFoundError(f"{name}={path!r}: no such file")
    try:
        with open(path) as f:
            obj = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{name}={path!r} is not readable JSON ({e})") from e
    _check(isinstance(obj, dict), f"{name}={path!r} must hold a JSON object, got {type(obj).__name__}")


def _trainer_names(message: str) -> str:
    """MoEConfig's message in the trainer's names: MoEConfig.top_k -> moe.top_k, hidden_size -> model.d_model."""
    return (message.replace("MoEConfig.hidden_size", "model.d_model")
            .replace("MoEConfig.ffn_hidden_size", "model.ffn_hidden").replace("MoEConfig.", "moe."))


def _cuda_available() -> bool:
    import torch  # moesys imports it anyway; kept local so the dataclasses above stay torch-free to read

    return torch.cuda.is_available()


def _triton_interpreted() -> bool:
    return backend.triton_available() and backend.interpreting()


def from_composed(dcfg) -> TrainConfig:
    """The TrainConfig of Hydra's composed config (a DictConfig without the `hydra` node).

    Raises ConfigError on a key the schema lacks (Hydra accepts `+trainer.stpes=5` and the run would
    ignore it) and on EvoConfig's own checks, which run when the dataclasses are built.
    """
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    top = {f.name: f for f in dataclasses.fields(TrainConfig)}
    for key in dcfg.keys():
        if key not in top:
            raise ConfigError(f"{key} is not a setting (added with '+'?); the groups are {', '.join(top)}")
        group = OmegaConf.get_type(dcfg, key)
        known = {f.name for f in dataclasses.fields(group)} if dataclasses.is_dataclass(group) else None
        extra = [k for k in dcfg[key].keys() if known is not None and k not in known]
        if extra:
            raise ConfigError(f"{key}.{extra[0]} is not a setting (added with '+'?): {key}.* has no field {extra[0]!r}")
    try:
        cfg = OmegaConf.to_object(dcfg)
    except (ValueError, OmegaConfBaseException) as e:  # EvoConfig.__post_init__; a value left at ???
        raise ConfigError(str(e).splitlines()[0]) from e
    cfg.apply_init_from()
    return cfg


def register() -> None:
    """Register the structured configs with Hydra's ConfigStore (idempotent)."""
    cs = ConfigStore.instance()
    cs.store(name="train_schema", node=TrainConfig)
