"""Load-balancing losses and router statistics.

Legend: T tokens, E experts, K routes per token (mean), R routes in all, S sequence length.
Formulas (DESIGN.md):
  switch  L = coef * E / (K * T^2) * sum_i (sum_t p_ti) * count_i     (Megatron's top-k form;
          = coef * E * sum_i f_i P_i for top-1)
  gshard  L = coef * E * sum_i me_i * ce_i, me_i = mean_t p_ti, ce_i = fraction of tokens whose
          FIRST choice is i (GShard, Tutel, DeepSpeed: second choices do not count; = switch at K=1)
  global_batch  L_r = coef * E * sum_i f_i * P_i on rank r, f_i = c_i / (K * T) with the routes
          per expert c_i and the tokens T summed over the balance group (no gradient: counts),
          P_i = mean_t p_ti over this rank's tokens only (Qwen's global-batch LBL, Qiu et al.
          2025). With equal tokens per rank, mean_r L_r (what data-parallel gradient averaging
          applies) is the switch loss of all the group's tokens in one process. Megatron's
          global_aux_loss is the same per-rank loss divided by the group size (it sums over ranks)
  seq     the same per sequence of length S (probabilities normalised per token), averaged
  z       L_z = coef * mean_t (logsumexp_j z_tj)^2                      (ST-MoE)
  evo     L = coef * E^2 * mean_e(me_e * ce_e), me = mean_t p, ce = fraction of tokens routed
          to e (EvoMoE's released gate)
"""
from __future__ import annotations

import torch


def routed_counts(expert_idx_R: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Routes per expert before any capacity drop: [E] int64."""
    return torch.bincount(expert_idx_R, minlength=num_experts)


def switch_aux_loss(probs_TE: torch.Tensor, counts_E: torch.Tensor, top_k: float, coef: float) -> torch.Tensor:
    T, E = probs_TE.shape
    if T == 0:
        return probs_TE.sum() * 0.0
    return coef * E / (top_k * T * T) * (probs_TE.sum(0) * counts_E.to(probs_TE.dtype)).sum()


def global_batch_aux_loss(probs_TE: torch.Tensor, counts_E: torch.Tensor, top_k: float, coef: float,
                          group=None) -> torch.Tensor:
    """The switch loss with f (routes per expert / (K * tokens)) taken over every rank of `group`.

    One all-reduce (sum) of E + 1 numbers on `group`; None: this process holds the whole batch (then
    it equals `switch_aux_loss`). The reduced counts are plain numbers: only this rank's P carries
    gradient, so each rank's gradient is its own tokens' share."""
    T, E = probs_TE.shape
    stats = torch.cat([counts_E.detach().to(torch.float64), counts_E.new_tensor([T], dtype=torch.float64)])
    if group is not None:
        import torch.distributed as dist

        dist.all_reduce(stats, group=group)
    f_E = (stats[:E] / (top_k * stats[E].clamp_min(1))).to(probs_TE.dtype)
    P_E = probs_TE.sum(0) / max(T, 1)
    return coef * E * (P_E * f_E).sum()


def gshard_aux_loss(probs_TE: torch.Tensor, expert_idx_R: torch.Tensor, slot_R: torch.Tensor, coef: float) -> torch.Tensor:
    """GShard's balance loss, as Tutel and DeepSpeed compute it: only first choices (slot 0) count.

    Routes are counted before any capacity drop, as in those systems."""
    T, E = probs_TE.shape
    if T == 0:
        return probs_TE.sum() * 0.0
    me_E = probs_TE.mean(0)
    ce_E = torch.bincount(expert_idx_R[slot_R == 0], minlength=E).to(probs_TE.dtype) / T
    return coef * E * (me_E * ce_E).sum()


def seq_aux_loss(
    probs_TE: torch.Tensor, token_idx_R: torch.Tensor, expert_idx_R: torch.Tensor, seq_len: int, top_k: float, coef: float
) -> torch.Tensor:
    """DeepSeek-V3 sequence-wise balance loss; tokens are laid out [B, S] in order."""
    T, E = probs_TE.shape
    if T == 0:
        return probs_TE.sum() * 0.0
    if T % seq_len != 0:
        raise ValueError(f"seq aux loss: {T} tokens do not split into sequences of length {seq_len}")
    B = T // seq_len
    # probabilities normalised per token (for sigmoid scores they do not sum to 1)
    p = probs_TE / probs_TE.sum(-1, keepdim=True).clamp_min(1e-20)
    p_sum_BE = p.view(B, seq_len, E).sum(1)
    seq_of_route = token_idx_R // seq_len
    counts_BE = torch.zeros(B * E, dtype=p.dtype, device=p.device)
    counts_BE.index_add_(0, seq_of_route * E + expert_idx_R, torch.ones_like(expert_idx_R, dtype=p.dtype))
    counts_BE = counts_BE.view(B, E)
    per_seq = E / (top_k * seq_len * seq_len) * (p_sum_BE * counts_BE).sum(-1)
    return coef * per_seq.mean()


def z_loss(logits_TE: torch.Tensor, coef: float) -> torch.Tensor:
    if logits_TE.shape[0] == 0:
        return logits_TE.sum() * 0.0
    return coef * torch.logsumexp(logits_TE, dim=-1).square().mean()


def evo_balance_loss(probs_TE: torch.Tensor, token_idx_R: torch.Tensor, expert_idx_R: torch.Tensor, coef: float) -> torch.Tensor:
    T, E = probs_TE.shape
    if T == 0:
        return probs_TE.sum() * 0.0
    me = probs_TE.mean(0)
    ce = torch.bincount(expert_idx_R, minlength=E).to(probs_TE.dtype) / T
    return coef * E * E * (me * ce).mean()


@torch.no_grad()
def router_metrics(probs_TE: torch.Tensor, counts_E: torch.Tensor, num_routes: int, dropped: int | torch.Tensor) -> dict:
    """Detached statistics (0-dim tensors, no host sync here)."""
    T = max(probs_TE.shape[0], 1)
    p = probs_TE.float()
    entropy = -(p * p.clamp_min(1e-20).log()).sum(-1).mean() if probs_TE.shape[0] else p.new_zeros(())
    load = counts_E.float()
    mean_load = load.mean()
    return {
        "router_entropy": entropy,
        "max_load": load.max(),
        "mean_load": mean_load,
        "max_over_mean_load": load.max() / mean_load.clamp_min(1e-9),
        "experts_per_token": torch.tensor(num_routes / T),
        "drop_rate": torch.as_tensor(dropped, dtype=torch.float32) / max(num_routes, 1),
    }


@torch.no_grad()
def router_metrics_static(probs_TE: torch.Tensor, routed_E: torch.Tensor, num_routes: int, dropped: torch.Tensor) -> dict:
    """`router_metrics` for the sync-free path, in fewer ops: routed_E sums to num_routes (every route
    counted before capacity), so the mean load is the Python number num_routes / E; all values stay
    0-dim device tensors (read on the host only when the trainer logs them)."""
    T, E = max(probs_TE.shape[0], 1), routed_E.shape[0]
    mean_load = num_routes / E
    max_load = routed_E.max().float()
    return {
        "router_entropy": torch.special.entr(probs_TE.float()).sum() / T,
        "max_load": max_load,
        "mean_load": torch.tensor(float(mean_load)),
        "max_over_mean_load": max_load / max(mean_load, 1e-9),
        "experts_per_token": torch.tensor(num_routes / T),
        "drop_rate": dropped / max(num_routes, 1),
    }


def route_losses(cfg, probs_TE: torch.Tensor, logits_TE: torch.Tensor, token_idx_R: torch.Tensor,
                 expert_idx_R: torch.Tensor, slot_R: torch.Tensor, seq_len: int, top_k: float, group_of) -> dict:
    """The balance losses cfg (a MoEConfig) asks for, over a router's flat routes: name -> scalar,
    coefficient-weighted. One call from the router; `group_of()` gives the balance group of
    aux_loss="global_batch" (asked only for that loss)."""
    losses = {}
    if cfg.aux_loss == "switch":
        counts_E = routed_counts(expert_idx_R, cfg.num_experts)
        losses["aux_loss"] = switch_aux_loss(probs_TE, counts_E, top_k, cfg.aux_loss_coef)
    elif cfg.aux_loss == "global_batch":
        counts_E = routed_counts(expert_idx_R, cfg.num_experts)
        losses["aux_loss"] = global_batch_aux_loss(probs_TE, counts_E, top_k, cfg.aux_loss_coef, group_of())
    elif cfg.aux_loss == "gshard":
        losses["aux_loss"] = gshard_aux_loss(probs_TE, expert_idx_R, slot_R, cfg.aux_loss_coef)
    elif cfg.aux_loss == "seq":
        losses["aux_loss"] = seq_aux_loss(probs_TE, token_idx_R, expert_idx_R, seq_len, top_k, cfg.aux_loss_coef)
    if cfg.z_loss_coef > 0:
        losses["z_loss"] = z_loss(logits_TE, cfg.z_loss_coef)
    return losses
