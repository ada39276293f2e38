"""The walk of one token through one MoE layer: the project files its forward enters, and the calls
that cross from one project file into another, in order (issue 24's measure of the hot path).

    python benchmarks/walk.py              # one device (the layer's LocalRunner)
    python benchmarks/walk.py --ep 2       # 2 gloo ranks, expert parallel, after the tuner decided

Counts only the project's own files (moesys/, parallel/, kernels/); torch and the standard library
are not counted. A call counts as crossing when the caller's file differs from the callee's.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.distributed as dist

from moesys import MoEConfig, MoELayer
from moesys.parallel import apply_expert_parallel, simulate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROJECT = tuple(os.path.join(ROOT, d) + os.sep for d in ("moesys", "parallel", "kernels"))


def _rel(path: str) -> str:
    return os.path.relpath(path, ROOT)


def trace(fn) -> dict:
    """Files entered and cross-file calls (caller file -> callee file: function) while fn() runs."""
    files, calls = [], []

    def prof(frame, event, arg):
        if event != "call":
            return
        callee = frame.f_code.co_filename
        if not callee.startswith(PROJECT):
            return
        caller = frame.f_back
        while caller is not None and not caller.f_code.co_filename.startswith(PROJECT):
            caller = caller.f_back  # through torch (nn.Module.__call__, autograd): the project caller
        here = _rel(callee)
        if here not in files:
            files.append(here)
        if caller is None or caller.f_code.co_filename != callee:
            calls.append(f"{here}: {frame.f_code.co_name}")

    sys.setprofile(prof)
    try:
        fn()
    finally:
        sys.setprofile(None)
    return {"files": files, "calls": calls}


def layer_and_input(ep: int):
    cfg = MoEConfig(hidden_size=16, ffn_hidden_size=32, num_experts=4, top_k=2)
    torch.manual_seed(0)
    layer = MoELayer(cfg)
    x = torch.randn(1, 16)
    return layer, x


def one_device() -> dict:
    layer, x = layer_and_input(1)
    with torch.no_grad():
        layer(x)  # first call: lazy set-up (kernel backend probes) is not the steady state
    with torch.no_grad():
        return trace(lambda: layer(x))


def ep_worker(warm_steps: int) -> dict:
    layer, x = layer_and_input(dist.get_world_size())
    apply_expert_parallel(layer, dist.group.WORLD, mode="ep", overlap=1, timeout_s=60)
    for _ in range(warm_steps):  # the tuner decides (pinned here), the runner warms up
        y, aux = layer(x)
        (y.sum() + aux.loss).backward()
    with torch.no_grad():
        return trace(lambda: layer(x))


def walk(ep: int = 1) -> dict:
    if ep == 1:
        return one_device()
    return simulate(ep_worker, ep, 2, timeout_s=120)[0]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ep", type=int, default=1)
    ap.add_argument("--json", action="store_true", help="print the walk as JSON")
    args = ap.parse_args(argv)
    w = walk(args.ep)
    if args.json:
        print(json.dumps(w))
        return
    print(f"one token, one layer forward, ep={args.ep}: {len(w['files'])} files, {len(w['calls'])} cross-file calls")
    for c in w["calls"]:
        print("  " + c)


if __name__ == "__main__":
    main()
