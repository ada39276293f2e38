"""Engine adapters for moesys checkpoints: AdamW state per parameter, and local expert shards as DTensors.

Checkpoints store every optimizer entry per model parameter, shaped like the parameter
(`optim.<param>.{exp_avg,exp_avg_sq,step}`), whichever engine trained:
- the plain engine's torch AdamW keeps exactly that (`PlainAdamState`);
- DeepSpeed ZeRO-1/2 keeps, per param group, one flat fp32 master partition and flat Adam moments
  over the data-parallel group of that group (the expert-data-parallel group for experts).
  `ZeroAdamState` cuts each parameter's fragment out of this rank's partition (DeepSpeed's
  `param._hp_mapping`) and sums the fragments over `param._dp_group`: the same assembly as
  `deepspeed.utils.safe_get_full_optimizer_state`, but it also works before the first step (DeepSpeed
  links the moment fragments lazily, in the first `step()`), and loading creates the flat state a
  fresh engine does not have yet. Model entries of a ZeRO run are the fp32 master weights.
So a checkpoint from either engine resumes on either, at any EP degree.

Expert weights that an engine keeps as plain local shards (DeepSpeed) are handed to DCP as DTensors of
the global shape built from the shard and the experts' `sharding` (`global_view`), the same entries a
plain or FSDP2 run's DTensor parameters give, so DCP writes one logical tensor and any later layout
reads its part.
"""
from __future__ import annotations

from typing import Dict, Optional

import torch
import torch.distributed as dist

from moesys.moe.experts import FFN_DIM
from moesys.parallel import expert_parameters

MOMENTS = ("exp_avg", "exp_avg_sq")


# ---- optimizer state per parameter ---------------------------------------------------------------
class PlainAdamState:
    """torch.optim.AdamW: state is already per parameter."""

    has_master = False

    def __init__(self, optimizer: torch.optim.Optimizer):
        self.optimizer = optimizer
        self.params = {id(p) for g in optimizer.param_groups for p in g["params"]}

    def holds(self, p: torch.Tensor) -> bool:
        return id(p) in self.params

    def get(self, p: torch.Tensor) -> dict:
        """{exp_avg, exp_avg_sq: like p; step: float32 scalar}; zeros before the first step."""
        st = self.optimizer.state.get(p, {})
        out = {k: st[k].detach() if k in st else torch.zeros_like(p, memory_format=torch.preserve_format)
               for k in MOMENTS}
        out["step"] = torch.as_tensor(st.get("step", 0.0), dtype=torch.float32).detach().clone().reshape(())
        return out

    def set(self, p: torch.Tensor, st: dict) -> None:
        self.optimizer.state[p] = {"step": st["step"].clone().reshape(()),
                                   **{k: st[k].clone().to(p.dtype).reshape(p.shape) for k in MOMENTS}}

    def master(self, p: torch.Tensor) -> Optional[torch.Tensor]:
        return None

    def set_master(self, p: torch.Tensor, value: torch.Tensor) -> None:
        pass


class ZeroAdamState:
    """DeepSpeed ZeRO-1/2 (`DeepSpeedZeroOptimizer`) around torch AdamW. get/master are collective over
    each parameter's data-parallel group: call them for every parameter in the same order on all ranks."""

    has_master = True

    def __init__(self, zero_optimizer):
        self.zo = zero_optimizer
        self.group_of = {id(p): i for i, g in enumerate(zero_optimizer.bit16_groups) for p in g}

    def holds(self, p: torch.Tensor) -> bool:
        return id(p) in self.group_of

    def _flat(self, p: torch.Tensor) -> torch.Tensor:
        return self.zo.single_partition_of_fp32_groups[self.group_of[id(p)]]

    def _gather(self, p: torch.Tensor, src: Optional[torch.Tensor]) -> torch.Tensor:
        """The full fp32 tensor shaped like p from this rank's flat partition `src` (summed over p's dp group)."""
        buf = torch.zeros(p.numel(), dtype=torch.float32, device=p.device)
        m = getattr(p, "_hp_mapping", None)
        if m is not None and src is not None:
            lp, hp = m.lp_fragment_address, m.hp_fragment_address
            buf.narrow(0, lp.start, lp.numel).copy_(src.narrow(0, hp.start, hp.numel))
        if dist.get_world_size(p._dp_group) > 1:
            dist.all_reduce(buf, group=p._dp_group)
        return buf.view(p.shape)

    def _scatter(self, p: torch.Tensor, dst: torch.Tensor, value: torch.Tensor) -> None:
        m = getattr(p, "_hp_mapping", None)
        if m is not None:
            lp, hp = m.lp_fragment_address, m.hp_fragment_address
            dst.narrow(0, hp.start, hp.numel).copy_(value.reshape(-1).narrow(0, lp.start, lp.numel))

    def _state(self, p: torch.Tensor, create: bool) -> Optional[dict]:
        flat = self._flat(p)
        st = self.zo.optimizer.state.get(flat)
        if not st and create:  # a fresh engine: torch AdamW creates its state lazily in step()
            st = {"step": torch.zeros((), dtype=torch.float32),
                  **{k: torch.zeros_like(flat, memory_format=torch.preserve_format) for k in MOMENTS}}
            self.zo.optimizer.state[flat] = st
        return st or None

    def get(self, p: torch.Tensor) -> dict:
        st = self._state(p, create=False)
        out = {k: self._gather(p, st[k] if st else None) for k in MOMENTS}
        out["step"] = torch.as_tensor(st["step"] if st else 0.0, dtype=torch.float32).detach().clone().reshape(())
        return out

    def set(self, p: torch.Tensor, st_in: dict) -> None:
        st = self._state(p, create=True)
        st["step"] = st_in["step"].clone().to(torch.float32).reshape(())  # one step per flat group: all equal
        for k in MOMENTS:
            self._scatter(p, st[k], st_in[k])

    def master(self, p: torch.Tensor) -> torch.Tensor:
        return self._gather(p, self._flat(p))

    def set_master(self, p: torch.Tensor, value: torch.Tensor) -> None:
        self._scatter(p, self._flat(p), value)


def adam_state(optimizer: torch.optim.Optimizer):
    """The per-parameter view of `optimizer` (torch AdamW, or DeepSpeed's ZeRO-1/2 optimizer around one)."""
    if hasattr(optimizer, "bit16_groups") and hasattr(optimizer, "single_partition_of_fp32_groups"):
        return ZeroAdamState(optimizer)
    return PlainAdamState(optimizer)


# ---- local expert shards as DTensors -----------------------------------------------------------------
def expert_owners(model: torch.nn.Module) -> Dict[str, tuple]:
    """{fqn of an expert weight held as a plain local shard: (its GroupedExperts, weight name)}: the
    expert-parallel weights of an engine that keeps them local (DeepSpeed, Megatron). Empty when the
    experts are DTensors (they carry their layout) or unsharded."""

    experts = {id(p) for p in expert_parameters(model)}
    out = {}
    for mod_name, mod in model.named_modules():
        sh = getattr(mod, "sharding", None)
        if sh is None:
            continue
        for pname, p in mod.named_parameters(recurse=False):
            if id(p) in experts and not hasattr(p, "device_mesh"):
                out[f"{mod_name}.{pname}" if mod_name else pname] = (mod, pname)
    return out


def global_view(owners: Dict[str, tuple], key: str, local: torch.Tensor) -> torch.Tensor:
    """`local` as a DTensor of the global [E, D, F] / [E, F, D] shape over the experts' mesh when `key`
    is a local expert shard (see expert_owners); otherwise `local` unchanged."""
    if key not in owners:
        return local
    from torch.distributed.tensor import DTensor


    mod, name = owners[key]
    sh = mod.sharding
    shape = list(local.shape)
    shape[0] = mod.num_experts
    if sh.shards > 1:
        shape[FFN_DIM[name]] = mod.cfg.ffn_hidden_size
    stride = torch.empty(shape, device="meta").stride()
    return DTensor.from_local(local.contiguous(), sh.mesh, sh.placements_for(name), run_check=False,
                              shape=torch.Size(shape), stride=stride)


def local_value(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of a loaded entry (a DTensor's local shard; a plain tensor as is)."""
    return t.to_local() if hasattr(t, "to_local") else t
