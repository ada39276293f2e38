"""GPT-MoE model: shapes, causality with MoE in every block, moe_every, expert-choice refusal."""
import pytest
import torch

from moesys import MoEConfig
from moesys.model import GPTConfig, GPTMoE, lm_loss


def _model(moe_every=1, router="topk", **moe_kw):
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=64, n_layers=2, d_model=32, n_heads=4, ffn_hidden=48, seq_len=16, moe_every=moe_every)
    top_k = 1 if router == "switch" else 2
    return GPTMoE(cfg, MoEConfig(hidden_size=32, ffn_hidden_size=48, num_experts=4, top_k=top_k, router=router, **moe_kw))


@pytest.mark.parametrize("router", ["topk", "switch", "sigmoid_bias"])
def test_causal_with_moe_in_every_block(router):
    m = _model(router=router).eval()
    x = torch.randint(0, 64, (3, 16))
    for t in (0, 7, 14):
        x2 = x.clone()
        x2[:, t + 1] = (x2[:, t + 1] + 1) % 64  # change token t+1 only
        with torch.no_grad():
            a, _, _ = m(x)
            b, _, _ = m(x2)
        assert torch.allclose(a[:, : t + 1], b[:, : t + 1], atol=1e-6, rtol=0), f"logits at <= {t} changed"
        assert not torch.allclose(a[:, t + 1], b[:, t + 1])


def test_moe_every_and_aux():
    m = _model(moe_every=2)
    assert [i for i, _ in m.moe_layers()] == [1]
    x = torch.randint(0, 64, (2, 16))
    logits, aux_loss, auxes = m(x)
    assert logits.shape == (2, 16, 64) and len(auxes) == 1
    assert aux_loss.dim() == 0 and aux_loss.item() > 0  # switch aux loss is on by default
    assert int(auxes[0].tokens_per_expert.sum()) == 2 * 16 * 2
    loss = lm_loss(logits, x) + aux_loss
    loss.backward()
    assert m.blocks[1].moe.router.weight.grad is not None
    dense = _model(moe_every=0)
    assert dense.moe_layers() == []


def test_expert_choice_refused_unless_allowed():
    with pytest.raises(ValueError, match="allow_noncausal"):
        _model(router="expert_choice")
    _model(router="expert_choice", allow_noncausal=True)


def test_tied_embeddings_and_seq_len_limit():
    m = _model()
    assert m.head.weight is m.tok_emb.weight
    with pytest.raises(ValueError, match="seq_len"):
        m(torch.zeros(1, 17, dtype=torch.long))


def test_qk_norm_matches_a_hand_written_attention():
    """model.qk_norm: each head's q and k are RMS-normalised (learned scale) before q·k/sqrt(hd);
    checked against attention written out by hand (softmax of masked scores), outputs and grads."""
    from moesys.model import CausalSelfAttention

    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=64, n_layers=1, d_model=24, n_heads=3, ffn_hidden=8, seq_len=7, qk_norm=True)
    attn = CausalSelfAttention(cfg)
    with torch.no_grad():  # non-trivial learned scales
        attn.q_norm.weight.uniform_(0.5, 1.5)
        attn.k_norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(2, 7, 24, requires_grad=True)
    y = attn(x)

    B, S, D, H = 2, 7, 24, 3
    hd = D // H
    q, k, v = (x @ attn.qkv.weight.T).split(D, dim=-1)
    outs = []
    for h in range(H):
        sl = slice(h * hd, (h + 1) * hd)
        qh, kh, vh = q[..., sl], k[..., sl], v[..., sl]
        qh = qh / torch.sqrt(qh.pow(2).mean(-1, keepdim=True) + torch.finfo(x.dtype).eps) * attn.q_norm.weight
        kh = kh / torch.sqrt(kh.pow(2).mean(-1, keepdim=True) + torch.finfo(x.dtype).eps) * attn.k_norm.weight
        scores = qh @ kh.transpose(-1, -2) / hd ** 0.5
        scores = scores.masked_fill(torch.ones(S, S, dtype=torch.bool).triu(1), float("-inf"))
        outs.append(scores.softmax(-1) @ vh)
    ref = torch.cat(outs, -1) @ attn.proj.weight.T
    assert torch.allclose(y, ref, atol=1e-5, rtol=1e-5)
    g = torch.Generator().manual_seed(1)
    w = torch.randn(ref.shape, generator=g)
    (ref * w).sum().backward()
    want = [x.grad.clone()] + [p.grad.clone() for p in attn.parameters()]
    for p in [x, *attn.parameters()]:
        p.grad = None
    (y * w).sum().backward()
    got = [x.grad] + [p.grad for p in attn.parameters()]
    for a, b in zip(got, want):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4)
    assert attn.q_norm.weight.grad.abs().sum() > 0  # the scales learn
    plain = CausalSelfAttention(GPTConfig(vocab_size=64, n_layers=1, d_model=24, n_heads=3, ffn_hidden=8, seq_len=7))
    assert plain.q_norm is None and sum(1 for _ in plain.parameters()) == 2
