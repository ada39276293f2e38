"""Run logging: a JSONL metrics file (always), W&B (offline by default), tqdm progress (rank 0),
and the run's resolved config.yaml.

Only rank 0 writes; other ranks get a logger whose methods do nothing, so the trainer never
branches on the rank to log.
"""
from __future__ import annotations

import json
import math
import os
import time
from typing import Optional

import torch


def _plain(v):
    if isinstance(v, torch.Tensor):
        v = v.detach().float().item() if v.numel() == 1 else v.detach().float().tolist()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v


class RunLogger:
    """Writes metrics of rank 0.

    Args:
        out_dir: the run's output directory (metrics.jsonl, wandb/).
        enabled: False on ranks other than 0.
        wandb_mode: offline | online | disabled. Offline never touches the network.
        total_steps, start_step: for the progress bar.
        config: the run's config as a plain dict (recorded in W&B and at the top of metrics.jsonl).
    """

    def __init__(self, out_dir: str, *, enabled: bool, wandb_mode: str, project: str, run_name: Optional[str],
                 total_steps: int, start_step: int, config: dict, use_tqdm: bool = True) -> None:
        self.enabled = enabled
        self._wandb = None
        self._bar = None
        self._f = None
        if not enabled:
            return
        os.makedirs(out_dir, exist_ok=True)
        self._f = open(os.path.join(out_dir, "metrics.jsonl"), "a")
        self._write({"event": "start", "time": time.time(), "start_step": start_step, "config": config})
        if wandb_mode != "disabled":
            os.environ.setdefault("WANDB_DIR", out_dir)
            os.environ.setdefault("WANDB_SILENT", "true")
            import wandb

            self._wandb = wandb.init(project=project, name=run_name, dir=out_dir, mode=wandb_mode,
                                     config=config, resume="allow")
        if use_tqdm:
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, initial=start_step, desc="train", dynamic_ncols=True)

    def _write(self, rec: dict) -> None:
        self._f.write(json.dumps(rec, default=str) + "\n")
        self._f.flush()

    def log(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        rec = {k: _plain(v) for k, v in metrics.items()}
        self._write({"step": step, **rec})
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in rec.items() if isinstance(v, (int, float))}, step=step)

    def event(self, name: str, fields: dict) -> None:
        """A named event record in metrics.jsonl ({"event": name, ...}), e.g. "overflow_rerun"."""
        if not self.enabled:
            return
        self._write({"event": name, **{k: _plain(v) for k, v in fields.items()}})

    def progress(self, n: int, loss: float, tokens_per_s: float) -> None:
        if self._bar is not None:
            self._bar.update(n)
            self._bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tokens_per_s:,.0f}")

    def message(self, text: str) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(text)
        else:
            print(text, flush=True)

    def close(self, summary: Optional[dict] = None) -> None:
        if not self.enabled:
            return
        if summary is not None:
            self._write({"event": "end", **{k: _plain(v) for k, v in summary.items()}})
            if self._wandb is not None:
                for k, v in summary.items():
                    if isinstance(_plain(v), (int, float)):
                        self._wandb.summary[k] = _plain(v)
        if self._bar is not None:
            self._bar.close()
        if self._wandb is not None:
            self._wandb.finish()
        self._f.close()


CONFIG_FILE = "config.yaml"


def write_config(out_dir: str, config: dict) -> str:
    """<out_dir>/config.yaml: the run's resolved config (every field, defaults included), replaced
    atomically; a resumed run replaces it with the config it was started with."""
    from omegaconf import OmegaConf

    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, CONFIG_FILE)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(OmegaConf.to_yaml(OmegaConf.create(config)))
    os.replace(tmp, path)
    return path
