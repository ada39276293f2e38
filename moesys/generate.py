"""`moesys-generate`: sample a continuation from a checkpoint.

    moesys-generate checkpoint=runs/a 'prompt="The "' max_new_tokens=200
    moesys-generate checkpoint=runs/a 'prompt="def "' temperature=0.8 top_k=40 top_p=0.95 seed=3
    moesys-generate checkpoint=runs/a prompt="Th" temperature=0         # greedy
    moesys-generate checkpoint=runs/tok prompt_tokens=[464,3290] max_new_tokens=20   # .bin token data

The model is rebuilt from the run config saved in the checkpoint and loaded on this one process
with every expert local (experts are stored per global index, so a checkpoint trained at any EP
size loads; an EvoMoE checkpoint keeps its phase: a dense-phase one samples from the dense FFN).
For byte-level runs the prompt is UTF-8 and the continuation is decoded with errors='replace' (a
sample can cut a multi-byte character); for .bin token data give prompt_tokens and read the ids.

Sampling: temperature (0 = greedy), then top_k, then top_p (nucleus) on the next-token
distribution, drawn from a CPU torch.Generator seeded with `seed`: the same checkpoint, prompt and
settings give the same text (on one device type).

Cost: with kv_cache=true (the default) the prompt runs once and every new token runs the model on
one position, attending over the cached keys and values (KVCache in moesys/model.py). The modern
decoder's positions are rotary: its cache grows without a window. The GPT's positions are learned
and absolute, so once prompt + text outgrows model.seq_len the window slides by
recomputing: each further token runs the whole last seq_len tokens, the same cost as
kv_cache=false, which recomputes the window for every token. With a capacity factor
(moe.capacity_factor set) a full window can drop routes that one cached position does not, so the two
can differ there; dropless runs (the default) give the same tokens either way. Expert-choice
routing depends on the whole batch, so it always recomputes.
"""
from __future__ import annotations

import json
import warnings
from typing import List, Tuple

import torch

from moesys.configs.apps import GenerateConfig, checked, register, saved_run_config
from moesys.configs.schema import TrainConfig
from moesys.errors import ConfigError

from . import checkpoint as ckpt_mod
from . import cli
from . import tokens as tokens_mod
from .evaluate import byte_level, open_checkpoint
from .model import GPTMoE, KVCache
from .trainer import build_model, structure_of

PROG = "moesys-generate"
register()


def load_model(path: str, device: torch.device = torch.device("cpu"),
               trust_checkpoint: bool = False) -> Tuple[GPTMoE, TrainConfig, str]:
    """The checkpoint's model on one process (all experts local), in eval mode; its run config; the
    checkpoint dir. ConfigError when the checkpoint is missing, corrupt, holds no config, or holds
    pickled entries and trust_checkpoint is false."""

    ckpt, meta = open_checkpoint(path)
    cfg = saved_run_config(ckpt, meta)
    # the run may have forced Triton experts on its GPUs; the same math runs here on whatever exists
    cfg.moe.kernel_backend = "auto"
    model = build_model(cfg).to(device)
    try:
        with warnings.catch_warnings():  # DCP warns that it loads in one process: that is the intent here
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            ckpt_mod.load_checkpoint(ckpt, model=model, optimizer=None, structure=structure_of(cfg),
                                     restore_rng=False, trust_pickle=trust_checkpoint)
    except ckpt_mod.CheckpointError as e:
        raise ConfigError(f"checkpoint={path!r}: {e}") from e
    return model.eval(), cfg, ckpt


def sample_next(logits_V: torch.Tensor, *, temperature: float, top_k: int, top_p: float,
                generator: torch.Generator) -> int:
    """One token id from next-token logits [V]: greedy at temperature 0, else temperature, top-k,
    top-p (the smallest set of most likely tokens whose probability reaches top_p), then a draw."""
    logits_V = logits_V.detach().float().cpu()  # the draw on the CPU generator: one stream on any device
    if temperature == 0:
        return int(torch.argmax(logits_V))
    logits_V = logits_V / temperature
    if 0 < top_k < logits_V.numel():
        kth = torch.topk(logits_V, top_k).values[-1]
        logits_V = logits_V.masked_fill(logits_V < kth, float("-inf"))
    if top_p < 1.0:
        probs, order = torch.sort(torch.softmax(logits_V, -1), descending=True)
        before = torch.cumsum(probs, 0) - probs  # mass of the more likely tokens
        logits_V = logits_V.clone()
        logits_V[order[before >= top_p]] = float("-inf")  # the most likely token always stays
    return int(torch.multinomial(torch.softmax(logits_V, -1), 1, generator=generator))


@torch.no_grad()
def generate(model: GPTMoE, prompt_ids: List[int], *, max_new_tokens: int, temperature: float = 1.0, top_k: int = 0,
             top_p: float = 1.0, seed: int = 0, kv_cache: bool = True) -> List[int]:
    """The prompt followed by max_new_tokens sampled ids (see the module docstring for the cost)."""
    if not prompt_ids:
        raise ConfigError("the prompt is empty: give prompt=TEXT or prompt_tokens=[ids]")
    # the GPT's learned positions bound the window; the decoder's rotary positions do not (None)
    S = model.cfg.seq_len if isinstance(model, GPTMoE) else None
    device = model.tok_emb.weight.device
    if any(b.moe is not None and b.moe.cfg.router == "expert_choice" for b in model.blocks):
        kv_cache = False  # an expert picks among the batch's tokens: one position alone routes differently
    gen = torch.Generator().manual_seed(seed)
    ids = list(prompt_ids)
    start, cache = 0, None  # the cache holds ids[start:start + cache.length]
    for _ in range(max_new_tokens):
        if cache is not None and (S is None or len(ids) - start <= S):  # one new position
            feed = ids[-1:]
        else:  # first step, no cache, or the window is full: (re)compute the last S tokens
            start = 0 if S is None else max(0, len(ids) - S)
            cache = KVCache(len(model.blocks)) if kv_cache else None
            feed = ids[start:]
        logits, _, _ = model(torch.tensor([feed], device=device), cache=cache)
        ids.append(sample_next(logits[0, -1], temperature=temperature, top_k=top_k, top_p=top_p, generator=gen))
    return ids


def prompt_ids_of(gcfg: GenerateConfig, cfg: TrainConfig) -> List[int]:
    if gcfg.prompt_tokens is not None:
        ids = list(gcfg.prompt_tokens)
        bad = [t for t in ids if not 0 <= t < cfg.data.vocab_size]
        if bad:
            raise ConfigError(f"prompt_tokens holds id {bad[0]}, outside the model's vocabulary [0, {cfg.data.vocab_size})")
    elif cfg.data.tokenizer is not None:
        ids = tokens_mod.load_tokenizer(cfg.data.tokenizer).encode(gcfg.prompt, add_special_tokens=False).ids
    elif not byte_level(cfg.data.path):
        raise ConfigError(f"the run trained on token ids ({cfg.data.path}, vocab {cfg.data.vocab_size}): give "
                          "prompt_tokens=[ids] (moesys has no tokenizer for them)")
    else:
        ids = list(gcfg.prompt.encode("utf-8"))
    if not ids:
        raise ConfigError("the prompt is empty: give prompt=TEXT or prompt_tokens=[ids]")
    return ids


def run(gcfg: GenerateConfig) -> dict:
    gcfg.validate()
    model, cfg, ckpt = load_model(gcfg.checkpoint, torch.device(gcfg.device), gcfg.trust_checkpoint)
    prompt = prompt_ids_of(gcfg, cfg)
    ids = generate(model, prompt, max_new_tokens=gcfg.max_new_tokens, temperature=gcfg.temperature,
                   top_k=gcfg.top_k, top_p=gcfg.top_p, seed=gcfg.seed, kv_cache=gcfg.kv_cache)
    new = ids[len(prompt):]
    out = {"checkpoint": ckpt, "prompt_tokens": prompt, "tokens": new}
    if cfg.data.tokenizer is not None:
        tok = tokens_mod.load_tokenizer(cfg.data.tokenizer)
        out["prompt"], out["text"] = tok.decode(prompt), tok.decode(new)
    elif byte_level(cfg.data.path):
        out["prompt"] = bytes(prompt).decode("utf-8", errors="replace")
        out["text"] = bytes(new).decode("utf-8", errors="replace")
    return out


# ---- Hydra entry point -----------------------------------------------------------------------------
def _checked(dcfg) -> GenerateConfig:
    gcfg = checked(dcfg, GenerateConfig)
    gcfg.validate()
    return gcfg


def _hydra_main(dcfg) -> None:
    try:
        gcfg = _checked(dcfg)
        res = run(gcfg)
    except ConfigError as e:
        cli.exit_bad_input(PROG, str(e), bool(dcfg.debug))
    print(res["prompt"] + res["text"] if "text" in res else " ".join(map(str, res["prompt_tokens"] + res["tokens"])),
          flush=True)
    if gcfg.out:
        with open(gcfg.out, "w") as f:
            json.dump(res, f, indent=1)


def main() -> None:
    cli.run_app(PROG, "generate", _checked, _hydra_main)


if __name__ == "__main__":
    main()
