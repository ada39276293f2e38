"""Hugging Face I/O: import time, bytes read and peak memory per rank at EP 1 and EP 4, and export
time and peak memory, for an OLMoE-shaped model with 64 experts (CPU, gloo ranks).

    python benchmarks/hf_io.py                                   # d=256, F=256, 4 layers, 64 experts
    python benchmarks/hf_io.py --d-model 512 --ffn 512 --layers 8

The Hugging Face directory is written by moesys's own export (no transformers needed). Import: each
rank builds the decoder, shards its experts (apply_expert_parallel) and reads its slices
(moesys.hf.load_into); memory is the process's peak RSS (ru_maxrss) after the build and after the
load, so the load's own cost is the difference. Export: one process (export-hf loads a checkpoint of
any layout whole on one process, then writes one shard at a time).
"""
from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from moesys import MoEConfig, hf  # noqa: E402
from moesys.decoder import Decoder, DecoderConfig  # noqa: E402
from moesys.hf_export import save_pretrained  # noqa: E402
from moesys.parallel import ParallelDims, apply_expert_parallel, simulate  # noqa: E402


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _configs(a):
    dcfg = DecoderConfig(vocab_size=a.vocab, n_layers=a.layers, d_model=a.d_model, n_heads=8, dense_ffn_hidden=a.ffn,
                         qk_norm=True, qk_norm_scope="all")
    moe = MoEConfig(hidden_size=a.d_model, ffn_hidden_size=a.ffn, num_experts=a.experts, top_k=8,
                    activation="swiglu", normalize_topk=False)
    return dcfg, moe


def import_rank(path: str, ep: int, a) -> dict:
    """Rank fn: build, shard, load this rank's slices; time and memory."""
    dcfg, moe = _configs(a)
    dims = ParallelDims.build(ep=ep, timeout_s=300)
    model = Decoder(dcfg, moe)
    if ep > 1:
        for _, layer in model.moe_layers():
            apply_expert_parallel(layer, dims.ep_group, dims=dims, overlap=1)
    built = _peak_mib()
    t0 = time.perf_counter()
    reader = hf.load_into(model, path)
    return {"seconds": time.perf_counter() - t0, "bytes": reader.bytes_read, "expert_bytes": reader.expert_bytes_read,
            "peak_after_build_mib": built, "peak_after_load_mib": _peak_mib()}


def export_once(path: str, out: str) -> dict:
    """Rank fn (1 rank): load the directory whole, write it again; time and memory."""
    model = hf.from_pretrained(path)
    loaded = _peak_mib()
    t0 = time.perf_counter()
    save_pretrained(model, out, max_shard_bytes=64 * 1024**2)
    return {"seconds": time.perf_counter() - t0, "peak_after_load_mib": loaded, "peak_after_export_mib": _peak_mib()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--ffn", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--experts", type=int, default=64)
    p.add_argument("--vocab", type=int, default=1024)
    p.add_argument("--eps", type=int, nargs="+", default=[1, 4])
    a = p.parse_args()
    dcfg, moe = _configs(a)
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        src = save_pretrained(Decoder(dcfg, moe), os.path.join(tmp, "hf"), max_shard_bytes=64 * 1024**2)
        size = sum(os.path.getsize(os.path.join(src, f)) for f in os.listdir(src) if f.endswith(".safetensors"))
        print(f"model: {a.layers} layers, d={a.d_model}, F={a.ffn}, {a.experts} experts; safetensors {size / 2**20:.1f} MiB")
        print("| what | ranks | seconds (max over ranks) | MiB read per rank (experts) | peak RSS MiB after build -> after load |")
        print("|---|---|---|---|---|")
        for ep in a.eps:
            res = simulate(import_rank, ep, src, ep, a, timeout_s=600)
            worst = max(res, key=lambda r: r["seconds"])
            print(f"| import EP {ep} | {ep} | {worst['seconds']:.2f} | {max(r['bytes'] for r in res) / 2**20:.1f} "
                  f"({max(r['expert_bytes'] for r in res) / 2**20:.1f}) | "
                  f"{max(r['peak_after_build_mib'] for r in res):.0f} -> {max(r['peak_after_load_mib'] for r in res):.0f} |")
        ex = simulate(export_once, 1, src, os.path.join(tmp, "out"), timeout_s=600)[0]
        print(f"| export (one process) | 1 | {ex['seconds']:.2f} | - | {ex['peak_after_load_mib']:.0f} -> "
              f"{ex['peak_after_export_mib']:.0f} |")


if __name__ == "__main__":
    main()
