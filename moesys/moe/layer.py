"""MoELayer: router -> plan -> permute -> runner (dispatch, experts, combine) -> unpermute.

Legend: T tokens, D hidden, E experts, R routes, N kept routes.
The layer is single-device; `moesys.parallel.apply_expert_parallel` swaps its runner (and slices
its experts) to move tokens between ranks. The layer never touches a process group itself,
except the optional one passed to `update_expert_bias` and the balance group of
aux_loss="global_batch" (`set_balance_group`: one all-reduce of E + 1 counts per training forward).

Shared experts (`num_shared_experts` > 0): y = routed(x) + shared_experts(x). A runner that moves
tokens (`overlaps_shared = True`) is handed the shared work and runs it while its first dispatch
is in flight; otherwise the layer runs it before the routed experts.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn as nn

from moesys.kernels import permute, resolve_backend, unpermute
from moesys.kernels.backend import sync_free
from moesys.kernels.grouped_mm_ffn import grouped_mm_aligned
from moesys.kernels.permute import inverse_routes, permute_fixed_k, unpermute_fixed_k
from moesys.kernels.permute_static import combine_static, dispatch_static

from . import balance
from .config import MoEConfig
from .experts import GroupedExperts, LocalRunner, SharedExperts
from .router_factory import build_router
from .routers import BalanceGroupRef
from .routing_plan import Plan, make_plan
from .runner import Runner, SharedWork
from .static_plan import make_static_plan, uniform_offsets


@dataclass
class MoEAux:
    """What one forward reports besides its output."""

    loss: torch.Tensor  # scalar: coefficient-weighted sum of the balance losses (add to the loss)
    tokens_per_expert: torch.Tensor  # [E] kept routes per expert (this rank's tokens)
    dropped: torch.Tensor  # 0-dim int64: (token, expert) routes dropped by capacity
    metrics: dict = field(default_factory=dict)  # name -> detached 0-dim tensor or float


class MoELayer(nn.Module):
    """A Mixture-of-Experts feed-forward layer.

    Args:
        cfg: the layer's MoEConfig.
        balance_group: for aux_loss="global_batch", the process group whose ranks' tokens make
            the batch the balance loss sees (the data-parallel group; under expert parallelism too,
            since EP ranks hold different tokens); see `set_balance_group`.
    """

    def __init__(self, cfg: MoEConfig, balance_group=None):
        super().__init__()
        if not isinstance(cfg, MoEConfig):
            raise TypeError(f"MoELayer expects a MoEConfig, got {type(cfg).__name__}")
        self.cfg = cfg
        self.router = build_router(cfg)
        self.experts = GroupedExperts(cfg)
        # dense FFNs every token goes through (replicated under expert parallelism)
        self.shared_experts = SharedExperts(cfg) if cfg.num_shared_experts > 0 else None
        self.runner: Runner = LocalRunner()
        self._generator: Optional[torch.Generator] = None
        self._variable_k = cfg.variable_k  # structural, as the router built for it: read once
        self._paths: dict = {}  # _kernel_paths' answers
        self.set_balance_group(balance_group)

    def set_balance_group(self, group) -> None:
        """The group over which aux_loss="global_batch" sums routes per expert and tokens (one
        all-reduce of E + 1 numbers per training forward). None: this process's tokens, and an error
        in a multi-rank job (a forgotten group would silently balance each rank alone); "local": this
        process's tokens, on purpose (e.g. a single-process reference inside a multi-rank test). Held
        weakly and not as module state: deep copies share it, checkpoints never hold it, and
        destroy_process_group() still destroys it."""
        if isinstance(group, str) and group != "local":
            raise ValueError(f"MoELayer.set_balance_group: a process group, None or 'local', got {group!r}")
        self.router.balance_group = BalanceGroupRef(group)

    def set_runner(self, runner: Runner) -> None:
        """Install the runner of the routed experts (see moesys.moe.runner.Runner); the expert-parallel
        runtime's apply_expert_parallel calls this."""
        self.runner = runner

    def capacity(self, num_tokens: int) -> Optional[int]:
        """Per-expert capacity for `num_tokens` local tokens, None when nothing is dropped."""
        if self.cfg.router == "expert_choice":  # the router fixes each expert's C itself
            return None
        if self._variable_k and self.training and not bool(getattr(self.router, "hard", True)):
            # dense phase of a dense-to-sparse gate: all tokens fit (no drops)
            return None
        if self.cfg.capacity_factor is None:  # dropless (MoEConfig.capacity's first rule, no call)
            return None
        return self.cfg.capacity(num_tokens)

    def route(self, x_TD: torch.Tensor, seq_len: int) -> tuple:
        routing = self.router(x_TD, seq_len=seq_len)
        cap = self.capacity(x_TD.shape[0]) if routing.capacity_applies else None
        plan = make_plan(routing, self.cfg.num_experts, cap, self.cfg.drop_policy, self._generator,
                         renormalize=self.cfg.renormalize_after_drop)
        return routing, plan

    def forward(self, x: torch.Tensor):
        cfg = self.cfg
        if x.dim() < 1 or x.shape[-1] != cfg.hidden_size:
            raise ValueError(
                f"MoELayer: input has width {x.shape[-1] if x.dim() else None} (shape {tuple(x.shape)}) "
                f"but MoEConfig.hidden_size is {cfg.hidden_size}"
            )
        shape = x.shape
        x_TD = x.reshape(-1, cfg.hidden_size)
        T = x_TD.shape[0]
        seq_len = shape[-2] if x.dim() >= 3 else max(T, 1)
        if self._takes_sync_free_path(x_TD):
            y_TD, aux = self._forward_sync_free(x_TD, seq_len)
            y_TD = self._scale_routed(y_TD)
            if self.shared_experts is not None:  # one more FFN over all T rows: static too
                y_TD = y_TD + self.shared_experts(x_TD).to(y_TD.dtype)
            return y_TD.reshape(shape).to(x.dtype), aux
        routing, plan = self.route(x_TD, seq_len)
        if not self.runner.local:  # a runner that moves tokens starts its counts exchange now: the
            self.runner.prefetch(plan)  # permute below runs while the counts travel (a local one has none)
        K = routing.fixed_k
        if K is not None and self._kernel_paths(x_TD)[1]:
            # token-major fixed-K routes: permute and combine with gathers only (no scatter-add)
            inv_R = inverse_routes(plan.route_idx_N, int(routing.token_idx_R.shape[0]))
            x_ND = permute_fixed_k(x_TD, plan.route_idx_N, inv_R, K)
            y_ND, s_TD = self._run(x_ND, plan, x_TD)
            y_TD = unpermute_fixed_k(y_ND, plan.weight_R.view(T, K), plan.route_idx_N, inv_R)
        else:
            x_ND = permute(x_TD, plan.token_idx_N, backend=cfg.kernel_backend)
            y_ND, s_TD = self._run(x_ND, plan, x_TD)
            y_TD = unpermute(y_ND, plan.token_idx_N, plan.weight_N, T, backend=cfg.kernel_backend)
        y_TD = self._scale_routed(y_TD)
        if s_TD is not None:
            y_TD = y_TD + s_TD.to(y_TD.dtype)
        aux = self._aux(routing, plan)
        return y_TD.reshape(shape).to(x.dtype), aux

    def _scale_routed(self, y_TD: torch.Tensor) -> torch.Tensor:
        """The routed output times MoEConfig.routed_scaling_factor (DeepSeek-V3), shared experts excluded."""
        f = self.cfg.routed_scaling_factor
        return y_TD if f == 1.0 else y_TD * f

    def _run(self, x_ND: torch.Tensor, plan: Plan, x_TD: torch.Tensor) -> tuple:
        """(y_ND, s_TD): the routed experts through the runner; the shared experts' s_TD (None without).

        The runner is called from inside one call of the experts module (`experts(x_ND, plan=...,
        runner=...)`), so a wrapper around that module (FSDP2 gathering the expert weights over edp)
        sees one forward per layer however many chunks the runner computes."""
        if self.shared_experts is None:
            return self.experts(x_ND, plan=plan, runner=self.runner), None
        work = SharedWork(self.shared_experts, x_TD)
        if self.runner.overlaps_shared:
            return self.experts(x_ND, plan=plan, runner=self.runner, shared=work)
        s_TD = work()
        return self.experts(x_ND, plan=plan, runner=self.runner), s_TD

    def _takes_sync_free_path(self, x_TD: torch.Tensor) -> bool:
        """kernel_backend="grouped_mm" (or "auto" on CUDA where torch._grouped_mm runs): the sync-free
        path, except under expert parallelism (the runner's all-to-all-v needs host splits: it keeps
        the host plan, its expert GEMMs on torch._grouped_mm) and for the dense-to-sparse gates
        (their number of routes depends on the data: the documented exception)."""
        if self._variable_k or not self.runner.local:
            return False
        return self._kernel_paths(x_TD)[0]

    def _kernel_paths(self, x_TD: torch.Tensor) -> tuple:
        """(sync-free, gathers) for a forward on x_TD: whether the backend takes the sync-free path,
        and whether the kernels take the torch path (fixed-K routes then permute and combine by
        gathers). moesys.kernels decides both from (kernel_backend, device, compute dtype) and
        TRITON_INTERPRET alone, so they are asked once per such key, not on every call."""
        cfg = self.cfg
        dev = x_TD.device
        dtype = torch.get_autocast_dtype(dev.type) if torch.is_autocast_enabled(dev.type) else x_TD.dtype
        compiling = torch.compiler.is_compiling()
        key = (cfg.kernel_backend, dev, dtype, os.environ.get("TRITON_INTERPRET"))
        paths = None if compiling else self._paths.get(key)
        if paths is None:
            # "auto" falls back where grouped_mm's alignment fails; a forced "grouped_mm" raises the
            # kernel's clear error
            free = sync_free(cfg.kernel_backend, dev, dtype) and not (
                cfg.kernel_backend == "auto" and not grouped_mm_aligned(cfg.hidden_size, cfg.ffn_hidden_size, dtype))
            paths = (free, resolve_backend(cfg.kernel_backend, dev) == "torch")
            if not compiling:
                self._paths[key] = paths
        return paths

    def _forward_sync_free(self, x_TD: torch.Tensor, seq_len: int):
        """Router -> static plan -> gather -> grouped_mm experts -> gather-combine, with no host read
        and shapes fixed by (T, K, E, C) alone (moesys/moe/static_plan.py)."""
        cfg = self.cfg
        T, E = x_TD.shape[0], cfg.num_experts
        if cfg.router == "expert_choice":
            # each expert holds exactly C routes, expert-major: the buffer is the route list itself
            routing = self.router(x_TD, seq_len=seq_len)
            C = routing.num_routes // E
            x_MD = x_TD.index_select(0, routing.token_idx_R)
            offs_E = uniform_offsets(E, C, x_TD.device)
            y_MD = self.experts(x_MD, offs_E=offs_E)
            contrib = y_MD * routing.weight_R.to(y_MD.dtype).unsqueeze(1)
            y_TD = contrib.new_zeros(T, contrib.shape[1]).index_add(0, routing.token_idx_R, contrib)
            counts_E = torch.full((E,), C, dtype=torch.int64, device=x_TD.device)
            dropped = counts_E.new_zeros(())
            return y_TD, self._make_aux(routing.losses, routing.probs_TE, routing.logits_TE, counts_E, counts_E,
                                        routing.num_routes, dropped, static=True)
        sr = self.router.route_static(x_TD, seq_len)
        K = cfg.top_k
        cap = self.capacity(T)
        plan = make_static_plan(sr.expert_TK, sr.weight_TK, sr.routed_E, sr.probs_TE, cap, cfg.drop_policy,
                                renormalize=cfg.renormalize_after_drop)
        x_MD = dispatch_static(x_TD, plan.row_route_M, plan.dest_R, K, plan.padded)
        y_MD = self.experts(x_MD, offs_E=plan.offs_E)
        y_TD = combine_static(y_MD, plan.weight_TK, plan.row_route_M, plan.dest_R, plan.padded, plan.renormalize)
        return y_TD, self._make_aux(sr.losses, sr.probs_TE, sr.logits_TE, plan.counts_E, plan.routed_E, T * K,
                                    plan.dropped, static=True)

    def _aux(self, routing, plan: Plan) -> MoEAux:
        return self._make_aux(routing.losses, routing.probs_TE, routing.logits_TE, plan.counts_E, plan.routed_E,
                              int(routing.token_idx_R.shape[0]), plan.dropped)

    def _make_aux(self, losses, probs_TE, logits_TE, counts_E, routed_E, num_routes: int, dropped,
                  static: bool = False) -> MoEAux:
        if losses:
            first, *rest = losses.values()
            loss = first + sum(rest) if rest else first
        else:
            loss = logits_TE.new_zeros(())
        if static:
            metrics = balance.router_metrics_static(probs_TE, routed_E, num_routes, dropped)
        else:
            metrics = balance.router_metrics(probs_TE, routed_E, num_routes, dropped)
        for name, value in losses.items():
            metrics[name] = value.detach()
        for name, value in self.runner.last_metrics.items():
            metrics[f"runtime/{name}"] = value
        return MoEAux(loss=loss, tokens_per_expert=counts_E, dropped=dropped, metrics=metrics)

    @torch.no_grad()
    def update_expert_bias(self, group=None) -> None:
        """Aux-loss-free balancing step (router="sigmoid_bias"); a no-op for other routers.
        Call after the optimizer step; pass the data-parallel group so loads are global."""
        self.router.update_expert_bias(group)

    def extra_repr(self) -> str:
        c = self.cfg
        shared = f", shared={c.num_shared_experts}" if c.num_shared_experts else ""
        return f"E={c.num_experts}, K={c.top_k}, router={c.router}, capacity_factor={c.capacity_factor}{shared}"
