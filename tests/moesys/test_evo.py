"""EvoMoE: tau schedule, config, expert spawning (determinism across EP sizes), dense phase,
optimizer-state transfer, and resume across the phase boundary (model + AdamW, no trainer)."""
import copy

import pytest
import torch
import torch.nn as nn

from moesys import MoEConfig, MoELayer
from moesys.evo import EvoConfig, EvoController, EvoMoELayer, TauSchedule, spawn_slice
from moesys.evo.layer import DENSE, SPARSE
from moesys.moe.experts import ExpertSharding


# ---- tau schedule --------------------------------------------------------------------------------
def test_linear_tau_schedule_values():
    s = TauSchedule(2.0, 0.5, steps=10, kind="linear", start_step=5)
    assert s.value(0) == 2.0 and s.value(5) == 2.0  # before / at the start
    assert s.value(10) == pytest.approx(1.25)  # halfway: 2 - 1.5 * 0.5
    assert s.value(15) == pytest.approx(0.5) and s.value(1000) == pytest.approx(0.5)  # after D


def test_exponential_tau_schedule_values():
    s = TauSchedule(2.0, 0.5, steps=10, kind="exponential")
    assert s.value(0) == 2.0
    assert s.value(5) == pytest.approx(1.0)  # geometric mean of 2 and 0.5
    assert s.value(2) == pytest.approx(2.0 * 0.25 ** 0.2)
    assert s.value(10) == pytest.approx(0.5) and s.value(11) == pytest.approx(0.5)
    assert TauSchedule(2.0, 0.5, steps=0, kind="linear", start_step=3).value(3) == 0.5


def test_gate_state_and_hard_switch():
    c = EvoConfig(enabled=True, diversify_step=4, tau_steps=8, tau_kind="linear", tau_max=2.0, tau_min=1.0,
                  hard_step=20)
    assert c.gate_state(0) == {"tau": 2.0, "hard": False}
    assert c.gate_state(8) == {"tau": pytest.approx(1.5), "hard": False}  # annealing starts at diversify
    assert c.gate_state(19)["hard"] is False and c.gate_state(20)["hard"] is True
    assert c.in_dense_phase(3) and not c.in_dense_phase(4)


@pytest.mark.parametrize("kw,match", [
    (dict(spawn="clone"), "evo.spawn"), (dict(mask_ratio=1.5), "evo.mask_ratio"),
    (dict(tau_min=3.0), "evo.tau_min"), (dict(diversify_step=10, hard_step=5), "evo.hard_step"),
    (dict(threshold=0.0), "evo.threshold"), (dict(optimizer_state="keep"), "evo.optimizer_state"),
])
def test_bad_evo_config_is_a_clear_error(kw, match):
    with pytest.raises(ValueError, match=match):
        EvoConfig(**kw)


# ---- spawning ------------------------------------------------------------------------------------
D, F, E = 6, 8, 8


def dense_weights(gated=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = {"w1": torch.randn(D, F, generator=g), "w2": torch.randn(F, D, generator=g)}
    if gated:
        w["w3"] = torch.randn(D, F, generator=g)
    return w


@pytest.mark.parametrize("method", ["copy", "mask", "drop_upcycle"])
def test_spawn_is_identical_whatever_the_ep_size(method):
    dense = dense_weights()
    full = spawn_slice(dense, first_expert=0, num_local=E, layer=3, seed=11, method=method, mask_fill="redraw")
    for P in (2, 4, 8):
        L = E // P
        parts = [spawn_slice(dense, first_expert=r * L, num_local=L, layer=3, seed=11, method=method,
                             mask_fill="redraw") for r in range(P)]
        for k in full:
            assert torch.equal(torch.cat([p[k] for p in parts]), full[k]), (P, k)
    # F-sharded experts (P = 16 > E = 8): rank r holds expert r // 2, F-slice r % 2
    for r in range(16):
        sl = slice((r % 2) * F // 2, (r % 2 + 1) * F // 2)
        part = spawn_slice(dense, first_expert=r // 2, num_local=1, layer=3, seed=11, method=method,
                           mask_fill="redraw", f_slice=sl)
        assert torch.equal(part["w1"][0], full["w1"][r // 2][:, sl])
        assert torch.equal(part["w2"][0], full["w2"][r // 2][sl, :])
    other = spawn_slice(dense, first_expert=0, num_local=E, layer=4, seed=11, method=method)
    if method != "copy":
        assert not torch.equal(other["w1"], full["w1"]), "another layer must draw another stream"


def test_copy_spawn_is_exact():
    dense = dense_weights()
    out = spawn_slice(dense, first_expert=0, num_local=E, layer=0, seed=0, method="copy")
    for k, w in dense.items():
        assert torch.equal(out[k], w.expand(E, *w.shape))


def test_mask_spawn_zeroes_a_fraction_of_entries():
    dense = dense_weights()
    out = spawn_slice(dense, first_expert=0, num_local=E, layer=0, seed=0, method="mask", mask_ratio=0.3)
    for k, w in dense.items():
        zeroed = out[k] == 0
        assert abs(zeroed.float().mean().item() - 0.3) < 0.08
        torch.testing.assert_close(out[k][~zeroed], w.expand_as(out[k])[~zeroed], rtol=0, atol=0)
    assert not torch.equal(out["w1"][0], out["w1"][1]), "experts must differ"


def test_drop_upcycle_reinitialises_whole_hidden_units():
    dense = dense_weights()
    out = spawn_slice(dense, first_expert=0, num_local=E, layer=0, seed=0, method="drop_upcycle", reinit_fraction=0.5)
    for e in range(E):
        changed_w1 = (out["w1"][e] != dense["w1"]).any(0)  # [F] units whose column changed
        changed_w3 = (out["w3"][e] != dense["w3"]).any(0)
        changed_w2 = (out["w2"][e] != dense["w2"]).any(1)
        assert torch.equal(changed_w1, changed_w3) and torch.equal(changed_w1, changed_w2)
        assert int(changed_w1.sum()) == F // 2
        assert (out["w1"][e][:, changed_w1] != dense["w1"][:, changed_w1]).all()  # whole columns redrawn


def test_drop_upcycle_redraws_with_the_original_statistics():
    g = torch.Generator().manual_seed(0)
    dense = {"w1": 0.3 + 0.05 * torch.randn(64, 512, generator=g), "w2": -0.1 + 2.0 * torch.randn(512, 64, generator=g)}
    out = spawn_slice(dense, first_expert=0, num_local=1, layer=0, seed=0, method="drop_upcycle", reinit_fraction=1.0)
    for k in dense:
        assert out[k].mean().item() == pytest.approx(dense[k].mean().item(), abs=0.02 * dense[k].std().item() + 1e-3)
        assert out[k].std().item() == pytest.approx(dense[k].std().item(), rel=0.03)


# ---- the layer: dense phase, diversification, optimizer state ------------------------------------
def evo_layer(router="topk", top_k=2, activation="swiglu", dense_phase=True, layer_index=0, seed=0):
    torch.manual_seed(seed)
    cfg = MoEConfig(hidden_size=D, ffn_hidden_size=F, num_experts=E, top_k=top_k, router=router, activation=activation)
    return EvoMoELayer(cfg, dense_phase=dense_phase, layer_index=layer_index)


def fake_shard(layer, P, r):
    """What apply_expert_parallel does to the parameters (P <= E): keep experts [r*E/P, (r+1)*E/P)."""
    L = E // P
    ex = layer.experts
    for name in ("w1", "w2", "w3"):
        w = getattr(ex, name)
        if w is not None:
            setattr(ex, name, nn.Parameter(w.detach()[r * L:(r + 1) * L].clone()))
    ex.sharding = ExpertSharding(mesh=None, first=r * L, count=L)
    return layer


def test_dense_phase_is_the_dense_ffn_and_touches_nothing_else():
    layer = evo_layer()
    x = torch.randn(5, 3, D, requires_grad=True)
    y, aux = layer(x)
    w1, w2, w3 = (getattr(layer.dense, n)[0] for n in ("w1", "w2", "w3"))
    ref = (torch.nn.functional.silu(x @ w1) * (x @ w3)) @ w2
    torch.testing.assert_close(y, ref)
    y.sum().backward()
    assert layer.router.weight.grad is None and layer.experts.w1.grad is None
    assert layer.dense.w1.grad is not None
    assert float(aux.loss) == 0.0 and aux.metrics["evo_phase"] == DENSE


@pytest.mark.parametrize("method", ["mask", "drop_upcycle"])
def test_layer_diversify_is_identical_across_ep_sizes(method):
    ref = evo_layer(layer_index=2)
    ref.diversify(seed=5, method=method)
    for P in (2, 4):
        for r in range(P):
            part = fake_shard(evo_layer(layer_index=2), P, r)
            part.diversify(seed=5, method=method)
            L = E // P
            for n in ("w1", "w2", "w3"):
                assert torch.equal(getattr(part.experts, n), getattr(ref.experts, n)[r * L:(r + 1) * L])
            assert torch.equal(part.router.weight, ref.router.weight)  # replicated router
            assert int(part.phase) == SPARSE


def test_copy_diversify_keeps_the_function_with_renormalised_topk():
    layer = evo_layer(router="topk", top_k=2)
    x = torch.randn(40, D)
    y_dense, _ = layer(x)
    layer.diversify(seed=0, method="copy")
    y_moe, aux = layer(x)
    torch.testing.assert_close(y_moe, y_dense, atol=1e-6, rtol=1e-5)
    assert aux.metrics["evo_phase"] == SPARSE
    assert layer.router.weight.std().item() == pytest.approx(0.02, rel=0.3)  # fresh N(0, 0.02^2)


def test_grouped_mm_backend_both_phases_equal_the_torch_backend():
    """kernel_backend=grouped_mm: the dense phase runs the grouped_mm expert FFN, the sparse phase
    (a top-k router) the sync-free path; both equal the torch backend, with EvoMoE's metrics."""
    outs = {}
    for backend in ("torch", "grouped_mm"):
        torch.manual_seed(0)
        cfg = MoEConfig(hidden_size=8, ffn_hidden_size=F, num_experts=E, top_k=2, activation="swiglu",
                        kernel_backend=backend)  # D=8: grouped_mm rows are 16-byte aligned
        layer = EvoMoELayer(cfg, dense_phase=True)
        x = torch.randn(40, 8, requires_grad=True)
        y_dense, _ = layer(x)
        layer.diversify(seed=0, method="mask")
        y, aux = layer(x)
        (y.sum() + y_dense.sum() + aux.loss).backward()
        outs[backend] = (y_dense.detach(), y.detach(), x.grad, layer.experts.w1.grad, layer.dense.w1.grad,
                         float(aux.metrics["max_experts_per_token"]))
    for a, b in zip(outs["grouped_mm"], outs["torch"]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("policy", ["copy", "reset"])
def test_optimizer_state_transfer(policy):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(D, D), MoELayer(MoEConfig(hidden_size=D, ffn_hidden_size=F, num_experts=E, top_k=2,
                                                              activation="swiglu")))
    ctl = EvoController.prepare(model, EvoConfig(enabled=True, diversify_step=3, gate="none", spawn="copy",
                                                 optimizer_state=policy), seed=0)
    layer = ctl.layers[0]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)

    def step(s):
        ctl.on_step_start(s, opt)
        y, aux = layer(model[0](torch.randn(16, D)))
        opt.zero_grad()
        (y.square().mean() + aux.loss).backward()
        opt.step()

    for s in range(3):
        step(s)
    assert layer.experts.w1 not in opt.state and layer.router.weight not in opt.state  # never had a grad
    dense_state = opt.state[layer.dense.w1]
    ctl.on_step_start(3, opt)  # the diversify step: state transferred before its update
    st = opt.state.get(layer.experts.w1)
    if policy == "copy":
        assert float(st["step"]) == 3
        for k in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(st[k], dense_state[k].expand(E, D, F))
        assert torch.equal(opt.state[layer.experts.w3]["exp_avg"], opt.state[layer.dense.w3]["exp_avg"].expand(E, D, F))
    else:  # zero moments, Adam's step starts over
        assert float(st["step"]) == 0 and not st["exp_avg"].any() and not st["exp_avg_sq"].any()
    # the new router: zero moments with the dense parameters' step (as ZeRO's shared group step has it)
    r = opt.state[layer.router.weight]
    assert float(r["step"]) == 3 and not r["exp_avg"].any() and not r["exp_avg_sq"].any()
    step(3)
    assert float(opt.state[layer.experts.w1]["step"]) == (4 if policy == "copy" else 1)
    assert layer.dense.w1.grad is None  # the dense FFN is retired


def test_prepare_swaps_layers_and_keeps_parameters():
    torch.manual_seed(0)
    model = nn.ModuleDict({"a": MoELayer(MoEConfig(hidden_size=D, ffn_hidden_size=F, num_experts=E, top_k=2))})
    w1 = model["a"].experts.w1.detach().clone()
    ctl = EvoController.prepare(model, EvoConfig(enabled=True, diversify_step=None, gate="dts", tau_max=1.5), seed=0)
    new = model["a"]
    assert isinstance(new, EvoMoELayer) and new.cfg.router == "dts" and new.dense is None
    assert torch.equal(new.experts.w1, w1)
    assert float(new.router.tau) == 1.5
    y, aux = new(torch.randn(7, D))
    m = ctl.metrics([aux])
    assert m["evo/tau"] == 1.5 and m["evo/experts_per_token_max"] >= m["evo/experts_per_token_mean"] >= 1
    assert sum(m[f"evo/layer0/load_e{e}"] for e in range(E)) == pytest.approx(1.0)


# ---- resume across the phase boundary -------------------------------------------------------------
def _tiny_model():
    from moesys.model import GPTConfig, GPTMoE

    torch.manual_seed(0)
    g = GPTConfig(vocab_size=32, n_layers=2, d_model=D * 2, n_heads=2, ffn_hidden=F, seq_len=8)
    return GPTMoE(g, MoEConfig(hidden_size=D * 2, ffn_hidden_size=F, num_experts=4, top_k=1, router="dts"))


EVO = EvoConfig(enabled=True, diversify_step=3, spawn="mask", tau_steps=4, hard_step=6, optimizer_state="copy")


def _train(model, ctl, opt, start, stop):
    from moesys.model import lm_loss

    for step in range(start, stop):
        ctl.on_step_start(step, opt)
        g = torch.Generator().manual_seed(step)
        x = torch.randint(0, 32, (4, 8), generator=g)
        torch.manual_seed(1000 + step)  # the Gumbel draws of this step
        logits, aux, _ = model(x)
        opt.zero_grad(set_to_none=True)
        (lm_loss(logits, x) + aux).backward()
        opt.step()


@pytest.mark.parametrize("stop_at", [2, 5])  # before and after the diversify step (3)
def test_resume_across_phase_boundary_equals_uninterrupted(stop_at):
    m1 = _tiny_model()
    c1 = EvoController.prepare(m1, EVO, seed=0)
    o1 = torch.optim.AdamW(m1.parameters(), lr=1e-2)
    _train(m1, c1, o1, 0, 8)

    m2 = _tiny_model()
    c2 = EvoController.prepare(m2, EVO, seed=0)
    o2 = torch.optim.AdamW(m2.parameters(), lr=1e-2)
    _train(m2, c2, o2, 0, stop_at)
    saved = copy.deepcopy({"model": m2.state_dict(), "opt": o2.state_dict()})

    m3 = _tiny_model()
    c3 = EvoController.prepare(m3, EVO, seed=0)
    o3 = torch.optim.AdamW(m3.parameters(), lr=1e-2)
    m3.load_state_dict(saved["model"])
    o3.load_state_dict(saved["opt"])
    assert c3.phase == ("dense" if stop_at < 3 else "moe")
    _train(m3, c3, o3, stop_at, 8)
    for (n, a), (_, b) in zip(m1.state_dict().items(), m3.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=lambda m: f"{n}: {m}")
    assert bool(m1.blocks[0].moe.router.hard) and c1.phase == "moe"


def test_gate_noise_is_keyed_by_seed_step_and_rank_not_the_global_rng():
    layer = evo_layer(router="dts", dense_phase=False)
    layer.router.set_gate_state(tau=1.0, hard=True)  # one expert per token: argmax of the noisy gate
    x = torch.randn(64, D)

    def routes(seed, step, rank, global_seed):
        torch.manual_seed(global_seed)
        layer.set_noise_key(seed=seed, step=step, rank=rank)
        first = layer.route(x, 64)[0].expert_idx_R.clone()
        return first, layer.route(x, 64)[0].expert_idx_R.clone(), torch.get_rng_state()

    a1, a2, rng = routes(0, 5, 0, global_seed=1)
    b1, b2, _ = routes(0, 5, 0, global_seed=2)  # another global RNG: the same noise
    assert torch.equal(a1, b1) and torch.equal(a2, b2)
    assert torch.equal(rng, torch.manual_seed(1).get_state())  # the global RNG is left alone
    assert not torch.equal(a1, a2)  # the second micro-batch of a step draws its own stream
    for other in ((0, 6, 0), (0, 5, 1), (1, 5, 0)):
        assert not torch.equal(routes(*other, global_seed=1)[0], a1), other


# ---- EvoMoE on the modern decoder (model.arch=decoder, the main job's default) -------------------------
def test_decoder_dense_phase_is_the_dense_decoder_outputs_and_gradients():
    """EvoController.prepare on a Decoder: until the diversify step each MoE block is one SwiGLU FFN
    started from expert 0, so the model equals the decoder built dense (model.moe_every=0) with those
    FFN weights, logits and every gradient."""
    from moesys.decoder import Decoder, DecoderConfig
    from moesys.model import lm_loss

    torch.manual_seed(0)
    dcfg = DecoderConfig(vocab_size=32, n_layers=3, d_model=12, n_heads=2, n_kv_heads=1, dense_ffn_hidden=F)
    moe = MoEConfig(hidden_size=12, ffn_hidden_size=F, num_experts=7, top_k=2, activation="swiglu")
    model = Decoder(dcfg, moe)
    ctl = EvoController.prepare(model, EvoConfig(enabled=True, diversify_step=3, gate="dts"), seed=0)
    assert ctl.phase == "dense" and all(isinstance(b.moe, EvoMoELayer) for b in model.blocks)
    ref = Decoder(DecoderConfig(**{**dcfg.__dict__, "moe_every": 0}), moe)
    sd = {k: v for k, v in model.state_dict().items() if ".moe." not in k}
    for i, blk in enumerate(model.blocks):
        for w in ("w1", "w3", "w2"):  # experts hold [1, D, F] / [1, F, D]; nn.Linear holds [out, in]
            sd[f"blocks.{i}.ffn.{w}.weight"] = getattr(blk.moe.dense, w)[0].detach().t()
    ref.load_state_dict(sd, strict=True)
    x = torch.randint(0, 32, (3, 9), generator=torch.Generator().manual_seed(1))
    got, aux, _ = model(x)
    want, _, _ = ref(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert float(aux) == 0.0
    (lm_loss(got, x) + aux).backward()
    lm_loss(want, x).backward()
    ref_params = dict(ref.named_parameters())
    for i, blk in enumerate(model.blocks):
        for w in ("w1", "w3", "w2"):
            torch.testing.assert_close(getattr(blk.moe.dense, w).grad[0].t(),
                                       ref_params[f"blocks.{i}.ffn.{w}.weight"].grad, rtol=1e-5, atol=1e-6)
    for n, p in model.named_parameters():
        if ".moe." not in n:
            torch.testing.assert_close(p.grad, ref_params[n].grad, rtol=1e-5, atol=1e-6,
                                       msg=lambda m, n=n: f"{n}: {m}")
