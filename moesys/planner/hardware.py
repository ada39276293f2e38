"""Cluster presets for `moesys-plan`: YAML files under configs/cluster/ (installed as moesys.configs),
or any YAML file of the same fields, turned into the cost model's Hardware.

    hw = load_hardware("a100_dgx", precision="bf16")       # a preset
    hw = load_hardware("my_cluster.yaml", precision="fp32")  # a file

Fields (units in the names): name, gpus_per_node, memory_gib, intra/inter {bandwidth_gb_s,
latency_us, gap_us}, gemm_tflops {bf16, fp32}, gemm_half_rows, mem_bandwidth_tb_s, overlap,
layer_overhead_ms, chunk_overhead_ms, expert_overhead_ms. "this" (this machine, probed) is not a file: see probe_host.py.
"""
from __future__ import annotations

import os
from importlib import resources

import yaml

from moesys.parallel.cost_network import Hardware, Link

from .workload import PlanError

THIS = "this"
REQUIRED = ("name", "gpus_per_node", "memory_gib", "intra", "inter", "gemm_tflops")
OPTIONAL = ("gemm_half_rows", "mem_bandwidth_tb_s", "overlap", "layer_overhead_ms", "chunk_overhead_ms",
            "expert_overhead_ms", "allgather_factor", "reduce_scatter_factor")
LINK_FIELDS = ("bandwidth_gb_s", "latency_us", "gap_us")


def presets() -> list:
    """Names of the cluster presets shipped in moesys.configs/cluster (plus 'this')."""
    root = resources.files("moesys.configs") / "cluster"
    return sorted(p.name[:-5] for p in root.iterdir() if p.name.endswith(".yaml")) + [THIS]


def _read(name_or_path: str) -> tuple:
    if name_or_path.endswith((".yaml", ".yml")) or os.sep in name_or_path:
        if not os.path.isfile(name_or_path):
            raise PlanError(f"--cluster={name_or_path!r}: no such file")
        with open(name_or_path) as f:
            return name_or_path, f.read()
    path = resources.files("moesys.configs") / "cluster" / f"{name_or_path}.yaml"
    if not path.is_file():
        raise PlanError(f"--cluster={name_or_path!r} is not a preset ({', '.join(presets())}) nor a YAML file")
    return f"preset {name_or_path}", path.read_text()


def _number(src: str, key: str, value, low: float = 0.0, strict: bool = True) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise PlanError(f"{src}: {key} must be a number, got {value!r}")
    if value < low or (strict and value == low):
        raise PlanError(f"{src}: {key} must be {'>' if strict else '>='} {low:g}, got {value}")
    return float(value)


def _link(src: str, key: str, d) -> Link:
    if not isinstance(d, dict):
        raise PlanError(f"{src}: {key} must be a mapping of {', '.join(LINK_FIELDS)}, got {d!r}")
    unknown = set(d) - set(LINK_FIELDS)
    if unknown:
        raise PlanError(f"{src}: unknown field {key}.{sorted(unknown)[0]} (known: {', '.join(LINK_FIELDS)})")
    for f in ("bandwidth_gb_s", "latency_us"):
        if f not in d:
            raise PlanError(f"{src}: missing field {key}.{f}")
    return Link(bandwidth=_number(src, f"{key}.bandwidth_gb_s", d["bandwidth_gb_s"]) * 1e9,
                latency=_number(src, f"{key}.latency_us", d["latency_us"], strict=False) * 1e-6,
                gap=_number(src, f"{key}.gap_us", d.get("gap_us", 0.0), strict=False) * 1e-6)


def hardware_from_dict(d: dict, precision: str, src: str = "cluster") -> Hardware:
    """Hardware from a preset's fields; PlanError naming the field for anything wrong."""
    if not isinstance(d, dict):
        raise PlanError(f"{src}: expected a mapping of cluster fields, got {type(d).__name__}")
    unknown = set(d) - set(REQUIRED) - set(OPTIONAL)
    if unknown:
        raise PlanError(f"{src}: unknown field {sorted(unknown)[0]!r} (known: {', '.join(REQUIRED + OPTIONAL)})")
    for key in REQUIRED:
        if key not in d:
            raise PlanError(f"{src}: missing field {key!r}")
    rates = d["gemm_tflops"]
    if not isinstance(rates, dict) or precision not in rates:
        raise PlanError(f"{src}: gemm_tflops needs a {precision} entry (trainer.precision={precision}), got {rates!r}")
    gpn = d["gpus_per_node"]
    if isinstance(gpn, bool) or not isinstance(gpn, int) or gpn < 1:
        raise PlanError(f"{src}: gpus_per_node must be a positive integer, got {gpn!r}")
    overlap = _number(src, "overlap", d.get("overlap", 1.0), strict=False)
    if overlap > 1:
        raise PlanError(f"{src}: overlap must be in [0, 1], got {overlap}")
    return Hardware(
        name=str(d["name"]), gpus_per_node=gpn, intra=_link(src, "intra", d["intra"]),
        inter=_link(src, "inter", d["inter"]),
        gemm_flops=_number(src, f"gemm_tflops.{precision}", rates[precision]) * 1e12,
        gemm_half_rows=_number(src, "gemm_half_rows", d.get("gemm_half_rows", 0.0), strict=False),
        mem_bandwidth=_number(src, "mem_bandwidth_tb_s", d.get("mem_bandwidth_tb_s", 1e6)) * 1e12,
        overlap=overlap,
        layer_overhead_s=_number(src, "layer_overhead_ms", d.get("layer_overhead_ms", 0.0), strict=False) * 1e-3,
        chunk_overhead_s=_number(src, "chunk_overhead_ms", d.get("chunk_overhead_ms", 0.0), strict=False) * 1e-3,
        expert_overhead_s=_number(src, "expert_overhead_ms", d.get("expert_overhead_ms", 0.0), strict=False) * 1e-3,
        memory_bytes=_number(src, "memory_gib", d["memory_gib"]) * 1024 ** 3,
        allgather_factor=_number(src, "allgather_factor", d.get("allgather_factor", 1.0)),
        reduce_scatter_factor=_number(src, "reduce_scatter_factor", d.get("reduce_scatter_factor", 1.0)),
        notes=src)


def load_hardware(name_or_path: str, precision: str = "bf16") -> Hardware:
    """A preset name (see `presets()`) or a YAML path -> Hardware for GEMMs in `precision`."""
    if name_or_path == THIS:
        raise PlanError("--cluster=this is probed, not loaded: use moesys.planner.probe_host.probe_this_machine")
    src, text = _read(name_or_path)
    try:
        d = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise PlanError(f"{src}: not valid YAML ({str(e).splitlines()[0]})") from None
    return hardware_from_dict(d, precision, src)
