"""Command-line shape options shared by the layer benchmarks (defaults: the issue's shape)."""
from __future__ import annotations

import argparse


def add_shape_args(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--ffn", type=int, default=1024)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--experts", type=int, nargs="+", default=[8, 16, 64])
    p.add_argument("--repeats", type=int, default=7)
    return p
