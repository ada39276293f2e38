"""moesys-train end to end: loss falls, EP=2 equals EP=1, CLI, hooks, options, bad input."""
import importlib.util
import json
import math
import os
import subprocess
import sys
import time

import numpy as np
import pytest
from hydra.errors import ConfigCompositionException

from moesys import train as train_mod
from moesys.errors import ConfigError, ConfigFileNotFoundError
from moesys.trainer import lr_at
from train_helpers import make_cfg, pool_run


def _records(out_dir):
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.mark.slow
@pytest.mark.multirank
def test_tiny_run_ep2_loss_falls_and_matches_ep1(rank_pool, tmp_path):
    ep2 = pool_run(rank_pool, make_cfg("parallel.ep=2", "parallel.simulate_ranks=2", "trainer.plots=true"),
                        str(tmp_path / "ep2"))
    assert ep2["steps"] == 20
    assert ep2["val_loss_end"] < ep2["val_loss_start"] - 0.5
    # the same global batches on one rank give the same curve (EP is a layout, not a model change)
    ep1 = train_mod.run(make_cfg("parallel.ep=1", "parallel.simulate_ranks=1"), str(tmp_path / "ep1"))
    np.testing.assert_allclose(ep2["train_losses"], ep1["train_losses"], rtol=1e-4, atol=1e-5)
    recs = _records(str(tmp_path / "ep2"))
    logged = [r for r in recs if "moe/block0/expert_load" in r]
    assert logged, "per-layer MoE metrics are logged"
    r = logged[-1]
    assert len(r["moe/block0/expert_load"]) == 4 and abs(sum(r["moe/block0/expert_load"]) - 1) < 1e-6
    for k in ("drop_rate", "aux_loss", "router_entropy"):
        assert f"moe/block1/{k}" in r
    assert any(k.startswith("moe/block0/runtime/") for k in r), "runtime decisions are logged"
    assert os.path.isfile(tmp_path / "ep2" / "expert_load.png") and os.path.isfile(tmp_path / "ep2" / "loss.png")
    assert os.path.isdir(tmp_path / "ep2" / "checkpoints")


def test_bf16_autocast_runs(tmp_path, monkeypatch):
    from moesys.kernels import cpu_blas

    # as in a fresh process: the CPU GEMM batch's one-time check has not run before this run's
    # autocast (issue 15: it then raised "Float did not match BFloat16")
    monkeypatch.setattr(cpu_blas, "_checked", None)
    s = train_mod.run(make_cfg("parallel.ep=1", "parallel.simulate_ranks=1", "trainer.steps=4", "moe.activation=swiglu",
                               "trainer.precision=bf16", "trainer.save_final=false"), str(tmp_path / "o"))
    assert s["steps"] == 4 and math.isfinite(s["train_loss_end"])
    assert s["train_losses"][-1] < s["train_losses"][0]


def test_readme_bf16_command_on_cpu(tmp_path, monkeypatch):
    """The README's `moesys-train trainer.precision=bf16 trainer.grad_accum=4 trainer.clip=1.0`,
    at the tiny preset's sizes, in a process whose CPU GEMM batch is not yet checked (issue 15)."""
    from moesys.kernels import cpu_blas

    monkeypatch.setattr(cpu_blas, "_checked", None)
    s = train_mod.run(make_cfg("trainer.precision=bf16", "trainer.grad_accum=4", "trainer.clip=1.0",
                               "trainer.steps=3", "trainer.save_final=false"), str(tmp_path / "o"))
    assert s["steps"] == 3 and all(math.isfinite(v) for v in s["train_losses"])


def test_issue15_moe_options_through_hydra(tmp_path):
    cfg = make_cfg("parallel.ep=1", "parallel.simulate_ranks=1", "trainer.steps=2", "trainer.save_final=false",
                   "moe.aux_loss=gshard", "moe.drop_policy=bpr", "moe.renormalize_after_drop=true",
                   "moe.capacity_factor=1.1", "moe.normalize_topk=null")
    moe = cfg.moe_config()
    assert (moe.aux_loss, moe.drop_policy, moe.renormalize_after_drop, moe.normalize_topk) == ("gshard", "bpr", True, None)
    assert moe.renormalize_topk and moe.capacity(400) == 220  # K=2: ceil(1.1 * 2 * 400 / 4), exactly
    s = train_mod.run(cfg, str(tmp_path / "o"))
    assert s["steps"] == 2 and all(math.isfinite(v) for v in s["train_losses"])
    assert make_cfg("moe.top_k=1").moe_config().renormalize_topk is False  # K=1 keeps p_max by default


def test_cpu_buffer_cache_on_and_off_train_alike(tmp_path, monkeypatch):
    from moesys.kernels import workspace

    monkeypatch.setattr(workspace, "MIN_BYTES", 0)  # the tiny model's buffers go through the cache too
    common = ("parallel.ep=1", "parallel.simulate_ranks=1", "trainer.steps=6", "trainer.save_final=false",
              "trainer.grad_accum=2", "moe.activation=swiglu", "trainer.log_interval=1")
    on = train_mod.run(make_cfg(*common), str(tmp_path / "on"))
    assert workspace.stats()["hits"] > 0
    off = train_mod.run(make_cfg(*common, "trainer.cpu_buffer_cache=false"), str(tmp_path / "off"))
    assert workspace.enabled()  # run() restores the process's setting
    np.testing.assert_allclose(on["train_losses"], off["train_losses"], rtol=1e-5, atol=1e-6)
    keep = train_mod.run(make_cfg(*common, "trainer.cpu_buffer_cache_keep_scratch=true"), str(tmp_path / "keep"))
    assert not workspace.keep_scratch()  # restored too
    np.testing.assert_allclose(keep["train_losses"], on["train_losses"], rtol=1e-5, atol=1e-6)
    from moesys.kernels import cpu_blas

    switched = []
    set_batch = cpu_blas.set_enabled
    monkeypatch.setattr(cpu_blas, "set_enabled", lambda flag: (switched.append(flag), set_batch(flag)))
    loop = train_mod.run(make_cfg(*common, "trainer.cpu_gemm_batch=false"), str(tmp_path / "loop"))
    assert switched == [False, True] and cpu_blas.enabled()  # off for the run, then restored
    np.testing.assert_allclose(loop["train_losses"], on["train_losses"], rtol=1e-5, atol=1e-6)
    logged = [r for r in _records(str(tmp_path / "on")) if "mem/cpu_buffer_cache_mb" in r]
    assert logged and all(r["mem/cpu_buffer_cache_mb"] > 0 for r in logged)
    assert not any("mem/cpu_buffer_cache_mb" in r for r in _records(str(tmp_path / "off")))
    workspace.release()


def test_options_accum_clip_textfile(tmp_path):
    text = tmp_path / "corpus.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 200)
    s = train_mod.run(make_cfg("parallel.ep=1", "parallel.simulate_ranks=1", "trainer.steps=4",
                               "trainer.grad_accum=2", "trainer.clip=0.5",
                               "trainer.save_final=false", "moe.z_loss_coef=1e-3", "moe.activation=swiglu",
                               "model.moe_every=2", f"data.path={text}"), str(tmp_path / "o"))
    assert s["steps"] == 4 and math.isfinite(s["train_loss_end"])
    assert not os.path.exists(tmp_path / "o" / "checkpoints")


def test_token_bin_data(tmp_path):
    p = tmp_path / "tok.bin"
    (np.arange(20000) % 300).astype(np.uint16).tofile(p)
    s = train_mod.run(make_cfg("parallel.ep=1", "parallel.simulate_ranks=1", "trainer.steps=2", "trainer.save_final=false",
                               f"data.path={p}", "data.vocab_size=300"), str(tmp_path / "o"))
    assert s["steps"] == 2


class _Recorder:
    def __init__(self):
        self.events = []

    def on_train_start(self, trainer):
        self.events.append(("start", trainer.step))

    def on_step_start(self, step):
        self.events.append(("step", step))

    def after_optimizer_step(self, step):
        self.events.append(("opt", step))


def test_step_hooks_are_called_in_order(tmp_path):
    rec = _Recorder()
    train_mod.run(make_cfg("parallel.ep=1", "parallel.simulate_ranks=1", "trainer.steps=2", "trainer.save_final=false"),
                  str(tmp_path), callbacks_fn=lambda cfg: [rec])
    assert rec.events == [("start", 0), ("step", 0), ("opt", 0), ("step", 1), ("opt", 1)]


def test_lr_schedule_warmup_then_cosine():
    kw = dict(lr=1.0, warmup=10, total=110, min_ratio=0.1)
    assert lr_at(0, **kw) == pytest.approx(0.1) and lr_at(9, **kw) == pytest.approx(1.0)
    assert lr_at(60, **kw) == pytest.approx(0.55) and lr_at(110, **kw) == pytest.approx(0.1)


# ---- bad input: clear errors before any collective -----------------------------------------------
def test_unknown_override_is_hydras_error():
    with pytest.raises(ConfigCompositionException, match="model.bogus"):
        make_cfg("model.bogus=1")
    with pytest.raises(ConfigCompositionException):
        make_cfg("trainer.steps=many")  # typed: not an int


@pytest.mark.parametrize("overrides, err, match", [
    (["parallel.ep=3", "parallel.simulate_ranks=3"], ConfigError, r"moe.num_experts \(4\) must be divisible by parallel.ep \(3\)"),
    (["parallel.ep=4", "parallel.simulate_ranks=2"], ConfigError, r"world size \(2\) must be divisible by parallel.ep \(4\)"),
    (["parallel.ep=6", "parallel.simulate_ranks=6"], ConfigError, r"parallel.ep \(6\) > moe.num_experts \(4\) needs"),
    (["parallel.ep=8", "parallel.simulate_ranks=8", "model.ffn_hidden=63"], ConfigError,
     r"model.ffn_hidden \(63\) must be divisible by parallel.ep / moe.num_experts \(2\)"),
    (["data.path=/nonexistent/corpus.txt"], ConfigFileNotFoundError, "/nonexistent/corpus.txt"),
    (["moe.router=expert_choice"], ConfigError, "allow_noncausal"),
    (["trainer.batch_size=7"], ConfigError, r"trainer.batch_size \(7\) must be divisible"),
    (["parallel.dispatcher=smoke"], ConfigError, "parallel.dispatcher='smoke'"),
    (["moe.aux_loss=tutel"], ConfigError, r"moe.aux_loss='tutel' is not one of"),
    (["moe.drop_policy=tutel"], ConfigError, r"moe.drop_policy='tutel' is not one of"),
    (["moe.top_k=1", "moe.renormalize_after_drop=true"], ConfigError, r"moe.renormalize_after_drop=True .* top_k=1"),
    (["moe.capacity_factor=inf"], ConfigError, r"moe.capacity_factor must be a finite number, got inf"),
])
def test_bad_config_fails_in_the_parent_before_spawning(tmp_path, overrides, err, match):
    cfg = make_cfg(*overrides)
    with pytest.raises(err, match=match):
        train_mod.run(cfg, str(tmp_path / "o"))
    assert not os.path.exists(tmp_path / "o")  # nothing written


def test_torchrun_rank_fails_before_any_collective(tmp_path, monkeypatch):
    """A rank of a 2-rank world whose peer never comes: the bad config must raise at once, not wait
    in init_process_group / the first collective."""
    for k, v in {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                 "MASTER_PORT": "29587"}.items():
        monkeypatch.setenv(k, v)
    cfg = make_cfg("parallel.ep=2", "moe.num_experts=5", "parallel.timeout_s=600")
    t0 = time.time()
    with pytest.raises(ConfigError, match=r"moe.num_experts \(5\) must be divisible by parallel.ep \(2\)"):
        train_mod.run(cfg, str(tmp_path / "o"))
    assert time.time() - t0 < 10


@pytest.mark.slow
def test_cli_entry_point(tmp_path, forked):
    """The console script: a short run through Hydra, then an unknown override (a process of its own,
    forked from the session's server: the `forked` fixture; `python -m moesys.train` without the script)."""
    out = tmp_path / "cli"
    env = {**os.environ, "WANDB_MODE": "offline"}
    script = os.path.join(os.path.dirname(sys.executable), "moesys-train")

    def cli(args, env, timeout):
        if os.path.isfile(script):
            return forked.run(script, args, os.getcwd(), env, timeout=timeout)
        return subprocess.run([sys.executable, "-m", "moesys.train", *args], capture_output=True, text=True,
                              timeout=timeout, env=env)

    r = cli(["preset=tiny", "trainer.steps=4", "trainer.eval_interval=2", f"trainer.out_dir={out}",
             "logging.wandb_mode=offline", f"hydra.run.dir={tmp_path}/hydra"], env, 240)
    assert r.returncode == 0, r.stderr[-3000:]
    end = [x for x in _records(str(out)) if x.get("event") == "end"][0]
    assert end["steps"] == 4 and end["val_loss_end"] < end["val_loss_start"]
    assert os.path.isdir(out / "wandb")  # offline W&B run written locally, no network
    bad = cli(["trainer.nonsense=1", f"hydra.run.dir={tmp_path}/h2"], dict(os.environ), 120)
    assert bad.returncode == 2 and bad.stdout == ""
    assert bad.stderr.splitlines() == ["moesys-train: error: Could not override 'trainer.nonsense': "
                                       "Key 'nonsense' not in 'TrainerConfig'"]
    assert not os.path.exists(tmp_path / "h2")  # refused before Hydra made its run dir


@pytest.mark.slow
@pytest.mark.parametrize("stage", [1, 2])
def test_deepspeed_engine_matches_plain(tmp_path, stage):
    """trainer.engine=deepspeed (ZeRO-1/2 from configs/deepspeed/zero{1,2}.json) follows the plain engine's curve,
    with gradient accumulation and an active clip (a wrong loss scale would show in the clipped step)."""
    pytest.importorskip("deepspeed")
    ds_json = os.path.join(os.path.dirname(__file__), "..", "..", "configs", "deepspeed", f"zero{stage}.json")
    common = ["parallel.ep=1", "parallel.simulate_ranks=1", "trainer.steps=4", "trainer.save_final=false",
              "trainer.grad_accum=2", "trainer.clip=0.05"]
    plain = train_mod.run(make_cfg(*common), str(tmp_path / "plain"))
    ds = train_mod.run(make_cfg(*common, "trainer.engine=deepspeed", f"trainer.zero_stage={stage}",
                                f"trainer.ds_config={ds_json}"), str(tmp_path / "ds"))
    np.testing.assert_allclose(ds["train_losses"], plain["train_losses"], rtol=1e-5, atol=1e-6)


@pytest.mark.slow
@pytest.mark.multirank
def test_groups_and_global_batch_ep2_match_one_rank_and_resume(rank_pool, tmp_path):
    """moe.num_groups / moe.topk_groups / moe.aux_loss=global_batch through moesys-train: 2 ranks
    (EP=2, groups aligned to the ranks) report the aux loss of one rank holding the whole batch and
    train alike, on the plain and the DeepSpeed engine; a resume from a mid-run checkpoint reproduces
    the run (no new state)."""
    common = ["moe.num_groups=2", "moe.topk_groups=1", "moe.aux_loss=global_batch", "moe.aux_loss_coef=0.1",
              "trainer.steps=4", "trainer.log_interval=1", "trainer.eval_interval=4"]
    ep2 = pool_run(rank_pool, make_cfg(*common, "parallel.ep=2", "parallel.simulate_ranks=2", "trainer.ckpt_interval=2",
                                 "trainer.keep_checkpoints=3"), str(tmp_path / "ep2"))
    ep1 = train_mod.run(make_cfg(*common, "parallel.ep=1", "parallel.simulate_ranks=1", "trainer.save_final=false"),
                        str(tmp_path / "ep1"))
    aux2 = [r["aux_loss"] for r in _records(str(tmp_path / "ep2")) if "aux_loss" in r]
    aux1 = [r["aux_loss"] for r in _records(str(tmp_path / "ep1")) if "aux_loss" in r]
    assert len(aux2) == len(aux1) == 4
    # the mean of the ranks' global-batch losses is the loss over the whole batch (a per-rank switch
    # loss would differ here: each rank's counts alone)
    np.testing.assert_allclose(aux2, aux1, rtol=1e-5)
    np.testing.assert_allclose(ep2["train_losses"], ep1["train_losses"], rtol=1e-5)
    if importlib.util.find_spec("deepspeed") is not None:  # the DeepSpeed engine (ZeRO-1) trains alike
        ds_json = os.path.join(os.path.dirname(__file__), "..", "..", "configs", "deepspeed", "zero1.json")
        ds = train_mod.run(make_cfg(*common, "parallel.ep=2", "parallel.simulate_ranks=2", "trainer.engine=deepspeed",
                                    "trainer.zero_stage=1", f"trainer.ds_config={ds_json}", "trainer.save_final=false"),
                           str(tmp_path / "ds"))
        np.testing.assert_allclose(ds["train_losses"], ep2["train_losses"], rtol=1e-5, atol=1e-6)
    half = str(tmp_path / "ep2" / "checkpoints" / "step_00000002")
    resumed = pool_run(rank_pool, make_cfg(*common, "parallel.ep=2", "parallel.simulate_ranks=2", f"trainer.resume={half}",
                                     "trainer.save_final=false"), str(tmp_path / "resumed"))
    assert resumed["train_losses"] == ep2["train_losses"]


def test_grouped_mm_backend_trains_like_the_torch_backend(tmp_path):
    """`moesys-train moe.kernel_backend=grouped_mm` at one rank: the sync-free layer path gives the
    torch backend's loss curve (same model, same batches)."""
    common = ("parallel.ep=1", "parallel.simulate_ranks=1", "trainer.steps=3", "trainer.save_final=false")
    gm = train_mod.run(make_cfg(*common, "moe.kernel_backend=grouped_mm"), str(tmp_path / "gm"))
    ref = train_mod.run(make_cfg(*common, "moe.kernel_backend=torch"), str(tmp_path / "ref"))
    assert gm["steps"] == 3
    np.testing.assert_allclose(gm["train_losses"], ref["train_losses"], rtol=1e-5, atol=1e-6)


@pytest.mark.slow
@pytest.mark.multirank
def test_grouped_mm_backend_under_expert_parallelism_matches_ep1(rank_pool, tmp_path):
    """The README's `moesys-train moe.kernel_backend=grouped_mm` (2 ranks, EP=2): the runner keeps the
    host plan (all-to-all-v needs host splits) and runs its local experts on torch._grouped_mm; its
    curve equals the single-rank sync-free run's."""
    ep2 = pool_run(rank_pool, make_cfg("moe.kernel_backend=grouped_mm", "parallel.ep=2", "parallel.simulate_ranks=2",
                                 "trainer.steps=3", "trainer.save_final=false"),
                        str(tmp_path / "ep2"))
    ep1 = train_mod.run(make_cfg("moe.kernel_backend=grouped_mm", "parallel.ep=1", "parallel.simulate_ranks=1",
                                 "trainer.steps=3", "trainer.save_final=false"), str(tmp_path / "ep1"))
    np.testing.assert_allclose(ep2["train_losses"], ep1["train_losses"], rtol=1e-4, atol=1e-5)


@pytest.mark.multirank
def test_static_capacity_padded_dispatch_through_the_trainer(rank_pool, tmp_path):
    """`moesys-train parallel.dispatcher=padded parallel.static_capacity_factor=F` at 2 ranks, EP=2,
    the runtime in auto mode: an ample buffer (nothing overflows) trains exactly like one rank; a
    small one drops rows and the trainer logs how many (runtime/overflow_dropped, the total over ranks)."""
    common = ("trainer.steps=3", "trainer.save_final=false", "trainer.log_interval=1", "trainer.eval_interval=3")
    ep2 = ("parallel.ep=2", "parallel.simulate_ranks=2", "parallel.dispatcher=padded")
    ample = pool_run(rank_pool, make_cfg(*common, *ep2, "parallel.static_capacity_factor=8.0"), str(tmp_path / "ample"))
    ep1 = train_mod.run(make_cfg(*common, "parallel.ep=1", "parallel.simulate_ranks=1"), str(tmp_path / "ep1"))
    assert ample["steps"] == 3
    np.testing.assert_allclose(ample["train_losses"], ep1["train_losses"], rtol=1e-4, atol=1e-5)
    logged = [r for r in _records(str(tmp_path / "ample")) if "moe/block0/runtime/overflow_dropped" in r]
    assert logged and all(r["moe/block0/runtime/overflow_dropped"] == 0 for r in logged)
    small = pool_run(rank_pool, make_cfg(*common, *ep2, "parallel.static_capacity_factor=0.3"), str(tmp_path / "small"))
    assert small["steps"] == 3 and all(math.isfinite(v) for v in small["train_losses"])
    dropped = [r["moe/block0/runtime/overflow_dropped"] for r in _records(str(tmp_path / "small"))
               if "moe/block0/runtime/overflow_dropped" in r]
    assert dropped and all(d > 0 and d == int(d) for d in dropped)  # a count summed over the ranks
