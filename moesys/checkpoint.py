"""Atomic, reshardable checkpoints with torch.distributed.checkpoint (DCP).

Layout of `<out_dir>/checkpoints/`:
    step_00000300/      a DCP checkpoint (.metadata + per-rank .distcp files) + moesys.json
    latest              the name of the newest complete checkpoint (replaced atomically)
    .step_00000400.tmp  a save in progress (or one that crashed): never read

Atomicity: every rank writes into the `.tmp` directory; after a barrier rank 0 writes moesys.json,
renames the directory to its final name and then points `latest` at it with os.replace. A crash
anywhere before the rename leaves `latest` and the previous checkpoint untouched.

Integrity: moesys.json lists every file of the checkpoint with its size and SHA-256 (the ranks hash
the files between them after the write). `verify_checkpoint` checks them, and `prepare` runs it
before any rank starts: a flipped byte or a truncated file is refused naming the file, and
`trainer.resume=auto` falls back to the newest checkpoint that verifies (`resolve_verified`).

Resharding: expert tensors are keyed by GLOBAL expert index (`blocks.1.moe.experts.w1.e5`) in both
the model and the optimizer entries, so a run at any EP degree saves and loads exactly its own
experts; non-expert tensors are replicated and DCP stores them once. A checkpoint written at EP=2
loads at EP=1 or EP=4 with the same numbers (optimizer state included). When the EP group has more
ranks than experts (each expert's F split over S ranks) the `.e<g>` entries are still the FULL expert:
every rank contributes its F-slice as a DTensor chunk (checkpoint_state), so EP=4 with 2 experts
reshards to EP=2 or EP=1 and back.

Engines: the plain engine's AdamW and DeepSpeed ZeRO-1/2 save the same entries (ZeRO's flat fp32
partitions are assembled per parameter, checkpoint_state.ZeroAdamState), so either engine resumes
a checkpoint of either.

Flat state keys:
    model.<name>[.e<g>]                         parameters and persistent buffers
    optim.<param>[.e<g>].{exp_avg,exp_avg_sq}   AdamW moments; optim.<param>.step
    rng.rank<r>                                 torch / numpy / python RNG states of rank r (pickled)
    trainer                                     step, data position, LR schedule, world/ep (pickled)
"""
from __future__ import annotations

import hashlib
import json
import os
import pickle
import random
import shutil
from typing import Dict, Iterable, Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from . import checkpoint_state as cstate

META_FILE = "moesys.json"
LATEST = "latest"
FORMAT = 2  # moesys.json "format": 2 adds per-file checksums (format 1, without them, loads unverified)
# model fields that change tensor shapes or names: a checkpoint must agree on all of them
STRUCTURAL_FIELDS = ("vocab_size", "n_layers", "d_model", "n_heads", "ffn_hidden", "seq_len", "moe_every",
                     "tie_embeddings", "qk_norm", "num_experts", "activation", "router", "num_shared_experts",
                     "shared_ffn_hidden", "shared_expert_gate")
# what a checkpoint written before a structural field existed had (its manifest lacks the key)
STRUCTURAL_DEFAULTS = {"qk_norm": False, "num_shared_experts": 0, "shared_ffn_hidden": 0, "shared_expert_gate": False}


class CheckpointError(RuntimeError):
    """A checkpoint is missing, corrupt, or does not fit the model being trained."""


# ---- expert tensors keyed by global index ---------------------------------------------------------
def _expert_modules(model: torch.nn.Module) -> Dict[str, torch.nn.Module]:
    """name -> the grouped-experts module (holds w1/w2[/w3] with leading dim E_local)."""
    return {name: mod for name, mod in model.named_modules()
            if hasattr(mod, "expert_offset") and isinstance(getattr(mod, "w1", None), torch.Tensor)}


def _check_meshes(experts: Dict[str, torch.nn.Module], meshes: Optional[dict]) -> None:
    for name, mod in experts.items():
        fs = getattr(mod, "ffn_shard", None)
        if fs and fs[1] not in (meshes or {}):
            raise CheckpointError(f"{name}: experts are split along F over {fs[1]} ranks (EP larger than the number "
                                  "of experts); pass meshes=dims.ffn_shard_meshes() "
                                  "(from ParallelDims.build(..., num_experts=E))")


def _split_experts(tensors: Dict[str, torch.Tensor], experts: Dict[str, torch.nn.Module],
                   meshes: Optional[dict]) -> Dict[str, torch.Tensor]:
    """Replace each expert tensor [E_local, ...] by E_local entries `<key>.e<global index>`; an F-sharded
    expert's entry is a DTensor of the full expert (see checkpoint_state)."""
    out = {}
    for key, t in tensors.items():
        mod_name, _, pname = key.rpartition(".")
        mod = experts.get(mod_name)
        if mod is not None and t.dim() >= 1 and t.shape[0] == mod.num_local_experts:
            for j in range(t.shape[0]):
                v = t[j]
                if getattr(mod, "ffn_shard", None):
                    v = cstate.full_expert_view(v, mod, pname, meshes)
                out[f"{key}.e{mod.expert_offset + j}"] = v
        else:
            out[key] = t
    return out


def model_state(model: torch.nn.Module, optimizer=None, meshes: Optional[dict] = None,
                shapes_only: bool = False) -> Dict[str, torch.Tensor]:
    """Flat model entries (detached views of this rank's tensors, expert tensors split per expert).

    With a ZeRO optimizer the parameters are its fp32 master weights (collective over dp groups unless
    shapes_only, which gives fp32 tensors of the right shapes and no collective).
    """
    adapter = cstate.adam_state(optimizer) if optimizer is not None else None
    sd = {}
    for k, v in model.state_dict(keep_vars=True).items():
        if adapter is not None and adapter.has_master and isinstance(v, torch.nn.Parameter) and adapter.holds(v):
            sd[k] = torch.empty_like(v, dtype=torch.float32) if shapes_only else adapter.master(v)
        else:
            sd[k] = v.detach()
    return _split_experts(sd, _expert_modules(model), meshes)


def _param_names(model: torch.nn.Module) -> Dict[int, str]:
    return {id(p): n for n, p in model.named_parameters()}


def optim_state(model: torch.nn.Module, optimizer, meshes: Optional[dict] = None,
                shapes_only: bool = False) -> Dict[str, torch.Tensor]:
    """Flat AdamW entries, experts split by global index; a parameter without state yet saves zeros.

    Collective with a ZeRO optimizer (unless shapes_only): every rank walks the parameters in model order.
    """
    adapter = cstate.adam_state(optimizer)
    experts = _expert_modules(model)
    out = {}
    for n, p in model.named_parameters():
        if not adapter.holds(p):
            continue
        if shapes_only:
            st = {k: torch.empty_like(p, dtype=torch.float32) for k in cstate.MOMENTS}
            st["step"] = torch.zeros((), dtype=torch.float32)
        else:
            st = adapter.get(p)
        # moments sit at "<param>.exp_avg": split on the param's module, then move the suffix last
        for m in cstate.MOMENTS:
            for k2, v in _split_experts({n: st[m]}, experts, meshes).items():
                out[f"optim.{k2}.{m}"] = v
        out[f"optim.{n}.step"] = st["step"]
    return out


def _collect(flat: Dict[str, torch.Tensor], key: str, like: torch.Tensor, experts: Dict[str, torch.nn.Module],
             spell) -> torch.Tensor:
    """The loaded value of `key` for this rank: expert tensors are stacked from their global entries."""
    mod = experts.get(key.rpartition(".")[0])
    if mod is not None and like.dim() >= 1 and like.shape[0] == mod.num_local_experts:
        parts = [flat[spell(f"{key}.e{mod.expert_offset + j}")] for j in range(like.shape[0])]
        return torch.stack([t.to_local() if hasattr(t, "to_local") else t for t in parts])
    return flat[spell(key)]


def _assign(model: torch.nn.Module, optimizer, flat: Dict[str, torch.Tensor]) -> None:
    """Copy loaded flat entries back into this rank's model (and optimizer, and ZeRO's fp32 masters)."""
    experts = _expert_modules(model)
    adapter = cstate.adam_state(optimizer) if optimizer is not None else None
    with torch.no_grad():
        for key, t in model.state_dict(keep_vars=True).items():
            value = _collect(flat, key, t, experts, lambda k: f"model.{k}")
            t.copy_(value)
            if adapter is not None and isinstance(t, torch.nn.Parameter) and adapter.holds(t):
                adapter.set_master(t, value.to(torch.float32))
    if adapter is None:
        return
    for n, p in model.named_parameters():
        if adapter.holds(p):
            st = {"step": flat[f"optim.{n}.step"]}
            for m in cstate.MOMENTS:
                st[m] = _collect(flat, n, p, experts, lambda k, m=m: f"optim.{k}.{m}")
            adapter.set(p, st)


# ---- RNG ---------------------------------------------------------------------------------------
def rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def set_rng_state(st: dict) -> None:
    torch.set_rng_state(st["torch"])
    np.random.set_state(st["numpy"])
    random.setstate(st["python"])


# ---- save ----------------------------------------------------------------------------------------
def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _write_atomic(path: str, text: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_checkpoint(root: str, step: int, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    trainer_state: dict, structure: dict, keep: int = 2, meshes: Optional[dict] = None,
                    config: Optional[dict] = None) -> str:
    """Collective: every rank calls it. Returns the final directory.

    Args:
        root: the checkpoints directory.
        step: optimizer steps done; names the checkpoint.
        trainer_state: small picklable dict (step, data position, schedule, world size, ep).
        structure: the model's STRUCTURAL_FIELDS values, written to moesys.json and checked on load.
        keep: how many complete checkpoints to keep (older ones are deleted after the new one is in place).
        optimizer: torch AdamW, or DeepSpeed's ZeRO-1/2 optimizer (saved per parameter, see checkpoint_state).
        meshes: `dims.ffn_shard_meshes()` (the ParallelDims' F-shard mesh); needed when experts are split along F.
        config: the run's resolved config as plain data, written to moesys.json ("config"), so the
            checkpoint can be evaluated or sampled from alone (moesys-eval, moesys-generate).
    """
    _check_meshes(_expert_modules(model), meshes)  # before any collective
    name = f"step_{step:08d}"
    final, tmp = os.path.join(root, name), os.path.join(root, f".{name}.tmp")
    rank = _rank()
    if rank == 0:
        os.makedirs(root, exist_ok=True)
        if os.path.exists(tmp):  # left by a crashed save
            shutil.rmtree(tmp)
    _barrier()
    state = {**{f"model.{k}": v for k, v in model_state(model, optimizer, meshes).items()},
             **optim_state(model, optimizer, meshes)}
    # small Python objects go in as pickled bytes: DCP flattens nested dicts into separate entries,
    # which a loader at another world size could not ask for by name
    state["trainer"] = pickle.dumps(dict(trainer_state))
    state[f"rng.rank{rank}"] = pickle.dumps(rng_state())
    dcp.save(state, storage_writer=dcp.FileSystemWriter(tmp))
    _barrier()
    files = _hash_files(tmp, rank)
    if rank == 0:
        meta = {"format": FORMAT, "step": step, "structure": structure, "trainer": trainer_state, "files": files}
        if config is not None:
            meta["config"] = config
        _write_atomic(os.path.join(tmp, META_FILE), json.dumps(meta, indent=1, default=str))
        if os.path.exists(final):  # the same step saved again (e.g. a re-run): replace it
            shutil.rmtree(final)
        os.rename(tmp, final)
        _write_atomic(os.path.join(root, LATEST), name + "\n")
        _prune(root, keep, name)
    _barrier()
    return final


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _hash_files(directory: str, rank: int) -> dict:
    """{file name: {bytes, sha256}} of every file in `directory`; the ranks split the hashing
    (collective when distributed: every rank calls it, after the files are written)."""
    names = sorted(n for n in os.listdir(directory) if os.path.isfile(os.path.join(directory, n)))
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    mine = {n: {"bytes": os.path.getsize(os.path.join(directory, n)), "sha256": _sha256(os.path.join(directory, n))}
            for n in names[rank::world]}
    if world == 1:
        return mine
    everyone = [None] * world
    dist.all_gather_object(everyone, mine)
    return {k: v for part in everyone for k, v in sorted(part.items())}


def verify_checkpoint(ckpt: str) -> bool:
    """Check every file against the manifest's size and SHA-256 (local reads only).

    Returns True when verified, False for a format-1 checkpoint (no checksums: loads unverified);
    raises CheckpointError naming the checkpoint and the first file that is missing, truncated or changed.
    """
    meta = read_meta(ckpt)
    files = meta.get("files")
    if files is None:
        return False
    for name, want in sorted(files.items()):
        path = os.path.join(ckpt, name)
        if not os.path.isfile(path):
            raise CheckpointError(f"checkpoint {ckpt!r} is corrupt: file {name} is missing")
        size = os.path.getsize(path)
        if size != want["bytes"]:
            raise CheckpointError(f"checkpoint {ckpt!r} is corrupt: file {name} has {size} bytes, "
                                  f"the manifest says {want['bytes']} (truncated or overwritten)")
        if _sha256(path) != want["sha256"]:
            raise CheckpointError(f"checkpoint {ckpt!r} is corrupt: file {name} does not match its SHA-256 "
                                  "in the manifest (changed after it was written)")
    return True


def _step_dirs(root: str) -> list:
    """Complete checkpoint directories under `root`, oldest first."""
    if not os.path.isdir(root):
        return []
    return sorted(d for d in os.listdir(root) if d.startswith("step_") and os.path.isdir(os.path.join(root, d)))


def newest_checkpoint(root: str) -> Optional[str]:
    """The checkpoint `latest` names under `root`, or None."""
    try:
        return resolve(root)
    except CheckpointError:
        return None


def resolve_verified(root: str) -> Tuple[Optional[str], list]:
    """The newest checkpoint under `root` (a checkpoints/ dir) that verifies, and a note per newer one
    that did not. `latest` first, then every step_* directory newest first. (None, notes) if none does."""
    notes, tried = [], []
    try:
        first = [resolve(root)]
    except CheckpointError as e:
        first = []
        notes.append(str(e))
    for cand in first + [os.path.join(root, d) for d in reversed(_step_dirs(root))]:
        cand = os.path.normpath(cand)
        if cand in tried:
            continue
        tried.append(cand)
        try:
            verify_checkpoint(cand)  # reads (and checks) moesys.json first
            return cand, notes
        except CheckpointError as e:
            notes.append(str(e))
    return None, notes


def _prune(root: str, keep: int, newest: str) -> None:
    done = _step_dirs(root)
    for d in done[: max(len(done) - max(keep, 1), 0)]:
        if d != newest:
            shutil.rmtree(os.path.join(root, d), ignore_errors=True)


# ---- find and check (local file reads only: safe before any collective) --------------------------
def resolve(path: str) -> str:
    """A checkpoint directory from a checkpoint dir, a checkpoints/ dir or a run's out dir."""
    for cand in (path, os.path.join(path, "checkpoints")):
        latest = os.path.join(cand, LATEST)
        if os.path.isfile(latest):
            with open(latest) as f:
                name = f.read().strip()
            target = os.path.join(cand, name)
            if not os.path.isdir(target):
                raise CheckpointError(f"{latest} points to {name!r}, which does not exist")
            return target
    if os.path.isfile(os.path.join(path, META_FILE)) or os.path.isfile(os.path.join(path, ".metadata")):
        return path
    raise CheckpointError(f"no checkpoint at {path!r} (expected a checkpoint directory, or a directory with a "
                          f"'{LATEST}' file, or an out dir with checkpoints/{LATEST})")


def read_meta(ckpt: str) -> dict:
    meta_path = os.path.join(ckpt, META_FILE)
    try:
        with open(meta_path) as f:
            meta = json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {ckpt!r} is incomplete: {META_FILE} is missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"checkpoint {ckpt!r} is corrupt: {META_FILE} is not valid JSON ({e})") from None
    if "structure" not in meta or "step" not in meta:
        raise CheckpointError(f"checkpoint {ckpt!r} is corrupt: {META_FILE} lacks 'structure'/'step'")
    return meta


def check_compatible(ckpt: str, structure: dict) -> dict:
    """Raise CheckpointError naming every structural field that differs; return the metadata."""
    meta = read_meta(ckpt)
    saved, structure = {**STRUCTURAL_DEFAULTS, **meta["structure"]}, {**STRUCTURAL_DEFAULTS, **structure}
    diffs = [f"{k}: checkpoint has {saved.get(k)!r}, this run has {structure.get(k)!r}"
             for k in STRUCTURAL_FIELDS if saved.get(k) != structure.get(k)]
    if diffs:
        raise CheckpointError(f"checkpoint {ckpt!r} does not fit this model: " + "; ".join(diffs))
    try:
        md = dcp.FileSystemReader(ckpt).read_metadata()
    except Exception as e:  # a truncated or garbled .metadata: name it, do not guess
        raise CheckpointError(f"checkpoint {ckpt!r} is corrupt: cannot read its DCP .metadata ({type(e).__name__}: {e})") from None
    meta["_keys"] = md.state_dict_metadata
    return meta


def build_load_state(model: torch.nn.Module, optimizer: Optional[torch.optim.Optimizer], saved_keys: Iterable[str],
                     rank: int, meshes: Optional[dict] = None) -> Tuple[dict, bool]:
    """The state dict this rank asks DCP for (fresh tensors), and whether its RNG entry exists.

    Raises CheckpointError when an entry this rank needs is missing or has another shape.
    """
    saved_keys = dict(saved_keys) if not isinstance(saved_keys, dict) else saved_keys
    want = {f"model.{k}": torch.empty_like(v)
            for k, v in model_state(model, optimizer, meshes, shapes_only=True).items()}
    if optimizer is not None:
        want.update({k: torch.empty_like(v) for k, v in optim_state(model, optimizer, meshes, shapes_only=True).items()})
    for k, v in want.items():
        md = saved_keys.get(k)
        if md is None:
            raise CheckpointError(f"checkpoint lacks entry {k!r} (shape {tuple(v.shape)}) that this run needs")
        size = tuple(getattr(md, "size", ()))
        if size != tuple(v.shape):
            raise CheckpointError(f"checkpoint entry {k!r} has shape {size}, this run needs {tuple(v.shape)}")
    want["trainer"] = b""
    has_rng = f"rng.rank{rank}" in saved_keys
    if has_rng:
        want[f"rng.rank{rank}"] = b""
    return want, has_rng


def load_checkpoint(ckpt: str, *, model: torch.nn.Module, optimizer: Optional[torch.optim.Optimizer],
                    structure: dict, restore_rng: bool = True, meshes: Optional[dict] = None) -> dict:
    """Collective. Loads model (+ optimizer, + this rank's RNG if the world matches); returns trainer state.

    optimizer: torch AdamW or DeepSpeed's ZeRO-1/2 optimizer; meshes: as for save_checkpoint.
    """
    _check_meshes(_expert_modules(model), meshes)
    meta = check_compatible(ckpt, structure)
    rank = _rank()
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    state, has_rng = build_load_state(model, optimizer, meta["_keys"], rank, meshes)
    dcp.load(state, storage_reader=dcp.FileSystemReader(ckpt))
    _assign(model, optimizer, state)
    trainer_state = pickle.loads(state["trainer"])
    if restore_rng and has_rng and trainer_state.get("world_size") == world:
        set_rng_state(pickle.loads(state[f"rng.rank{rank}"]))
        trainer_state["rng_restored"] = True
    else:
        trainer_state["rng_restored"] = False
    return trainer_state
