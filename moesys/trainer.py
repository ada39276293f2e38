"""The training loop of `moesys-train`: one rank's view, inside an initialised process group.

Step s (plain engine):
    callbacks.on_step_start(s) -> lr(s) -> grad_accum x (forward, loss/accum backward)
    -> gradient sync, experts over edp and the rest over dp: bucketed all-reduces launched by the
       last micro-batch's backward as gradients become ready, waited on here (parallel.grad_overlap,
       parallel/grad_overlap.py), or one flat allreduce_gradients (grad_overlap=false); the fsdp
       engine reduce-scatters in the backward instead -> clip by the global norm over every shard
    -> the ranks agree the step is finite (loss and grad norm) -> optimizer.step() (or skip it)
    -> layer.update_expert_bias(dp_group) -> callbacks.after_optimizer_step(s)
A step whose loss or gradient norm is not finite changes no weight on any rank (DeepSpeed's ZeRO
optimizer skips it by its own overflow check); after trainer.max_bad_steps such steps in a row the
run stops with NonFiniteError. A checkpoint is written only when every weight is finite.
Callbacks are how schedules plug in (EvoMoE's tau schedule, expert diversification): any object
with some of on_train_start(trainer), on_step_start(step), after_optimizer_step(step),
on_train_end(trainer); missing methods are skipped.
Stopping (moesys.preemption): a stop request (SIGINT, SIGTERM, SIGUSR1 on any rank) rides in the
step's loss all-reduce, so every rank stops after the same step; SIGTERM and SIGUSR1 write a
checkpoint of that step first. fit() then returns a summary with `stopped`.

Legend: B local sequences, S seq_len, V vocab, E experts.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import time
from typing import Dict, Iterable, List, Optional

import torch
import torch.distributed as dist

from moesys.evo import EvoController
from moesys.integrations import deepspeed as ds_integration
from moesys.kernels import workspace
from moesys.parallel import (
    ExpertParallelRunner,
    OverlappedGradReducer,
    allreduce_gradients,
    apply_expert_parallel,
    apply_fsdp,
    clip_grad_norm_,
    materialize,
)
from moesys.parallel.overflow import grown_factor, set_static_capacity_factor
from moesys.parallel.placement_control import PlacementController, PlacementSettings, placed_layers

from . import checkpoint as ckpt
from . import data as data_mod
from . import hf, preemption
from . import tokens as tokens_mod
from .collapse import CollapseMonitor
from .decoder import DECODER_FIELDS, Decoder
from .logging_utils import RunLogger, write_config
from .model import GPTConfig, GPTMoE, lm_loss
from .plots import evo_marks, write_all
from .step_state import StepState

_HOOKS = ("on_train_start", "on_step_start", "after_optimizer_step", "on_train_end")
# per-layer metrics logged as the total over the data-parallel ranks (the rest: their mean)
SUMMED_METRICS = ("runtime/overflow_dropped",)


@dataclasses.dataclass(frozen=True)
class Evaluation:
    """One pass over the validation set: mean loss (nats/token), tokens scored, and per MoE block the
    routes each expert received (all dp ranks)."""

    loss: float
    tokens: int
    load: Dict[int, List[float]]


class NonFiniteError(RuntimeError):
    """trainer.max_bad_steps optimizer steps in a row had a non-finite loss or gradient norm."""


def lr_at(step: int, *, lr: float, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warmup over `warmup` steps, then cosine from lr to min_ratio*lr at `total`."""
    if step < warmup:
        return lr * (step + 1) / warmup
    frac = min(1.0, (step - warmup) / max(1, total - warmup))
    return lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * frac)))


def structure_of(cfg) -> dict:
    """The checkpoint-relevant shape of the model (checkpoint.STRUCTURAL_FIELDS)."""
    m, moe = cfg.model, cfg.moe
    return {"vocab_size": cfg.data.vocab_size, "n_layers": m.n_layers, "d_model": m.d_model, "n_heads": m.n_heads,
            "ffn_hidden": m.ffn_hidden,
            # the GPT's learned positions are seq_len long; the decoder's rotary ones take any length
            "seq_len": m.seq_len if m.arch == "gpt" else 0, "moe_every": m.moe_every,
            "tie_embeddings": m.tie_embeddings, "qk_norm": m.qk_norm, "num_experts": moe.num_experts,
            "activation": moe.activation, "router": moe.router, "num_shared_experts": moe.num_shared_experts,
            # the resolved width (None means model.ffn_hidden), 0 without shared experts
            "shared_ffn_hidden": (moe.shared_ffn_hidden_size or m.ffn_hidden) if moe.num_shared_experts else 0,
            "shared_expert_gate": bool(moe.shared_expert_gate), "arch": m.arch,
            **{name: getattr(m, name) for name in DECODER_FIELDS}}


def build_model(cfg) -> "GPTMoE | Decoder":
    m = cfg.model
    if m.arch == "decoder":
        model = Decoder(cfg.decoder_config(), cfg.moe_config())
    else:
        gcfg = GPTConfig(vocab_size=cfg.data.vocab_size, n_layers=m.n_layers, d_model=m.d_model, n_heads=m.n_heads,
                         ffn_hidden=m.ffn_hidden, seq_len=m.seq_len, moe_every=m.moe_every, dropout=m.dropout,
                         tie_embeddings=m.tie_embeddings, qk_norm=m.qk_norm)
        model = GPTMoE(gcfg, cfg.moe_config())
    if cfg.evo.enabled:  # EvoMoE: swap in EvoMoELayers before expert parallelism and the optimizer
        EvoController.prepare(model, cfg.evo, seed=cfg.trainer.seed)
    return model


def _mesh_key(p: torch.Tensor):
    """Which optimizer group a parameter joins: torch's foreach kernels take one kind of tensor per
    list (plain tensors, or DTensors of one mesh)."""
    mesh = getattr(p, "device_mesh", None)
    return None if mesh is None else id(mesh)


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


class Trainer:
    """Builds model, data, optimizer and logger for this rank and runs the loop.

    Args:
        cfg: a validated TrainConfig.
        dims: moesys.parallel.ParallelDims of the running process group.
        out_dir: the run's output directory (same on every rank).
        callbacks: step hooks (see module docstring).
        device: where the model lives.
        stop: a moesys.preemption.StopSignal (entered) whose request the ranks agree on every step.
    """

    def __init__(self, cfg, *, dims, out_dir: str, callbacks: Iterable = (), device: torch.device = torch.device("cpu"),
                 stop: Optional[preemption.StopSignal] = None):
        self.cfg, self.dims, self.out_dir, self.device = cfg, dims, out_dir, device
        self.stop = stop  # this rank's stop request (None: never stops early)
        self.stop_signal: Optional[int] = None  # the stop every rank agreed on, after a step
        self.callbacks: List = list(callbacks)
        self.rank = dims.rank
        t, p = cfg.trainer, cfg.parallel
        self.ckpt_root = os.path.join(out_dir, "checkpoints")

        # --- model: identical init on every rank, then experts sliced by the runtime ---------------
        # model.init_from: built on the meta device, made parallel, then each rank allocates only its
        # shards (parallel.materialize) and reads its slices of the checkpoint into them (hf.load_into):
        # no rank ever holds the whole model. A fresh run draws the whole model's init on every rank
        # (the same numbers at every layout) and slices it.
        torch.manual_seed(t.seed)
        meta = cfg.model.init_from is not None
        with torch.device("meta") if meta else contextlib.nullcontext():
            self.model = build_model(cfg)
        if not meta:
            self.model = self.model.to(device)
        if p.ep > 1:
            overlap = p.overlap if str(p.overlap) == "auto" else int(p.overlap)
            # experts become DTensors over the ep mesh; DeepSpeed flattens parameter storage, so it
            # keeps the local shards (its checkpoints wrap them: checkpoint_state.global_view)
            for _, layer in self.model.moe_layers():
                apply_expert_parallel(layer, dims.ep_group, dims=dims, dispatcher=p.dispatcher, mode=p.mode,
                                      overlap=overlap, dtensor=t.engine != "deepspeed",
                                      static_capacity_factor=p.static_capacity_factor, overflow=p.overflow)
        # parallel.placement: experts permuted over the ep ranks as the load drifts (parallel/placement.py)
        self.placement = None
        if p.ep > 1 and p.placement != "off":
            settings = PlacementSettings(policy=p.placement, interval=p.placement_interval,
                                         payback_steps=p.placement_payback_steps, replicas=p.placement_replicas)
            self.placement = PlacementController(settings, placed_layers(self.model))
        # the static dispatch buffers' factor (None without one); overflow=rerun grows it (train_step)
        self.static_capacity_factor = p.static_capacity_factor if p.ep > 1 else None
        self.overflow_rerun = p.overflow == "rerun" and self.static_capacity_factor is not None
        # aux_loss=global_batch: routes per expert summed over every data-parallel rank, i.e. over the
        # whole global batch of the micro-step (EP ranks hold different tokens, so the dp group, not ep)
        for _, layer in self.model.moe_layers():
            layer.set_balance_group(dims.dp_group)
        # per-rank streams from here on (jitter, dropout), so ranks do not draw identical noise
        torch.manual_seed(t.seed + 7919 * (self.rank + 1))

        # --- data --------------------------------------------------------------------------------
        tokens = data_mod.load_tokens(*tokens_mod.source_of(cfg.data), cfg.data.vocab_size)
        self.train_split, self.val_split = data_mod.train_val_split(tokens, cfg.data.val_fraction, cfg.model.seq_len)
        self.batches = data_mod.TrainBatches(self.train_split, seq_len=cfg.model.seq_len, global_batch=t.batch_size,
                                             grad_accum=t.grad_accum, dp_rank=dims.rank, dp_size=dims.dp, seed=t.seed)

        # --- optimizer / engine ------------------------------------------------------------------
        o = cfg.optim
        if t.engine == "fsdp":
            apply_fsdp(self.model, dims, reshard_after_forward=t.fsdp_reshard_after_forward,
                       param_dtype=None if t.fsdp_param_dtype == "fp32" else t.fsdp_param_dtype,
                       reduce_dtype=t.fsdp_reduce_dtype)
        if meta:  # each rank allocates its shards and reads its own slices into them
            materialize(self.model, device)
            hf.load_into(self.model, cfg.model.init_from)
        # decay / no decay, and one group per kind of tensor (plain, or DTensors of one mesh)
        keyed: dict = {}
        for q in self.model.parameters():
            keyed.setdefault((q.dim() >= 2, _mesh_key(q)), []).append(q)
        groups = [{"params": ps, "weight_decay": o.weight_decay if decay else 0.0}
                  for (decay, _), ps in keyed.items()]
        # plain engine, parallel.grad_overlap: the reducer's hooks hold the final parameters (as the optimizer does)
        self.grad_reducer = (OverlappedGradReducer(self.model, dims, bucket_mb=p.grad_bucket_mb)
                             if t.engine == "plain" and p.grad_overlap else None)
        self.engine = None
        if t.engine == "deepspeed":
            self.engine = self._build_deepspeed()
            self.optimizer = self.engine.optimizer
        else:
            self.optimizer = torch.optim.AdamW(groups, lr=o.lr, betas=tuple(o.betas), eps=o.eps)
        self.step = 0
        self.schedule_total = t.steps  # the LR schedule's horizon (a resume keeps the checkpoint's)
        self.bad_streak = 0  # consecutive skipped (non-finite) steps
        self.saved_schedule_total: Optional[int] = None  # the resumed run's horizon
        self.history = {"train": [], "val": [], "load_steps": [], "load": {}, "drop_rate": {}, "router_entropy": {}}
        blocks = [i for i, _ in self.moe_layers()]
        self.collapse = (CollapseMonitor(share=t.collapse_share, steps=t.collapse_steps, blocks=blocks)
                         if t.collapse_share > 0 and blocks else None)
        self.tokens_per_step = t.batch_size * cfg.model.seq_len

    # ------------------------------------------------------------------------------------------
    def _build_deepspeed(self):
        t = self.cfg.trainer
        micro = t.batch_size // (self.dims.dp * t.grad_accum)
        return ds_integration.build_engine(self.model, optimizer_cfg=dataclasses.asdict(self.cfg.optim),
                                           zero_stage=t.zero_stage, dims=self.dims, grad_accum=t.grad_accum,
                                           clip=t.clip, micro_batch_size=micro, dtype=t.precision,
                                           config=t.ds_config)

    def _hook(self, name: str, *args) -> None:
        for cb in self.callbacks:
            fn = getattr(cb, name, None)
            if fn is not None:
                fn(*args)

    def _autocast(self):
        enabled = self.cfg.trainer.precision == "bf16"
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=enabled)

    def moe_layers(self):
        return self.model.moe_layers()

    def tuners(self) -> list:
        """The adaptive tuner of every expert-parallel MoE layer, in layer order."""
        return [m.runner.tuner for _, m in self.moe_layers() if isinstance(m.runner, ExpertParallelRunner)]

    def _load_tuners(self, st: dict) -> None:
        """Continue each layer's tuner where the checkpoint left it, when the job has the same shape
        (world, ep, layers); otherwise (or for a checkpoint without them) the tuners start afresh,
        as they would in a new job."""
        saved, tuners = st.get("tuners") or [], self.tuners()
        if not saved or len(saved) != len(tuners):
            return
        if st.get("world_size") != self.dims.world_size or st.get("ep") != self.dims.ep:
            return
        for t, state in zip(tuners, saved):
            t.load_state_dict(state)  # False (kept fresh) for another pinned mode or degree

    # ---- one optimizer step ------------------------------------------------------------------------
    def _clip(self) -> float:
        """Clip by the global grad norm over every shard (moesys.parallel.clip_grad_norm_: torch's
        norm and clipping, grouped by mesh). Returns the norm before clipping."""

        return float(clip_grad_norm_(self.model.parameters(), self.cfg.trainer.clip))

    def _forward_backward(self, step: int) -> dict:
        """The micro-batches of `step`: forward and backward of each (gradients accumulate; the
        plain engine's are zeroed first). Returns device tensors, read on the host by the caller:
        lm, aux (mean losses), loads ([L, E] routes per expert or None), auxes (the last
        micro-batch's), overflow (rows the static dispatch buffers dropped, summed over layers and
        micro-batches) and needed (the largest runtime/static_factor_needed seen)."""
        t = self.cfg.trainer
        if self.engine is None:
            self.optimizer.zero_grad(set_to_none=True)
        # summed on the device; read on the host once per step (train_step), not once per micro-batch
        lm_sum = torch.zeros((), device=self.device)
        aux_sum = torch.zeros((), device=self.device)
        overflow = torch.zeros((), device=self.device)
        needed = torch.zeros((), device=self.device, dtype=torch.float64)
        loads = None
        last_auxes = []
        fsdp = t.engine == "fsdp"
        for i, (x, y) in enumerate(self.batches.step_batches(step)):
            if fsdp:  # reduce-scatter the gradients once, in the last micro-batch's backward
                self.model.set_requires_gradient_sync(i == t.grad_accum - 1)
            elif self.grad_reducer is not None:  # the same: reductions launched by the last backward only
                self.grad_reducer.prepare_backward(sync=i == t.grad_accum - 1)
            x, y = x.to(self.device), y.to(self.device)
            with self._autocast():
                logits, aux_loss, auxes = (self.model if self.engine is None else self.engine)(x)
            loss_lm = lm_loss(logits, y)
            if self.engine is None:
                ((loss_lm + aux_loss) / t.grad_accum).backward()
            else:
                # the engine divides by its gradient_accumulation_steps itself
                self.engine.backward(loss_lm + aux_loss)
                self.engine.step()
            lm_sum += loss_lm.detach().float() / t.grad_accum
            aux_sum += aux_loss.detach().float() / t.grad_accum
            # routes per expert stay device tensors (the sync-free layer path reads nothing on the host)
            cnt = torch.stack([a.tokens_per_expert.detach().float() for a in auxes]) if auxes else None
            loads = cnt if loads is None else loads + cnt
            if self.overflow_rerun:  # the static dispatch buffers' 0-dim device tensors: no read here
                for a in auxes:  # (a layer that ran no runner, e.g. EvoMoE's dense phase, has none)
                    if "runtime/static_factor_needed" in a.metrics:
                        overflow += a.metrics["runtime/overflow_dropped"]
                        needed = torch.maximum(needed, a.metrics["runtime/static_factor_needed"])
            last_auxes = auxes
        return {"lm": lm_sum, "aux": aux_sum, "loads": loads, "auxes": last_auxes, "overflow": overflow,
                "needed": needed}

    def _grow_static_capacity(self, step: int, needed: torch.Tensor, dropped: int, rerun: bool) -> dict:
        """Every rank saw the same overflow count (the per-step all-reduce): agree on the largest
        need (one all-reduce, max, on overflowed steps only) and grow every layer's factor."""

        need = needed.detach().reshape(1).to("cpu", torch.float64)
        dist.all_reduce(need, op=dist.ReduceOp.MAX)
        old = self.static_capacity_factor
        moe = self.cfg.moe  # E / K: C = T, no expert can receive more
        new = grown_factor(old, float(need), limit=moe.num_experts / moe.top_k)
        set_static_capacity_factor(self.model, new)
        self.static_capacity_factor = new
        event = {"step": step, "dropped": dropped, "factor_needed": float(need), "factor_from": old,
                 "factor_to": new, "rerun": rerun}
        self.history.setdefault("overflow_events", []).append(event)
        return event

    def train_step(self) -> dict:
        cfg, t = self.cfg, self.cfg.trainer
        step = self.step
        e = cfg.evo
        if self.placement is not None and e.dense_phase and step == e.diversify_step:
            # EvoMoE spawns its experts at this step's on_step_start, by expert index: the canonical
            # layout for the spawn, and the placement decided afresh on the sparse phase's loads
            self.placement.restart(self.optimizer)
        self._hook("on_step_start", step)
        lr = lr_at(step, lr=cfg.optim.lr, warmup=cfg.schedule.warmup_steps, total=self.schedule_total,
                   min_ratio=cfg.schedule.min_lr_ratio)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        self.model.train()
        fsdp = t.engine == "fsdp"
        # parallel.overflow=rerun: what this step's forward/backward changes, to put back before a re-run
        snapshot = StepState.capture(self.model, self.device) if self.overflow_rerun else None
        events = []
        while True:
            r = self._forward_backward(step)
            grad_norm = float("nan")
            if self.engine is None:
                if self.grad_reducer is not None:  # launched during the backward: wait, average
                    self.grad_reducer.finish()
                elif not fsdp:  # FSDP2 reduce-scattered them in the backward
                    allreduce_gradients(self.model, self.dims)
                grad_norm = self._clip()  # the global norm: the same on every rank
                bad = not math.isfinite(grad_norm)
            else:  # the engine stepped already; ZeRO skipped the update if its gradients overflowed
                bad = bool(getattr(self.engine.optimizer, "overflow", False))
            # one small all-reduce: the loss every rank reports (mean over dp), whether any rank saw a
            # non-finite value, the rows any static dispatch buffer dropped, and any rank's stop
            # request, so every rank takes the same branches below (one host read of the device sums)
            flags = torch.tensor(preemption.flags_of(self.stop.signum if self.stop is not None else None))
            sums = torch.stack([r["lm"].float(), r["aux"].float(), r["overflow"].float()]).cpu()
            red = torch.cat([sums[:2], torch.tensor([float(bad)]), sums[2:], flags])
            tail = red[3:].clone()  # this rank's own: summed over the world below, not over dp first
            dist.all_reduce(red, group=self.dims.dp_group)
            if self.dims.dp != self.dims.world_size:  # the stop (and a re-run) must be agreed over the world
                dist.all_reduce(tail)
                red[3:] = tail
            dropped = int(red[3])
            if snapshot is not None and dropped > 0:
                events.append(self._grow_static_capacity(step, r["needed"], dropped, rerun=not events))
                if len(events) == 1:  # re-run once: the gradients, buffers and RNG as before the first pass
                    snapshot.restore(self.model)
                    continue
            break
        loads, last_auxes = r["loads"], r["auxes"]
        self.stop_signal = preemption.agreed_signal(red[4:])
        loss, aux_loss = float(red[0]) / self.dims.dp, float(red[1]) / self.dims.dp
        skip = bool(red[2] > 0) or not (math.isfinite(loss) and math.isfinite(aux_loss))
        if self.engine is None:
            if skip:
                self.optimizer.zero_grad(set_to_none=True)
            else:
                self.optimizer.step()
        if not skip:
            for _, layer in self.moe_layers():
                layer.update_expert_bias(self.dims.dp_group)
        if self.placement is not None:  # every rank, every step (skipped ones too): the decisions agree
            self.placement.after_step(step, self.optimizer)
        self.bad_streak = self.bad_streak + 1 if skip else 0
        self._hook("after_optimizer_step", step)
        self.step += 1
        out = {"loss": loss, "aux_loss": aux_loss, "lr": lr, "grad_norm": grad_norm, "skipped": float(skip)}
        if self.static_capacity_factor is not None:
            out["overflow/static_capacity_factor"] = self.static_capacity_factor
        if snapshot is not None:
            out["overflow/reruns"] = float(bool(events))
            out["overflow_events"] = events  # fit() logs them as messages
        log_step = self.step % t.log_interval == 0 or self.step == t.steps
        if loads is not None and (log_step or self.collapse is not None):
            # routes per expert of this step over all dp ranks: [L, E] (the collapse check needs every step)
            loads = loads.cpu()
            dist.all_reduce(loads, group=self.dims.dp_group)
            if self.collapse is not None:
                out["collapse_warnings"] = self.collapse.update(self.step, loads)
        if log_step:
            out.update(self._moe_metrics(loads, last_auxes))
        return out

    def _moe_metrics(self, loads: Optional[torch.Tensor], auxes) -> dict:
        """Per MoE layer: load share per expert (`loads` [L, E]: already summed over all dp ranks), drop
        rate, losses, router entropy and the runtime's decisions. Collective on the dp group."""
        if loads is None:
            return {}
        blocks = [i for i, _ in self.moe_layers()]
        names = sorted({k for a in auxes for k, v in a.metrics.items()
                        if isinstance(v, (int, float)) or (isinstance(v, torch.Tensor) and v.numel() == 1)})
        vals = torch.tensor([[float(a.metrics.get(k, float("nan"))) for k in names] for a in auxes])
        dist.all_reduce(vals, group=self.dims.dp_group)
        # the mean over dp ranks, except counts of events, which are totals over the job
        totals = torch.tensor([k.endswith(SUMMED_METRICS) for k in names], dtype=torch.bool)
        vals[:, ~totals] /= self.dims.dp
        out = {}
        share = loads / loads.sum(-1, keepdim=True).clamp_min(1)
        self.history["load_steps"].append(self.step)
        routing = {k: names.index(k) for k in ("drop_rate", "router_entropy") if k in names}
        for j, b in enumerate(blocks):
            self.history["load"].setdefault(b, []).append(share[j].tolist())
            for k, n in routing.items():  # plotted in routing.png
                self.history.setdefault(k, {}).setdefault(b, []).append(float(vals[j, n]))
            out[f"moe/block{b}/expert_load"] = share[j].tolist()
            out[f"moe/block{b}/max_over_mean_load"] = float(share[j].max() * share.shape[-1])
            for n, k in enumerate(names):
                out[f"moe/block{b}/{k}"] = float(vals[j, n])
        return out

    # ---- evaluation ---------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluation(self) -> "Evaluation":
        """The fixed validation set (independent of the world size): summed next-token loss, tokens,
        and the routes per expert of every MoE layer, over all dp ranks. Collective on the dp group."""
        cfg = self.cfg
        self.model.eval()
        tot = torch.zeros(2, dtype=torch.float64)
        loads = None  # [L, E] routes per expert (the runtime reports each rank's tokens to all E)
        for x, y in data_mod.eval_batches(self.val_split, seq_len=cfg.model.seq_len, batch_size=cfg.trainer.batch_size,
                                          n_batches=cfg.trainer.eval_batches, dp_rank=self.dims.rank,
                                          dp_size=self.dims.dp):
            with self._autocast():
                logits, _, auxes = self.model(x.to(self.device))
            tot[0] += lm_loss(logits, y.to(self.device), reduction="sum").double().cpu()
            tot[1] += y.numel()
            if auxes:
                cnt = torch.stack([a.tokens_per_expert.detach().double().cpu() for a in auxes])
                loads = cnt if loads is None else loads + cnt
        dist.all_reduce(tot, group=self.dims.dp_group)
        if loads is not None:
            dist.all_reduce(loads, group=self.dims.dp_group)
        self.model.train()
        blocks = [i for i, _ in self.moe_layers()]
        return Evaluation(loss=float(tot[0] / tot[1]), tokens=int(tot[1]),
                          load={b: loads[j].tolist() for j, b in enumerate(blocks)} if loads is not None else {})

    def data_warnings(self) -> list:
        """Warnings that need the data: tied embeddings over a vocabulary of which the training split
        never uses more than 90% (docs/stability.md: Adam drifts the never-seen output rows together, and
        with tied embeddings that made the run spike)."""
        cfg = self.cfg
        if not cfg.model.tie_embeddings:
            return []
        unused = data_mod.unused_ids(self.train_split.tokens, cfg.data.vocab_size)
        if unused * 10 <= cfg.data.vocab_size * 9:  # at most 90% unused (the embedded corpus: 149 of 256)
            return []
        return [f"model.tie_embeddings=true with data.vocab_size={cfg.data.vocab_size}: {unused:,} ids never occur in "
                f"the training data; tied, their drifting rows can make the loss spike (README, \"Training "
                f"stability\"): pass model.tie_embeddings=false, or a data.vocab_size fitted to the data"]

    def evaluate(self) -> float:
        """Mean next-token loss on the fixed validation set (independent of the world size)."""
        return self.evaluation().loss

    # ---- checkpoints --------------------------------------------------------------------------------
    def trainer_state(self) -> dict:
        s = self.cfg.schedule
        return {"step": self.step, "data_position": self.step, "world_size": self.dims.world_size,
                "ep": self.dims.ep, "seed": self.cfg.trainer.seed,
                "schedule": {"lr": self.cfg.optim.lr, "warmup_steps": s.warmup_steps, "min_lr_ratio": s.min_lr_ratio,
                             "total_steps": self.cfg.trainer.steps},
                "history": self.history,
                # parallel.overflow=rerun grows it: a resumed run keeps the grown buffer
                "static_capacity_factor": self.static_capacity_factor,
                # the adaptive runtime's progress per expert-parallel layer (the same on every rank):
                # a resumed run continues the same trial schedule and decisions
                "tuners": [t.state_dict() for t in self.tuners()]}

    def weights_finite(self) -> bool:
        """Whether every rank's weights are all finite (collective over the dp group)."""
        bad = torch.zeros(1)
        for q in self.model.parameters():  # each rank checks its own shards (experts, FSDP2)
            if not bool(torch.isfinite(_local(q.detach())).all()):
                bad.fill_(1.0)
                break
        dist.all_reduce(bad)
        return not bool(bad.item())

    def save(self) -> Optional[str]:
        """A checkpoint of this step, or None (saving nothing) when some weight is not finite: a
        non-finite checkpoint would rotate the last good one away."""
        if not self.weights_finite():
            return None
        # one format for both engines: DeepSpeed's ZeRO optimizer is saved per parameter (checkpoint_state);
        # experts in their canonical order whatever the placement (resume at any ep size, moesys-convert)
        with self.placement.canonical(self.optimizer) if self.placement is not None else contextlib.nullcontext():
            return ckpt.save_checkpoint(self.ckpt_root, self.step, model=self.model, optimizer=self.optimizer,
                                        trainer_state=self.trainer_state(), structure=structure_of(self.cfg),
                                        keep=self.cfg.trainer.keep_checkpoints, config=_as_dict(self.cfg))

    def load(self, path: str) -> dict:
        if self.placement is not None:  # the checkpoint holds experts in canonical order
            self.placement.reset(self.optimizer)
        st = ckpt.load_checkpoint(path, model=self.model, optimizer=self.optimizer, structure=structure_of(self.cfg),
                                  trust_pickle=self.cfg.trainer.trust_checkpoint)
        self.step = int(st["data_position"])
        saved_total = (st.get("schedule") or {}).get("total_steps")
        self.saved_schedule_total = saved_total
        if saved_total is not None and not self.cfg.trainer.extend_schedule:
            self.schedule_total = int(saved_total)  # the run's own LR horizon, whatever trainer.steps says now
        if self.engine is not None:  # DeepSpeed's own counters (logging, its step-based schedules)
            self.engine.global_steps = self.step
            self.engine.global_samples = self.step * self.cfg.trainer.batch_size
        if st.get("history"):
            self.history = st["history"]
            for key in ("load", "drop_rate", "router_entropy"):  # JSON-like round trips can make the keys str
                self.history[key] = {int(k): v for k, v in self.history.get(key, {}).items()}
        saved_f = st.get("static_capacity_factor")
        if saved_f is not None and self.static_capacity_factor is not None and saved_f > self.static_capacity_factor:
            # the run grew its buffer (parallel.overflow=rerun): keep it; a larger configured one wins
            set_static_capacity_factor(self.model, float(saved_f))
            self.static_capacity_factor = float(saved_f)
        self._load_tuners(st)
        if not st["rng_restored"]:  # another world size: fresh per-rank streams derived from the step
            torch.manual_seed(self.cfg.trainer.seed + 7919 * (self.rank + 1) + 104729 * self.step)
        return st

    # ---- the loop -----------------------------------------------------------------------------------
    def fit(self, resume_from: Optional[str] = None) -> dict:
        cfg, t = self.cfg, self.cfg.trainer
        if resume_from is not None:
            self.load(resume_from)
        log = RunLogger(self.out_dir, enabled=self.rank == 0, wandb_mode=cfg.logging.wandb_mode,
                        project=cfg.logging.wandb_project, run_name=cfg.logging.run_name, total_steps=t.steps,
                        start_step=self.step, config=_as_dict(cfg), use_tqdm=cfg.logging.tqdm)
        if self.rank == 0:
            write_config(self.out_dir, _as_dict(cfg))
        start = time.time()
        for w in cfg.warnings() + (self.data_warnings() if self.rank == 0 else []):  # valid, probably not meant
            log.message(f"warning: {w}")
        if resume_from is not None:
            log.message(f"resumed from {resume_from} at step {self.step}")
            old = self.saved_schedule_total
            if old is not None and old != t.steps:
                how = (f"stretched to {t.steps} (trainer.extend_schedule=true)" if t.extend_schedule else
                       f"kept at {old}; trainer.extend_schedule=true stretches it to {t.steps}")
                log.message(f"trainer.steps is {t.steps}, the run was planned for {old}: the LR schedule's horizon is {how}")
            if self.step >= t.steps:
                v = self.evaluate()
                log.message(f"nothing to train: the checkpoint is at step {self.step} and trainer.steps is {t.steps} "
                            f"(raise trainer.steps to train on); val loss {v:.4f}")
                log.close({"steps": self.step, "val_loss_end": v})
                return {"steps": self.step, "elapsed_s": time.time() - start, "val_loss_start": v, "val_loss_end": v,
                        "train_loss_end": float("nan"), "checkpoint": None, "out_dir": self.out_dir,
                        "train_losses": [], "nothing_to_train": True}
        self._hook("on_train_start", self)
        k = cfg.moe.top_k if cfg.moe.router in ("topk", "sigmoid_bias") else 1  # routes a token sends
        if self.collapse is not None and t.collapse_share >= 1 / k:
            log.message(f"note: no router collapse warning can fire: at moe.top_k={k} an expert takes at most 1/{k} "
                        f"of the routes, not more than trainer.collapse_share={t.collapse_share:g}")
        if self.step == 0:
            v = self.evaluate()
            self.history["val"].append((0, v))
            log.log(0, {"val/loss": v})
            log.message(f"step 0: val loss {v:.4f}")
        t_last, last = time.time(), None
        while self.step < t.steps:
            m = self.train_step()
            for warning in m.pop("collapse_warnings", ()):
                log.message(warning)
            for e in m.pop("overflow_events", ()):
                log.message(_overflow_message(e))
                log.event("overflow_rerun" if e["rerun"] else "overflow_grow", e)
            last = m
            if m["skipped"]:
                log.message(f"step {self.step}: non-finite loss {m['loss']:.4g} or grad norm {m['grad_norm']:.4g}: "
                            f"optimizer step skipped on every rank ({self.bad_streak} in a row, "
                            f"limit trainer.max_bad_steps={t.max_bad_steps})")
                if self.bad_streak >= t.max_bad_steps:
                    newest = ckpt.newest_checkpoint(self.ckpt_root)
                    raise NonFiniteError(
                        f"stopping at step {self.step}: {self.bad_streak} steps in a row had a non-finite loss or "
                        f"gradient norm (trainer.max_bad_steps={t.max_bad_steps}); no weight was changed by them; "
                        f"last checkpoint: {newest or 'none'}. Lower optim.lr, set trainer.clip, or check the data")
            self.history["train"].append((self.step, m["loss"]))
            now = time.time()
            tok_s = self.tokens_per_step / max(now - t_last, 1e-9)
            t_last = now
            m["tokens_per_s"] = tok_s
            if self.device.type == "cpu" and workspace.enabled():
                m["mem/cpu_buffer_cache_mb"] = workspace.stats()["held_bytes"] / 2**20
            log.progress(1, m["loss"], tok_s)
            if self.step % t.eval_interval == 0 or self.step == t.steps:
                v = self.evaluate()
                m["val/loss"] = v
                self.history["val"].append((self.step, v))
                log.message(f"step {self.step}: train loss {m['loss']:.4f}  val loss {v:.4f}  lr {m['lr']:.2e}")
            log.log(self.step, m)
            saved_now = None
            if t.ckpt_interval and self.step % t.ckpt_interval == 0 and self.step < t.steps:
                saved_now = self.save()
                if saved_now is None:
                    log.message(f"step {self.step}: a weight is not finite: checkpoint not written")
            if self.stop_signal is not None and self.step < t.steps:
                return self._stopped(log, start, last, saved_now)
        saved = self.save() if t.save_final else None
        if t.save_final and saved is None:
            log.message(f"step {self.step}: a weight is not finite: final checkpoint not written")
        self._hook("on_train_end", self)
        elapsed = time.time() - start
        summary = {"steps": self.step, "elapsed_s": elapsed,
                   "val_loss_start": self.history["val"][0][1] if self.history["val"] else float("nan"),
                   "val_loss_end": self.history["val"][-1][1] if self.history["val"] else float("nan"),
                   "train_loss_end": last["loss"] if last else float("nan"),
                   "checkpoint": saved, "out_dir": self.out_dir, "train_losses": [l for _, l in self.history["train"]]}
        if self.rank == 0:
            if t.plots:
                summary["plots"] = _plots(self.out_dir, self.history, cfg)
            log.message(f"done: {self.step} steps in {elapsed:.1f}s; val loss {summary['val_loss_start']:.4f} -> "
                        f"{summary['val_loss_end']:.4f}; outputs in {self.out_dir}")
        log.close({k: v for k, v in summary.items() if k != "train_losses"})
        return summary

    def _stopped(self, log, start: float, last: Optional[dict], saved_now: Optional[str]) -> dict:
        """Every rank agreed to stop after this step: write a checkpoint if the signal asks for one
        (collective), and return the summary with `stopped`."""
        import signal as signal_mod

        signum = self.stop_signal
        name = signal_mod.Signals(signum).name
        saved = saved_now
        if saved is None and signum in preemption.SAVING_SIGNALS:
            saved = self.save()
            if saved is None:
                log.message(f"step {self.step}: a weight is not finite: checkpoint not written")
        newest = saved or ckpt.newest_checkpoint(self.ckpt_root)
        self._hook("on_train_end", self)
        summary = {"steps": self.step, "elapsed_s": time.time() - start,
                   "val_loss_start": self.history["val"][0][1] if self.history["val"] else float("nan"),
                   "val_loss_end": self.history["val"][-1][1] if self.history["val"] else float("nan"),
                   "train_loss_end": last["loss"] if last else float("nan"), "checkpoint": saved,
                   "out_dir": self.out_dir, "train_losses": [l for _, l in self.history["train"]],
                   "stopped": {"signal": name, "exit_code": preemption.exit_code(signum), "step": self.step,
                               "checkpoint": newest, "saved": saved is not None}}
        log.message(f"stopped by {name} at step {self.step}; " + (
            f"checkpoint {saved}" if saved else f"no checkpoint written (latest: {newest or 'none'})"))
        log.close({k: v for k, v in summary.items() if k not in ("train_losses", "stopped")})
        return summary


def _overflow_message(e: dict) -> str:
    """The log line of one parallel.overflow=rerun event (Trainer._grow_static_capacity)."""
    what = ("the step is re-run with the larger buffer" if e["rerun"] else
            "the re-run overflowed too: its rows stay dropped (counted in runtime/overflow_dropped); "
            "the larger buffer is used from the next step")
    return (f"step {e['step']}: the static dispatch buffer overflowed ({e['dropped']} rows dropped over the job; "
            f"the largest load needs static_capacity_factor >= {e['factor_needed']:.3f}): "
            f"parallel.static_capacity_factor {e['factor_from']:g} -> {e['factor_to']:g}; {what}")


def _plots(out_dir: str, history: dict, cfg) -> list:
    last = history["train"][-1][0] if history["train"] else 0
    return write_all(out_dir, history, num_experts=cfg.moe.num_experts, marks=evo_marks(cfg.evo, last))


def _as_dict(cfg) -> dict:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)
