"""moesys-plan: the plan function, its memory model and the CLI's errors (single process; fast)."""
import itertools
import math
import os
import re
import shlex

import pytest

from moesys.planner import load_hardware, plan, presets, workload_from_config
from moesys.planner.cli import compose_train_config, main, run

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SMALL = ["model.n_layers=2", "model.d_model=256", "model.n_heads=4", "model.ffn_hidden=512", "model.seq_len=64",
         "moe.num_experts=8", "trainer.batch_size=64"]


def _fails(argv, capsys) -> str:
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err  # one line
    assert err.startswith("moesys-plan: error: "), err
    return err


def test_presets_ship_with_the_package():
    assert {"a100_dgx", "h100_dgx", "h200_dgx", "this"} <= set(presets())
    a100, h200 = load_hardware("a100_dgx", "bf16"), load_hardware("h200_dgx", "fp32")
    assert a100.gpus_per_node == 8 and a100.inter.bandwidth < a100.intra.bandwidth
    assert h200.memory_bytes > a100.memory_bytes and h200.gemm_flops < load_hardware("h200_dgx", "bf16").gemm_flops


def test_plan_prices_every_candidate_and_picks_what_fits():
    cfg = compose_train_config(SMALL + ["trainer.precision=bf16"])
    wl = workload_from_config(cfg)
    r = plan(wl, load_hardware("a100_dgx", "bf16"), world=16)
    assert [p.ep for p in r.plans] == [1, 2, 4, 8, 16]  # 16: each expert F-sharded over 2 ranks
    for p in r.plans:
        assert len(p.ranked) == 5 * 4 + 4  # ep x 5 dispatchers x 4 degrees + sharded_dp x 4
        assert p.runtime.mode == "sharded_dp" or p.runtime.dispatcher == "alltoallv"  # the config's dispatcher
        assert p.best.total <= p.runtime.total <= p.baseline.total
        assert p.speedup("best") >= 1 and p.step_best.total > 0
    assert r.recommended in r.plans and r.recommended.fits[r.recommended.best.mode]
    # pins: the runtime's choice respects parallel.mode / parallel.overlap
    pinned = workload_from_config(compose_train_config(SMALL + ["parallel.mode=sharded_dp", "parallel.overlap=2"]))
    p = plan(pinned, load_hardware("a100_dgx", "fp32"), world=16, eps=[8]).plans[0]
    assert p.runtime.key == ("sharded_dp", "-", 2)


def test_memory_model_by_hand():
    cfg = compose_train_config(SMALL)
    wl = workload_from_config(cfg)
    p = plan(wl, load_hardware("a100_dgx", "fp32"), world=8, eps=[8]).plans[0]
    m = p.memory["ep"]
    experts = 2 * 8 * 2 * 256 * 512 / 8  # 2 MoE layers of 8 experts (w1, w2), one expert per rank
    n = wl.dense_params + experts
    assert (m.params, m.grads, m.optimizer) == (4 * n, 4 * n, 8 * n)  # fp32 AdamW on the plain engine
    # sharded_dp keeps every layer's gathered experts for the backward
    gathered = 2 * 8 * 2 * 256 * 512 * 4
    assert p.memory["sharded_dp"].activations - gathered < p.memory["ep"].activations
    # ZeRO-2 splits optimizer state and gradients over the data-parallel ranks
    ds = workload_from_config(compose_train_config(SMALL + ["trainer.engine=deepspeed", "trainer.zero_stage=2"]))
    z = plan(ds, load_hardware("a100_dgx", "fp32"), world=8, eps=[8]).plans[0].memory["ep"]
    assert z.optimizer == pytest.approx(8 * (ds.dense_params / 8 + experts / 1))
    assert z.grads == pytest.approx(4 * (ds.dense_params / 8 + experts / 1))
    # FSDP2 shards weights, grads and moments over all 8 ranks (experts: ep=8 x edp=1 here, ep=4 x edp=2
    # below), plus one gathered block (its dense weights and local experts) at a time
    for ep in (8, 4):
        fs = workload_from_config(compose_train_config(SMALL + ["trainer.engine=fsdp", f"parallel.ep={ep}"]))
        f = plan(fs, load_hardware("a100_dgx", "fp32"), world=8, eps=[ep]).plans[0].memory["ep"]
        local = 2 * 8 * 2 * 256 * 512 / ep  # both layers' experts held after expert parallelism
        sharded = fs.dense_params / 8 + local / (8 // ep)
        assert f.optimizer == pytest.approx(8 * sharded) and f.grads == pytest.approx(4 * sharded)
        assert f.params == pytest.approx(4 * sharded + 4 * (fs.dense_params / fs.n_layers + local / 2))


def test_cli_prints_a_plan_and_a_plot(tmp_path):
    out = run(["--cluster", "h100_dgx", "--gpus", "32", "--tokens-per-gpu", "2048", "--plot",
               str(tmp_path / "s.png"), *SMALL])
    assert "EP=8 " in out and "runtime's choice" in out and re.search(r"recommended: parallel\.ep=\d+", out)
    assert (tmp_path / "s.png").stat().st_size > 1000


@pytest.mark.parametrize("argv, msg", [
    (["--ep", "3"], r"--ep 3: moe.num_experts \(8\) must be divisible by parallel.ep \(3\)"),
    (["--gpus", "8", "--ep", "16", "moe.num_experts=16"], r"world size \(8 GPUs\) must be divisible by parallel.ep \(16\)"),
    (["--cluster", "dgx9000"], r"--cluster='dgx9000' is not a preset \(a100_dgx, .*\) nor a YAML file"),
    (["moe.nope=1"], r"config: Could not override 'moe.nope': Key 'nope' not in 'MoESection'"),
    (["moe.top_k=abc"], r"config: Error merging override moe.top_k=abc: .*abc"),
    (["preset=nope"], r"config: In 'train': Could not find 'preset/nope' \(available: deepseek_v3_671b, "
                      r"deepseek_v3_tiny, gpu_small, mixtral_8x7b, .*, tiny\)"),
    (["--gpus", "8", "--tokens-per-gpu", "65536", "model.d_model=8192", "model.ffn_hidden=32768", "model.n_heads=64",
      "model.seq_len=2048", "moe.num_experts=64", "model.n_layers=8"], r"no layout fits in 80 GiB per GPU .*parallel.ep="),
    (["--skew", "0.5"], r"--skew must be >= 1"),
    (["--gpus", "many"], r"argument --gpus: invalid int value: .many."),
    (["--tokens-per-gpu", "100"], r"multiple of model.seq_len \(128\)"),
])
def test_cli_errors_name_the_field(argv, msg, capsys):
    err = _fails(argv, capsys)
    assert re.search(msg, err), err


def test_cluster_yaml_errors_name_the_field(tmp_path, capsys):
    bad = tmp_path / "c.yaml"
    bad.write_text("name: x\ngpus_per_node: 8\nmemory_gib: 80\nintra: {bandwidth_gb_s: 100, latency_us: 2}\n"
                   "inter: {bandwidth_gb_s: 10, latency_us: 5}\ngemm_tflops: {bf16: 100}\nnics: 8\n")
    assert "unknown field 'nics'" in _fails(["--cluster", str(bad)], capsys)
    bad.write_text(bad.read_text().replace("nics: 8\n", ""))
    assert "gemm_tflops needs a fp32 entry (trainer.precision=fp32)" in _fails(["--cluster", str(bad)], capsys)
    good = run(["--cluster", str(bad), "--gpus", "8", "trainer.precision=bf16", *SMALL])
    assert "moesys-plan: 8 x x" in good
    bad.write_text(bad.read_text() + "reduce_scatter_factor: 0\n")
    assert "reduce_scatter_factor must be > 0, got 0" in _fails(["--cluster", str(bad), "trainer.precision=bf16"], capsys)
    from moesys.planner.hardware import load_hardware

    bad.write_text(bad.read_text().replace("reduce_scatter_factor: 0", "reduce_scatter_factor: 2.5"))
    assert load_hardware(str(bad), "bf16").reduce_scatter_factor == 2.5


def test_cli_plans_a_saved_run_config(tmp_path):
    from omegaconf import OmegaConf

    saved = tmp_path / "config.yaml"
    OmegaConf.save(OmegaConf.structured(compose_train_config(SMALL + ["moe.num_experts=16"])), saved)
    out = run(["--cluster", "a100_dgx", "--gpus", "16", "--config", str(saved), "moe.top_k=1"])
    assert "E=16, experts per token 1," in out and "EP=16 " in out  # the file's E, the override's top-k


def readme_plan_commands() -> list:
    with open(os.path.join(ROOT, "README.md")) as f:
        text = f.read()
    blocks = re.findall(r"```bash\n(.*?)```", text, flags=re.S)
    return [line.split("#")[0].strip() for b in blocks for line in b.splitlines() if line.startswith("moesys-plan")]


@pytest.mark.slow  # the CLI's own tests above run in the fast set
def test_readme_plan_commands_run(tmp_path):
    cmds = readme_plan_commands()
    assert len(cmds) >= 3, cmds
    for cmd in cmds:
        argv = shlex.split(cmd)[1:]
        if "--plot" in argv:
            argv[argv.index("--plot") + 1] = str(tmp_path / "plot.png")
        out = run(argv)
        assert "recommended:" in out, (cmd, out[-500:])


def test_exposed_grad_sync_formula_by_hand():
    from moesys.planner.plan import exposed_grad_sync

    # hidden behind the backward but for the last bucket, which starts when the backward ends
    assert exposed_grad_sync(sync=0.3, backward=0.5, tail=0.02) == pytest.approx(0.02)
    # longer than the backward: what outlasts it shows
    assert exposed_grad_sync(sync=0.3, backward=0.1, tail=0.02) == pytest.approx(0.2)
    # one bucket (the tail is the whole reduction): nothing hides
    assert exposed_grad_sync(sync=0.3, backward=0.5, tail=0.3) == 0.3
    assert exposed_grad_sync(sync=0.3, backward=0.5, tail=1.0) == 0.3  # a tail never exceeds the reduction
    # a machine that hides half of what runs side by side (Hardware.overlap): 0.3 - 0.5 x 0.28
    assert exposed_grad_sync(sync=0.3, backward=0.5, tail=0.02, overlap=0.5) == pytest.approx(0.16)
    assert exposed_grad_sync(sync=0.3, backward=0.5, tail=0.02, overlap=0.0) == 0.3


def test_plan_step_prices_only_the_exposed_grad_sync_with_overlap():
    from moesys.planner.plan import exposed_grad_sync, grad_sync_seconds, last_bucket_seconds

    hw = load_hardware("a100_dgx", "bf16")
    base = SMALL + ["trainer.precision=bf16"]
    on = workload_from_config(compose_train_config(base))  # parallel.grad_overlap defaults to true
    off = workload_from_config(compose_train_config(base + ["parallel.grad_overlap=false"]))
    fsdp = workload_from_config(compose_train_config(base + ["trainer.engine=fsdp", "parallel.ep=8"]))
    assert on.grad_overlap and not off.grad_overlap and not fsdp.grad_overlap
    p_on, p_off = (plan(w, hw, world=64, eps=[8]).plans[0] for w in (on, off))
    full = grad_sync_seconds(on, 64, 8, hw)
    assert p_off.step_best.grad_sync == full == p_on.step_best.grad_sync_full
    dense = (p_on.step_best.dense / on.grad_accum)
    backward = 2 / 3 * (dense + on.n_moe_layers * (p_on.best.compute + p_on.best.local))
    want = exposed_grad_sync(full, backward, last_bucket_seconds(on, 64, 8, hw), hw.overlap)
    assert p_on.step_best.grad_sync == pytest.approx(want) and want < full
    assert p_on.step_best.total == pytest.approx(p_off.step_best.total - (full - want))
    # fsdp's reductions are priced whole
    p_fsdp = plan(fsdp, hw, world=64, eps=[8]).plans[0]
    assert p_fsdp.step_best.grad_sync == p_fsdp.step_best.grad_sync_full


def test_2d_dispatchers_win_at_2048_gpus():
    """Issue 26 part 5, Tutel's scaling setting (2 experts and 8,192 tokens per GPU, D = F = 2048,
    top-2, bf16, even routing) on 2,048 A100s: both 2-D dispatchers predicted >= 1.5x faster per
    layer than the static flat all-to-all-v (ep, c = 1). The `hierarchical` plan used to all-gather
    the [P, E] counts over a ring of P - 1 steps (19.6 ms of a 42.3 ms layer, docs/planning.md); its
    counts now take the 2-D exchange's two stages."""
    world = 2048
    cfg = compose_train_config(["model.d_model=2048", "model.ffn_hidden=2048", "moe.num_experts=4096", "moe.top_k=2",
                                "trainer.precision=bf16"])
    cfg.trainer.batch_size = 8192 * world // cfg.model.seq_len  # what --tokens-per-gpu 8192 sets
    wl = workload_from_config(cfg, skew=1.0)
    p = plan(wl, load_hardware("a100_dgx", "bf16"), world=world, eps=[world], degrees=(1,)).plans[0]
    by = {b.key: b for b in p.ranked}
    flat = p.baseline.total
    assert p.baseline.key == ("ep", "alltoallv", 1)
    for d in ("hierarchical", "hierarchical_padded"):
        assert flat / by[("ep", d, 1)].total >= 1.5, (d, flat, by[("ep", d, 1)].total)
    assert by[("ep", "hierarchical", 1)].plan < 1e-3  # the counts: 0.53 ms (a ring all-gather: 19.6 ms)
    assert p.best.dispatcher in ("hierarchical", "hierarchical_padded")


def _best_split(load, ranks):
    """The smallest busiest-rank load of any split of the experts into `ranks` equal groups (brute force)."""
    L = len(load) // ranks
    best = math.inf

    def deal(left, bins):
        nonlocal best
        if not left:
            best = min(best, max(bins))
            return
        first, rest = left[0], left[1:]
        for group in itertools.combinations(rest, L - 1):
            deal([e for e in rest if e not in group], bins + [load[first] + sum(load[e] for e in group)])
    deal(list(range(len(load))), [])
    return best


def test_cli_prints_the_placement_gain():
    """moesys-plan prints what parallel.placement=auto gains at the recommended layout for --skew: Zipf
    loads with the hottest expert --skew x the mean; the static row is the canonical layout's busiest
    rank, the permutation is within 10% of the best split (brute force), and with skew the (compute-bound)
    layer gets faster; a skew of 1 gains nothing."""
    argv = ["--cluster", "h100_dgx", "--gpus", "4", "--ep", "4", "--tokens-per-gpu", "65536", "moe.num_experts=8",
            "model.d_model=1024", "model.ffn_hidden=4096", "model.n_heads=8"]
    out = run([*argv, "--skew", "3"])
    m = re.search(r"placement \(parallel\.placement=auto\) at ep=4, loads Zipf\(([\d.]+)\) over the experts \(hottest 3x "
                  r"the mean\).*\n  static: busiest rank ([\d.]+)x the mean rows, ([\d.]+) ms; permuted: ([\d.]+)x, "
                  r"([\d.]+) ms \(([\d.]+)x\); \+ 1 replica slot a rank: ([\d.]+)x, ([\d.]+) ms \(([\d.]+)x\)", out)
    assert m, out
    a = float(m.group(1))
    w = [1 / (i + 1) ** a for i in range(8)]
    load = [x / sum(w) for x in w]
    assert load[0] * 8 == pytest.approx(3, rel=3e-3)  # the exponent fits --skew
    canonical = max(sum(load[r * 2:(r + 1) * 2]) for r in range(4)) * 4
    assert float(m.group(2)) == pytest.approx(canonical, abs=0.006)
    permuted = float(m.group(4))
    assert _best_split(load, 4) * 4 - 0.006 <= permuted <= 1.1 * _best_split(load, 4) * 4
    assert float(m.group(7)) < permuted  # a replica of the hottest expert splits its rows
    assert float(m.group(3)) > float(m.group(5)) > float(m.group(8))  # ms: static > permuted > + replica
    assert float(m.group(6)) > 1.05 and float(m.group(9)) > float(m.group(6))
    flat = run([*argv, "--skew", "1"])
    assert "static: busiest rank 1.00x" in flat and "(1.00x); + 1 replica" in flat, flat
