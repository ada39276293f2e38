"""Routers: token -> experts decisions with their balancing losses.

Legend: T tokens, D hidden, E experts, K top-k.
Router logits are computed in float32 whatever the input dtype: bf16 logits make top-k ties flip
between ranks and runs.
"""
from __future__ import annotations

import os
import weakref

import torch
import torch.nn as nn
import torch.nn.functional as F

from moesys.kernels import resolve_backend, topk_softmax
from moesys.kernels.topk_route import histogram, topk_route

from . import balance
from .config import MoEConfig, exact_capacity
from .routing import Routing, StaticRouting


def token_major_routes(idx_TK: torch.Tensor, weight_TK: torch.Tensor):
    """Flatten [T, K] choices into routes ordered token-major: route t*K + k."""
    T, K = idx_TK.shape
    dev = idx_TK.device
    token_idx_R = torch.arange(T, device=dev).repeat_interleave(K)
    slot_R = torch.arange(K, device=dev).repeat(T)
    return token_idx_R, idx_TK.reshape(-1), weight_TK.reshape(-1), slot_R


def group_limited_mask(scores_TE: torch.Tensor, num_groups: int, topk_groups: int) -> torch.Tensor:
    """[T, E] bool: the experts of each token's `topk_groups` best groups (DeepSeek-V3).

    Experts e in [g*E/G, (g+1)*E/G) form group g; a group's score is the sum of its two highest
    scores (its highest when a group holds one expert). Called on detached scores: the choice of
    groups, like the choice of experts, carries no gradient.
    """
    T, E = scores_TE.shape
    per_group = E // num_groups
    group_score_TG = scores_TE.view(T, num_groups, per_group).topk(min(2, per_group), dim=-1).values.sum(-1)
    keep_TG = torch.zeros(T, num_groups, dtype=torch.bool, device=scores_TE.device)
    keep_TG.scatter_(1, group_score_TG.topk(topk_groups, dim=-1).indices, True)
    return keep_TG.unsqueeze(-1).expand(T, num_groups, per_group).reshape(T, E)


def limited_topk(choice_TE: torch.Tensor, k: int, cfg: MoEConfig) -> torch.Tensor:
    """idx_TK of the top-k of `choice_TE` (detached), inside each token's best groups when
    cfg.group_limited."""
    if cfg.group_limited:
        mask_TE = group_limited_mask(choice_TE, cfg.num_groups, cfg.topk_groups)
        choice_TE = choice_TE.masked_fill(~mask_TE, float("-inf"))
    return choice_TE.topk(k, dim=-1).indices


class BalanceGroupRef:
    """The balance group of aux_loss="global_batch", kept on the router without being module state:
    None, "local", or a process group held weakly, as moesys.parallel holds its groups (comm.GroupRef):
    the layer borrows the group, so destroy_process_group() still tears it down (a group kept alive
    past it can abort the interpreter at exit). Deep copies share the group; a pickled layer comes
    back without it (groups belong to a job); state_dict never sees it."""

    __slots__ = ("_value", "_ref")

    def __init__(self, group) -> None:
        self._value = group if group is None or isinstance(group, str) else None
        self._ref = None if self._value is not None or group is None else weakref.ref(group)

    @property
    def group(self):
        if self._ref is None:
            return self._value
        group = self._ref()
        if group is None:
            raise RuntimeError("MoELayer: the balance group of aux_loss='global_batch' was destroyed "
                               "(destroy_process_group) while the layer still uses it")
        return group

    def __deepcopy__(self, memo) -> "BalanceGroupRef":
        return BalanceGroupRef(self.group)

    def __reduce__(self):
        return (BalanceGroupRef, (self._value,))


class Router(nn.Module):
    """Base: holds `weight` [E, D]; subclasses turn logits into routes."""

    def __init__(self, cfg: MoEConfig):
        super().__init__()
        self.cfg = cfg
        self.weight = nn.Parameter(torch.empty(cfg.num_experts, cfg.hidden_size))
        nn.init.normal_(self.weight, std=cfg.init_std)
        self.balance_group = BalanceGroupRef(None)  # aux_loss="global_batch": where counts are summed
        self._paths: dict = {}  # _topk_path's answers
        # MoEConfig's routing rules, structural like the router's class: read once, not per call
        self._normalize, self._group_limited = cfg.renormalize_topk, cfg.group_limited

    def _topk_path(self, device: torch.device) -> str:
        """"torch" or "triton" for the top-k kernel on `device`: moesys.kernels' resolve_backend,
        asked once per (kernel_backend, device, TRITON_INTERPRET), on which alone its answer depends."""
        if torch.compiler.is_compiling():
            return resolve_backend(self.cfg.kernel_backend, device)
        key = (self.cfg.kernel_backend, device, os.environ.get("TRITON_INTERPRET"))
        path = self._paths.get(key)
        if path is None:
            path = self._paths[key] = resolve_backend(self.cfg.kernel_backend, device)
        return path

    def global_batch_group(self):
        """The group for aux_loss="global_batch" in this forward, or None (local counts).

        Only training forwards with autograd on reduce (evaluation may run on some ranks only and
        its loss is not used); an unset group in a multi-rank job is an error, not a silent local loss."""
        if not (self.training and torch.is_grad_enabled()):
            return None
        group = self.balance_group.group
        if isinstance(group, str):  # "local" (set_balance_group checked it)
            return None
        if group is None:
            import torch.distributed as dist

            if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
                raise RuntimeError(
                    "MoEConfig.aux_loss='global_batch' in a job of "
                    f"{dist.get_world_size()} ranks needs the group whose tokens make the batch: call "
                    "layer.set_balance_group(dp_group) (moesys-train does), or MoELayer(cfg, balance_group=...); "
                    "set_balance_group('local') counts this process's tokens only"
                )
        return group

    def logits(self, x_TD: torch.Tensor) -> torch.Tensor:
        if self.training and self.cfg.jitter_eps > 0:
            eps = self.cfg.jitter_eps
            x_TD = x_TD * torch.empty_like(x_TD).uniform_(1.0 - eps, 1.0 + eps)
        return F.linear(x_TD.float(), self.weight.float())  # [T, E] fp32

    def balance_losses(self, probs_TE, logits_TE, token_idx_R, expert_idx_R, slot_R, seq_len: int, top_k: float) -> dict:
        return balance.route_losses(self.cfg, probs_TE, logits_TE, token_idx_R, expert_idx_R, slot_R, seq_len, top_k,
                                    self.global_batch_group)

    def static_losses(self, probs_TE, logits_TE, expert_TK, routed_E, seq_len: int, aux: bool = True) -> dict:
        """`balance_losses` for [T, K] routes without a host sync (no bincount, no boolean mask).
        aux=False: the aux loss was computed already (the fused top-k kernel)."""
        cfg = self.cfg
        T, K = expert_TK.shape
        losses = {}
        if aux and cfg.aux_loss == "switch":
            losses["aux_loss"] = balance.switch_aux_loss(probs_TE, routed_E, K, cfg.aux_loss_coef)
        elif cfg.aux_loss == "global_batch":  # an all-reduce of device counts (no host read)
            losses["aux_loss"] = balance.global_batch_aux_loss(probs_TE, routed_E, K, cfg.aux_loss_coef,
                                                               self.global_batch_group())
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
        normalize, group_limited = self._normalize, self._group_limited  # never normalised for router="switch"
        if group_limited:
            # group-limited: groups ranked by the sum of their top-2 probabilities (plain torch: the
            # fused kernel has no group step)
            probs_TE = torch.softmax(logits_TE, dim=-1)
            idx_TK = limited_topk(probs_TE.detach(), cfg.top_k, cfg)
            w_TK = probs_TE.gather(1, idx_TK)
            if normalize:
                w_TK = w_TK / w_TK.sum(-1, keepdim=True)
        else:
            # softmax + top-k, fused into one kernel on the Triton path
            probs_TE, w_TK, idx_TK = topk_softmax(logits_TE, cfg.top_k, normalize,
                                                  backend=self._topk_path(logits_TE.device))
        token_R, expert_R, weight_R, slot_R = token_major_routes(idx_TK, w_TK)
        losses = self.balance_losses(probs_TE, logits_TE, token_R, expert_R, slot_R, seq_len, cfg.top_k)
        return Routing(token_R, expert_R, weight_R, slot_R, x_TD.shape[0], probs_TE, logits_TE, losses,
                       fixed_k=cfg.top_k)

    def route_static(self, x_TD: torch.Tensor, seq_len: int) -> StaticRouting:
        """The same decision as `forward`, sync-free: softmax, top-k, renormalisation, the routes'
        histogram and the switch/gshard loss in one fused node (moesys.kernels.topk_route)."""
        cfg = self.cfg
        logits_TE = self.logits(x_TD)
        if cfg.group_limited:
            # the group step is plain device ops (a masked top-k), as in `forward`
            probs_TE = torch.softmax(logits_TE, dim=-1)
            idx_TK = limited_topk(probs_TE.detach(), cfg.top_k, cfg)
            w_TK = probs_TE.gather(1, idx_TK)
            if cfg.renormalize_topk:
                w_TK = w_TK / w_TK.sum(-1, keepdim=True)
            routed_E = histogram(idx_TK, cfg.num_experts)
            losses = self.static_losses(probs_TE, logits_TE, idx_TK, routed_E, seq_len)
            return StaticRouting(idx_TK, w_TK, routed_E, probs_TE, logits_TE, losses)
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

    def _select(self, x_TD: torch.Tensor):
        """(logits, sigmoid scores, top-k expert ids, their weights): experts picked on the biased
        scores (groups too are ranked on them: DeepSeek-V3, Megatron), weighted by the unbiased."""
        cfg = self.cfg
        logits_TE = self.logits(x_TD)
        scores_TE = torch.sigmoid(logits_TE)
        idx_TK = limited_topk(scores_TE.detach() + self.expert_bias, cfg.top_k, cfg)
        w_TK = scores_TE.gather(1, idx_TK)
        if cfg.renormalize_topk:
            w_TK = w_TK / w_TK.sum(-1, keepdim=True)
        return logits_TE, scores_TE, idx_TK, w_TK

    def forward(self, x_TD: torch.Tensor, seq_len: int) -> Routing:
        cfg = self.cfg
        logits_TE, scores_TE, idx_TK, w_TK = self._select(x_TD)
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
        logits_TE, scores_TE, idx_TK, w_TK = self._select(x_TD)
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
        ratio = cfg.capacity_ratio() if cfg.capacity_factor is not None else (1, 1)
        return min(T, max(cfg.min_capacity, exact_capacity(cfg.capacity_factor, cfg.top_k, T, cfg.num_experts, ratio)))

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
