"""Config errors, early and short: a catalogue of bad inputs through `moesys-train`'s entry point.

Every case must end with exit code 2 and ONE stderr line, `moesys-train: error: ...`, naming the
field and the value; no traceback; nothing on stdout (rank 0 logs from its first step: nothing there
means no rank ran); the given trainer.out_dir (which holds a file beforehand) unchanged; and, for
the errors found by composing and validating the config, no Hydra run dir either.

Every case runs in process through `moesys.train.main` (Hydra's compose API and the config's
validate, as the CLI runs them); the real CLI (`python -m moesys.train`, ~5-10 s of imports each)
takes one case of each way an error is found: five in the fast tier, eight more in the slow test.
"""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from hydra.core.global_hydra import GlobalHydra

from moesys import train as train_mod

CPU_ONLY = not torch.cuda.is_available()

# (overrides, text the one line must hold). Placeholders: {tmp} a folder with files the cases name,
# {out} the case's trainer.out_dir. Cases marked LATE fail after Hydra made its run dir (the token
# ids and the checkpoint to resume are checked by prepare(), in the parent, before any rank starts).
LATE = "late"
CASES = [
    # trainer
    (["trainer.batch_size=0"], "trainer.batch_size must be > 0, got 0"),
    (["trainer.grad_accum=0"], "trainer.grad_accum must be > 0, got 0"),
    (["trainer.batch_size=7"], "trainer.batch_size (7) must be divisible by data-parallel size (2) x trainer.grad_accum (1)"),
    (["trainer.steps=0"], "trainer.steps must be > 0, got 0"),
    (["trainer.eval_interval=0"], "trainer.eval_interval must be > 0, got 0"),
    (["trainer.log_interval=-5"], "trainer.log_interval must be > 0, got -5"),
    (["trainer.eval_batches=0"], "trainer.eval_batches must be > 0, got 0"),
    (["trainer.ckpt_interval=-1"], "trainer.ckpt_interval must be >= 0 (0: only at the end), got -1"),
    (["trainer.keep_checkpoints=0"], "trainer.keep_checkpoints must be >= 1, got 0"),
    (["trainer.clip=-1"], "trainer.clip must be >= 0 (0 disables), got -1.0"),
    (["trainer.seed=-1"], "trainer.seed must be in [0, 2**32), got -1"),
    (["trainer.max_bad_steps=0"], "trainer.max_bad_steps must be >= 1, got 0"),
    (["trainer.precision=fp16"], "trainer.precision='fp16' is not one of fp32|bf16"),
    (["trainer.engine=megatron"], "trainer.engine='megatron' is not one of plain|fsdp|deepspeed"),
    (["trainer.engine=deepspeed", "trainer.zero_stage=3"], "trainer.zero_stage must be 1 or 2 with MoE, got 3"),
    (["trainer.ds_config={tmp}/ds.json"], "trainer.ds_config='{tmp}/ds.json' is only read by trainer.engine=deepspeed"),
    (["trainer.out_dir={tmp}/a_file"], "trainer.out_dir='{tmp}/a_file' exists and is not a directory"),
    (["trainer.resume={tmp}/nowhere"], "trainer.resume='{tmp}/nowhere': no checkpoint at", LATE),
    # optim, schedule
    (["optim.lr=-1e-3"], "optim.lr must be > 0, got -0.001"),
    (["optim.lr=inf"], "optim.lr must be a finite number, got inf"),
    (["optim.betas=[0.9,1.5]"], "optim.betas[1] must be in [0, 1), got 1.5"),
    (["optim.betas=[0.9]"], "optim.betas must have two values, got [0.9]"),
    (["optim.eps=0"], "optim.eps must be > 0, got 0.0"),
    (["optim.weight_decay=-0.1"], "optim.weight_decay must be >= 0, got -0.1"),
    (["schedule.warmup_steps=-1"], "schedule.warmup_steps must be >= 0, got -1"),
    (["schedule.min_lr_ratio=2"], "schedule.min_lr_ratio must be in [0, 1], got 2.0"),
    # model
    (["model.n_heads=3"], "model.d_model (32) must be divisible by model.n_heads (3)"),
    (["model.arch=llama"], "model.arch='llama' is not one of gpt|decoder"),
    (["model.arch=gpt", "model.n_kv_heads=1"], "model.n_kv_heads=1 is a field of the modern decoder only: set model.arch=decoder"),
    (["model.arch=decoder", "model.n_kv_heads=3"], "model.n_kv_heads (3) must divide model.n_heads (2)"),
    (["model.arch=decoder", "model.qk_norm_scope=layer"], "model.qk_norm_scope='layer' is not one of head|all"),
    (["model.arch=decoder", "model.rope_theta=0.5"], "model.rope_theta must be a finite number > 1, got 0.5"),
    (["model.arch=decoder", "model.q_lora_rank=8"], "model.q_lora_rank=8 needs latent attention: set model.kv_lora_rank"),
    (["model.arch=decoder", "model.kv_lora_rank=8", "model.qk_rope_head_dim=3", "model.qk_nope_head_dim=4",
      "model.v_head_dim=4"], "model.qk_rope_head_dim (3) must be even"),
    (["model.arch=decoder", "model.first_k_dense=2"], "model.first_k_dense (2) >= model.n_layers (2): no layer"),
    (["moe.routed_scaling_factor=0"], "moe.routed_scaling_factor must be a finite number > 0, got 0.0"),
    (["model.n_layers=0"], "model.n_layers must be > 0, got 0"),
    (["model.d_model=0"], "model.d_model must be > 0, got 0"),
    (["model.moe_every=5"], "model.moe_every (5) > model.n_layers (2)"),
    (["model.dropout=1.0"], "model.dropout must be in [0, 1), got 1.0"),
    (["model.seq_len=100000"], "model.seq_len=100000 does not fit the data: the validation split has"),
    # moe (MoEConfig's checks under the trainer's names)
    (["moe.top_k=5"], "moe.top_k (5) must be <= num_experts (4)"),
    (["moe.num_experts=0"], "moe.num_experts must be a positive integer, got 0"),
    (["moe.capacity_factor=0"], "moe.capacity_factor must be a finite number > 0 or None (dropless), got 0.0"),
    (["moe.aux_loss_coef=-1"], "moe.aux_loss_coef must be >= 0, got -1.0"),
    (["moe.router=nope"], "moe.router='nope' is not one of"),
    (["moe.activation=tanh"], "moe.activation='tanh' is not one of"),
    (["moe.router=switch"], "moe.router='switch' is top-1; got top_k=2"),
    (["moe.router=expert_choice"], "moe.router=expert_choice is not causal"),
    (["moe.kernel_backend=grouped_mm", "model.d_model=30", "model.n_heads=3"],
     "moe.kernel_backend='grouped_mm' needs model.d_model (30) divisible by 4"),
    (["moe.kernel_backend=fast"], "moe.kernel_backend='fast' is not one of"),
    (["moe.num_groups=3", "moe.topk_groups=1"], "moe.num_groups (3) must divide moe.num_experts (4)"),
    (["moe.num_groups=2", "moe.topk_groups=3"], "moe.topk_groups (3) must be <= moe.num_groups (2)"),
    (["moe.num_groups=4", "moe.topk_groups=1"],
     "moe.top_k (2) must be <= moe.topk_groups (1) x experts per group (1 = num_experts 4 / num_groups 4) = 1"),
    (["moe.num_groups=2"], "moe.num_groups (2) and moe.topk_groups (None) go together"),
    (["moe.num_groups=0", "moe.topk_groups=1"], "moe.num_groups must be a positive integer or None (no group limit), got 0"),
    (["moe.router=dts", "moe.top_k=1", "moe.num_groups=2", "moe.topk_groups=1"],
     "moe.num_groups=2: group-limited routing needs router in ['topk', 'switch', 'sigmoid_bias'], got router='dts'"),
    (["moe.router=dts", "moe.top_k=1", "moe.aux_loss=global_batch"], "moe.aux_loss='global_batch' pools the Switch loss's counts; router='dts'"),
    (["moe.aux_loss=global"], "moe.aux_loss='global' is not one of"),
    (["moe.num_shared_experts=-1"], "moe.num_shared_experts must be an integer >= 0, got -1"),
    (["moe.num_shared_experts=1", "moe.shared_ffn_hidden_size=0"],
     "moe.shared_ffn_hidden_size must be a positive integer or None (= model.ffn_hidden), got 0"),
    (["moe.shared_expert_gate=true"], "moe.num_shared_experts is 0 but moe.shared_ffn_hidden_size=None / "
     "moe.shared_expert_gate=True is set: shared experts need moe.num_shared_experts >= 1"),
    (["evo=evomoe", "moe.num_shared_experts=1"], "evo.enabled=true does not support shared experts "
     "(moe.num_shared_experts=1)"),
    (["moe.recompute=maybe"], "moe.recompute=maybe"),
    # parallel
    (["parallel.ep=3", "parallel.simulate_ranks=3"], "moe.num_experts (4) must be divisible by parallel.ep (3)"),
    (["parallel.ep=4"], "world size (2) must be divisible by parallel.ep (4)"),
    (["parallel.ep=0"], "parallel.ep must be > 0, got 0"),
    (["parallel.simulate_ranks=0"], "parallel.simulate_ranks must be > 0, got 0"),
    (["parallel.dispatcher=smoke"], "parallel.dispatcher='smoke' is not one of"),
    (["parallel.dispatcher=hierarchical_pad"], "hierarchical|hierarchical_padded|allgather"),
    (["parallel.mode=fast"], "parallel.mode='fast' is not one of auto|ep|sharded_dp"),
    (["parallel.overlap=3"], "parallel.overlap='3' is not one of auto|1|2|4|8"),
    (["parallel.timeout_s=0"], "parallel.timeout_s must be > 0, got 0.0"),
    (["parallel.static_capacity_factor=1.0"], "parallel.static_capacity_factor=1.0 needs parallel.dispatcher=padded"),
    (["parallel.dispatcher=padded", "parallel.static_capacity_factor=0"],
     "parallel.static_capacity_factor must be a finite number > 0 or null, got 0.0"),
    (["parallel.dispatcher=padded", "parallel.static_capacity_factor=1.0", "moe.router=dts"],
     "parallel.static_capacity_factor=1.0 needs a fixed number of experts per token"),
    (["parallel.dispatcher=padded", "parallel.static_capacity_factor=1.0", "parallel.overflow=later"],
     "parallel.overflow='later' is not one of drop|error|rerun"),
    (["parallel.overflow=error"], "parallel.overflow='error' applies to a static buffer only"),
    (["parallel.overflow=rerun"], "parallel.overflow='rerun' applies to a static buffer only: set "
                                  "parallel.static_capacity_factor too (with parallel.dispatcher=padded or "
                                  "hierarchical_padded)"),
    (["parallel.overflow=rerun", "parallel.static_capacity_factor=0.5"],
     "parallel.static_capacity_factor=0.5 needs parallel.dispatcher=padded"),
    (["parallel.overflow=rerun", "parallel.dispatcher=padded", "parallel.static_capacity_factor=0.5",
      "parallel.ep=1", "parallel.simulate_ranks=1"], "parallel.overflow='rerun' re-runs a step whose"),
    (["parallel.overflow=rerun", "parallel.dispatcher=padded", "parallel.static_capacity_factor=0.5",
      "trainer.engine=deepspeed"], "parallel.overflow='rerun' needs trainer.engine=plain or fsdp"),
    (["parallel.placement=always"], "parallel.placement='always' is not one of off|static|auto"),
    (["parallel.placement_interval=0"], "parallel.placement_interval must be an integer >= 1 (steps), got 0"),
    (["parallel.placement=auto", "parallel.ep=1", "parallel.simulate_ranks=1"],
     "parallel.placement='auto': parallel.ep=1 holds every expert on every rank"),
    (["parallel.placement=auto", "parallel.ep=8", "parallel.simulate_ranks=8"],
     "parallel.placement='auto': parallel.ep (8) > moe.num_experts (4) splits each expert over ranks"),
    (["parallel.placement=auto", "parallel.placement_replicas=4"],
     "parallel.placement_replicas (4) must be <= the experts a rank does not hold: moe.num_experts (4) - "
     "moe.num_experts / parallel.ep (2) = 2"),
    (["parallel.placement_replicas=1"], "parallel.placement_replicas=1 needs parallel.placement=auto"),
    (["parallel.dispatcher=padded", "parallel.static_capacity_factor=1.0", "parallel.placement=auto", "parallel.ep=8",
      "parallel.simulate_ranks=8"],  # a static buffer is placed too, but whole experts only
     "parallel.placement='auto': parallel.ep (8) > moe.num_experts (4) splits each expert over ranks"),
    (["parallel.placement=static", "trainer.engine=deepspeed"],
     "parallel.placement='static': trainer.engine='deepspeed': placement moves the experts' rows and AdamW "
     "moments of the plain and fsdp engines"),
    # data
    (["data.path={tmp}/missing.txt"], "data.path='{tmp}/missing.txt': no such file"),
    (["data.dtype=int8"], "data.dtype='int8' is not one of uint16|uint32"),
    (["data.vocab_size=100"], "data.path=null (the embedded corpus) is byte-level: data.vocab_size must be 256, got 100"),
    (["data.val_fraction=0"], "data.val_fraction must be in (0, 1), got 0.0"),
    (["data.path={tmp}/tok.bin", "data.vocab_size=200"], "data.path='{tmp}/tok.bin' holds token id 299 >= data.vocab_size (200)", LATE),
    # logging, evo
    (["logging.wandb_mode=loud"], "logging.wandb_mode='loud' is not one of offline|online|disabled"),
    (["evo=evomoe", "evo.spawn=bogus"], "evo.spawn='bogus' is not one of"),
    (["evo.tau_min=5"], "evo.tau_min (5.0) and evo.tau_max (2.0) must satisfy"),
    (["evo=evomoe", "model.moe_every=0"], "evo.enabled=true needs MoE layers, but model.moe_every=0"),
    # Hydra's own errors: unknown key, wrong type, syntax, unknown preset, a key added with '+'
    (["trainer.nonsense=1"], "Could not override 'trainer.nonsense': Key 'nonsense' not in 'TrainerConfig'"),
    (["trainer.steps=abc"], "Error merging override trainer.steps=abc: Value 'abc' of type 'str' could not be converted to Integer"),
    (["trainer.steps"], "Error parsing override 'trainer.steps'"),
    (["evo=nope"], "Could not find 'evo/nope' (available: act_dts, dts, evomoe, upcycle)"),
    (["+trainer.stpes=5"], "trainer.stpes is not a setting"),
    (["trainer.engine=fsdp", "parallel.ep=4", "parallel.simulate_ranks=4", "moe.num_experts=2"],
     "trainer.engine=fsdp with parallel.ep (4) > moe.num_experts (2)"),
    (["trainer.engine=fsdp", "trainer.fsdp_param_dtype=fp16"], "trainer.fsdp_param_dtype='fp16' is not one of"),
]
if CPU_ONLY:
    CASES += [
        (["parallel.backend=nccl"], "parallel.backend='nccl' needs CUDA GPUs"),
        (["moe.kernel_backend=triton"], "moe.kernel_backend='triton' needs a CUDA device"),
        (["moe.kernel_backend=triton_persistent"], "moe.kernel_backend='triton_persistent' needs a CUDA device"),
    ]
# through the real CLI (slow test): the ways an error is found that FAST_CLI does not already take
# through a real process (Hydra: unknown key, parse error, unknown group option, a '+' key; a
# group's setting; a path; the layout; a LATE check of the data). Every case in CASES also runs
# through moesys.train.main in process (test_catalogue_in_process), with the same checks.
CLI = [
    "trainer.nonsense=1", "trainer.steps", "evo=nope", "+trainer.stpes=5", "evo=evomoe evo.spawn=bogus",
    "trainer.out_dir={tmp}/a_file", "parallel.ep=3 parallel.simulate_ranks=3",
    "data.path={tmp}/tok.bin data.vocab_size=200",
]
# one of each kind for the fast tier's real-CLI calls
FAST_CLI = ["trainer.batch_size=0", "optim.lr=-1e-3", "moe.top_k=5", "trainer.steps=abc", "trainer.resume={tmp}/nowhere"]


def _case_id(case):
    return " ".join(case[0])


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """The files some cases name."""
    tmp = tmp_path_factory.mktemp("inputs")
    (np.arange(20000) % 300).astype(np.uint16).tofile(tmp / "tok.bin")
    (tmp / "ds.json").write_text("{}")
    (tmp / "a_file").write_text("not a directory")
    return str(tmp)


def _setup(case, inputs, root):
    """Fill the placeholders; a trainer.out_dir holding one file; where Hydra's run dir would go."""
    os.makedirs(root)
    out = os.path.join(root, "out")
    os.makedirs(out)
    with open(os.path.join(out, "keep.txt"), "w") as f:
        f.write("from an earlier run")
    overrides = [o.format(tmp=inputs) for o in case[0]]
    if not any(o.startswith("trainer.out_dir=") for o in overrides):
        overrides.append(f"trainer.out_dir={out}")
    args = ["preset=tiny", *overrides, f"hydra.run.dir={root}/hydra"]
    return args, case[1].format(tmp=inputs), out


def _snapshot(out):
    return sorted((n, os.stat(os.path.join(out, n)).st_mtime_ns, open(os.path.join(out, n)).read())
                  for n in os.listdir(out))


def _check(case, stdout, stderr, expected, out, before, root):
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, f"{_case_id(case)}: stderr is not one line:\n{stderr[-3000:]}"
    assert lines[0].startswith("moesys-train: error: "), lines[0]
    assert expected in lines[0], f"{_case_id(case)}: {lines[0]!r} lacks {expected!r}"
    assert "Traceback" not in stderr + stdout
    assert stdout.strip() == "", f"{_case_id(case)}: something ran:\n{stdout[-2000:]}"
    assert _snapshot(out) == before, f"{_case_id(case)}: trainer.out_dir changed"
    hydra_dir = os.path.join(root, "hydra")
    if len(case) > 2 and case[2] == LATE:  # Hydra made its run dir; only its own .hydra/ is in it
        assert sorted(os.listdir(hydra_dir)) == [".hydra"]
    else:
        assert not os.path.exists(hydra_dir), f"{_case_id(case)}: Hydra's run dir was created"


def _run_cli(case, inputs, root, forked):
    """The case through the installed `moesys-train` console script, a process of its own forked from
    the session's server (the `forked` fixture: the same exit code, output and files as the script
    started fresh, tests/packaging/test_readme_commands.py checks), or `python -m moesys.train`
    without the script."""
    args, expected, out = _setup(case, inputs, root)
    before = _snapshot(out)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "HYDRA_FULL_ERROR")}
    script = os.path.join(os.path.dirname(sys.executable), "moesys-train")
    if os.path.isfile(script):
        r = forked.run(script, args, os.getcwd(), env, timeout=300)
    else:
        r = subprocess.run([sys.executable, "-m", "moesys.train", *args], capture_output=True, text=True,
                           timeout=300, env=env)
    assert r.returncode == 2, f"{_case_id(case)}: exit {r.returncode}\n{r.stderr[-3000:]}"
    _check(case, r.stdout, r.stderr, expected, out, before, root)


def _run_many_cli(cases, inputs, tmp_path, forked):
    failed = []
    for i, case in enumerate(cases):
        try:
            _run_cli(case, inputs, str(tmp_path / f"case{i}"), forked)
        except AssertionError as e:
            failed.append(str(e))
    assert not failed, f"{len(failed)} of {len(cases)} cases failed:\n" + "\n".join(failed)


@pytest.mark.slow
@pytest.mark.timeout(900)  # 8 calls
def test_catalogue_through_the_cli(inputs, tmp_path, forked):
    cases = [c for c in CASES if _case_id(c) in CLI]
    assert len(cases) == len(CLI) >= 8 and not set(CLI) & set(FAST_CLI)
    _run_many_cli(cases, inputs, tmp_path, forked)


def test_representative_cases_through_the_cli(inputs, tmp_path, forked):
    cases = [c for c in CASES if _case_id(c) in FAST_CLI]
    assert len(cases) == len(FAST_CLI)
    _run_many_cli(cases, inputs, tmp_path, forked)


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_catalogue_in_process(case, inputs, tmp_path, monkeypatch, capsys):
    """The same cases through moesys.train.main in this process (argv patched)."""
    args, expected, out = _setup(case, inputs, str(tmp_path / "case"))
    before = _snapshot(out)
    monkeypatch.setattr(sys, "argv", ["moesys-train", *args])
    try:
        with pytest.raises(SystemExit) as e:
            train_mod.main()
    finally:
        GlobalHydra.instance().clear()  # a LATE case ran Hydra's app in this process
    assert e.value.code == 2
    cap = capsys.readouterr()
    _check(case, cap.out, cap.err, expected, out, before, str(tmp_path / "case"))


def test_debug_shows_the_traceback(inputs, tmp_path, monkeypatch, capsys):
    """trainer.debug=true: the traceback, then the same one line; still exit code 2."""
    for extra, expected in ((["trainer.batch_size=0"], "trainer.batch_size must be > 0, got 0"),
                            (["trainer.steps=abc"], "trainer.steps=abc")):
        monkeypatch.setattr(sys, "argv", ["moesys-train", "preset=tiny", *extra, "trainer.debug=true",
                                          f"hydra.run.dir={tmp_path}/hydra"])
        with pytest.raises(SystemExit) as e:
            train_mod.main()
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert "Traceback" in err
        assert err.strip().splitlines()[-1].startswith("moesys-train: error: ") and expected in err


def test_a_good_config_passes_the_checks(monkeypatch):
    cfg = train_mod.check_overrides(["preset=tiny", "trainer.steps=3", "optim.betas=[0.8,0.99]"])
    assert cfg.trainer.steps == 3 and cfg.optim.betas == [0.8, 0.99]


def test_placement_under_a_static_buffer_passes_the_checks():
    """Expert placement (and replicas) with the padded dispatchers' static buffer, every overflow policy."""
    for overflow in ("drop", "error", "rerun"):
        for dispatcher in ("padded", "hierarchical_padded"):
            cfg = train_mod.check_overrides([f"parallel.dispatcher={dispatcher}", "parallel.static_capacity_factor=1.0",
                                             f"parallel.overflow={overflow}", "parallel.placement=auto",
                                             "parallel.placement_replicas=1"])
            assert cfg.parallel.placement == "auto" and cfg.parallel.static_capacity_factor == 1.0


def test_warnings_name_settings_that_are_probably_not_meant():
    from train_helpers import make_cfg

    assert make_cfg("trainer.steps=40", "schedule.warmup_steps=10").warnings() == []
    (w,) = make_cfg("trainer.steps=4").warnings()  # preset=tiny warms up over 30 steps
    assert w.startswith("schedule.warmup_steps (30) > trainer.steps (4)")
    # groups not aligned with the EP ranks: a token can reach more than topk_groups ranks
    ok = ["trainer.steps=40", "schedule.warmup_steps=10", "moe.num_experts=12", "moe.topk_groups=1"]
    assert make_cfg(*ok, "moe.num_groups=4", "parallel.ep=2").warnings() == []  # 2 groups a rank
    assert make_cfg(*ok, "moe.num_groups=2", "parallel.ep=4").warnings() == []  # a group = 2 ranks (a node)
    (w,) = make_cfg(*ok, "moe.num_groups=3", "parallel.ep=2").warnings()
    assert w.startswith("moe.num_groups (3) and parallel.ep (2): groups are not aligned")
