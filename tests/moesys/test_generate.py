"""moesys-generate: the KV cache equals full recomputation, sampling obeys temperature/top-k/top-p and
the seed, and checkpoints trained with EP or in EvoMoE's dense phase load on one process."""
import math

import pytest
import torch

from moesys import MoEConfig
from moesys.errors import ConfigError
from moesys.generate import generate, sample_next
from moesys.model import GPTConfig, GPTMoE, KVCache


def _model(seq_len=11, capacity_factor=None, moe_every=1):
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=37, n_layers=3, d_model=24, n_heads=3, ffn_hidden=20, seq_len=seq_len, moe_every=moe_every)
    moe = MoEConfig(hidden_size=24, ffn_hidden_size=20, num_experts=7, top_k=2, capacity_factor=capacity_factor)
    return GPTMoE(cfg, moe).eval()


@torch.no_grad()
def test_kv_cache_logits_equal_full_forward():
    """Prefill 4 tokens, then 1, 3 and 1 more: each chunk's logits equal the full causal forward's
    rows at those positions (the cache's positions and masks are right)."""
    model = _model()
    idx = torch.randint(0, 37, (2, 9))
    full, _, _ = model(idx)
    cache = KVCache(3)
    got = []
    for a, b in ((0, 4), (4, 5), (5, 8), (8, 9)):
        out, _, _ = model(idx[:, a:b], cache=cache)
        got.append(out)
    assert cache.length == 9
    torch.testing.assert_close(torch.cat(got, 1), full, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="sequence length 12 > model.seq_len 11"):
        model(idx[:, :3], cache=cache)


@torch.no_grad()
def _greedy_reference(model, ids, n):
    """The obvious loop: run the last seq_len tokens from scratch, take the argmax."""
    ids = list(ids)
    for _ in range(n):
        logits, _, _ = model(torch.tensor([ids[-model.cfg.seq_len:]]))
        ids.append(int(logits[0, -1].argmax()))
    return ids


@pytest.mark.parametrize("moe_every", [1, 2])
def test_greedy_generation_with_cache_equals_recomputation_past_the_window(moe_every):
    model = _model(moe_every=moe_every)
    prompt = [3, 1, 4, 1, 5]
    ref = _greedy_reference(model, prompt, 15)  # 20 tokens: the 11-token window slides
    assert generate(model, prompt, max_new_tokens=15, temperature=0, kv_cache=True) == ref
    assert generate(model, prompt, max_new_tokens=15, temperature=0, kv_cache=False) == ref


def test_sampling_is_deterministic_for_a_seed_and_cache_independent():
    model = _model()
    kw = dict(max_new_tokens=14, temperature=1.3, top_k=9, top_p=0.9)
    a = generate(model, [2, 7], seed=5, **kw)
    assert a == generate(model, [2, 7], seed=5, **kw)
    assert a == generate(model, [2, 7], seed=5, kv_cache=False, **kw)
    assert a != generate(model, [2, 7], seed=6, **kw)
    with pytest.raises(ConfigError, match="prompt is empty"):
        generate(model, [], max_new_tokens=1)


def test_sample_next_obeys_temperature_top_k_top_p():
    logits = torch.tensor([0.5, 2.0, -1.0, 1.9, 0.0, 1.0])
    g = torch.Generator().manual_seed(0)
    assert sample_next(logits, temperature=0, top_k=0, top_p=1.0, generator=g) == 1
    assert all(sample_next(logits, temperature=5.0, top_k=1, top_p=1.0, generator=g) == 1 for _ in range(20))
    assert all(sample_next(logits, temperature=1.0, top_k=0, top_p=1e-6, generator=g) == 1 for _ in range(20))
    draws = [sample_next(logits, temperature=1.0, top_k=3, top_p=1.0, generator=g) for _ in range(600)]
    assert set(draws) == {1, 3, 5}  # the three largest logits, each drawn
    # nucleus 0.6: probabilities sorted are p1, p3, p5, ...; p1 + p3 reaches 0.6, so {1, 3}
    p = torch.softmax(logits, 0)
    assert p[1] < 0.6 <= p[1] + p[3]
    draws = [sample_next(logits, temperature=1.0, top_k=0, top_p=0.6, generator=g) for _ in range(600)]
    assert set(draws) == {1, 3}
    # the draws follow the renormalised distribution (binomial 4 sigma band)
    q = float(p[1] / (p[1] + p[3]))
    n1 = draws.count(1)
    assert abs(n1 - 600 * q) < 4 * math.sqrt(600 * q * (1 - q))
