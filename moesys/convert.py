"""moesys-convert: moesys checkpoints to and from Hugging Face model directories.

    moesys-convert export-hf runs/my_run hf_out/        # a run dir or checkpoint dir, any engine and layout
    moesys-convert import-hf path/to/hf_model ckpt_out/  # a moesys checkpoint (moesys-eval, moesys-generate)

export-hf loads the checkpoint on one process (DCP reshards whatever layout wrote it) and writes the
Hugging Face directory (moesys/hf_export.py); import-hf reads the directory (moesys/hf.py) and writes
a moesys checkpoint at step 0 with the run config derived from config.json. Bad input (a missing or
truncated file, an unsupported architecture, an unwritable output) is one line on stderr, exit 2,
and nothing half-written.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import sys
import warnings
from typing import List, Optional

import torch

from moesys.configs.schema import TrainConfig

from . import checkpoint as ckpt_mod
from . import cli
from .errors import ConfigError
from .generate import load_model
from .hf import CONFIG_FILE, HFFormatError, derive_settings, from_pretrained, read_config
from .hf_export import DEFAULT_SHARD_BYTES, save_pretrained
from .trainer import structure_of

PROG = "moesys-convert"


def train_config_from_hf(path: str) -> TrainConfig:
    """moesys-train's config for the Hugging Face directory `path`: its derived settings over the defaults."""
    cfg = TrainConfig()
    for key, value in derive_settings(read_config(path), os.path.join(path, CONFIG_FILE)).items():
        group, name = key.split(".")
        setattr(getattr(cfg, group), name, value)
    return cfg


def export_hf(checkpoint: str, out_dir: str, *, max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> str:
    model, cfg, _ = load_model(checkpoint)
    tok = cfg.data.tokenizer  # the run's tokenizer files go along (tokenizer.json and its neighbours)
    tok_dir = None if tok is None else (tok if os.path.isdir(tok) else os.path.dirname(os.path.abspath(tok)))
    return save_pretrained(model, out_dir, max_shard_bytes=max_shard_bytes, tokenizer_dir=tok_dir,
                           max_position_embeddings=max(4096, cfg.model.seq_len))


def import_hf(hf_dir: str, out: str) -> str:
    """Write the HF model as a moesys checkpoint directory `out` (a checkpoints/ folder: out/latest ->
    out/step_00000000). Returns the checkpoint dir."""
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise HFFormatError(f"{out}: exists and is not an empty directory; moesys writes a new one")
    parent = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK):
        raise HFFormatError(f"{out}: cannot write there ({parent} is not a writable directory)")
    cfg = train_config_from_hf(hf_dir)
    model = from_pretrained(hf_dir)
    # AdamW's state as a fresh optimizer has it (zero moments, step 0): trainer.resume= finds every
    # entry it asks for, and the first step is the one a new optimizer would take
    optimizer = torch.optim.AdamW(model.parameters())
    for p in model.parameters():
        optimizer.state[p] = {"step": torch.tensor(0.0), "exp_avg": torch.zeros_like(p),
                              "exp_avg_sq": torch.zeros_like(p)}
    # written beside `out` and renamed: a failure leaves no half checkpoint under the name
    tmp = os.path.join(parent, f".{os.path.basename(out)}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        with warnings.catch_warnings():  # DCP warns that it saves in one process: that is the intent here
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            ckpt_mod.save_checkpoint(tmp, 0, model=model, optimizer=optimizer, trainer_state={"step": 0, "data_position": 0},
                                     structure=structure_of(cfg), keep=1, config=dataclasses.asdict(cfg))
        if os.path.isdir(out):
            os.rmdir(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return ckpt_mod.resolve(out)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    e = sub.add_parser("export-hf", help="a moesys run or checkpoint -> a Hugging Face model directory")
    e.add_argument("checkpoint", help="a run dir, its checkpoints/ dir or one checkpoint dir")
    e.add_argument("out_dir", help="the Hugging Face directory to write (new or empty)")
    e.add_argument("--max-shard-bytes", type=int, default=DEFAULT_SHARD_BYTES,
                   help=f"largest safetensors shard (default {DEFAULT_SHARD_BYTES})")
    i = sub.add_parser("import-hf", help="a Hugging Face model directory -> a moesys checkpoint")
    i.add_argument("hf_dir", help="config.json + safetensors (single, or shards with their index)")
    i.add_argument("out_checkpoint", help="the checkpoint directory to write (new or empty)")
    return p


def main(argv: Optional[List[str]] = None) -> None:
    args = _parser().parse_args(argv)
    try:
        if args.command == "export-hf":
            if args.max_shard_bytes <= 0:
                raise ConfigError(f"--max-shard-bytes must be > 0, got {args.max_shard_bytes}")
            out = export_hf(args.checkpoint, args.out_dir, max_shard_bytes=args.max_shard_bytes)
        else:
            out = import_hf(args.hf_dir, args.out_checkpoint)
    except (ConfigError, ckpt_mod.CheckpointError) as e:
        cli.exit_bad_input(PROG, str(e), debug=False)
    except OSError as e:  # e.g. the disk filled while writing: named, nothing left behind
        cli.exit_bad_input(PROG, f"{e.filename or ''}: {e.strerror or e}", debug=False)
    print(f"{PROG}: wrote {out}", file=sys.stdout)


if __name__ == "__main__":
    main()
