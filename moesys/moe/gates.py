"""Dense-to-sparse gates: EvoMoE's DTS gate and the activation gate of Nguyen, Akbarian & Ho.

Legend: T tokens, E experts, R routes (varies per token).

router="dts" (EvoMoE, released code):
    training:  g = softmax((z + G) / tau), G ~ Gumbel(0, 1) per token and expert; the token goes
               to every expert with g > threshold (so K varies per token); after the hard switch,
               to argmax g only. Combine weight = softmax(z) at that expert.
    eval:      top-1 of softmax(z), weight = its probability.
    balance:   coef * E^2 * mean_e(me_e * ce_e).
router="act_dts" (ICML 2024): the gate is softmax(sigma(z) / tau + b), sigma in {sigmoid, tanh},
    b a learned [E] bias; Gumbel noise is added to sigma(z) in training; the same selection rules;
    combine weight = the noise-free gate at that expert.
tau and the hard switch are buffers set by the trainer's schedule (`set_gate_state`), so they are
saved with the model and identical on every rank.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from . import balance
from .config import MoEConfig
from .routers import Router
from .routing import Routing


def gumbel_like(t: torch.Tensor) -> torch.Tensor:
    u = torch.empty_like(t).uniform_(torch.finfo(t.dtype).tiny, 1.0)
    return -torch.log(-torch.log(u))


class DTSRouter(Router):
    def __init__(self, cfg: MoEConfig):
        super().__init__(cfg)
        self.register_buffer("tau", torch.tensor(float(cfg.tau_max)))
        self.register_buffer("hard", torch.tensor(False))
        if cfg.router == "act_dts":
            self.gate_bias = nn.Parameter(torch.zeros(cfg.num_experts))

    def set_gate_state(self, *, tau: float | None = None, hard: bool | None = None) -> None:
        if tau is not None:
            if not tau > 0:
                raise ValueError(f"gate temperature tau must be > 0, got {tau}")
            self.tau.fill_(float(tau))
        if hard is not None:
            self.hard.fill_(bool(hard))

    def _scores(self, logits_TE: torch.Tensor):
        """(pre-temperature score, combine probabilities) for the gate kind."""
        if self.cfg.router == "dts":
            return logits_TE, torch.softmax(logits_TE, dim=-1)
        act = torch.sigmoid if self.cfg.gate_activation == "sigmoid" else torch.tanh
        a_TE = act(logits_TE)
        return a_TE, torch.softmax(a_TE / self.tau + self.gate_bias.float(), dim=-1)

    def forward(self, x_TD: torch.Tensor, seq_len: int) -> Routing:
        cfg = self.cfg
        T, E = x_TD.shape[0], cfg.num_experts
        dev = x_TD.device
        logits_TE = self.logits(x_TD)
        score_TE, probs_TE = self._scores(logits_TE)
        hard = self.training and bool(self.hard)  # `bool` of a device buffer: one host sync per call
        if not self.training:
            w_T, idx_T = probs_TE.max(dim=-1)
            token_R = torch.arange(T, device=dev)
            expert_R, weight_R, slot_R = idx_T, w_T, torch.zeros_like(idx_T)
        else:
            with torch.no_grad():
                noisy_TE = score_TE.detach() + gumbel_like(score_TE)
                if cfg.router == "dts":
                    g_TE = torch.softmax(noisy_TE / self.tau, dim=-1)
                else:
                    g_TE = torch.softmax(noisy_TE / self.tau + self.gate_bias.float(), dim=-1)
                top_T = g_TE.argmax(dim=-1)
                if hard:
                    mask_TE = torch.zeros_like(g_TE, dtype=torch.bool)
                else:
                    mask_TE = g_TE > cfg.dts_threshold
                # the best expert is always chosen (matters only when E > 1/threshold)
                mask_TE[torch.arange(T, device=dev), top_T] = True
                # choice rank of each expert for its token, for positional capacity priority
                rank_TE = torch.argsort(torch.argsort(g_TE, dim=-1, descending=True), dim=-1)
                token_R, expert_R = mask_TE.nonzero(as_tuple=True)  # token-major
                slot_R = rank_TE[token_R, expert_R]
            weight_R = probs_TE[token_R, expert_R]
        losses = {}
        if cfg.aux_loss != "none":
            losses["aux_loss"] = balance.evo_balance_loss(probs_TE, token_R, expert_R, cfg.dts_balance_coef)
        if cfg.z_loss_coef > 0:
            losses["z_loss"] = balance.z_loss(logits_TE, cfg.z_loss_coef)
        # eval and the hard phase route exactly one expert per token, token-major: the layer's
        # gather-only fixed-K combine applies; the soft phase has a variable K
        one_per_token = not self.training or hard
        return Routing(token_R, expert_R, weight_R, slot_R, T, probs_TE, logits_TE, losses,
                       fixed_k=1 if one_per_token else None)
