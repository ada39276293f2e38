"""Group-limited routing (MoEConfig.num_groups / topk_groups, DeepSeek-V3) and the global-batch
balance loss (aux_loss="global_batch"), single process: against the per-token reference loop of
moe_reference.py (outputs and every gradient), hand-made scores, and the switch loss."""
import pytest
import torch

from moesys import MoEConfig, MoELayer
from moesys.moe.routers import group_limited_mask

from moe_reference import reference_forward


def make(router="topk", E=8, K=3, G=4, TG=2, D=12, Fh=20, seed=0, **kw):
    torch.manual_seed(seed)
    if router == "switch":
        K = 1
    cfg = MoEConfig(hidden_size=D, ffn_hidden_size=Fh, num_experts=E, top_k=K, router=router,
                    num_groups=G, topk_groups=TG, **kw)
    layer = MoELayer(cfg)
    with torch.no_grad():  # decisive, tie-free routing
        layer.router.weight.normal_(0, 0.5)
        if router == "sigmoid_bias":  # a bias that changes choices (groups are ranked with it)
            layer.router.expert_bias.copy_(torch.linspace(-0.3, 0.3, E)[torch.randperm(E)])
    return layer


def grads_of(layer, x, fn):
    layer.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    y = fn(x)
    g = torch.linspace(-1, 1, y.numel()).reshape(y.shape)
    (y * g).sum().backward()
    ps = {"router": layer.router.weight, "w1": layer.experts.w1, "w2": layer.experts.w2}
    if layer.experts.w3 is not None:
        ps["w3"] = layer.experts.w3
    return y.detach(), x.grad.clone(), {k: p.grad.clone() for k, p in ps.items()}


def assert_same(layer, x, atol=2e-5):
    y, gx, gp = grads_of(layer, x, lambda x: layer(x)[0])
    y_ref, gx_ref, gp_ref = grads_of(layer, x, lambda x: reference_forward(layer, x)[0])
    torch.testing.assert_close(y, y_ref, atol=atol, rtol=1e-4)
    torch.testing.assert_close(gx, gx_ref, atol=atol, rtol=1e-4)
    for k in gp:
        torch.testing.assert_close(gp[k], gp_ref[k], atol=atol, rtol=1e-4, msg=lambda m: f"grad {k}: {m}")


def experts_of(layer, x):
    routing, _ = layer.route(x.reshape(-1, layer.cfg.hidden_size), seq_len=x.shape[0])
    T = routing.num_tokens
    return routing.expert_idx_R.view(T, -1)


# ---- group-limited routing ------------------------------------------------------------------------
@pytest.mark.parametrize("router", ["topk", "switch", "sigmoid_bias"])
@pytest.mark.parametrize("E,K,G,TG", [(8, 3, 4, 2), (9, 2, 3, 1), (6, 4, 3, 2), (7, 2, 7, 2)])
def test_matches_per_token_reference(router, E, K, G, TG):
    layer = make(router, E=E, K=K, G=G, TG=TG, activation="swiglu")
    assert_same(layer, torch.randn(3, 11, 12))


@pytest.mark.parametrize("cf", [None, 0.75])
def test_601_tokens_9_experts_capacity_and_an_empty_expert(cf):
    layer = make("topk", E=9, K=2, G=3, TG=2, capacity_factor=cf)
    x = torch.randn(601, 12).abs() + 0.5
    with torch.no_grad():  # tokens lean positive, expert 4's row negative: nobody routes to it
        layer.router.weight[4] = -1.0
    assert not (experts_of(layer, x) == 4).any()
    assert_same(layer, x)


def test_routes_stay_inside_topk_groups_and_the_limit_binds():
    E, G, TG, K = 8, 4, 2, 4
    x = torch.randn(400, 12)
    grouped = experts_of(make(E=E, K=K, G=G, TG=TG), x)
    free = experts_of(make(E=E, K=K, G=G, TG=G), x)  # topk_groups == num_groups: no limit
    groups_per_token = lambda idx: torch.tensor([len(set((row // (E // G)).tolist())) for row in idx])  # noqa: E731
    assert int(groups_per_token(grouped).max()) <= TG
    assert int(groups_per_token(free).max()) > TG  # without the limit some tokens spread wider


def test_topk_groups_equal_to_num_groups_is_plain_topk():
    x = torch.randn(5, 7, 12)
    a, b = make(G=4, TG=4), make(G=None, TG=None)
    ya, _ = a(x)
    yb, _ = b(x)
    assert torch.equal(ya, yb)


def test_group_score_is_the_sum_of_the_top_two_not_the_max():
    # group 0 holds the single best score (0.9) but group 1's two best sum higher (0.8 + 0.7)
    s = torch.tensor([[0.9, 0.1, 0.8, 0.7, 0.2, 0.3]])
    mask = group_limited_mask(s, num_groups=3, topk_groups=1)
    assert mask.tolist() == [[False, False, True, True, False, False]]
    # one expert per group: the group's score is that expert's
    mask = group_limited_mask(s, num_groups=6, topk_groups=2)
    assert mask.tolist() == [[True, False, True, False, False, False]]


def test_sigmoid_bias_ranks_groups_with_the_bias():
    layer = make("sigmoid_bias", E=4, K=1, G=2, TG=1, D=2, normalize_topk=False)
    with torch.no_grad():
        layer.router.weight.zero_()  # every score sigmoid(0) = 0.5: the bias alone decides
        layer.router.expert_bias.copy_(torch.tensor([0.0, 0.3, 0.2, 0.2]))
    # group 0: 0.5+0.3 + 0.5 = 1.3; group 1: 0.7 + 0.7 = 1.4 -> group 1, though expert 1 scores best
    assert experts_of(layer, torch.randn(3, 2)).view(-1).tolist() == [2, 2, 2]


# ---- global-batch balance loss, one process ------------------------------------------------------
@pytest.mark.parametrize("router", ["topk", "sigmoid_bias"])
def test_global_batch_alone_equals_switch(router):
    x = torch.randn(4, 9, 12)
    losses, grads = [], []
    for aux in ("switch", "global_batch"):
        layer = make(router, G=None, TG=None, aux_loss=aux, aux_loss_coef=0.5)
        _, a = layer(x)
        a.loss.backward()
        losses.append(a.loss.detach())
        grads.append(layer.router.weight.grad.clone())
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-6, atol=0)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-8)
    assert grads[1].abs().sum() > 0


def test_global_batch_by_hand():
    E, K, coef = 5, 2, 0.3
    layer = make(E=E, K=K, G=None, TG=None, aux_loss="global_batch", aux_loss_coef=coef)
    x = torch.randn(13, 12)
    _, a = layer(x)
    p = torch.softmax(x @ layer.router.weight.detach().t(), -1)
    idx = p.topk(K, -1).indices
    f = torch.stack([(idx == e).sum() for e in range(E)]).float() / (K * 13)
    torch.testing.assert_close(a.loss.detach(), coef * E * (f * p.mean(0)).sum())


def test_global_batch_without_a_group_in_a_multirank_job_is_an_error(world1, monkeypatch):
    import torch.distributed as dist

    layer = make(G=None, TG=None, aux_loss="global_batch")
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    with pytest.raises(RuntimeError, match="global_batch.*set_balance_group"):
        layer(torch.randn(5, 12))
    layer.eval()  # evaluation reduces nothing: local counts, no error
    layer(torch.randn(5, 12))
    layer.train()
    layer.set_balance_group(dist.group.WORLD)
    import copy

    assert copy.deepcopy(layer).router.balance_group.group is dist.group.WORLD  # shared, not copied
    assert not any("balance" in k for k in layer.state_dict())
    import pickle

    assert pickle.loads(pickle.dumps(layer)).router.balance_group.group is None  # groups are per job
    with pytest.raises(ValueError, match="'local'"):
        layer.set_balance_group("everyone")


def test_balance_group_is_borrowed_not_owned(world1):
    """The layer holds its balance group weakly (as moesys.parallel does): destroy_process_group()
    frees it, and a later training forward says so instead of using a dead group."""
    import gc

    import torch.distributed as dist

    layer = make(G=None, TG=None, aux_loss="global_batch")
    g = dist.new_group([0])
    layer.set_balance_group(g)
    layer(torch.randn(5, 12))  # reduces over g
    dist.destroy_process_group(g)
    del g
    gc.collect()
    with pytest.raises(RuntimeError, match="balance group.*destroyed"):
        layer(torch.randn(5, 12))


@pytest.mark.parametrize("router", ["topk", "switch"])
def test_softmax_scores_rank_groups_by_their_top_two(router):
    """Softmax scores (not only sigmoid ones): expert 0 has the best probability, but group 1's two
    best sum higher, so every token goes to expert 2, on the host-plan and the sync-free paths, with
    the softmax probability of expert 2 as its weight (switch: the same; it scales by p_max of the
    allowed experts)."""
    layer = make(router, E=4, K=1, G=2, TG=1, D=2)
    z = torch.tensor([2.0, -5.0, 1.8, 1.6])
    with torch.no_grad():
        layer.router.weight.zero_()
        layer.router.weight[:, 0] = z
    x = torch.tensor([[1.0, 0.0]] * 3)
    p2 = float(torch.softmax(z, 0)[2])
    assert float(torch.softmax(z, 0).argmax()) == 0  # without the group limit expert 0 would win
    routing = layer.router(x, seq_len=3)
    assert routing.expert_idx_R.tolist() == [2, 2, 2]
    torch.testing.assert_close(routing.weight_R, torch.full((3,), p2))
    static = layer.router.route_static(x, seq_len=3)
    assert static.expert_TK.view(-1).tolist() == [2, 2, 2]
    torch.testing.assert_close(static.weight_TK.view(-1), torch.full((3,), p2))
