"""Grouped experts: E feed-forward networks evaluated with grouped GEMMs; the shared experts.

Legend: N routed rows grouped by expert, T tokens, D hidden, F ffn hidden, E experts (local to this
rank), S shared experts, Fs a shared expert's ffn hidden.
FFN_e(x) = act(x @ w1[e]) @ w2[e];  swiglu: (silu(x @ w1[e]) * (x @ w3[e])) @ w2[e].
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor, Shard, distribute_tensor
from torch.utils.checkpoint import checkpoint

from moesys.kernels import grouped_gemm, resolve_backend
from moesys.kernels.grouped_gemm import expert_ffn_torch
from moesys.kernels.grouped_mm_ffn import expert_ffn_grouped_mm, grouped_mm_aligned

from .config import MoEConfig
from .routing_plan import Plan
from .runner import SharedWork

_ACTS = {"gelu": F.gelu, "relu": F.relu, "silu": F.silu}

# the F axis of each expert weight: w1, w3 [E, D, F]; w2 [E, F, D]
FFN_DIM = {"w1": 2, "w2": 1, "w3": 2}


def slice_ffn(name: str, t: torch.Tensor, f_slice: Optional[slice]) -> torch.Tensor:
    """`t` (shaped like expert weight `name`) cut to `f_slice` along its F axis; t if None."""
    if f_slice is None:
        return t
    return t[:, :, f_slice] if FFN_DIM[name] == 2 else t[:, f_slice, :]


def composed_ffn(x_ND, counts_E, w1, w2, w3, activation: str, backend: str) -> torch.Tensor:
    """The expert FFN as grouped GEMMs and an activation, each its own autograd node (Triton, CUDA)."""
    h_NF = grouped_gemm(x_ND, w1, counts_E, backend=backend)
    if activation == "swiglu":
        h_NF = F.silu(h_NF) * grouped_gemm(x_ND, w3, counts_E, backend=backend)
    else:
        h_NF = _ACTS[activation](h_NF)
    return grouped_gemm(h_NF, w2, counts_E, backend=backend)


def expert_ffn(x_ND, counts_E, w1, w2, w3, cfg: MoEConfig, recompute: Optional[bool] = None,
               paths: Optional[dict] = None) -> torch.Tensor:
    """y_ND = FFN_e(rows of e) for every expert e with the given weights, on cfg's kernel backend.

    paths: the caller's memo of the grouped GEMMs' resolved backend (moesys.kernels decides it from
    kernel_backend, device, dtype and TRITON_INTERPRET alone: asked once per such key); None: ask.

    recompute (default cfg.recompute): keep no [N, F] intermediate from the forward; the backward
    recomputes them. The torch path does it inside its fused Function (its intermediates live on
    ctx, out of checkpoint's reach); the composed path (Triton, CUDA grouped_mm), whose nodes save
    with save_for_backward, through non-reentrant activation checkpointing."""
    recompute = cfg.recompute if recompute is None else recompute
    backend = cfg.kernel_backend
    x_ND, w1, w2, w3 = _autocast(x_ND, w1, w2, w3)
    if backend == "grouped_mm" and grouped_mm_aligned(w1.shape[1], w1.shape[2], x_ND.dtype):
        # the host plan's path under grouped_mm (expert parallelism, dense-to-sparse gates): the
        # expert GEMMs still run on torch._grouped_mm, with offsets from the counts on the device
        offs_E = torch.cumsum(counts_E, 0, dtype=torch.int32)
        return _grouped_mm_ffn(x_ND, offs_E, w1, w2, w3, cfg.activation, recompute)
    if paths is None or torch.compiler.is_compiling():
        which = resolve_backend(backend, x_ND.device, x_ND.dtype)
    else:
        key = (backend, x_ND.device, x_ND.dtype, os.environ.get("TRITON_INTERPRET"))
        which = paths.get(key)
        if which is None:
            which = paths[key] = resolve_backend(backend, x_ND.device, x_ND.dtype)
    if which == "torch":
        # one autograd node that owns its [N, F] intermediates (in-place activation backward)
        return expert_ffn_torch(x_ND, w1, w2, w3, counts_E, cfg.activation, recompute=recompute)
    if recompute and torch.is_grad_enabled():
        return checkpoint(composed_ffn, x_ND, counts_E, w1, w2, w3, cfg.activation, backend, use_reentrant=False)
    return composed_ffn(x_ND, counts_E, w1, w2, w3, cfg.activation, backend)


def _autocast(x_ND, w1, w2, w3):
    """autocast does not reach custom autograd ops: cast to its dtype here (differentiably)."""
    dev = x_ND.device.type
    if not torch.is_autocast_enabled(dev):
        return x_ND, w1, w2, w3
    dt = torch.get_autocast_dtype(dev)
    return x_ND.to(dt), w1.to(dt), w2.to(dt), (w3.to(dt) if w3 is not None else None)


def _offsets_gemm(backend: str) -> str:
    """The grouped GEMM of the offsets path for a kernel_backend: "auto" measures ours against
    torch._grouped_mm per shape bucket on CUDA (torch._grouped_mm elsewhere)."""
    return backend if backend in ("auto", "triton_persistent") else "grouped_mm"


def _grouped_mm_ffn(x_MD, offs_E, w1, w2, w3, activation: str, recompute: bool, gemm: str = "grouped_mm"):
    """The grouped_mm expert FFN (its Function saves with save_for_backward, so recompute is
    non-reentrant activation checkpointing)."""
    if recompute and torch.is_grad_enabled():
        return checkpoint(expert_ffn_grouped_mm, x_MD, w1, w2, w3, offs_E, activation, gemm, use_reentrant=False)
    return expert_ffn_grouped_mm(x_MD, w1, w2, w3, offs_E, activation, gemm)


def expert_ffn_offsets(x_MD, offs_E, w1, w2, w3, cfg: MoEConfig) -> torch.Tensor:
    """The sync-free path's expert FFN: groups given by int32 device offsets (rows past offs_E[-1]
    are padding); cfg.recompute as in `expert_ffn`."""
    x_MD, w1, w2, w3 = _autocast(x_MD, w1, w2, w3)
    return _grouped_mm_ffn(x_MD, offs_E, w1, w2, w3, cfg.activation, cfg.recompute, _offsets_gemm(cfg.kernel_backend))


@dataclass(frozen=True)
class ExpertSharding:
    """Where this rank's expert weights sit in the global [E, D, F] tensors (set by
    `moesys.parallel.apply_expert_parallel`; None on a single device).

    mesh / placements: the DTensor spec of every expert weight: `Shard(0)` over the ep mesh, or over
    ("ep_expert", "fshard") `(Shard(0), Shard(F dim))` when the ep group has more ranks than experts.
    A weight whose F axis is dim 1 (w2) gets Shard(1) in place of Shard(2): `placements_for(name)`.
    first / count: the global experts held; f_slice: the F columns held (None: whole experts).
    """

    mesh: object
    first: int
    count: int
    f_slice: Optional[slice] = None
    shards: int = 1  # S: ranks sharing one expert's F

    def placements_for(self, name: str) -> tuple:
        if self.shards == 1:
            return (Shard(0),)
        return (Shard(0), Shard(FFN_DIM[name]))


def _wrapped(module: nn.Module) -> bool:
    """Whether FSDP2 wraps `module` (fully_shard swaps in a subclass of FSDPModule)."""
    return isinstance(module, FSDPModule)


def _no_view(out):
    """FSDP2 hooks the backward of a unit's outputs; a view output would lose the hook to a later
    in-place op, so a runner's view (a combine's reshape) is copied when the experts are an FSDP unit."""
    if isinstance(out, tuple):
        return tuple(_no_view(o) for o in out)
    return out.clone() if isinstance(out, torch.Tensor) and out._base is not None else out


def local_tensor(w: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """This rank's part of an expert weight: `w.to_local()` for a DTensor (differentiable), else w."""
    if w is None:
        return None
    return w.to_local() if isinstance(w, DTensor) else w


@torch.no_grad()
def copy_global_(param: torch.Tensor, full: torch.Tensor) -> None:
    """param <- full, `full` the parameter's global value: a DTensor parameter keeps its own part
    (each rank cuts its chunk locally, no communication); a plain one takes it all."""
    full = full.to(device=param.device, dtype=param.dtype)
    if isinstance(param, DTensor):
        full = distribute_tensor(full, param.device_mesh, param.placements, src_data_rank=None)
    param.copy_(full)


def full_value(t: torch.Tensor) -> torch.Tensor:
    """The global value of a (possibly DTensor) tensor: collective over its mesh for a DTensor."""
    return t.full_tensor() if isinstance(t, DTensor) else t


class GroupedExperts(nn.Module):
    """Holds w1 [E, D, F], w2 [E, F, D] (+ w3 [E, D, F] for swiglu): the global shapes.

    Single-device by default (plain tensors). `moesys.parallel.apply_expert_parallel` makes them
    DTensor parameters sharded over the ep mesh (`sharding` says how): `w1` keeps its global meaning
    and `local_weights()` gives this rank's [E/P, D, F] (or [1, D, F/S] when experts are split along
    F). Integrations whose engines flatten parameter storage (DeepSpeed ZeRO, Megatron DDP) hold the
    local shards as plain tensors instead; `sharding` describes them the same way.

    One call per layer forward (the unit FSDP2 gathers and reshards around):
        experts(x_ND, counts_E)                    every local expert on rows grouped by expert
        experts(x_MD, offs_E=offs)                 the sync-free path (int32 device offsets)
        experts(x_ND, plan=p, runner=r, shared=w)  a runner that moves rows (expert parallelism): it
                                                   gets this module and its local_weights() of the call
    """

    def __init__(self, cfg: MoEConfig):
        super().__init__()
        self.cfg = cfg
        E, D, Fh = cfg.num_experts, cfg.hidden_size, cfg.ffn_hidden_size
        self.num_experts = E
        self.sharding: Optional[ExpertSharding] = None
        self.w1 = nn.Parameter(torch.empty(E, D, Fh))
        self.w2 = nn.Parameter(torch.empty(E, Fh, D))
        self.w3 = nn.Parameter(torch.empty(E, D, Fh)) if cfg.gated else None
        self._paths: dict = {}  # expert_ffn's memo of the kernel path
        self.reset_parameters()

    # -- where the weights live -------------------------------------------------------------------
    @property
    def num_local_experts(self) -> int:
        return self.num_experts if self.sharding is None else self.sharding.count

    @property
    def expert_offset(self) -> int:
        return 0 if self.sharding is None else self.sharding.first

    @property
    def ffn_shard(self) -> Optional[tuple]:
        """(j, S): this rank holds the j-th of S F-slices; None when experts are whole."""
        sh = self.sharding
        if sh is None or sh.f_slice is None:
            return None
        return sh.f_slice.start // (self.cfg.ffn_hidden_size // sh.shards), sh.shards

    def ffn_slice(self) -> Optional[slice]:
        """This rank's part of the F axis when experts are F-sharded; None when they are whole."""
        return None if self.sharding is None else self.sharding.f_slice

    def local_weights(self) -> tuple:
        """(w1, w2, w3) of this rank (w3 None without swiglu), differentiable into the parameters."""
        return local_tensor(self.w1), local_tensor(self.w2), local_tensor(self.w3)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        for w in (self.w1, self.w2, self.w3):
            if w is not None:
                nn.init.normal_(local_tensor(w), std=self.cfg.init_std)

    def compute(
        self,
        x_ND: torch.Tensor,
        counts_E: torch.Tensor,
        w1: torch.Tensor,
        w2: torch.Tensor,
        w3: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """The expert FFNs with explicit (local) weights (len(counts_E) == w1.shape[0])."""
        return expert_ffn(x_ND, counts_E, w1, w2, w3, self.cfg, paths=self._paths)

    def forward(self, x_ND: torch.Tensor, counts_E: Optional[torch.Tensor] = None, *,
                offs_E: Optional[torch.Tensor] = None, plan=None, runner=None, shared=None):
        if runner is not None:
            # the weights as this call sees them (under FSDP2: just gathered), handed to the runner
            weights = self.local_weights()
            out = (runner(x_ND, plan, self, weights) if shared is None
                   else runner(x_ND, plan, self, weights, shared=shared))
            return _no_view(out) if _wrapped(self) else out
        if offs_E is not None:
            return self.forward_offsets(x_ND, offs_E)
        if counts_E is None:
            raise TypeError("GroupedExperts: give counts_E, offs_E, or plan and runner")
        return self.compute(x_ND, counts_E, *self.local_weights())

    def forward_offsets(self, x_MD: torch.Tensor, offs_E: torch.Tensor) -> torch.Tensor:
        """The sync-free path: groups given by int32 device offsets (rows past offs_E[-1] are padding)."""
        if self.num_local_experts != self.num_experts:
            raise RuntimeError("GroupedExperts.forward_offsets: the sync-free path runs all experts on one device; "
                               f"this one holds {self.num_local_experts} of {self.num_experts}")
        return expert_ffn_offsets(x_MD, offs_E, *self.local_weights(), self.cfg)

    def extra_repr(self) -> str:
        return (f"num_experts={self.num_experts}, local={self.num_local_experts}, offset={self.expert_offset}, "
                f"D={self.cfg.hidden_size}, F={self.cfg.ffn_hidden_size}, activation={self.cfg.activation}")


class LocalRunner:
    """Runs all experts on this device: no communication, nothing to prefetch, no metrics.
    (Beside the experts it calls, so one layer call stays in this file from experts(...) to the FFN.)"""

    local = True
    overlaps_shared = False

    def __init__(self) -> None:
        self.last_metrics: dict = {}

    def prefetch(self, plan: Plan) -> None:
        pass

    def __call__(self, x_ND: torch.Tensor, plan: Plan, experts, weights: tuple, shared: Optional[SharedWork] = None):
        if experts.num_local_experts != plan.counts_E.shape[0]:
            raise RuntimeError(
                f"LocalRunner: the layer holds {experts.num_local_experts} of {plan.counts_E.shape[0]} experts; "
                "a sharded layer needs the runner installed by moesys.parallel.apply_expert_parallel"
            )
        y_ND = experts.compute(x_ND, plan.counts_E, *weights)
        return y_ND if shared is None else (y_ND, shared())



class SharedExperts(nn.Module):
    """S dense FFNs every token goes through (DeepSeek-MoE's shared experts; Qwen2-MoE's gated one).

    Holds w1 [S, D, Fs], w2 [S, Fs, D] (+ w3 [S, D, Fs] for swiglu), the routed experts' layout, and
    with `shared_expert_gate` a gate g [D]:  s(x) = sum_s FFN_s(x)  (* sigmoid(x . g)).
    Dense parameters: replicated under expert parallelism, their gradients all-reduced over the
    data-parallel group like any other dense weight (no `expert_offset`: checkpoints store them
    whole, as dense tensors).
    """

    def __init__(self, cfg: MoEConfig):
        super().__init__()
        if cfg.num_shared_experts < 1:
            raise ValueError(f"SharedExperts: MoEConfig.num_shared_experts is {cfg.num_shared_experts}")
        self.cfg = cfg
        S, D, Fs = cfg.num_shared_experts, cfg.hidden_size, cfg.shared_ffn
        self.w1 = nn.Parameter(torch.empty(S, D, Fs))
        self.w2 = nn.Parameter(torch.empty(S, Fs, D))
        self.w3 = nn.Parameter(torch.empty(S, D, Fs)) if cfg.gated else None
        self.gate = nn.Parameter(torch.empty(D)) if cfg.shared_expert_gate else None
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        for w in (self.w1, self.w2, self.w3, self.gate):
            if w is not None:
                nn.init.normal_(w, std=self.cfg.init_std)

    def forward(self, x_TD: torch.Tensor) -> torch.Tensor:
        """s_TD for x_TD [T, D]."""
        S, D, Fs = self.w1.shape
        T = x_TD.shape[0]
        # sum_s FFN_s(x) is one FFN of width S*Fs (the activation is elementwise over F): lay the S
        # experts side by side along F and run it as one expert over all T rows
        w1, w2, w3 = self.w1, self.w2, self.w3
        if S > 1:
            w1 = w1.transpose(0, 1).reshape(1, D, S * Fs)
            w2 = w2.reshape(1, S * Fs, D)
            w3 = w3.transpose(0, 1).reshape(1, D, S * Fs) if w3 is not None else None
        counts = torch.tensor([T], dtype=torch.long, device=x_TD.device)
        y_TD = expert_ffn(x_TD, counts, w1, w2, w3, self.cfg)
        if self.gate is not None:
            # the gate logit in fp32, as the router's: one scalar per token
            g_T1 = torch.sigmoid(x_TD.float() @ self.gate.float()).unsqueeze(1)
            y_TD = y_TD * g_T1.to(y_TD.dtype)
        return y_TD

    def extra_repr(self) -> str:
        S, D, Fs = self.w1.shape
        return f"num_shared_experts={S}, D={D}, Fs={Fs}, activation={self.cfg.activation}, gate={self.gate is not None}"
