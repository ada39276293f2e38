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

Resharding: expert weights are DTensors of their global shape ([E, D, F], Shard(0) over the ep mesh;
over (edp, ep) under FSDP2), dense weights are replicated tensors (or FSDP2's dp-sharded DTensors), and
the entries come from DCP's state_dict API (`get_model_state_dict` / `get_optimizer_state_dict`, and
their `set_*` on load). DCP writes each logical tensor once and every rank reads exactly its part, so
a checkpoint written at any EP degree, F-shard or FSDP layout resumes at any other. Engines: the
plain and FSDP2 engines' AdamW and DeepSpeed ZeRO-1/2 save the same entries (ZeRO's flat fp32
partitions are assembled per parameter, its local expert shards wrapped as DTensors:
checkpoint_state), so any engine resumes a checkpoint of any other. Formats 1 and 2 (one entry per
expert, `<key>.e<g>`) still load: read as full tensors and placed.

Flat state keys (format 4):
    model.<name>                                parameters and persistent buffers
    optim.<param>.{exp_avg,exp_avg_sq,step}     AdamW moments and step
    rng.rank<r>.{torch,numpy,python}            RNG states of rank r as integer tensors (rng_state)
and moesys.json's "trainer": step, data position, LR schedule, world/ep, history (JSON).

No pickle of ours: every entry is a tensor, which DCP reads with torch.load(weights_only=True).
DCP would read a non-tensor entry with torch.load(weights_only=False), which runs whatever code the
pickle names, so a checkpoint with such entries (formats 1 to 3 pickled `trainer` and `rng.rank<r>`;
anything else is planted) is refused by name unless the caller trusts it (trainer.trust_checkpoint).
DCP's own `.metadata` file is still a pickle read by torch (see README "Security").
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import sys
from typing import Dict, Iterable, List, Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from moesys.moe.experts import slice_ffn
from moesys.moe.layer import MoELayer
from moesys.parallel import expert_parameters

from . import checkpoint_state as cstate
from .decoder import DECODER_FIELDS

META_FILE = "moesys.json"
LATEST = "latest"
# moesys.json "format": 2 added per-file checksums (format 1, without them, loads unverified); 3 stores
# expert weights as whole DTensor entries (format 1 and 2: one entry per expert, read by _load_legacy);
# 4 has no pickled entries (trainer state in moesys.json, RNG states as tensors)
FORMAT = 4
# model fields that change tensor shapes or names: a checkpoint must agree on all of them
STRUCTURAL_FIELDS = ("vocab_size", "n_layers", "d_model", "n_heads", "ffn_hidden", "seq_len", "moe_every",
                     "tie_embeddings", "qk_norm", "num_experts", "activation", "router", "num_shared_experts",
                     "shared_ffn_hidden", "shared_expert_gate", "arch")
# the modern decoder's model.* fields (model.arch=decoder) are structural too; their defaults: configs/schema.py's
STRUCTURAL_FIELDS = STRUCTURAL_FIELDS + DECODER_FIELDS
# what a checkpoint written before a structural field existed had (its manifest lacks the key)
STRUCTURAL_DEFAULTS = {"qk_norm": False, "num_shared_experts": 0, "shared_ffn_hidden": 0, "shared_expert_gate": False,
                       "arch": "gpt", "n_kv_heads": None, "head_dim": None, "norm_eps": 1e-6, "rope_theta": 10000.0,
                       "qkv_bias": False, "out_bias": False, "qk_norm_scope": "head", "dense_ffn_hidden": None,
                       "first_k_dense": 0, "q_lora_rank": None, "kv_lora_rank": None, "qk_rope_head_dim": 0,
                       "qk_nope_head_dim": 0, "v_head_dim": 0}
# the moesys-train override that sets each structural field (for the error's "to resume it" hint)
STRUCTURAL_OVERRIDES = {"vocab_size": "data.vocab_size", "num_experts": "moe.num_experts", "activation": "moe.activation",
                        "router": "moe.router", "num_shared_experts": "moe.num_shared_experts",
                        "shared_ffn_hidden": "moe.shared_ffn_hidden_size", "shared_expert_gate": "moe.shared_expert_gate"}


class CheckpointError(RuntimeError):
    """A checkpoint is missing, corrupt, or does not fit the model being trained."""


# ---- what a checkpoint holds -----------------------------------------------------------------------
def _is_zero(optimizer) -> bool:
    return optimizer is not None and isinstance(cstate.adam_state(optimizer), cstate.ZeroAdamState)


def _param_fqns(model: torch.nn.Module) -> Dict[int, str]:
    return {id(p): n for n, p in model.named_parameters()}


def _fqn_param_groups(model: torch.nn.Module, optimizer) -> list:
    """The optimizer's param groups as DCP's set_optimizer_state_dict takes them (params by FQN):
    the current hyperparameters stay (the LR schedule sets them), only the state is loaded."""
    fqn = _param_fqns(model)
    return [{**{k: v for k, v in g.items() if k != "params"}, "params": [fqn[id(q)] for q in g["params"]]}
            for g in optimizer.param_groups]


def _zeros_state(p: torch.Tensor) -> dict:
    """AdamW's state of a parameter that has none yet (never had a gradient): equivalent to none."""
    return {"step": torch.zeros((), dtype=torch.float32),
            **{m: torch.zeros_like(p, dtype=torch.float32) for m in cstate.MOMENTS}}


def _torch_optim_state(model: torch.nn.Module, optimizer, template: bool) -> Dict[str, dict]:
    """{fqn: {exp_avg, exp_avg_sq, step}} of a torch optimizer (plain or FSDP2: DTensors where the
    parameters are), through DCP's state_dict API; zeros for a parameter without state yet. template:
    fresh zeros of the right shapes and placements, without touching the optimizer."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    state = {}
    if not template and optimizer.state:  # (an empty optimizer would be initialised by a fake step)
        state = dict(get_optimizer_state_dict(model, optimizer)["state"])
    held = {id(p) for g in optimizer.param_groups for p in g["params"]}
    for n, p in model.named_parameters():
        if id(p) in held and n not in state:
            state[n] = _zeros_state(p.detach())
    return {n: {k: v for k, v in st.items() if k in cstate.MOMENTS + ("step",)} for n, st in state.items()}


def _zero_state(model: torch.nn.Module, optimizer, template: bool) -> Tuple[dict, dict]:
    """Model and optimizer entries of a DeepSpeed ZeRO-1/2 run: the fp32 masters and per-parameter
    moments assembled from the flat partitions (collective unless template), each expert tensor a
    DTensor of the global shape built from this rank's local shard (cstate.global_view)."""
    adapter = cstate.adam_state(optimizer)
    owners = cstate.expert_owners(model)
    msd = {}
    for k, v in model.state_dict(keep_vars=True).items():
        if isinstance(v, torch.nn.Parameter) and adapter.holds(v):
            v = torch.empty_like(v, dtype=torch.float32) if template else adapter.master(v)
        msd[k] = cstate.global_view(owners, k, v.detach())
    osd = {}
    for n, p in model.named_parameters():
        if not adapter.holds(p):
            continue
        st = _zeros_state(p.detach()) if template else adapter.get(p)
        osd[n] = {k: (cstate.global_view(owners, n, v) if k != "step" else v) for k, v in st.items()}
    return msd, osd


def engine_state(model: torch.nn.Module, optimizer=None, template: bool = False) -> Tuple[dict, dict]:
    """(model entries {fqn: tensor}, optimizer entries {fqn: {exp_avg, exp_avg_sq, step}}) of this
    rank, the same keys whatever the engine: expert weights are DTensors of their global shape, so
    DCP writes each logical tensor once and any other layout reads its own part.

    plain and fsdp engines: DCP's state_dict API (`get_model_state_dict` / `get_optimizer_state_dict`);
    DeepSpeed ZeRO-1/2: its flat partitions per parameter (checkpoint_state.ZeroAdamState).
    template: tensors of the right shapes to load into (no collective, nothing changed).
    """
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    if optimizer is not None and _is_zero(optimizer):
        return _zero_state(model, optimizer, template)
    msd = dict(get_model_state_dict(model))
    if template:
        msd = {k: torch.empty_like(v) for k, v in msd.items()}
    osd = _torch_optim_state(model, optimizer, template) if optimizer is not None else {}
    return msd, osd


def flat_entries(msd: dict, osd: dict) -> Dict[str, torch.Tensor]:
    """DCP keys: model.<fqn> and optim.<fqn>.{exp_avg,exp_avg_sq,step}."""
    out = {f"model.{k}": v for k, v in msd.items()}
    for n, st in osd.items():
        out.update({f"optim.{n}.{k}": v for k, v in st.items()})
    return out


def _apply_loaded(model: torch.nn.Module, optimizer, flat: Dict[str, torch.Tensor]) -> None:
    """Put loaded entries (engine_state's keys) into this rank's model and optimizer."""
    msd = {k[len("model."):]: v for k, v in flat.items() if k.startswith("model.")}
    if optimizer is not None and _is_zero(optimizer):
        adapter = cstate.adam_state(optimizer)
        local = cstate.local_value
        with torch.no_grad():
            for k, t in model.state_dict(keep_vars=True).items():
                value = local(msd[k])
                t.copy_(value)
                if isinstance(t, torch.nn.Parameter) and adapter.holds(t):
                    adapter.set_master(t, value.to(torch.float32))
        for n, p in model.named_parameters():
            if adapter.holds(p):
                adapter.set(p, {m: local(flat[f"optim.{n}.{m}"]) for m in cstate.MOMENTS + ("step",)})
        return
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    set_model_state_dict(model, msd)
    if optimizer is not None:
        state = {n: {m: flat[f"optim.{n}.{m}"] for m in cstate.MOMENTS + ("step",)}
                 for n, p in model.named_parameters() if f"optim.{n}.step" in flat}
        set_optimizer_state_dict(model, optimizer, {"state": state, "param_groups": _fqn_param_groups(model, optimizer)})


# ---- RNG ---------------------------------------------------------------------------------------
def _float_bits(x: float) -> int:
    return int(torch.tensor([x], dtype=torch.float64).view(torch.int64)[0])


def _bits_float(i: int) -> float:
    return float(torch.tensor([i], dtype=torch.int64).view(torch.float64)[0])


def rng_state() -> Dict[str, torch.Tensor]:
    """This process's RNG states as tensors: torch's byte state as is; numpy's MT19937 and Python's
    Mersenne Twister as int64 [627] = the 624 (numpy) or 625 (Python, with its position) state words,
    then numpy's position, then the cached Gaussian as (present, its float64 bits)."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    if name != "MT19937":
        raise ValueError(f"rng_state: numpy's global generator is {name!r}, expected 'MT19937'")
    version, words, gauss_next = random.getstate()
    if version != 3:
        raise ValueError(f"rng_state: Python's random state version {version}, expected 3")
    numpy_st = [int(k) for k in keys] + [int(pos), int(has_gauss), _float_bits(float(gauss))]
    python_st = list(words) + [int(gauss_next is not None), _float_bits(gauss_next or 0.0)]
    return {"torch": torch.get_rng_state(), "numpy": torch.tensor(numpy_st, dtype=torch.int64),
            "python": torch.tensor(python_st, dtype=torch.int64)}


def set_rng_state(st: Dict[str, torch.Tensor]) -> None:
    """Restore what rng_state returned."""
    torch.set_rng_state(st["torch"])
    n = st["numpy"].tolist()
    np.random.set_state(("MT19937", np.array(n[:624], dtype=np.uint32), n[624], n[625], _bits_float(n[626])))
    p = st["python"].tolist()
    random.setstate((3, tuple(p[:625]), _bits_float(p[626]) if p[625] else None))


def rng_entries(rank: int, st: Optional[Dict[str, torch.Tensor]] = None) -> Dict[str, torch.Tensor]:
    """DCP entries rng.rank<r>.{torch,numpy,python} (this process's states, or empty ones to load into)."""
    if st is None:
        st = {"torch": torch.empty_like(torch.get_rng_state()), "numpy": torch.empty(627, dtype=torch.int64),
              "python": torch.empty(627, dtype=torch.int64)}
    return {f"rng.rank{rank}.{k}": v for k, v in st.items()}


# ---- what may be unpickled -------------------------------------------------------------------------
def pickled_entries(saved_keys: dict) -> List[str]:
    """Names of the checkpoint's non-tensor entries: DCP stores them with torch.save and reads them with
    torch.load(weights_only=False), i.e. unpickles them, which can run any code their author chose."""
    return sorted(k for k, md in saved_keys.items() if not isinstance(md, TensorStorageMetadata))


def check_trusted(ckpt: str, meta: dict, trust: bool) -> List[str]:
    """Refuse (CheckpointError naming the entries) a checkpoint that holds pickled entries unless the
    caller trusts its author (trainer.trust_checkpoint=true); returns the pickled entries' names.
    `meta` is check_compatible's (local reads only: safe before any collective)."""
    pickled = pickled_entries(meta["_keys"])
    if not pickled:
        return []
    names = ", ".join(pickled[:4]) + (f" and {len(pickled) - 4} more" if len(pickled) > 4 else "")
    if not trust:
        raise CheckpointError(
            f"checkpoint {ckpt!r} (format {meta.get('format', 1)}) holds pickled entries ({names}); loading "
            "them runs whatever code the checkpoint's author put in them. Refused: add trainer.trust_checkpoint=true "
            "(moesys-generate: trust_checkpoint=true) only if you trust who wrote it (moesys before format 4 "
            "wrote such entries)")
    return pickled


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
                    trainer_state: dict, structure: dict, keep: int = 2, config: Optional[dict] = None) -> str:
    """Collective: every rank calls it. Returns the final directory.

    Args:
        root: the checkpoints directory.
        step: optimizer steps done; names the checkpoint.
        trainer_state: small JSON-serialisable dict (step, data position, schedule, world size, ep,
            history), written to moesys.json ("trainer"): tuples come back as lists, int keys as str.
        structure: the model's STRUCTURAL_FIELDS values, written to moesys.json and checked on load.
        keep: how many complete checkpoints to keep (older ones are deleted after the new one is in place).
        optimizer: torch AdamW (plain or FSDP2 model), or DeepSpeed's ZeRO-1/2 optimizer (saved per
            parameter, see checkpoint_state).
        config: the run's resolved config as plain data, written to moesys.json ("config"), so the
            checkpoint can be evaluated or sampled from alone (moesys-eval, moesys-generate).
    """
    name = f"step_{step:08d}"
    final, tmp = os.path.join(root, name), os.path.join(root, f".{name}.tmp")
    rank = _rank()
    if rank == 0:
        os.makedirs(root, exist_ok=True)
        if os.path.exists(tmp):  # left by a crashed save
            shutil.rmtree(tmp)
    _barrier()
    # the trainer state goes in moesys.json as JSON; refuse what JSON cannot hold before writing anything
    trainer_json = json.loads(json.dumps(dict(trainer_state)))
    state = flat_entries(*engine_state(model, optimizer))
    state.update(rng_entries(rank, rng_state()))  # tensors only: nothing of ours is pickled
    dcp.save(state, storage_writer=dcp.FileSystemWriter(tmp))
    _barrier()
    files = _hash_files(tmp, rank)
    if rank == 0:
        meta = {"format": FORMAT, "step": step, "structure": structure, "trainer": trainer_json, "files": files}
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
    differ = [k for k in STRUCTURAL_FIELDS if saved.get(k) != structure.get(k)]
    if differ:
        def value(v):
            return str(v).lower() if isinstance(v, bool) else str(v)

        diffs = "; ".join(f"{k}: checkpoint has {saved.get(k)!r}, this run has {structure.get(k)!r}" for k in differ)
        resume = " ".join(f"{STRUCTURAL_OVERRIDES.get(k, 'model.' + k)}={value(saved.get(k))}" for k in differ)
        raise CheckpointError(f"checkpoint {ckpt!r} does not fit this model: {diffs} (to resume it, add: {resume})")
    try:
        md = dcp.FileSystemReader(ckpt).read_metadata()
    except Exception as e:  # a truncated or garbled .metadata: name it, do not guess
        raise CheckpointError(f"checkpoint {ckpt!r} is corrupt: cannot read its DCP .metadata ({type(e).__name__}: {e})") from None
    meta["_keys"] = md.state_dict_metadata
    return meta


def build_load_state(model: torch.nn.Module, optimizer: Optional[torch.optim.Optimizer], saved_keys: Iterable[str],
                     rank: int) -> Tuple[dict, bool]:
    """The state dict this rank asks DCP for (fresh tensors of engine_state's keys), and whether its RNG
    entry exists. Raises CheckpointError when an entry this rank needs is missing or has another shape."""
    saved_keys = dict(saved_keys) if not isinstance(saved_keys, dict) else saved_keys
    want = flat_entries(*engine_state(model, optimizer, template=True))
    for k, v in want.items():
        md = saved_keys.get(k)
        if md is None:
            raise CheckpointError(f"checkpoint lacks entry {k!r} (shape {tuple(v.shape)}) that this run needs")
        size = tuple(getattr(md, "size", ()))
        if size != tuple(v.shape):
            raise CheckpointError(f"checkpoint entry {k!r} has shape {size}, this run needs {tuple(v.shape)}")
    rng = rng_entries(rank)
    has_rng = all(k in saved_keys for k in rng)
    if has_rng:
        want.update(rng)
    return want, has_rng


def _legacy_request(model: torch.nn.Module, optimizer, saved_keys: dict) -> Tuple[dict, dict]:
    """Format 2 (per-expert entries `<key>.e<g>`, before experts were DTensors): the request for every
    entry as a full plain tensor, and {format-3 key: [its E per-expert keys]} to stack them back."""
    msd, osd = engine_state(model, optimizer, template=True)
    flat = flat_entries(msd, osd)

    names = _param_fqns(model)
    expert_fqns = {names[id(p)] for p in expert_parameters(model) if id(p) in names}
    E = {names[id(p)]: m.experts.num_experts for m in _moe_layers(model) for p in m.experts.parameters()
         if id(p) in names}
    want, stacks = {}, {}
    for k, v in flat.items():
        fqn = k[len("model."):] if k.startswith("model.") else k[len("optim."):].rpartition(".")[0]
        if fqn in expert_fqns and not k.endswith(".step"):
            keys = [f"model.{fqn}.e{g}" if k.startswith("model.") else f"optim.{fqn}.e{g}.{k.rpartition('.')[2]}"
                    for g in range(E[fqn])]
            stacks[k] = keys
            for kk in keys:
                md = saved_keys.get(kk)
                if md is None:
                    raise CheckpointError(f"format-2 checkpoint lacks entry {kk!r} that this run needs")
                want[kk] = torch.empty(tuple(md.size), dtype=torch.float32)
        else:
            md = saved_keys.get(k)
            if md is None:
                raise CheckpointError(f"format-2 checkpoint lacks entry {k!r} that this run needs")
            want[k] = torch.empty(tuple(md.size), dtype=getattr(md.properties, "dtype", torch.float32)) \
                if hasattr(md, "size") else b""
    return want, stacks


def _moe_layers(model: torch.nn.Module) -> list:
    return [m for m in model.modules() if isinstance(m, MoELayer)]


def _load_legacy(ckpt: str, model, optimizer, saved_keys: dict, rank: int) -> Tuple[dict, bool]:
    """Read a format-2 checkpoint as full tensors and place this rank's parts (DCP's full-state-dict
    path for plain and FSDP2 models; the experts' `sharding` for DeepSpeed's local shards)."""
    want, stacks = _legacy_request(model, optimizer, saved_keys)
    want["trainer"] = b""
    has_rng = f"rng.rank{rank}" in saved_keys
    if has_rng:
        want[f"rng.rank{rank}"] = b""
    dcp.load(want, storage_reader=dcp.FileSystemReader(ckpt))
    full = {k: v for k, v in want.items() if isinstance(v, torch.Tensor)}
    for k, keys in stacks.items():
        full[k] = torch.stack([want.pop(kk) for kk in keys])
        for kk in keys:
            full.pop(kk, None)
    msd = {k[len("model."):]: v for k, v in full.items() if k.startswith("model.")}
    osd: dict = {}
    for k, v in full.items():
        if k.startswith("optim."):
            fqn, _, m = k[len("optim."):].rpartition(".")
            osd.setdefault(fqn, {})[m] = v
    if optimizer is not None and _is_zero(optimizer):
        owners = cstate.expert_owners(model)
        local = {}
        for k, v in flat_entries(msd, osd).items():
            fqn = k[len("model."):] if k.startswith("model.") else k[len("optim."):].rpartition(".")[0]
            if fqn in owners and not k.endswith(".step"):
                mod, name = owners[fqn]
                sh = mod.sharding
                v = v[sh.first:sh.first + sh.count]
                if sh.f_slice is not None:
                    v = slice_ffn(name, v, sh.f_slice)
            local[k] = v
        _apply_loaded(model, optimizer, local)
    else:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        opts = StateDictOptions(full_state_dict=True)
        set_model_state_dict(model, msd, options=opts)
        if optimizer is not None:
            set_optimizer_state_dict(model, optimizer, {"state": osd, "param_groups": _fqn_param_groups(model, optimizer)},
                                     options=opts)
    return want, has_rng


def _load_pickled_format(ckpt: str, fmt: int, model, optimizer, saved_keys: dict, rank: int) -> Tuple[dict, dict]:
    """Formats 1 to 3 (trusted only: check_trusted first): their `trainer` and `rng.rank<r>` entries
    are pickles. Returns (trainer state, this rank's RNG states {torch, numpy, python} or {})."""
    import pickle  # only here: the one reader of pickles of ours, behind trainer.trust_checkpoint

    if fmt < 3:
        state, has_rng = _load_legacy(ckpt, model, optimizer, saved_keys, rank)
    else:
        state, _ = build_load_state(model, optimizer, saved_keys, rank)
        state["trainer"] = b""
        has_rng = f"rng.rank{rank}" in saved_keys
        if has_rng:
            state[f"rng.rank{rank}"] = b""
        dcp.load(state, storage_reader=dcp.FileSystemReader(ckpt))
        _apply_loaded(model, optimizer, state)
    return pickle.loads(state["trainer"]), (pickle.loads(state[f"rng.rank{rank}"]) if has_rng else {})


def load_checkpoint(ckpt: str, *, model: torch.nn.Module, optimizer: Optional[torch.optim.Optimizer],
                    structure: dict, restore_rng: bool = True, trust_pickle: bool = False) -> dict:
    """Collective. Loads model (+ optimizer, + this rank's RNG if the world matches); returns trainer state.

    optimizer: torch AdamW (plain or FSDP2 model) or DeepSpeed's ZeRO-1/2 optimizer. Any layout reads a
    checkpoint of any other: DCP reads each rank's part of every DTensor entry. A format-2 checkpoint
    (per-expert entries) is read as full tensors and placed; older formats are refused by name.
    trust_pickle: load a checkpoint with pickled entries (formats 1 to 3, or planted ones), which can
    run code its author chose; otherwise it is refused by name (check_trusted) before anything is read.
    """
    meta = check_compatible(ckpt, structure)
    fmt = int(meta.get("format", 1))
    rank = _rank()
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    if fmt > FORMAT:
        raise CheckpointError(f"checkpoint {ckpt!r} has format {fmt}; this moesys reads formats 1 to {FORMAT} "
                              "(written by a newer moesys)")
    pickled = check_trusted(ckpt, meta, trust_pickle)
    if pickled and rank == 0:
        what = "unpickling" if fmt < FORMAT else f"format {FORMAT} reads tensors only, so not reading"
        print(f"warning: trainer.trust_checkpoint=true: {what} {', '.join(pickled)} of {ckpt}", file=sys.stderr,
              flush=True)
    if fmt == FORMAT and not isinstance(meta.get("trainer"), dict):
        raise CheckpointError(f"checkpoint {ckpt!r} is corrupt: {META_FILE} lacks the trainer state ('trainer')")
    if fmt < FORMAT:
        trainer_state, old_rng = _load_pickled_format(ckpt, fmt, model, optimizer, meta["_keys"], rank)
        has_rng = bool(old_rng)
    else:
        state, has_rng = build_load_state(model, optimizer, meta["_keys"], rank)
        dcp.load(state, storage_reader=dcp.FileSystemReader(ckpt))
        _apply_loaded(model, optimizer, state)
        trainer_state = dict(meta["trainer"])
    if restore_rng and has_rng and trainer_state.get("world_size") == world:
        if fmt < FORMAT:
            torch.set_rng_state(old_rng["torch"])
            np.random.set_state(old_rng["numpy"])
            random.setstate(old_rng["python"])
        else:
            set_rng_state({k: state[f"rng.rank{rank}.{k}"] for k in ("torch", "numpy", "python")})
        trainer_state["rng_restored"] = True
    else:
        trainer_state["rng_restored"] = False
    return trainer_state
