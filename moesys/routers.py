"""Routers: token -> experts decisions with their balancing losses.

Legend: T tokens, D hidden, E experts, K top-k.
Router logits are computed in float32 whatever the input dtype: bf16 logits make top-k ties flip
between ranks and runs.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from moesys.kernels import topk_softmax
from moesys.kernels.topk_route import histogram, topk_route

from . import balance
from .config import MoEConfig, exact_capacity
from .routing import Routing, StaticRouting, token_major_routes


class Router(nn.Module):
    """Base: holds `weight` [E, D]; subclasses turn logits into routes."""

    def __init__(self, cfg: MoEConfig):
        super().__init__()
        self.cfg = cfg
        self.weight = nn.Parameter(torch.empty(cfg.num_experts, cfg.hidden_size))
        nn.init.normal_(self.weight, std=cfg.init_std)

    def logits(self, x_TD: torch.Tensor) -> torch.Tensor:
        if self.training and self.cfg.jitter_eps > 0:
            eps = self.cfg.jitter_eps
            x_TD = x_TD * torch.empty_like(x_TD).uniform_(1.0 - eps, 1.0 + eps)
        return F.linear(x_TD.float(), self.weight.float())  # [T, E] fp32

    def balance_losses(self, probs_TE, logits_TE, token_idx_R, expert_idx_R, slot_R, seq_len: int, top_k: float) -> dict:
        cfg = self.cfg
        losses = {}
        if cfg.aux_loss == "switch":
            counts_E = balance.routed_counts(expert_idx_R, cfg.num_experts)
            losses["aux_loss"] = balance.switch_aux_loss(probs_TE, counts_E, top_k, cfg.aux_loss_coef)
        elif cfg.aux_loss == "gshard":
            losses["aux_loss"] = balance.gshard_aux_loss(probs_TE, expert_idx_R, slot_R, cfg.aux_loss_coef)
        elif cfg.aux_loss == "seq":
            losses["aux_loss"] = balance.seq_aux_loss(probs_TE, token_idx_R, expert_idx_R, seq_len, top_k, cfg.aux_loss_coef)
        if cfg.z_loss_coef > 0:
            losses["z_loss"] = balance.z_loss(logits_TE, cfg.z_loss_coef)
        return losses

    def static_losses(self, probs_TE, logits_TE, expert_TK, routed_E, seq_len: int, aux: bool = True) -> dict:
        """`balance_losses` for [T, K] routes without a host sync (no bincount, no boolean mask).
        aux=False: the aux loss was computed already (the fused top-k kernel)."""
        cfg = self.cfg
        T, K = expert_TK.shape
        losses = {}
        if aux and cfg.aux_loss == "switch":
            losses["aux_loss"] = balance.switch_aux_loss(probs_TE, routed_E, K, cfg.aux_loss_coef)
        elif aux and cfg.aux_loss == "gshard":
            first_E = histogram(expert_TK[:, 0], cfg.num_experts)
            losses["aux_loss"] = balance.switch_aux_loss(probs_TE, first_E, 1, cfg.aux_loss_coef)
        elif cfg.aux_loss == "seq":
            token_R = torch.div(torch.arange(T * K, device=expert_TK.device), K, rounding_mode="floor")
            losses["aux_loss"] = balance.seq_aux_loss(probs_TE, token_R, expert_TK.reshape(-1), seq_len, K,
                                                      cfg.aux_loss_coef)
        if cfg.z_loss_coef > 0:
            losses["z_loss"] = balance.z_loss(logits_TE, cfg.z_loss_coef)
        return losses

    def update_expert_bias(self, group=None) -> None:
        """Only the aux-loss-free router has a bias; the others have nothing to update."""


class TopKRouter(Router):
    """p = softmax(z); top-k; weights renormalised over the k when cfg.renormalize_topk
    (`normalize_topk`, by default: K > 1).

    router="switch": top-1 with the output scaled by p_max (no renormalisation).
    """

    def forward(self, x_TD: torch.Tensor, seq_len: int) -> Routing:
        cfg = self.cfg
        logits_TE = self.logits(x_TD)
        normalize = cfg.renormalize_topk  # never for router="switch"
        # softmax + top-k, fused into one kernel on the Triton path
        probs_TE, w_TK, idx_TK = topk_softmax(logits_TE, cfg.top_k, normalize, backend=cfg.kernel_backend)
        token_R, expert_R, weight_R, slot_R = token_major_routes(idx_TK, w_TK)
        losses = self.balance_losses(probs_TE, logits_TE, token_R, expert_R, slot_R, seq_len, cfg.top_k)
        return Routing(token_R, expert_R, weight_R, slot_R, x_TD.shape[0], probs_TE, logits_TE, losses,
                       fixed_k=cfg.top_k)

    def route_static(self, x_TD: torch.Tensor, seq_len: int) -> StaticRouting:
        """The same decision as `forward`, sync-free: softmax, top-k, renormalisation, the routes'
        histogram and the switch/gshard loss in one fused node (moesys.kernels.topk_route)."""
        cfg = self.cfg
        logits_TE = self.logits(x_TD)
        fused = cfg.aux_loss if cfg.aux_loss in ("switch", "gshard") else "none"
        probs_TE, w_TK, idx_TK, routed_E, aux = topk_route(logits_TE, cfg.top_k, cfg.renormalize_topk, fused,
                                                           cfg.aux_loss_coef)
        losses = {"aux_loss": aux} if fused != "none" else {}
        losses.update(self.static_losses(probs_TE, logits_TE, idx_TK, routed_E, seq_len, aux=False))
        return StaticRouting(idx_TK, w_TK, routed_E, probs_TE, logits_TE, losses)


class SigmoidBiasRouter(Router):
    """DeepSeek-V3 aux-loss-free balancing.

    s = sigmoid(z); choose top-k of s + b (b only for selection); weights = s / sum_selected s.
    b changes only through `update_expert_bias`, called by the trainer after the optimizer step:
    b_i <- b_i + gamma * sign(mean_load - load_i), loads summed over `group` when given.
    """

    def __init__(self, cfg: MoEConfig):
        super().__init__(cfg)
        self.register_buffer("expert_bias", torch.zeros(cfg.num_experts))
        # routes per expert seen in training since the last update (not saved: transient)
        self.register_buffer("load_since_update", torch.zeros(cfg.num_experts), persistent=False)

    def forward(self, x_TD: torch.Tensor, seq_len: int) -> Routing:
        cfg = self.cfg
        logits_TE = self.logits(x_TD)
        scores_TE = torch.sigmoid(logits_TE)
        idx_TK = (scores_TE.detach() + self.expert_bias).topk(cfg.top_k, dim=-1).indices
        w_TK = scores_TE.gather(1, idx_TK)
        if cfg.renormalize_topk:
            w_TK = w_TK / w_TK.sum(-1, keepdim=True)
        token_R, expert_R, weight_R, slot_R = token_major_routes(idx_TK, w_TK)
        if self.training:
            with torch.no_grad():
                self.load_since_update += torch.bincount(expert_R, minlength=cfg.num_experts).float()
        probs_TE = scores_TE / scores_TE.sum(-1, keepdim=True)
        losses = self.balance_losses(probs_TE, logits_TE, token_R, expert_R, slot_R, seq_len, cfg.top_k)
        return Routing(token_R, expert_R, weight_R, slot_R, x_TD.shape[0], probs_TE, logits_TE, losses,
                       fixed_k=cfg.top_k)

    def route_static(self, x_TD: torch.Tensor, seq_len: int) -> StaticRouting:
        """`forward` without a host sync: the load is a device histogram (no bincount)."""
        cfg = self.cfg
        logits_TE = self.logits(x_TD)
        scores_TE = torch.sigmoid(logits_TE)
        idx_TK = (scores_TE.detach() + self.expert_bias).topk(cfg.top_k, dim=-1).indices
        w_TK = scores_TE.gather(1, idx_TK)
        if cfg.renormalize_topk:
            w_TK = w_TK / w_TK.sum(-1, keepdim=True)
        routed_E = histogram(idx_TK, cfg.num_experts)
        if self.training:
            with torch.no_grad():
                self.load_since_update += routed_E
        probs_TE = scores_TE / scores_TE.sum(-1, keepdim=True)
        losses = self.static_losses(probs_TE, logits_TE, idx_TK, routed_E, seq_len)
        return StaticRouting(idx_TK, w_TK, routed_E, probs_TE, logits_TE, losses)

    @torch.no_grad()
    def update_expert_bias(self, group=None) -> None:
        load_E = self.load_since_update.clone()
        if group is not None:
            import torch.distributed as dist

            dist.all_reduce(load_E, group=group)
        self.expert_bias += self.cfg.bias_update_rate * torch.sign(load_E.mean() - load_E)
        self.load_since_update.zero_()


class ExpertChoiceRouter(Router):
    """Expert choice (Zhou et al. 2022): S = softmax(z); expert e takes its top-C tokens,
    C = ceil(cf * K * T / E) (cf defaults to 1), weight = S[t, e]. Balanced by construction,
    so no balance loss; it looks at the whole batch, so it is not causal."""

    def capacity(self, T: int) -> int:
        cfg = self.cfg
        cf = cfg.capacity_factor if cfg.capacity_factor is not None else 1.0
        return min(T, max(cfg.min_capacity, exact_capacity(cf, cfg.top_k, T, cfg.num_experts)))

    def forward(self, x_TD: torch.Tensor, seq_len: int) -> Routing:
        cfg = self.cfg
        T, E = x_TD.shape[0], cfg.num_experts
        logits_TE = self.logits(x_TD)
        probs_TE = torch.softmax(logits_TE, dim=-1)
        C = self.capacity(T)
        w_EC, token_EC = probs_TE.t().topk(C, dim=-1)
        dev = x_TD.device
        expert_R = torch.arange(E, device=dev).repeat_interleave(C)
        slot_R = torch.arange(C, device=dev).repeat(E)
        losses = {}
        if cfg.z_loss_coef > 0:
            losses["z_loss"] = balance.z_loss(logits_TE, cfg.z_loss_coef)
        return Routing(token_EC.reshape(-1), expert_R, w_EC.reshape(-1), slot_R, T, probs_TE, logits_TE, losses,
                       capacity_applies=False)


def build_router(cfg: MoEConfig) -> Router:
    if cfg.router in ("topk", "switch"):
        return TopKRouter(cfg)
    if cfg.router == "sigmoid_bias":
        return SigmoidBiasRouter(cfg)
    if cfg.router == "expert_choice":
        return ExpertChoiceRouter(cfg)
    if cfg.router in ("dts", "act_dts"):
        from .gates import DTSRouter

        return DTSRouter(cfg)
    raise ValueError(f"MoEConfig.router={cfg.router!r} has no implementation")
