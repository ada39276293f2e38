"""Structured configs of `moesys-eval` and `moesys-generate` (primary configs eval.yaml, generate.yaml).

Both read the trained run's config from the checkpoint (moesys.json "config", written by every save;
else the run directory's config.yaml) and change only what their own fields name. moesys-eval's
fields keep moesys-train's names (`parallel.ep`, `trainer.eval_batches`, `data.path`), so an error
from `TrainConfig.validate` names the key the user typed. Errors are `ConfigError`: one line, exit 2.
"""
from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from typing import List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from moesys.errors import ConfigError

from .schema import ParallelConfig, TrainConfig


@dataclass
class EvalTrainer:
    """trainer.*: the evaluation's batches (null: the run's own)."""

    eval_batches: Optional[int] = None
    batch_size: Optional[int] = None
    precision: Optional[str] = None
    trust_checkpoint: bool = False  # load pickled entries (checkpoints before format 4): README "Security"


@dataclass
class EvalData:
    """data.*: null keeps the run's data (its validation split is what the run evaluated)."""

    path: Optional[str] = None
    dtype: Optional[str] = None


@dataclass
class EvalConfig:
    checkpoint: str = MISSING  # a checkpoint dir, a checkpoints/ dir or a run's out dir (its latest)
    parallel: ParallelConfig = field(default_factory=lambda: ParallelConfig(ep=1, simulate_ranks=1))
    trainer: EvalTrainer = field(default_factory=EvalTrainer)
    data: EvalData = field(default_factory=EvalData)
    out: Optional[str] = None  # also write the results as JSON here
    debug: bool = False  # a bad setting prints its traceback too


@dataclass
class GenerateConfig:
    checkpoint: str = MISSING
    prompt: str = ""  # text, encoded as UTF-8 bytes (byte-level runs only)
    prompt_tokens: Optional[List[int]] = None  # token ids instead of prompt (any vocabulary)
    max_new_tokens: int = 200
    temperature: float = 1.0  # 0: greedy (argmax)
    top_k: int = 0  # 0: off; else sample among the k most likely tokens
    top_p: float = 1.0  # nucleus: the smallest set of tokens whose probability reaches top_p; 1: off
    seed: int = 0  # the same seed, checkpoint and settings give the same text
    kv_cache: bool = True  # false: recompute the whole window for every new token (the reference)
    device: str = "cpu"  # cpu | cuda
    out: Optional[str] = None  # also write prompt and continuation (tokens and text) as JSON here
    trust_checkpoint: bool = False  # load pickled entries (checkpoints before format 4): README "Security"
    debug: bool = False

    def validate(self) -> None:
        if self.max_new_tokens < 0:
            raise ConfigError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise ConfigError(f"temperature must be a finite number >= 0 (0: greedy), got {self.temperature}")
        if self.top_k < 0:
            raise ConfigError(f"top_k must be >= 0 (0: off), got {self.top_k}")
        if not (0 < self.top_p <= 1):
            raise ConfigError(f"top_p must be in (0, 1] (1: off), got {self.top_p}")
        if self.device not in ("cpu", "cuda"):
            raise ConfigError(f"device={self.device!r} is not one of cpu, cuda")
        if self.device == "cuda":
            import torch

            if not torch.cuda.is_available():
                raise ConfigError("device=cuda but this machine has no CUDA GPU; use device=cpu")
        if self.prompt and self.prompt_tokens is not None:
            raise ConfigError("give prompt or prompt_tokens, not both")
        if not self.prompt and not self.prompt_tokens:
            raise ConfigError("the prompt is empty: give prompt=TEXT or prompt_tokens=[ids]")


def checked(dcfg, schema):
    """The typed config of a composed eval/generate DictConfig; ConfigError for a value left at ???."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    if OmegaConf.is_missing(dcfg, "checkpoint"):
        raise ConfigError("checkpoint=PATH is required (a checkpoint dir, a checkpoints/ dir or a run's out dir)")
    try:
        cfg = OmegaConf.to_object(dcfg)
    except (ValueError, OmegaConfBaseException) as e:
        raise ConfigError(str(e).splitlines()[0]) from e
    assert isinstance(cfg, schema)
    return cfg


def saved_run_config(ckpt: str, meta: dict) -> TrainConfig:
    """The TrainConfig the checkpoint was trained with: moesys.json's "config", else the run directory's
    config.yaml (<run>/checkpoints/step_N/ -> <run>/config.yaml). ConfigError when neither exists."""
    from omegaconf import DictConfig, OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    data = meta.get("config")
    where = f"{ckpt}/moesys.json"
    if data is None:
        run_yaml = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(ckpt))), "config.yaml")
        if not os.path.isfile(run_yaml):
            raise ConfigError(f"checkpoint {ckpt!r} holds no config (saved before configs were stored) and "
                              f"{run_yaml} does not exist: the model's settings are unknown")
        data, where = OmegaConf.load(run_yaml), run_yaml
    try:
        data = OmegaConf.create(data)
        if isinstance(data.get("model"), DictConfig) and "arch" not in data.model:
            data.model.arch = "gpt"  # saved before model.arch existed: every such run trained the GPT
        merged = OmegaConf.merge(OmegaConf.structured(TrainConfig), data)
        return OmegaConf.to_object(merged)
    except (ValueError, OmegaConfBaseException) as e:
        raise ConfigError(f"the run config in {where} does not fit this moesys: {str(e).splitlines()[0]}") from e


def eval_run_config(ecfg: EvalConfig, run: TrainConfig) -> TrainConfig:
    """The run's config with the evaluation's settings: its layout, batches, data; the plain engine
    (a DeepSpeed run's checkpoint is in the same format) and no logging."""
    cfg = dataclasses.replace(run)
    cfg.parallel = dataclasses.replace(ecfg.parallel)
    t = ecfg.trainer
    cfg.trainer = dataclasses.replace(run.trainer, engine="plain", resume=None, plots=False,
                                      eval_batches=run.trainer.eval_batches if t.eval_batches is None else t.eval_batches,
                                      batch_size=run.trainer.batch_size if t.batch_size is None else t.batch_size,
                                      precision=run.trainer.precision if t.precision is None else t.precision,
                                      grad_accum=1, ds_config=None,
                                      # never the saved config's: the checkpoint cannot vouch for itself
                                      trust_checkpoint=t.trust_checkpoint)
    if ecfg.data.path is not None or ecfg.data.dtype is not None:
        cfg.data = dataclasses.replace(run.data, path=ecfg.data.path if ecfg.data.path is not None else run.data.path,
                                       dtype=ecfg.data.dtype if ecfg.data.dtype is not None else run.data.dtype)
    cfg.logging = dataclasses.replace(run.logging, wandb_mode="disabled", tqdm=False)
    # a run that forced Triton experts on GPUs evaluates anywhere: the same math on what exists here
    cfg.moe = dataclasses.replace(run.moe, kernel_backend="auto")
    return cfg


def register() -> None:
    cs = ConfigStore.instance()
    cs.store(name="eval_schema", node=EvalConfig)
    cs.store(name="generate_schema", node=GenerateConfig)
