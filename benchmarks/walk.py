"""The walk of one token through one MoE layer: the project files its forward enters, and the calls
that cross from one project file into another, in order (issue 24's measure of the hot path).

    python benchmarks/walk.py              # one device (the layer's LocalRunner)
    python benchmarks/walk.py --ep 2       # 2 gloo ranks, expert parallel (auto mode), once the tuner
                                           # has decided, on a step it does not check its statistics
    python benchmarks/walk.py --ep 2 --mode ep --overlap 1   # the decision pinned (mode ep | sharded_dp,
                                           # overlap 1 | 2 | 4 | 8): the same decided path as when the
                                           # tuner chose it, whichever it would choose on this machine

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

from _shapes import RANK_PRELOAD  # benchmarks/ is on sys.path when a script runs
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


def _step(layer, x) -> None:
    y, aux = layer(x)
    (y.sum() + aux.loss).backward()


def one_device() -> dict:
    layer, x = layer_and_input(1)
    _step(layer, x)  # first call: lazy set-up (kernel backend probes) is not the steady state
    return trace(lambda: layer(x))  # a training forward (grad enabled)


def ep_worker(max_warm_steps: int, mode: str = "auto", overlap="auto") -> dict:
    layer, x = layer_and_input(dist.get_world_size())
    apply_expert_parallel(layer, dist.group.WORLD, timeout_s=60, mode=mode, overlap=overlap)
    tuner = layer.runner.tuner
    for _ in range(max_warm_steps):  # until the tuner has decided (its trials are over) ...
        _step(layer, x)
        if not tuner.report()["tuner_exploring"]:
            break
    while tuner.wants_stats():  # ... and the next call is not one of its periodic statistics checks
        _step(layer, x)
    return trace(lambda: layer(x))


def walk(ep: int = 1, mode: str = "auto", overlap="auto") -> dict:
    if ep == 1:
        return one_device()
    return simulate(ep_worker, ep, 200, mode, overlap, timeout_s=120, preload=RANK_PRELOAD)[0]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ep", type=int, default=1)
    ap.add_argument("--mode", choices=("auto", "ep", "sharded_dp"), default="auto",
                    help="with --ep: the runtime's mode (auto: the tuner's choice; ep or sharded_dp: pinned)")
    ap.add_argument("--overlap", type=lambda v: v if v == "auto" else int(v), default="auto",
                    help="with --ep: the overlap degree (auto: the tuner's choice; 1, 2, 4 or 8: pinned)")
    ap.add_argument("--json", action="store_true", help="print the walk as JSON")
    args = ap.parse_args(argv)
    w = walk(args.ep, args.mode, args.overlap)
    if args.json:
        print(json.dumps(w))
        return
    print(f"== one token, one layer forward, ep={args.ep}: {len(w['files'])} files, "
          f"{len(w['calls'])} cross-file calls ==")
    for c in w["calls"]:
        print("  " + c)


if __name__ == "__main__":
    main()
