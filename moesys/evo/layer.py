"""EvoMoELayer: a MoELayer with EvoMoE's dense phase and routing statistics for the schedule.

Legend: T tokens, D hidden, F ffn hidden, E experts, L local experts.

Phase 0 (dense): y = FFN_dense(x) with one replicated expert `dense` (GroupedExperts, E=1, the
    same w1/w2/w3 layout); router and experts are unused (no grads, no communication).
Phase 1 (MoE):   the ordinary MoELayer forward (any router; the DTS gates route a variable number
    of experts per token).
`phase` is a buffer, so it is checkpointed with the model and equal on every rank. `diversify()`
spawns the experts of this rank's slice from `dense` (see diversify.py) and flips the phase.

The parameter set never changes shape across the phase boundary, so the optimizer and
checkpoints stay valid on both sides; `dense` receives no gradient after diversification.

Gate noise: once `set_noise_key(seed, step, rank)` was called (EvoController.on_step_start does it
every step), the router's random draws in training (DTS Gumbel noise, jitter, random drops) come
from a stream seeded by (seed, layer, step, rank, n-th routing call of the step) instead of the
global RNG, so they do not depend on how the global RNG was seeded (e.g. after a resume at another
world size). Without a key the global RNG is used.
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Optional

import torch

from moesys.moe import balance
from moesys.moe.config import MoEConfig
from moesys.moe.experts import GroupedExperts, copy_global_, full_value, local_tensor
from moesys.moe.layer import MoEAux, MoELayer

from . import diversify as _div

DENSE, SPARSE = 0, 1


class EvoMoELayer(MoELayer):
    """Args:
        cfg: the phase-2 layer config.
        dense_phase: start in the dense phase (holds a `dense` FFN); False = a MoELayer with
            EvoMoE's metrics only.
        layer_index: index of this MoE layer in the model (seeds the spawn streams).
    """

    def __init__(self, cfg: MoEConfig, *, dense_phase: bool = True, layer_index: int = 0):
        if cfg.num_shared_experts:
            raise ValueError(f"EvoMoELayer does not support shared experts (MoEConfig.num_shared_experts="
                             f"{cfg.num_shared_experts}): the dense phase and the spawn have no place for them")
        super().__init__(cfg)
        self.layer_index = layer_index
        self.register_buffer("phase", torch.tensor(DENSE if dense_phase else SPARSE, dtype=torch.int64))
        self.dense: Optional[GroupedExperts] = None
        self._noise_key: Optional[tuple] = None  # (seed, step, rank); see set_noise_key
        self._noise_calls = 0
        if dense_phase:
            # the dense FFN has no router: normalize_topk=None keeps a K>1 setting from warning at K=1
            self.dense = GroupedExperts(dataclasses.replace(cfg, num_experts=1, top_k=1, normalize_topk=None))

    @property
    def in_dense_phase(self) -> bool:
        return int(self.phase) == DENSE

    def set_noise_key(self, *, seed: int, step: int, rank: int) -> None:
        """Draw this step's gate noise from streams keyed by (seed, layer, step, rank, call index)."""
        self._noise_key, self._noise_calls = (seed, step, rank), 0

    def step_state(self) -> dict:
        """Python-side state a training forward advances (moesys.step_state: a re-run step restores it)."""
        return {"noise_calls": self._noise_calls}

    def load_step_state(self, state: dict) -> None:
        self._noise_calls = state["noise_calls"]

    def _noise_stream(self, device: torch.device):
        """Context: the global RNG of `device` seeded for the next routing call, restored afterwards."""
        if not self.training or self._noise_key is None:
            return contextlib.nullcontext()
        seed, step, rank = self._noise_key
        s = _div.stream_seed(seed, self.layer_index, f"gate/{step}/{rank}/{self._noise_calls}")
        self._noise_calls += 1
        return _seeded(device, s)

    # ---- forward ---------------------------------------------------------------------------
    def route(self, x_TD: torch.Tensor, seq_len: int):
        with self._noise_stream(x_TD.device):
            routing, plan = super().route(x_TD, seq_len)
        with torch.no_grad():
            k_T = torch.bincount(routing.token_idx_R, minlength=routing.num_tokens)
            self._max_k = k_T.max() if routing.num_tokens else k_T.new_zeros(())
        return routing, plan

    def _takes_sync_free_path(self, x_TD: torch.Tensor) -> bool:
        # expert choice gives a token a data-dependent number of experts: its max-K metric needs the
        # host plan's routes (the dts gates keep the host plan anyway)
        return self.cfg.router != "expert_choice" and super()._takes_sync_free_path(x_TD)

    def _forward_sync_free(self, x_TD: torch.Tensor, seq_len: int):
        with self._noise_stream(x_TD.device):
            out = super()._forward_sync_free(x_TD, seq_len)
        self._max_k = torch.tensor(self.cfg.top_k, device=x_TD.device)  # fixed K: every token has K
        return out

    def forward(self, x: torch.Tensor):
        if not self.in_dense_phase:
            y, aux = super().forward(x)
            aux.metrics["max_experts_per_token"] = self._max_k.float()
            aux.metrics["tau"] = getattr(self.router, "tau", torch.tensor(float("nan"))).detach().clone()
            aux.metrics["evo_phase"] = torch.tensor(float(SPARSE))
            return y, aux
        if x.shape[-1] != self.cfg.hidden_size:
            raise ValueError(f"EvoMoELayer: input width {x.shape[-1]} != hidden_size {self.cfg.hidden_size}")
        shape = x.shape
        x_TD = x.reshape(-1, self.cfg.hidden_size)
        T = x_TD.shape[0]
        counts_1 = torch.tensor([T], dtype=torch.int64, device=x.device)
        y_TD = self.dense(x_TD, counts_1)
        zero = torch.zeros((), dtype=torch.int64, device=x.device)
        metrics = balance.router_metrics(x_TD.new_ones(T, 1, dtype=torch.float32), counts_1, T, zero)
        metrics["max_experts_per_token"] = torch.tensor(1.0)
        metrics["tau"] = getattr(self.router, "tau", torch.tensor(float("nan"))).detach().clone()
        metrics["evo_phase"] = torch.tensor(float(DENSE))
        aux = MoEAux(
            loss=x_TD.new_zeros((), dtype=torch.float32),
            tokens_per_expert=torch.zeros(self.cfg.num_experts, dtype=torch.int64, device=x.device),
            dropped=zero,
            metrics=metrics,
        )
        return y_TD.reshape(shape).to(x.dtype), aux

    # ---- diversification -------------------------------------------------------------------
    def local_expert_range(self) -> tuple:
        ex = self.experts
        return ex.expert_offset, ex.num_local_experts

    @torch.no_grad()
    def diversify(self, *, seed: int, method: str, router_std: float = 0.02, **spawn_kw) -> None:
        """Spawn this rank's experts from `dense`, draw a fresh router, enter phase 1."""
        if self.dense is None:
            raise RuntimeError("EvoMoELayer.diversify: this layer was built without a dense phase")
        ex = self.experts
        # the dense FFN's weights (FSDP2 shards them over dp: gathered here, on every rank alike)
        dense_w = {"w1": full_value(self.dense.w1)[0], "w2": full_value(self.dense.w2)[0]}
        if self.dense.w3 is not None:
            dense_w["w3"] = full_value(self.dense.w3)[0]
        if hasattr(ex.w1, "device_mesh") and (ex.sharding is None or ex.w1.device_mesh is not ex.sharding.mesh):
            # experts that FSDP2 also shards (over (edp, ep)): spawn all E, each rank keeps its part
            new = _div.spawn_slice(dense_w, first_expert=0, num_local=self.cfg.num_experts, layer=self.layer_index,
                                   seed=seed, method=method, f_slice=None, **spawn_kw)
            for name, w in new.items():
                copy_global_(getattr(ex, name), w)
        else:
            first, L = self.local_expert_range()
            new = _div.spawn_slice(dense_w, first_expert=first, num_local=L, layer=self.layer_index, seed=seed,
                                   method=method, f_slice=ex.ffn_slice(), **spawn_kw)
            for name, w in new.items():
                p = local_tensor(getattr(ex, name))  # a DTensor over ep: its local experts
                p.copy_(w.to(device=p.device, dtype=p.dtype))
        copy_global_(self.router.weight, _div.fresh_router(self.cfg.num_experts, self.cfg.hidden_size,
                                                           layer=self.layer_index, seed=seed, std=router_std))
        gb = getattr(self.router, "gate_bias", None)
        if gb is not None:
            gb.zero_()
        self.phase.fill_(SPARSE)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", evo_phase={'dense' if self.in_dense_phase else 'moe'}"


@contextlib.contextmanager
def _seeded(device: torch.device, seed: int):
    """fork_rng for `device` only (the CPU generator is always forked), seeded with `seed`."""
    cuda = device.type == "cuda"
    index = (device.index if device.index is not None else torch.cuda.current_device()) if cuda else None
    with torch.random.fork_rng(devices=[index] if cuda else [], device_type="cuda"):
        (torch.cuda.default_generators[index] if cuda else torch.default_generator).manual_seed(seed)
        yield
