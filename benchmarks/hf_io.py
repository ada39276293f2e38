"""Hugging Face I/O: import time, bytes read and peak memory per rank at EP 1 and EP 4, and export
time and peak memory, for an OLMoE-shaped model with 64 experts (CPU, gloo ranks).

    python benchmarks/hf_io.py                                   # d=256, F=256, 4 layers, 64 experts
    python benchmarks/hf_io.py --d-model 512 --ffn 512 --layers 8
    python benchmarks/hf_io.py --full-build                      # also the way before, for comparison

The Hugging Face directory is written by moesys's own export (no transformers needed). Import, as
`model.init_from` does it: each rank builds the decoder on the meta device, shards its experts
(apply_expert_parallel), allocates only its shards (moesys.parallel.materialize) and reads its slices
into them (moesys.hf.load_into). Memory per rank: the resident memory now (/proc/self/statm) at the
start, after the build and after the load (the peak RSS, also given, is set by importing torch and
hides the weights; the ranks are forked from a server that imported moesys, and a forked process
counts the pages it shares with the server from its start, as a spawned one counts its imports). Export: one process (export-hf loads a checkpoint of any layout whole on one
process, then writes one shard at a time).
"""
from __future__ import annotations

import argparse
import contextlib
import os
import resource
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from _shapes import RANK_PRELOAD  # noqa: E402  (benchmarks/ is on sys.path when a script runs)
from moesys import MoEConfig, hf  # noqa: E402
from moesys.decoder import Decoder, DecoderConfig  # noqa: E402
from moesys.hf_export import save_pretrained  # noqa: E402
from moesys.parallel import ParallelDims, apply_expert_parallel, materialize, simulate  # noqa: E402


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _rss_mib() -> float:
    """The process's resident memory now (Linux /proc): the peak is set by importing torch, so the
    current figure is what shows the model's weights."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _configs(a):
    dcfg = DecoderConfig(vocab_size=a.vocab, n_layers=a.layers, d_model=a.d_model, n_heads=8, dense_ffn_hidden=a.ffn,
                         qk_norm=True, qk_norm_scope="all")
    moe = MoEConfig(hidden_size=a.d_model, ffn_hidden_size=a.ffn, num_experts=a.experts, top_k=8,
                    activation="swiglu", normalize_topk=False)
    return dcfg, moe


def import_rank(path: str, ep: int, a, meta: bool = True) -> dict:
    """Rank fn: build on meta, shard, allocate this rank's shards, load its slices; time and memory.
    meta=False: the way before, every expert built (random init) and then sliced by the sharding."""
    dcfg, moe = _configs(a)
    dims = ParallelDims.build(ep=ep, timeout_s=300)
    rss0 = _rss_mib()
    t0 = time.perf_counter()
    with torch.device("meta") if meta else contextlib.nullcontext():
        model = Decoder(dcfg, moe)
    built_rss = _rss_mib()  # before sharding: the whole model when meta=False
    if ep > 1:
        for _, layer in model.moe_layers():
            apply_expert_parallel(layer, dims.ep_group, dims=dims, overlap=1)
    if meta:
        materialize(model, "cpu")
    reader = hf.load_into(model, path)
    return {"seconds": time.perf_counter() - t0, "bytes": reader.bytes_read, "expert_bytes": reader.expert_bytes_read,
            "rss_before_mib": rss0, "rss_built_mib": built_rss, "rss_loaded_mib": _rss_mib(), "peak_mib": _peak_mib()}


def export_once(path: str, out: str) -> dict:
    """Rank fn (1 rank): load the directory whole, write it again; time and memory."""
    model = hf.from_pretrained(path)
    loaded = _rss_mib()
    t0 = time.perf_counter()
    save_pretrained(model, out, max_shard_bytes=64 * 1024**2)
    return {"seconds": time.perf_counter() - t0, "rss_loaded_mib": loaded, "rss_written_mib": _rss_mib(),
            "peak_after_export_mib": _peak_mib()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--ffn", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--experts", type=int, default=64)
    p.add_argument("--vocab", type=int, default=1024)
    p.add_argument("--eps", type=int, nargs="+", default=[1, 4])
    p.add_argument("--full-build", action="store_true",
                   help="also import the way before (every rank builds all experts, then slices them)")
    a = p.parse_args()
    dcfg, moe = _configs(a)
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        src = save_pretrained(Decoder(dcfg, moe), os.path.join(tmp, "hf"), max_shard_bytes=64 * 1024**2)
        size = sum(os.path.getsize(os.path.join(src, f)) for f in os.listdir(src) if f.endswith(".safetensors"))
        print(f"model: {a.layers} layers, d={a.d_model}, F={a.ffn}, {a.experts} experts; safetensors {size / 2**20:.1f} MiB")
        print("| what | ranks | seconds (max over ranks) | MiB read per rank (experts) | RSS MiB per rank (max): "
              "start -> model built -> loaded | peak RSS MiB |")
        print("|---|---|---|---|---|---|")
        runs = [(ep, True) for ep in a.eps] + [(ep, False) for ep in a.eps if a.full_build and ep > 1]
        for ep, meta in runs:
            res = simulate(import_rank, ep, src, ep, a, meta, timeout_s=600, preload=RANK_PRELOAD)
            worst = max(res, key=lambda r: r["seconds"])
            what = f"import EP {ep}" + ("" if meta else ", all experts built then sliced (before)")
            print(f"| {what} | {ep} | {worst['seconds']:.2f} | {max(r['bytes'] for r in res) / 2**20:.1f} "
                  f"({max(r['expert_bytes'] for r in res) / 2**20:.1f}) | "
                  f"{max(r['rss_before_mib'] for r in res):.0f} -> {max(r['rss_built_mib'] for r in res):.0f} -> "
                  f"{max(r['rss_loaded_mib'] for r in res):.0f} | {max(r['peak_mib'] for r in res):.0f} |")
        ex = simulate(export_once, 1, src, os.path.join(tmp, "out"), timeout_s=600, preload=RANK_PRELOAD)[0]
        print(f"| export (one process) | 1 | {ex['seconds']:.2f} | - | loaded {ex['rss_loaded_mib']:.0f} -> "
              f"written {ex['rss_written_mib']:.0f} | {ex['peak_after_export_mib']:.0f} |")


if __name__ == "__main__":
    main()
