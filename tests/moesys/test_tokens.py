"""data.tokenizer: text through a `tokenizers` BPE (trained here on the embedded corpus) into a cached
token file, made once and atomically; moesys-train trains on it and moesys-generate encodes and
decodes with it."""
import os

import numpy as np
import pytest

pytest.importorskip("tokenizers")

from moesys import tokens  # noqa: E402
from moesys import train as train_mod  # noqa: E402
from moesys.configs.apps import GenerateConfig  # noqa: E402
from moesys.data import embedded_corpus  # noqa: E402
from moesys.errors import ConfigError, ConfigFileNotFoundError  # noqa: E402
from moesys.generate import run as generate_run  # noqa: E402
from train_helpers import make_cfg  # noqa: E402

VOCAB = 300


@pytest.fixture(scope="module")
def bpe(tmp_path_factory):
    """A byte-level BPE of VOCAB ids trained on the embedded corpus; the tokenizer.json's directory."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator([embedded_corpus().decode("utf-8")], trainer=trainer)
    d = tmp_path_factory.mktemp("tok")
    tok.save(str(d / "tokenizer.json"))
    return str(d), tok


def test_cache_holds_the_tokenizers_ids_and_is_made_once(bpe, tmp_path):
    d, tok = bpe
    path, dtype = tokens.token_source(None, d, str(tmp_path / "cache"), use_tqdm=False)
    assert dtype == "uint16" and tokens.dtype_for(70000) == "uint32"
    got = np.fromfile(path, dtype=np.uint16)
    want = tok.encode(embedded_corpus().decode("utf-8"), add_special_tokens=False).ids
    np.testing.assert_array_equal(got, want)
    assert len(got) < 0.8 * len(embedded_corpus())  # BPE merges, not bytes
    mtime = os.stat(path).st_mtime_ns
    assert tokens.token_source(None, os.path.join(d, "tokenizer.json"), str(tmp_path / "cache"))[0] == path
    assert os.stat(path).st_mtime_ns == mtime and os.listdir(tmp_path / "cache") == [os.path.basename(path)]
    folder = tmp_path / "texts"
    folder.mkdir()
    (folder / "b.txt").write_text("second file\n")
    (folder / "a.txt").write_text("first file\n")
    p2, _ = tokens.token_source(str(folder), d, str(tmp_path / "cache"), use_tqdm=False)
    want2 = tok.encode("first file\n").ids + tok.encode("second file\n").ids  # files in name order
    np.testing.assert_array_equal(np.fromfile(p2, dtype=np.uint16), want2)


def test_bad_tokenizer_input_named(bpe, tmp_path):
    d, _ = bpe
    with pytest.raises(ConfigFileNotFoundError, match="data.tokenizer='/nowhere': no such file"):
        tokens.token_source(None, "/nowhere", str(tmp_path))
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ConfigError, match="bad.json is not a readable tokenizer"):
        tokens.token_source(None, str(tmp_path / "bad.json"), str(tmp_path))
    with pytest.raises(ConfigError, match=r"data.vocab_size \(256\) < the vocabulary of data.tokenizer=.* \(300\)"):
        make_cfg(f"data.tokenizer={d}").validate(world_size=2)


def test_train_and_generate_with_the_tokenizer(bpe, tmp_path):
    d, tok = bpe
    cfg = make_cfg(f"data.tokenizer={d}", f"data.vocab_size={VOCAB}", f"data.cache_dir={tmp_path / 'cache'}",
                   "parallel.ep=1", "parallel.simulate_ranks=1", "trainer.steps=6")
    s = train_mod.run(cfg, str(tmp_path / "run"))
    assert s["steps"] == 6 and s["train_losses"][-1] < s["train_losses"][0]
    res = generate_run(GenerateConfig(checkpoint=str(tmp_path / "run"), prompt="The ", max_new_tokens=5,
                                      temperature=0))
    assert res["prompt_tokens"] == tok.encode("The ").ids and len(res["tokens"]) == 5
    assert res["text"] == tok.decode(res["tokens"]) and res["prompt"] == "The "


@pytest.mark.slow
def test_init_from_uses_the_models_own_tokenizer_and_export_carries_it(bpe, tmp_path):
    """An HF directory with a tokenizer.json: model.init_from picks it up as data.tokenizer; export-hf of
    the run writes it beside the weights."""
    pytest.importorskip("transformers")
    import shutil

    from hf_models import build_hf

    from moesys import convert

    d, _ = bpe
    hf_dir = str(tmp_path / "hf")
    build_hf("olmoe", hf_dir, vocab_size=VOCAB)
    shutil.copyfile(os.path.join(d, "tokenizer.json"), os.path.join(hf_dir, "tokenizer.json"))
    cfg = make_cfg(f"model.init_from={hf_dir}", "model.n_layers=4", "model.d_model=128", "model.n_heads=4",
                   "model.ffn_hidden=256", "moe.num_experts=8", f"data.cache_dir={tmp_path / 'cache'}",
                   "parallel.ep=1", "parallel.simulate_ranks=1", "trainer.steps=2")
    cfg.apply_init_from()
    assert cfg.data.tokenizer == hf_dir and cfg.data.vocab_size == VOCAB
    train_mod.run(cfg, str(tmp_path / "run"))
    convert.main(["export-hf", str(tmp_path / "run"), str(tmp_path / "out")])
    assert open(tmp_path / "out" / "tokenizer.json").read() == open(os.path.join(d, "tokenizer.json")).read()
