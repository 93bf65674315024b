"""RoutedFFN against a dense masked reference in float64, for both routers."""
import pytest
import torch
import torch.nn.functional as F

from monoroute import MonorouteError, RoutedFFN, SparseActivations
from monoroute.layers import Routing


def make_layer(router="product_key", n_units=64, k=4, d=8, **kw):
    kw.setdefault("aux_coef", 0.0)
    kw.setdefault("impl", "reference")
    return RoutedFFN(d, n_units, k, router=router, **kw).double()


def dense_reference(layer: RoutedFFN, x):
    """y from full (T, N) tensors: every unit's pre-activation, masked to the exact top-k by score."""
    pre = x @ layer.w_in.t() + layer.b_in  # (T, N)
    scores = pre if layer.router_name == "dense" else layer.router.all_scores(x)  # (T, N)
    mask = torch.zeros_like(pre).scatter(-1, scores.topk(layer.k, dim=-1).indices, 1.0)
    h = F.relu(pre)
    if layer.gate == "sigmoid":
        h = h * torch.sigmoid(scores)
    return (h * mask) @ layer.w_out


def grads(layer, x, fn):
    layer.zero_grad()
    x = x.detach().clone().requires_grad_()
    y = fn(x)
    (y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)).sum().backward()
    out = {"x": x.grad.clone(), "y": y.detach()}
    out.update({name: p.grad.clone() for name, p in layer.named_parameters() if p.grad is not None})
    return out


ROUTERS = [dict(router="dense"), dict(router="product_key"), dict(router="product_key", router_heads=3),
           dict(router="product_key", router_balance=True)]


@pytest.mark.parametrize("kw", ROUTERS)
@pytest.mark.parametrize("k", [1, 4, 64])
def test_matches_dense_masked_reference(kw, k):
    layer = make_layer(k=k, **kw)
    x = torch.randn(10, 8, dtype=torch.double)
    fast, ref = grads(layer, x, layer), grads(layer, x, lambda x: dense_reference(layer, x))
    assert fast.keys() == ref.keys()
    for name in ref:
        torch.testing.assert_close(fast[name], ref[name], rtol=1e-10, atol=1e-12, msg=name)


@pytest.mark.parametrize("balance", [False, True])
@pytest.mark.parametrize("k", [1, 5, 64])
def test_product_key_search_finds_exact_top_k(k, balance):
    layer = make_layer("product_key", k=k, router_balance=balance)
    x = torch.randn(50, 8, dtype=torch.double)
    got = layer.router(x).indices.sort(-1).values
    want = layer.router.all_scores(x).topk(k, dim=-1).indices.sort(-1).values
    assert torch.equal(got, want)


@pytest.mark.parametrize("kw", ROUTERS)
def test_gradcheck(kw):
    layer = make_layer(n_units=16, k=3, d=4, **kw)
    x = torch.randn(5, 4, dtype=torch.double, requires_grad=True)
    params = [p for p in layer.parameters()]

    def f(x, *values):
        with torch.nn.utils.stateless._reparametrize_module(layer, dict(zip([n for n, _ in layer.named_parameters()], values))):
            return layer(x)

    assert torch.autograd.gradcheck(f, (x, *params))


@pytest.mark.parametrize("router", ["dense", "product_key"])
def test_only_selected_rows_get_gradient(router):
    layer = make_layer(router)
    x = torch.randn(6, 8, dtype=torch.double)
    layer(x).sum().backward()
    selected = torch.zeros(64, dtype=torch.bool)
    selected[layer.last_activations.indices.flatten()] = True
    for table in (layer.w_in, layer.w_out):
        assert table.grad[~selected].abs().max() == 0  # exactly zero, not small
        assert table.grad[selected].abs().sum(-1).gt(0).any()


@pytest.mark.parametrize("router", ["dense", "product_key"])
def test_no_tokens_by_units_tensor_is_saved_for_backward(router):
    T, N, k, d = 16, 256, 2, 8  # T*N = 4096 is larger than every legitimate saved tensor (T*k*d = 256)
    layer = make_layer(router, n_units=N, k=k, d=d)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        layer(torch.randn(T, d, dtype=torch.double)).sum().backward()
    assert saved and max(saved) < T * N


def test_leading_dims_and_recorded_routing():
    layer = make_layer("product_key")
    y = layer(torch.randn(2, 3, 8, dtype=torch.double))
    assert y.shape == (2, 3, 8)
    acts = layer.last_activations
    assert acts.indices.shape == acts.values.shape == (2, 3, 4)
    assert acts.to_dense().shape == (2, 3, 64)


def test_k_is_a_cap_relu_may_silence_selected_units():
    layer = make_layer("dense", k=8)
    with torch.no_grad():
        layer.b_in.fill_(-100.0)  # every pre-activation negative: all selected units stay at zero
    y = layer(torch.randn(4, 8, dtype=torch.double))
    assert torch.all(layer.last_activations.values == 0) and torch.all(y == 0)


def test_firing_statistics_and_dead_window():
    layer = make_layer("dense", n_units=16, k=2, d=4, dead_window=10)
    layer.train()
    x = torch.randn(4, 4, dtype=torch.double)
    layer(x)
    fired = layer.last_activations.indices[layer.last_activations.values != 0].unique()
    assert set((layer.last_fired >= 0).nonzero().flatten().tolist()) == set(fired.tolist())
    assert int(layer.fire_count.sum()) == int((layer.last_activations.values != 0).sum())
    assert fired.numel() < 16 and layer.dead_fraction() == 0.0  # 4 tokens < dead_window: the unfired are untried
    with torch.no_grad():
        layer.b_in.fill_(-100.0)  # nothing fires any more
    layer(x)
    assert layer.dead_fraction() == 0.0  # 8 tokens: still inside every unit's grace window
    for _ in range(2):
        layer(x)  # 16 tokens: the units that fired at token 4 are now 12 > dead_window tokens back
    assert layer.dead_fraction() == 1.0
    layer.eval()
    before = layer.tokens_seen.clone()
    layer(x)
    assert torch.equal(layer.tokens_seen, before)  # evaluation does not count as training use


@pytest.mark.parametrize("router", ["dense", "product_key"])
def test_revival_loss_reaches_dead_units_only(router):
    layer = make_layer(router, n_units=64, k=2, aux_coef=1.0, aux_units=8, dead_window=4)
    layer.train()
    x = torch.randn(4, 8, dtype=torch.double)
    layer(x)  # 4 tokens = dead_window: the units not fired on them are dead
    assert layer.aux_loss > 0
    layer.zero_grad()
    layer.aux_loss.backward()
    alive = ~layer.dead_mask()
    touched = layer.w_in.grad.abs().sum(-1) > 0
    assert touched.any() and not (touched & alive).any()
    assert 0 < int(touched.sum()) <= 8


def test_l1_pressure_is_part_of_the_aux_loss():
    layer = make_layer("dense", l1_coef=0.5)
    layer.train()
    layer(torch.randn(4, 8, dtype=torch.double))
    expected = 0.5 * layer.last_activations.values.abs().sum(-1).mean()
    torch.testing.assert_close(layer.aux_loss, expected)


def test_hook_post_replacement_ablates_and_steers():
    layer = make_layer("product_key")
    x = torch.randn(3, 8, dtype=torch.double)
    y = layer(x)
    acts = layer.last_activations
    unit = int(acts.indices[0, 0])
    layer.hook_post.fns.append(lambda a, hook: a.ablate([unit]))
    ablated = layer(x)
    contribution = (acts.values * (acts.indices == unit)).sum(-1, keepdim=True) * layer.w_out[unit]
    torch.testing.assert_close(ablated, y - contribution)
    layer.hook_post.fns[:] = [lambda a, hook: a.with_unit(7, 2.0)]
    torch.testing.assert_close(layer(x), y + 2.0 * layer.w_out[7])


def test_sparse_activations_to_dense():
    acts = SparseActivations(torch.tensor([[1, 3]]), torch.tensor([[0.5, 2.0]]), 5)
    assert acts.to_dense().tolist() == [[0.0, 0.5, 0.0, 2.0, 0.0]]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(n_units=64, k=65), "k must be between 1 and n_units"),
        (dict(n_units=64, k=0), "k must be between 1 and n_units"),
        (dict(n_units=50, k=4), "perfect square, got 50; use 49 or 64"),
        (dict(n_units=64, k=4, router="hash"), "unknown router 'hash'"),
        (dict(n_units=64, k=4, activation="tanh"), "unknown activation 'tanh'"),
        (dict(n_units=64, k=4, impl="cuda-magic"), "unknown impl 'cuda-magic'"),
        (dict(n_units=64, k=4, dead_window=0), "dead_window must be a whole number of tokens >= 1, got 0"),
        (dict(n_units=64, k=4, router_heads=0), "router_heads must be a whole number >= 1, got 0"),
        (dict(n_units=64, k=4, router="dense", router_heads=2), "router_heads, router_balance and coupling='preact' need router="),
        (dict(n_units=64, k=4, router="dense", router_balance=True), "router_balance and coupling='preact' need router="),
        (dict(n_units=64, k=4, coupling="both"), "unknown coupling 'both'"),
        (dict(n_units=64, k=4, coupling="agreement", activation="gelu"), "needs router='product_key' and activation="),
        (dict(n_units=64, k=4, coupling="preact", router="dense"), "needs router='product_key' and activation="),
        (dict(n_units=64, k=4, agree_coef=-1.0), "agree_coef must be a finite number >= 0"),
    ],
)
def test_bad_arguments_raise_one_clear_error(kwargs, message):
    with pytest.raises(MonorouteError, match=message):
        RoutedFFN(8, **kwargs)


@pytest.mark.parametrize("router", ["dense", "product_key"])
def test_sparse_grad_survives_the_revival_loss(router):
    layer = make_layer(router, aux_coef=1.0, aux_units=8, sparse_grad=True, impl="cpu", dead_window=6)
    layer.train()
    y = layer(torch.randn(6, 8, dtype=torch.double))
    (y.sum() + layer.aux_loss).backward()
    assert layer.w_in.grad.is_sparse and layer.w_out.grad.is_sparse


def test_training_on_zero_tokens():
    layer = make_layer("product_key", aux_coef=1.0)
    layer.train()
    assert layer(torch.randn(0, 8, dtype=torch.double)).shape == (0, 8)


def test_never_fired_units_get_a_grace_window():
    # A 64-token step of a 4096-unit layer tries ~k*64 units; the untried ones are not dead yet.
    layer = make_layer("product_key", n_units=4096, k=4, d=8, aux_coef=1.0, dead_window=200)
    layer.train()
    x = torch.randn(64, 8, dtype=torch.double)
    layer(x)
    assert int((layer.last_fired >= 0).sum()) < 4096 // 4 and int(layer.dead_mask().sum()) == 0
    assert layer.aux_loss == 0  # no dead unit: nothing to revive
    layer(x)
    layer(x)  # 192 tokens: still < dead_window
    assert int(layer.dead_mask().sum()) == 0
    layer(x)  # 256 tokens > dead_window: a never-fired unit is dead, one fired on the last step is not
    never = layer.last_fired < 0
    recent = layer.last_fired == 256
    assert never.any() and recent.any()
    assert bool(layer.dead_mask()[never].all()) and not bool(layer.dead_mask()[recent].any())
    assert layer.aux_loss > 0


def test_dead_grace_zero_counts_untried_units_dead_from_the_first_step():
    # dead_grace=0 is the behaviour before the grace window: every never-fired unit is dead (and a
    # revival target) at once, while a unit that fired stays alive for dead_window tokens.
    layer = make_layer("product_key", n_units=4096, k=4, d=8, aux_coef=1.0, dead_window=200, dead_grace=0)
    layer.train()
    layer(torch.randn(64, 8, dtype=torch.double))
    fired = layer.last_fired >= 0
    assert 0 < int(fired.sum()) < 4096 // 4
    assert torch.equal(layer.dead_mask(), ~fired) and layer.aux_loss > 0
    with pytest.raises(MonorouteError, match="dead_grace"):
        make_layer("product_key", n_units=64, k=2, dead_grace=-1)


def test_revival_loss_reuses_the_forward_half_scores():
    layer = make_layer("product_key", n_units=64, k=2, aux_coef=1.0, aux_units=8, dead_window=4)
    layer.train()
    calls = []
    layer.router.query.register_forward_hook(lambda *_: calls.append(1))
    x = torch.randn(4, 8, dtype=torch.double)
    layer(x)
    assert len(calls) == 1 and layer.aux_loss > 0  # the revival loss ran, on the forward's query
    params = dict(layer.named_parameters())

    def revival(recompute: bool):
        torch.manual_seed(0)  # the same sample of dead units both times
        routing = layer.router(x)
        if recompute:
            routing = routing._replace(halves=None)
        loss = layer.revival_loss(x, routing)
        return loss, torch.autograd.grad(loss, list(params.values()), allow_unused=True)

    (reused, g_reused), (recomputed, g_recomputed) = revival(False), revival(True)
    torch.testing.assert_close(reused, recomputed, rtol=1e-12, atol=0)
    for name, a, b in zip(params, g_reused, g_recomputed):
        assert (a is None) == (b is None), name
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-15, msg=name)
    assert g_reused[list(params).index("router.query.weight")].abs().sum() > 0  # the query is on the gradient path


def no_gradient(grad) -> bool:
    """None, or exactly zero (the l1 term, 0 * |h|, links h to the graph with a zero weight)."""
    return grad is None or not grad.any()


@pytest.mark.parametrize("k", [1, 5, 64])
def test_multi_head_search_is_exact_per_head_and_merges_without_repeats(k):
    layer = make_layer("product_key", k=k, router_heads=3)
    router, x = layer.router, torch.randn(50, 8, dtype=torch.double)
    per_head, _ = router.search_heads(*router.half_scores(x))  # (T, 3, k)
    full = router.head_scores(x)  # (T, 3, N) dense reference
    assert torch.equal(per_head.sort(-1).values, full.topk(k, dim=-1).indices.sort(-1).values)
    got = router(x).indices.sort(-1).values  # (T, k)
    assert not (got[:, 1:] == got[:, :-1]).any()  # no unit twice for one token
    assert torch.equal(got, full.amax(1).topk(k, dim=-1).indices.sort(-1).values)  # top-k of the best head's score
    if k < 64:  # the heads disagree, so the union really mixes them (at k = N every head finds all units)
        assert not torch.equal(got, per_head[:, 0].sort(-1).values)


def test_multi_head_gradients_reach_every_head_query():
    layer = make_layer("product_key", k=4, router_heads=3)
    g = grads(layer, torch.randn(32, 8, dtype=torch.double), layer)["router.query.weight"].view(3, 8, 8)
    assert (g.abs().sum((1, 2)) > 0).all()  # each head is the best one for some selected unit


def test_agreement_loss_on_a_hand_built_case():
    layer = make_layer("product_key", n_units=16, k=3, d=4, coupling="agreement")
    scores = torch.tensor([[2.0, 1.0, 0.5], [0.1, 0.3, 0.2]], dtype=torch.double, requires_grad=True)
    routing = Routing(torch.zeros(2, 3, dtype=torch.long), scores)
    fires = torch.tensor([[0.3, 0.1, 0.2], [0.1, 0.2, 0.4]], dtype=torch.double)
    assert layer.agreement_loss(routing, fires) == 0
    silenced = fires.clone()
    silenced[0, 1] = 0.0  # selected with score 1.0 above the threshold 0.5, but ReLU keeps it at zero
    loss = layer.agreement_loss(routing, silenced)
    assert loss.item() == pytest.approx((1.0 - 0.5) / 4.0 / 6)  # in units of the router's scale, 4 at init
    (grad,) = torch.autograd.grad(loss, scores)
    expected = torch.zeros_like(grad)
    expected[0, 1] = 1 / 4.0 / 6  # positive: gradient descent lowers only the silenced unit's score
    torch.testing.assert_close(grad, expected)


def test_agreement_loss_in_the_layer_trains_the_router_only():
    layer = make_layer("product_key", n_units=16, k=3, d=4, coupling="agreement", agree_coef=1.0)
    layer.train()
    x = torch.randn(8, 4, dtype=torch.double)
    with torch.no_grad():
        layer.b_in.fill_(100.0)  # every selected unit fires
    layer(x)
    assert layer.aux_loss == 0
    with torch.no_grad():
        layer.b_in[::2] = -100.0  # half the units can never fire
    layer(x)
    acts, routing = layer.last_activations, layer.router(x)
    silent = (acts.values == 0).double()
    scale = layer.router.log_scale.exp().squeeze()
    expected = ((routing.scores - routing.scores.min(-1, keepdim=True).values) * silent).sum() / scale / 24
    torch.testing.assert_close(layer.aux_loss, expected)
    assert layer.aux_loss > 0.01
    params = dict(layer.named_parameters())
    grad = dict(zip(params, torch.autograd.grad(layer.aux_loss, list(params.values()), allow_unused=True)))
    assert no_gradient(grad["w_in"]) and grad["router.query.weight"].abs().sum() > 0
    assert grad["router.log_scale"].abs().item() < 1e-12  # shrinking the scale is no way out of the loss


def test_preact_selection_keeps_firing_units_against_a_dense_reference():
    T, N, k = 60, 64, 4
    layer = make_layer("product_key", n_units=N, k=k, coupling="preact")
    with torch.no_grad():
        layer.b_in.normal_(0, 0.3)
    x = torch.randn(T, 8, dtype=torch.double)
    got = layer.router(x, layer.w_in, layer.b_in).indices
    scores = layer.router.all_scores(x)  # (T, N) float64 dense reference
    pre = x @ layer.w_in.t() + layer.b_in  # (T, N)
    mattered = 0
    for t in range(T):
        cand = scores[t].topk(2 * k).indices.tolist()  # by score, best first
        firing = [u for u in cand if pre[t, u] > 0]
        want = (firing + [u for u in cand if pre[t, u] <= 0])[:k]
        assert set(got[t].tolist()) == set(want)
        if len(firing) >= k:
            assert bool((pre[t, got[t]] > 0).all())
            mattered += set(want) != set(cand[:k])
    assert mattered >= 10  # plain top-k by score would have kept silent units on these tokens


def test_gelu_units_always_fire_and_revival_moves_only_the_router():
    """GELU/SiLU are nonzero almost everywhere: every selected unit fires (L0 = k, k is a quota),
    so a unit is dead only if never selected and the revival loss pulls its score alone."""
    for activation in ("gelu", "silu"):
        layer = make_layer("product_key", k=4, activation=activation, aux_coef=1.0, dead_window=8)
        layer.train()
        layer(torch.randn(8, 8, dtype=torch.double))
        assert bool((layer.last_activations.values != 0).all())
        assert int(layer.fire_count.sum()) == 8 * 4
        params = dict(layer.named_parameters())
        grad = dict(zip(params, torch.autograd.grad(layer.aux_loss, list(params.values()), allow_unused=True)))
        assert layer.aux_loss > 0 and no_gradient(grad["w_in"]) and grad["router.keys"].abs().sum() > 0


def test_routing_agreement_measures_live_slots_and_score_pre_correlation():
    from monoroute.bench.agreement import routing_agreement

    x = torch.randn(64, 8, dtype=torch.double)
    dense = make_layer("dense", k=4)
    got = routing_agreement(dense, x)
    pre = x @ dense.w_in.t() + dense.b_in
    assert got["score_pre_corr"] == pytest.approx(1.0)  # the dense router's score is the pre-activation
    assert got["live_slot_fraction"] == pytest.approx((pre.topk(4, -1).values > 0).double().mean().item())
    with torch.no_grad():
        dense.b_in.fill_(-100.0)
    assert routing_agreement(dense, x)["live_slot_fraction"] == 0.0


def test_balance_scores_standardise_each_half_per_token():
    from monoroute.layers.routing import balance_scores

    s = torch.tensor([[0.0, 1.0, 2.0, 3.0], [10.0, 10.0, 10.0, 14.0]], dtype=torch.double)
    b = balance_scores(s)
    torch.testing.assert_close(b.mean(-1), torch.zeros(2, dtype=torch.double))
    torch.testing.assert_close(b.std(-1), torch.ones(2, dtype=torch.double), rtol=1e-5, atol=1e-5)
    assert torch.equal(b[0].argsort(), s[0].argsort())  # the order within a half is unchanged
    torch.testing.assert_close(b[1], torch.tensor([-0.5, -0.5, -0.5, 1.5], dtype=torch.double), rtol=1e-5, atol=1e-5)


def test_multi_pool_revival_pulls_a_dead_unit_to_its_own_pools_threshold():
    """Two pools of 64 units, 2 picks each. Pool 1's picks score far below pool 0's; a dead unit of
    pool 0 must reach pool 0's lowest pick, not the lower minimum over both pools."""
    torch.manual_seed(0)
    layer = RoutedFFN(8, 128, 4, router="multi_pool", router_pools=2, coupling="none", impl="reference").double()
    x = torch.randn(5, 8, dtype=torch.double)
    routing = layer.router(x)
    scores = routing.scores.detach().clone()
    scores[:, 2:] -= 100.0  # pool 1's picks (the last k/P slots) now score far lower
    units = torch.tensor([3, 70])  # one unit of each pool
    got = layer.selection_threshold(routing._replace(scores=scores), units)
    torch.testing.assert_close(got[:, 0], scores[:, :2].min(-1).values)  # pool 0's own picks
    torch.testing.assert_close(got[:, 1], scores[:, 2:].min(-1).values)
    assert bool((got[:, 0] > scores.min(-1).values + 50).all())  # the old all-pool minimum was 100 lower
    single = make_layer("product_key")
    r = single.router(torch.randn(5, 8, dtype=torch.double))
    torch.testing.assert_close(single.selection_threshold(r, torch.tensor([1, 2]))[:, 0], r.scores.min(-1).values)


def test_gated_units_match_a_float64_reference_in_value_and_gradient():
    """Gated units (a SwiGLU teacher's): h_i = silu(w_gate[i]·x) * (w_in[i]·x + b_i) * sigmoid(score_i),
    y = sum_i h_i w_out[i], against a hand-written float64 reference on the same selection, values and
    every gradient; selection reads the gate's pre-activation."""
    import torch.nn.functional as F

    from monoroute.layers import RoutedFFN

    for impl in ("reference", "cpu"):
        torch.manual_seed(0)
        layer = RoutedFFN(8, 64, 4, activation="silu", gated=True, impl=impl).double()
        assert layer.select_tables()[0] is layer.w_gate and layer.gate == "sigmoid"
        x = torch.randn(5, 8, dtype=torch.float64, requires_grad=True)
        layer.eval()
        y = layer(x)
        idx = layer.last_activations.indices
        routing = layer.router(x, layer.w_gate, None)
        assert torch.equal(routing.indices, idx)
        r = torch.randn_like(y)
        (y * r).sum().backward()
        tables = [t.detach().clone().requires_grad_(True) for t in (layer.w_gate, layer.w_in, layer.b_in, layer.w_out)]
        xr = x.detach().clone().requires_grad_(True)
        w_gate, w_in, b_in, w_out = tables
        g = torch.einsum("td,tkd->tk", xr, w_gate[idx])
        u = torch.einsum("td,tkd->tk", xr, w_in[idx]) + b_in[idx]
        h = F.silu(g) * u * torch.sigmoid(routing.scores.detach())
        ref = torch.einsum("tk,tkd->td", h, w_out[idx])
        assert torch.allclose(y, ref, atol=1e-12) and torch.allclose(layer.last_activations.values, h, atol=1e-12)
        (ref * r).sum().backward()
        # x also feeds the router's sigmoid gate in the layer; the reference holds the scores fixed
        for mine, theirs in ((layer.w_gate.grad, w_gate.grad), (layer.w_in.grad, w_in.grad),
                             (layer.b_in.grad, b_in.grad), (layer.w_out.grad, w_out.grad)):
            mine = mine.to_dense() if mine.is_sparse else mine
            assert torch.allclose(mine, theirs, atol=1e-10), impl
