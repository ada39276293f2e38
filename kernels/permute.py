"""Permute tokens into expert order and combine them back with their routing weights.

Legend: T tokens, N kept routes, D hidden.

permute:   x_ND[i]  = x_TD[token_idx_N[i]]
unpermute: y_TD[t]  = sum over i with token_idx_N[i] == t of weight_N[i] * y_ND[i]
(a token whose routes were all dropped gets 0.)
"""
from __future__ import annotations

import torch

from . import backend as _backend
from . import workspace


def _check(name: str, token_idx_N: torch.Tensor, n_rows: int) -> None:
    if token_idx_N.dim() != 1 or token_idx_N.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{name}: token_idx must be a 1-D integer tensor, got {token_idx_N.dtype} {tuple(token_idx_N.shape)}")
    if token_idx_N.shape[0] != n_rows:
        raise ValueError(f"{name}: token_idx has {token_idx_N.shape[0]} entries but there are {n_rows} rows")


def permute_torch(x_TD: torch.Tensor, token_idx_N: torch.Tensor) -> torch.Tensor:
    return x_TD.index_select(0, token_idx_N)


def unpermute_torch(y_ND: torch.Tensor, token_idx_N: torch.Tensor, weight_N: torch.Tensor, num_tokens: int) -> torch.Tensor:
    # weights are fp32 (router precision); accumulate in fp32 and return y's dtype
    contrib = y_ND.float() * weight_N.float().unsqueeze(1)
    out = contrib.new_zeros(num_tokens, y_ND.shape[1])
    out = out.index_add(0, token_idx_N, contrib)
    return out.to(y_ND.dtype)


def permute(x_TD: torch.Tensor, token_idx_N: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """Gather rows of x_TD into expert order. Differentiable."""
    _check("permute", token_idx_N, token_idx_N.shape[0])
    if _backend.resolve(backend, x_TD.device) == "triton":
        from .permute_triton import permute_triton

        return permute_triton(x_TD, token_idx_N)
    return permute_torch(x_TD, token_idx_N)


def unpermute(y_ND: torch.Tensor, token_idx_N: torch.Tensor, weight_N: torch.Tensor, num_tokens: int, *, backend: str = "auto") -> torch.Tensor:
    """Scatter-add expert outputs back to tokens, each scaled by its routing weight. Differentiable
    in y_ND and weight_N."""
    _check("unpermute", token_idx_N, y_ND.shape[0])
    if weight_N.shape != token_idx_N.shape:
        raise ValueError(f"unpermute: weight has shape {tuple(weight_N.shape)}, token_idx {tuple(token_idx_N.shape)}")
    if _backend.resolve(backend, y_ND.device) == "triton":
        from .permute_triton import unpermute_triton

        return unpermute_triton(y_ND, token_idx_N, weight_N, num_tokens)
    return unpermute_torch(y_ND, token_idx_N, weight_N, num_tokens)


# ---------------------------------------------------------------------------------------------
# Fixed-K torch path: routes are token-major (route r = t*K + k), so both directions can be done
# with gathers only. index_add (scatter) is single-threaded on CPU and was ~15% of a layer step;
# a gather by the inverse permutation gives the same sums with no scatter at all.
#   route_idx_N [N]: which route (in 0..T*K-1) each kept row is, grouped by expert
#   inv_R       [R]: row of each route in x_ND, or N for a dropped route (reads a zero row)
# ---------------------------------------------------------------------------------------------
def inverse_routes(route_idx_N: torch.Tensor, num_routes: int) -> torch.Tensor:
    N = route_idx_N.shape[0]
    inv_R = torch.full((num_routes,), N, dtype=torch.int64, device=route_idx_N.device)
    inv_R[route_idx_N] = torch.arange(N, device=route_idx_N.device)
    return inv_R


def _gather(rows_ND: torch.Tensor, idx_M: torch.Tensor) -> torch.Tensor:
    """rows_ND[idx_M] into a workspace buffer (reused across steps on CPU)."""
    return torch.index_select(rows_ND, 0, idx_M, out=workspace.empty_as((idx_M.shape[0], rows_ND.shape[1]), rows_ND))


def _padded(rows_ND: torch.Tensor, inv_R: torch.Tensor) -> torch.Tensor:
    """rows_ND, with a zero row appended when some route is dropped (inv_R == N reads it)."""
    if rows_ND.shape[0] == inv_R.shape[0]:  # nothing dropped: no copy
        return rows_ND
    return torch.cat([rows_ND, rows_ND.new_zeros(1, rows_ND.shape[1])])


def _sum_routes(rows_ND: torch.Tensor, inv_TK: torch.Tensor, weight_TK=None) -> torch.Tensor:
    """out[t] = sum_k (weight[t, k] *) rows[inv[t, k]], one [T, D] gather per k (no [T, K, D] copy)."""
    T, K = inv_TK.shape
    pad = _padded(rows_ND, inv_TK.view(-1))
    out = _gather(pad, inv_TK[:, 0])
    if weight_TK is not None:
        out.mul_(weight_TK[:, :1])
    for k in range(1, K):
        rows_k = _gather(pad, inv_TK[:, k])
        if weight_TK is None:
            out.add_(rows_k)
        else:
            out.addcmul_(rows_k, weight_TK[:, k : k + 1])
        del rows_k  # its workspace block serves the next k
    return out


class _PermuteFixedK(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_TD, route_idx_N, inv_R, top_k):
        ctx.save_for_backward(inv_R)
        ctx.top_k, ctx.T = top_k, x_TD.shape[0]
        return _gather(x_TD, torch.div(route_idx_N, top_k, rounding_mode="floor"))

    @staticmethod
    def backward(ctx, dx_ND):
        (inv_R,) = ctx.saved_tensors
        return _sum_routes(dx_ND.contiguous(), inv_R.view(ctx.T, ctx.top_k)), None, None, None


class _UnpermuteFixedK(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y_ND, weight_TK, route_idx_N, inv_R):
        T, K = weight_TK.shape
        ctx.save_for_backward(y_ND, weight_TK, route_idx_N, inv_R)
        with torch.autocast(y_ND.device.type, enabled=False):  # output in y's dtype, as the torch path
            return _sum_routes(y_ND, inv_R.view(T, K), weight_TK.to(y_ND.dtype))

    @staticmethod
    def backward(ctx, dout_TD):
        # route i = (t, k) holds y_ND[i]: dy_ND[i] = w[t, k] * dout[t], dw[t, k] = <y_ND[i], dout[t]>
        y_ND, weight_TK, route_idx_N, inv_R = ctx.saved_tensors
        T, K = weight_TK.shape
        dout_ND = _gather(dout_TD.contiguous().to(y_ND.dtype), torch.div(route_idx_N, K, rounding_mode="floor"))
        dweight_TK = None
        if ctx.needs_input_grad[1]:
            # fp32 row dots, scattered to routes; a dropped route's weight gets 0
            dots_N = torch.bmm(y_ND.float().unsqueeze(1), dout_ND.float().unsqueeze(2)).view(-1)
            dweight_TK = dots_N.new_zeros(T * K).index_copy_(0, route_idx_N, dots_N).view(T, K).to(weight_TK.dtype)
        dy_ND = None
        if ctx.needs_input_grad[0]:
            dy_ND = dout_ND.mul_(weight_TK.reshape(-1)[route_idx_N].to(dout_ND.dtype).unsqueeze(1))  # in place
        return dy_ND, dweight_TK, None, None


def permute_fixed_k(x_TD: torch.Tensor, route_idx_N: torch.Tensor, inv_R: torch.Tensor, top_k: int) -> torch.Tensor:
    """x_ND[i] = x_TD[route_idx_N[i] // top_k]; backward by gathers only."""
    return _PermuteFixedK.apply(x_TD, route_idx_N, inv_R, top_k)


def unpermute_fixed_k(y_ND: torch.Tensor, weight_TK: torch.Tensor, route_idx_N: torch.Tensor, inv_R: torch.Tensor) -> torch.Tensor:
    """y_TD[t] = sum_k weight_TK[t, k] * y_ND[inv_R[t*K + k]] (0 for a dropped route)."""
    if weight_TK.shape[0] * weight_TK.shape[1] != inv_R.shape[0]:
        raise ValueError(f"unpermute_fixed_k: weight {tuple(weight_TK.shape)} does not match {inv_R.shape[0]} routes")
    return _UnpermuteFixedK.apply(y_ND, weight_TK, route_idx_N, inv_R)
