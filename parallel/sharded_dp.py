"""Expert-sharded data-parallel mode: move the weights, keep the tokens (ZeRO-style, Tutel r=0).

Each rank all-gathers the layer's expert weights over the ep group and runs all E experts on its
own rows with `experts.compute`. The backward of the all-gather reduce-scatters (sums) dW, so each
owner ends with the gradient of every rank's tokens, exactly as in expert-parallel mode: the same
parameter layout serves both modes.

Overlap degree c splits the F dimension into c chunks: chunk i+1's weights are gathered while chunk
i computes. The activation is elementwise over F, so the output is the sum of the chunks' outputs.
With F-sharded experts (P > E) the gathered F-slices are concatenated; the order of the F columns
differs from the unsharded layer, but w1's columns and w2's rows are permuted alike, so the FFN is
the same function.
"""
from __future__ import annotations

import datetime
import time
from typing import Optional

import torch

from . import comm
from .layout import ExpertLayout


def f_chunks(width: int, chunks: int) -> list[slice]:
    """Up to `chunks` F-ranges, in whole 16-byte units (4 fp32) when F allows: the CPU grouped GEMM
    (torch._grouped_mm) rejects a 1-wide operand, and aligned widths keep it off the slow loop."""
    unit = 4 if width % 4 == 0 else 1
    units = width // unit
    chunks = max(1, min(chunks, units if unit == 4 else width // 2))
    bounds = [unit * (units * i // chunks) for i in range(chunks + 1)]
    return [slice(bounds[i], bounds[i + 1]) for i in range(chunks)]


def _assemble_in(w_XDF: torch.Tensor, E: int, S: int) -> torch.Tensor:
    """[P*L, D, f] gathered rank-major -> [E, D, S*f] (F-slices of one expert side by side)."""
    if S == 1:
        return w_XDF
    D, f = w_XDF.shape[1], w_XDF.shape[2]
    return w_XDF.view(E, S, D, f).permute(0, 2, 1, 3).reshape(E, D, S * f)


def _assemble_out(w_XFD: torch.Tensor, E: int, S: int) -> torch.Tensor:
    """[P*L, f, D] -> [E, S*f, D]."""
    if S == 1:
        return w_XFD
    f, D = w_XFD.shape[1], w_XFD.shape[2]
    return w_XFD.reshape(E, S * f, D)


class ShardedDataParallel:
    """Runs all experts locally with gathered weights; not an nn.Module (holds no parameters)."""

    def __init__(self, layout: ExpertLayout, group, timeout_s: Optional[float] = None) -> None:
        self.layout = layout
        self._group = comm.GroupRef(group)  # borrowed, never owned: see comm.GroupRef
        self.timeout = None if timeout_s is None else datetime.timedelta(seconds=timeout_s)
        self._E, self._S = layout.num_experts, layout.shards  # fixed: read once, not per call
        self.last_chunks = 0
        self.last_weight_bytes = 0  # the latest call's `weight_bytes` (the runner reports it)

    @property
    def group(self):
        return self._group.get()

    def _start(self, weights: tuple, fs: slice, group):
        w1, w2, w3 = weights
        ws = [w1[:, :, fs], w2[:, fs, :]]
        if w3 is not None:
            ws.append(w3[:, :, fs])
        return [comm.all_gather_start(w, group, self.timeout) for w in ws]

    def _finish(self, tokens):
        ws = [comm.all_gather_wait(t) for t in tokens]
        w1 = _assemble_in(ws[0], self._E, self._S)
        w2 = _assemble_out(ws[1], self._E, self._S)
        w3 = _assemble_in(ws[2], self._E, self._S) if len(ws) == 3 else None
        return w1, w2, w3

    def weight_bytes(self, experts) -> int:
        """Bytes each rank receives per forward: the other ranks' expert weights."""
        return self._weight_bytes(experts.local_weights())

    def _weight_bytes(self, weights: tuple) -> int:
        return (self.layout.world - 1) * sum(w.numel() * w.element_size() for w in weights if w is not None)

    def __call__(self, x_ND: torch.Tensor, counts_E: torch.Tensor, experts, chunks: int = 1,
                 t_s: Optional[dict] = None, shared=None, out: Optional[dict] = None, weights: Optional[tuple] = None):
        """y_ND for this rank's rows with all E experts; `t_s` (optional, key -> seconds, holding
        "shared_s", "wait_s" and "compute_s") accumulates the host time of those parts.
        weights: experts.local_weights() when the caller has them (the runner: the experts module
        handed them over), else asked here.

        shared (optional): the layer's shared-expert work, run while the first weight chunk is
        gathered; its s_TD goes to out["shared"]."""
        weights = experts.local_weights() if weights is None else weights
        group, clock = self.group, time.perf_counter
        t_s = dict.fromkeys(("shared_s", "wait_s", "compute_s"), 0.0) if t_s is None else t_s
        spans = f_chunks(weights[0].shape[2], chunks)
        self.last_chunks = len(spans)
        self.last_weight_bytes = self._weight_bytes(weights)
        pending = self._start(weights, spans[0], group)
        if shared is not None:
            t = clock()
            out["shared"] = shared()
            t_s["shared_s"] += clock() - t
        y_ND = None
        for i in range(len(spans)):
            t = clock()
            w1, w2, w3 = self._finish(pending)
            t_s["wait_s"] += clock() - t
            if i + 1 < len(spans):
                pending = self._start(weights, spans[i + 1], group)  # in flight during this chunk's compute
            t = clock()
            y_i = experts.compute(x_ND, counts_E, w1, w2, w3)
            t_s["compute_s"] += clock() - t
            y_ND = y_i if y_ND is None else y_ND + y_i
        return y_ND
