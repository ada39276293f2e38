"""Data sources, the fixed split, and deterministic per-step batches."""
import numpy as np
import pytest
import torch

from moesys import data


def test_embedded_corpus_is_deterministic_bytes():
    a, b = data.load_tokens(None), data.load_tokens(None)
    assert a.dtype == np.uint8 and len(a) > 400_000
    assert np.array_equal(a, b)


def test_text_file_and_split(tmp_path):
    p = tmp_path / "t.txt"
    p.write_text("abcdefghij" * 100)
    toks = data.load_tokens(str(p))
    assert toks[0] == ord("a") and len(toks) == 1000
    train, val = data.train_val_split(toks, 0.1, seq_len=8)
    assert len(val) == 100 and len(train) == 900
    assert np.array_equal(val.tokens, toks[900:])  # the last fraction is validation


def test_bin_memmap(tmp_path):
    p = tmp_path / "x.bin"
    arr = (np.arange(5000) % 1000).astype(np.uint16)
    arr.tofile(p)
    toks = data.load_tokens(str(p), "uint16", vocab_size=1000)
    assert np.array_equal(np.asarray(toks), arr)
    with pytest.raises(ValueError, match="token id 999 >= data.vocab_size"):
        data.load_tokens(str(p), "uint16", vocab_size=500)
    (tmp_path / "odd.bin").write_bytes(b"\x00\x01\x02")
    with pytest.raises(ValueError, match="not a non-empty multiple of uint16"):
        data.load_tokens(str(tmp_path / "odd.bin"), "uint16")


def test_missing_file_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        data.load_tokens(str(tmp_path / "nope.txt"))


def test_split_too_short_for_seq_len():
    with pytest.raises(ValueError, match="model.seq_len"):
        data.train_val_split(np.zeros(100, np.uint8), 0.1, seq_len=64)


def test_split_boundary_is_what_the_batches_need():
    """Validation needs one window of seq_len + 1 tokens; training one more (TrainBatches draws the
    starts from [0, len - seq_len - 1)). A split the check passes must give a batch."""
    S = 8
    with pytest.raises(data.ConfigError, match=r"model.seq_len=8 does not fit the data: the train split has 9 tokens"):
        data.train_val_split(np.zeros(18, np.uint8), 0.5, seq_len=S)
    with pytest.raises(data.ConfigError, match=r"the validation split has 8 tokens and needs at least 9"):
        data.train_val_split(np.zeros(20, np.uint8), 0.4, seq_len=S)
    train, val = data.train_val_split(np.arange(19, dtype=np.uint8), 9 / 19, seq_len=S)
    assert (len(train), len(val)) == (S + 2, S + 1)
    x, y = next(data.TrainBatches(train, seq_len=S, global_batch=2, grad_accum=1, dp_rank=0, dp_size=1,
                                  seed=0).step_batches(0))
    assert x.shape == (2, S) and torch.equal(x[:, 1:], y[:, :-1])
    (xv, _), = data.eval_batches(val, seq_len=S, batch_size=2, n_batches=1, dp_rank=0, dp_size=1)
    assert xv.shape == (2, S)


def test_count_tokens_reads_sizes_only(tmp_path):
    p = tmp_path / "x.bin"
    np.arange(300, dtype=np.uint32).tofile(p)
    assert data.count_tokens(str(p), "uint32") == 300 and data.count_tokens(str(p), "uint16") == 600
    assert data.count_tokens(None) == len(data.load_tokens(None))
    with pytest.raises(FileNotFoundError, match="nope.bin"):
        data.count_tokens(str(tmp_path / "nope.bin"))


def test_batches_are_a_function_of_step_and_shard_the_global_batch():
    toks = data.load_tokens(None)
    split, _ = data.train_val_split(toks, 0.1, seq_len=16)
    full = data.TrainBatches(split, seq_len=16, global_batch=8, grad_accum=2, dp_rank=0, dp_size=1, seed=3)
    halves = [data.TrainBatches(split, seq_len=16, global_batch=8, grad_accum=2, dp_rank=r, dp_size=2, seed=3)
              for r in range(2)]
    for step in (0, 5):
        micro_full = list(full.step_batches(step))
        assert len(micro_full) == 2 and micro_full[0][0].shape == (4, 16)
        for m in range(2):
            x_full, y_full = micro_full[m]
            x_parts = torch.cat([list(h.step_batches(step))[m][0] for h in halves])
            assert torch.equal(x_full, x_parts)  # dp ranks see slices of the same global batch
            assert torch.equal(x_full[:, 1:], y_full[:, :-1])  # y is x shifted by one
    a = list(full.step_batches(0))[0][0]
    b = list(full.step_batches(1))[0][0]
    assert not torch.equal(a, b)


def test_eval_batches_cover_the_same_windows_at_any_dp():
    toks = data.load_tokens(None)
    _, val = data.train_val_split(toks, 0.1, seq_len=16)
    one = torch.cat([x for x, _ in data.eval_batches(val, seq_len=16, batch_size=4, n_batches=3, dp_rank=0, dp_size=1)])
    parts = [torch.cat([x for x, _ in data.eval_batches(val, seq_len=16, batch_size=4, n_batches=3, dp_rank=r, dp_size=4)])
             for r in range(4)]
    assert one.shape == (12, 16)
    assert sorted(map(tuple, one.tolist())) == sorted(map(tuple, torch.cat(parts).tolist()))


def test_unused_ids_counts_every_id_that_never_occurs():
    tokens = np.array([0, 3, 3, 9, 0], dtype=np.uint16)
    assert data.unused_ids(tokens, 10) == 7  # only 0, 3 and 9 occur
    assert data.unused_ids(np.arange(10, dtype=np.uint16), 10) == 0
    corpus = data.load_tokens(None, "uint16", 256)
    assert data.unused_ids(corpus, 256) == 256 - len(np.unique(corpus))


def test_trainer_warns_for_tied_embeddings_over_a_mostly_unused_vocabulary(tmp_path, world1):
    """The 50304-vocabulary spike (docs/stability.md): a .bin file that uses < 10% of the
    ids warns with tied embeddings and names the override; untied, or the embedded corpus, does not."""
    from train_helpers import build_trainer, make_cfg

    path = str(tmp_path / "tokens.bin")
    (data.load_tokens(None, "uint16", 256).astype(np.uint16) % 97).tofile(path)  # 97 of 1200 ids
    base = ["parallel.ep=1", "parallel.simulate_ranks=1", f"data.path={path}", "data.vocab_size=1200"]
    tied = build_trainer(make_cfg(*base, "model.tie_embeddings=true"), str(tmp_path / "a"))
    unused = 1200 - len(np.unique(np.asarray(tied.train_split.tokens)))
    assert unused >= 1103  # the train split holds at most the 97 residues
    (w,) = tied.data_warnings()
    assert w.startswith(f"model.tie_embeddings=true with data.vocab_size=1200: {unused:,} ids never occur")
    assert "pass model.tie_embeddings=false" in w
    assert build_trainer(make_cfg(*base, "model.tie_embeddings=false"), str(tmp_path / "b")).data_warnings() == []
    tr = build_trainer(make_cfg("parallel.ep=1", "parallel.simulate_ranks=1"), str(tmp_path / "c"))
    assert tr.cfg.model.tie_embeddings and tr.data_warnings() == []  # 149 of 256 byte values unused: below 90%


@pytest.mark.parametrize("train_ids,val_ids,warns", [
    (99, 1000, True),  # 901 of 1000 ids unused in training, though validation uses every id
    (100, 1000, False),  # exactly 90% unused: not more than 90%, no warning
    (1000, 5, False),  # training uses every id; validation's 995 unused ids do not count
])
def test_the_unused_id_warning_reads_the_training_split_only(tmp_path, world1, train_ids, val_ids, warns):
    from train_helpers import build_trainer, make_cfg

    n_val = 1200  # data.val_fraction 0.1 of 12000 tokens
    tokens = np.concatenate([np.arange(12000 - n_val) % train_ids, np.arange(n_val) % val_ids]).astype(np.uint16)
    path = str(tmp_path / "tokens.bin")
    tokens.tofile(path)
    cfg = make_cfg("parallel.ep=1", "parallel.simulate_ranks=1", f"data.path={path}", "data.vocab_size=1000",
                   "data.val_fraction=0.1", "model.tie_embeddings=true")
    tr = build_trainer(cfg, str(tmp_path / "run"))
    assert len(tr.train_split.tokens) == 12000 - n_val
    got = tr.data_warnings()
    assert len(got) == int(warns)
    if warns:
        assert got[0].startswith(f"model.tie_embeddings=true with data.vocab_size=1000: {1000 - train_ids} ids never")
