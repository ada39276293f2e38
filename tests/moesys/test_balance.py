"""Each balancing loss equals its formula computed by hand; the aux-loss-free bias rule."""
import math

import pytest
import torch

from moesys import MoEConfig, MoELayer, update_expert_biases


def make(**kw):
    torch.manual_seed(0)
    base = dict(hidden_size=10, ffn_hidden_size=16, num_experts=5, top_k=2)
    base.update(kw)
    layer = MoELayer(MoEConfig(**base))
    with torch.no_grad():
        layer.router.weight.normal_(0, 0.5)
    return layer


def test_switch_aux_loss_topk_formula():
    layer = make(aux_loss="switch", aux_loss_coef=0.1)
    x = torch.randn(33, 10)
    _, aux = layer(x)
    T, E, K = 33, 5, 2
    p = torch.softmax(x @ layer.router.weight.t(), -1)
    idx = p.topk(K).indices
    # by hand: coef * E / (K T^2) * sum_i (sum_t p_ti) * count_i
    expected = 0.0
    for i in range(E):
        count_i = float((idx == i).sum())
        expected += float(p[:, i].sum()) * count_i
    expected *= 0.1 * E / (K * T * T)
    assert math.isclose(float(aux.loss), expected, rel_tol=1e-5)


def test_switch_aux_loss_top1_is_E_sum_f_P():
    layer = make(aux_loss="switch", aux_loss_coef=0.01, top_k=1, router="switch")
    x = torch.randn(40, 10)
    _, aux = layer(x)
    p = torch.softmax(x @ layer.router.weight.t(), -1)
    f = torch.bincount(p.argmax(-1), minlength=5).float() / 40
    P = p.mean(0)
    assert math.isclose(float(aux.loss), 0.01 * 5 * float((f * P).sum()), rel_tol=1e-5)


def _gshard_by_hand(x_TD, router_w, E, coef):
    """GShard/Tutel/DeepSpeed: coef * E * sum_e me_e * ce_e, me_e = mean_t p_te, ce_e = share of
    tokens whose first choice is e; one token at a time, differentiable w.r.t. router_w."""
    T = x_TD.shape[0]
    me = [0.0] * E
    ce = [0.0] * E
    for t in range(T):
        p_t = torch.softmax(router_w @ x_TD[t], -1)
        first = int(p_t.detach().argmax())
        ce[first] += 1.0 / T
        for e in range(E):
            me[e] = me[e] + p_t[e] / T
    return coef * E * sum(me[e] * ce[e] for e in range(E))


@pytest.mark.parametrize("K", [1, 2, 3])
def test_gshard_aux_loss_value_and_router_grad_by_hand(K):
    E, T = 7, 45
    # a capacity that drops routes: the loss counts choices before any drop, as GShard does
    layer = make(aux_loss="gshard", aux_loss_coef=0.1, num_experts=E, top_k=K, capacity_factor=0.5, min_capacity=1)
    x = torch.randn(T, 10)
    _, aux = layer(x)
    assert int(aux.dropped) > 0
    aux.loss.backward()
    w = layer.router.weight.detach().clone().requires_grad_(True)
    expected = _gshard_by_hand(x, w, E, 0.1)
    expected.backward()
    assert math.isclose(float(aux.loss), float(expected), rel_tol=1e-5)
    torch.testing.assert_close(layer.router.weight.grad, w.grad, rtol=1e-4, atol=1e-7)
    assert float(aux.metrics["aux_loss"]) == float(aux.loss)


def test_gshard_equals_switch_at_top1_and_not_at_top2():
    x = torch.randn(50, 10)
    for K, same in ((1, True), (2, False)):
        _, a_gs = make(aux_loss="gshard", top_k=K)(x)
        _, a_sw = make(aux_loss="switch", top_k=K)(x)
        assert math.isclose(float(a_gs.loss), float(a_sw.loss), rel_tol=1e-6) == same


def test_gshard_with_the_sigmoid_bias_router_counts_its_first_choices():
    layer = make(router="sigmoid_bias", aux_loss="gshard", aux_loss_coef=1.0)
    with torch.no_grad():
        layer.router.expert_bias.copy_(torch.tensor([0.0, 0.3, -0.2, 0.0, 0.1]))
    x = torch.randn(31, 10)
    _, aux = layer(x)
    s = torch.sigmoid(x @ layer.router.weight.t())
    p = s / s.sum(-1, keepdim=True)
    first = (s + layer.router.expert_bias).argmax(-1)  # selection sees the bias
    ce = torch.bincount(first, minlength=5).float() / 31
    assert math.isclose(float(aux.loss), 5 * float((p.mean(0) * ce).sum()), rel_tol=1e-5)


def test_seq_aux_loss_per_sequence():
    layer = make(aux_loss="seq", aux_loss_coef=0.1)
    B, S, E, K = 3, 7, 5, 2
    x = torch.randn(B, S, 10)
    _, aux = layer(x)
    losses = []
    for b in range(B):
        p = torch.softmax(x[b] @ layer.router.weight.t(), -1)
        idx = p.topk(K).indices
        f = torch.stack([(idx == i).sum() for i in range(E)]).float() * E / (K * S)
        P = p.mean(0)
        losses.append(0.1 * float((f * P).sum()))
    assert math.isclose(float(aux.loss), sum(losses) / B, rel_tol=1e-5)


def test_z_loss_formula_and_sum():
    layer = make(aux_loss="switch", aux_loss_coef=0.0, z_loss_coef=1e-3)
    x = torch.randn(21, 10)
    _, aux = layer(x)
    z = x @ layer.router.weight.t()
    expected = 1e-3 * float((torch.logsumexp(z, -1) ** 2).mean())
    assert math.isclose(float(aux.metrics["z_loss"]), expected, rel_tol=1e-5)
    assert math.isclose(float(aux.loss), expected, rel_tol=1e-5)  # aux coef 0: only z remains


def test_aux_none_gives_zero_loss_with_grad_path():
    layer = make(aux_loss="none")
    _, aux = layer(torch.randn(8, 10))
    assert float(aux.loss) == 0.0


def test_aux_loss_gradient_reaches_router():
    layer = make(aux_loss="switch", aux_loss_coef=1.0)
    _, aux = layer(torch.randn(30, 10))
    aux.loss.backward()
    assert layer.router.weight.grad.abs().sum() > 0


def test_sigmoid_bias_selection_and_update_rule():
    layer = make(router="sigmoid_bias", aux_loss="none", bias_update_rate=0.5)
    x = torch.randn(50, 10)
    layer.train()
    _, aux = layer(x)
    s = torch.sigmoid(x @ layer.router.weight.t())
    load = torch.bincount(s.topk(2).indices.reshape(-1), minlength=5).float()
    assert torch.equal(aux.tokens_per_expert.float(), load)
    bias_before = layer.router.expert_bias.clone()
    assert torch.equal(bias_before, torch.zeros(5))  # the forward alone never moves the bias
    update_expert_biases(layer)
    expected = 0.5 * torch.sign(load.mean() - load)
    torch.testing.assert_close(layer.router.expert_bias, expected)
    # the bias now steers selection (only selection: weights still come from s)
    routing, _ = layer.route(x, 50)
    idx = (s + expected).topk(2).indices
    assert torch.equal(routing.expert_idx_R, idx.reshape(-1))
    w = s.gather(1, idx)
    torch.testing.assert_close(routing.weight_R, (w / w.sum(-1, keepdim=True)).reshape(-1))


def test_bias_not_updated_in_eval_loads():
    layer = make(router="sigmoid_bias", aux_loss="none")
    layer.eval()
    layer(torch.randn(20, 10))
    layer.update_expert_bias()
    assert torch.equal(layer.router.expert_bias, torch.zeros(5))  # no training loads: sign(0)=0


def test_metrics_present():
    layer = make(capacity_factor=0.5, min_capacity=1)
    _, aux = layer(torch.randn(40, 10))
    for k in ("router_entropy", "max_load", "mean_load", "drop_rate", "experts_per_token", "aux_loss"):
        assert k in aux.metrics, k
    assert 0 < float(aux.metrics["drop_rate"]) < 1
    p = torch.softmax(torch.zeros(1, 5), -1)
    assert float(aux.metrics["router_entropy"]) <= math.log(5) + 1e-6


@pytest.mark.multirank
def test_bias_update_sums_loads_over_group(rank_pool):

    results = rank_pool.run(_bias_update_rank, 2)
    assert torch.equal(results[0], results[1])


def _bias_update_rank():
    import torch.distributed as dist

    rank = dist.get_rank()
    layer = make(router="sigmoid_bias", aux_loss="none", bias_update_rate=1.0)
    torch.manual_seed(100 + rank)  # different tokens on each rank
    x = torch.randn(30 + 17 * rank, 10)
    layer(x)
    local = layer.router.load_since_update.clone()
    total = local.clone()
    dist.all_reduce(total)
    layer.update_expert_bias(dist.group.WORLD)
    assert torch.equal(layer.router.expert_bias, torch.sign(total.mean() - total))
    return layer.router.expert_bias.clone()
