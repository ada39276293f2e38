"""moesys-convert: import-hf and export-hf through the CLI entry point, against the original files and
transformers; bad input is one line, exit 2, nothing written."""
import json
import os

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

from moesys import convert, hf  # noqa: E402
from moesys import train as train_mod  # noqa: E402
from moesys.generate import load_model  # noqa: E402
from hf_models import VOCAB, build_hf, import_transformers  # noqa: E402
from test_hf import _tensors  # noqa: E402
from train_helpers import make_cfg, pool_run  # noqa: E402


def _run(capsys, *argv):
    with pytest.raises(SystemExit) as e:
        convert.main(list(argv))
    cap = capsys.readouterr()
    return e.value.code, cap.err


def test_import_then_export_through_a_checkpoint_is_bitwise(tmp_path, capsys):
    """HF dir -> import-hf -> a moesys checkpoint (DCP) -> export-hf -> the original tensors bit for bit;
    the checkpoint loads (moesys-generate's loader) to the logits of the HF model."""
    src = str(tmp_path / "hf")
    ref = build_hf("deepseek_v3", src, seed=4)
    convert.main(["import-hf", src, str(tmp_path / "ckpt")])
    model, cfg, _ = load_model(str(tmp_path / "ckpt"))
    assert cfg.model.arch == "decoder" and cfg.moe.routed_scaling_factor == 2.5 and cfg.data.vocab_size == VOCAB
    x = torch.randint(0, VOCAB, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(x)[0], ref(x).logits, rtol=1e-5, atol=1e-5)
    convert.main(["export-hf", str(tmp_path / "ckpt"), str(tmp_path / "out")])
    assert "moesys-convert: wrote" in capsys.readouterr().out
    orig, new = _tensors(src), _tensors(str(tmp_path / "out"))
    assert set(orig) == set(new) and all(torch.equal(orig[k], new[k]) for k in orig)


@pytest.mark.slow
@pytest.mark.multirank
@pytest.mark.parametrize("engine", ["plain", "deepspeed"])
def test_export_of_an_ep2_run_loads_in_transformers(rank_pool, tmp_path, engine):
    """A run trained at EP 2 on 2 gloo ranks (plain, or DeepSpeed ZeRO's checkpoint format) exports,
    resharded to one process by DCP, to a directory AutoModelForCausalLM loads to the checkpoint's logits."""
    run = str(tmp_path / "run")
    # DeepSpeed keeps process-wide state (its comm backend): its ranks are spawned, the plain ones pooled
    train = train_mod.run if engine == "deepspeed" else lambda c, o: pool_run(rank_pool, c, o)
    train(make_cfg("preset=qwen3_moe_tiny", "parallel.ep=2", "parallel.simulate_ranks=2", "trainer.steps=3",
                   f"trainer.engine={engine}"), run)
    convert.main(["export-hf", run, str(tmp_path / "out"), "--max-shard-bytes", "20000"])
    model, _, _ = load_model(run)
    auto = import_transformers().AutoModelForCausalLM.from_pretrained(str(tmp_path / "out")).float().eval()
    x = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(auto(x).logits, model(x)[0], rtol=1e-5, atol=1e-5)


def test_bad_input_is_one_line_exit_2_nothing_written(tmp_path, capsys):
    src = str(tmp_path / "hf")
    build_hf("mixtral", src)
    capsys.readouterr()  # transformers' save progress bar
    (tmp_path / "a_file").write_text("x")
    code, err = _run(capsys, "import-hf", src, str(tmp_path / "a_file" / "ckpt"))
    assert code == 2 and err.count("\n") == 1
    assert err.startswith("moesys-convert: error: ") and "a_file/ckpt: cannot write there" in err
    code, err = _run(capsys, "export-hf", str(tmp_path / "nowhere"), str(tmp_path / "out"))
    assert code == 2 and err.count("\n") == 1 and "nowhere" in err
    cfg = json.load(open(os.path.join(src, "config.json")))
    cfg["architectures"] = ["GPT2LMHeadModel"]
    json.dump(cfg, open(os.path.join(src, "config.json"), "w"))
    code, err = _run(capsys, "import-hf", src, str(tmp_path / "ckpt"))
    assert code == 2 and "architectures=['GPT2LMHeadModel'] is not supported" in err
    assert sorted(os.listdir(tmp_path)) == ["a_file", "hf"]  # no checkpoint, no export, no temporary dir
    with pytest.raises(hf.HFFormatError):
        hf.from_pretrained(src)


@pytest.mark.slow
def test_import_hf_checkpoint_resumes_and_evaluates(tmp_path):
    """import-hf's checkpoint: trainer.resume= continues from it (its AdamW state is a fresh one's) and
    moesys-eval scores it."""
    from moesys.configs.apps import EvalConfig
    from moesys.evaluate import evaluate_checkpoint

    src = str(tmp_path / "hf")
    build_hf("mixtral", src, vocab_size=256)  # byte-level: the embedded corpus fits
    convert.main(["import-hf", src, str(tmp_path / "ckpt")])
    res = evaluate_checkpoint(EvalConfig(checkpoint=str(tmp_path / "ckpt")))
    assert res["step"] == 0 and res["tokens"] > 0 and np.isfinite(res["val_loss"]) and res["byte_level"]
    cfg = make_cfg(f"model.init_from={src}", "model.n_heads=4", "model.ffn_hidden=256", "moe.num_experts=8",
                   f"trainer.resume={tmp_path / 'ckpt'}", "parallel.ep=1", "parallel.simulate_ranks=1",
                   "trainer.steps=2")
    cfg.apply_init_from()
    s = train_mod.run(cfg, str(tmp_path / "run"))
    assert s["steps"] == 2 and np.isfinite(s["train_loss_end"])


@pytest.mark.slow
@pytest.mark.multirank
def test_export_of_an_ep2_fsdp2_run_equals_the_export_resharded_to_ep1(rank_pool, tmp_path):
    """A run at EP 2 x FSDP2 (4 gloo ranks) exports to the same bytes as its checkpoint loaded at
    EP 1 (one process, every expert local), saved again and exported."""
    import dataclasses

    from moesys import checkpoint as ckpt_mod
    from moesys.trainer import structure_of

    run = str(tmp_path / "run")
    pool_run(rank_pool, make_cfg("preset=olmoe_tiny", "parallel.ep=2", "parallel.simulate_ranks=4",
                                 "trainer.engine=fsdp", "trainer.steps=2"), run)
    convert.main(["export-hf", run, str(tmp_path / "a")])
    model, cfg, _ = load_model(run)  # resharded to one process by DCP
    ep1 = ckpt_mod.save_checkpoint(str(tmp_path / "ep1"), 2, model=model, optimizer=None, trainer_state={"step": 2},
                                   structure=structure_of(cfg), config=dataclasses.asdict(cfg))
    convert.main(["export-hf", ep1, str(tmp_path / "b")])
    a, b = _tensors(str(tmp_path / "a")), _tensors(str(tmp_path / "b"))
    assert set(a) == set(b) and len(a) > 0
    for k in a:
        assert torch.equal(a[k], b[k]), k
