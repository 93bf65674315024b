"""RoutedFFN against a dense masked reference in float64, for both routers."""
import pytest
import torch
import torch.nn.functional as F

from monoroute import MonorouteError, RoutedFFN, SparseActivations


def make_layer(router, n_units=64, k=4, d=8, **kw):
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


@pytest.mark.parametrize("router", ["dense", "product_key"])
@pytest.mark.parametrize("k", [1, 4, 64])
def test_matches_dense_masked_reference(router, k):
    layer = make_layer(router, k=k)
    x = torch.randn(10, 8, dtype=torch.double)
    fast, ref = grads(layer, x, layer), grads(layer, x, lambda x: dense_reference(layer, x))
    assert fast.keys() == ref.keys()
    for name in ref:
        torch.testing.assert_close(fast[name], ref[name], rtol=1e-10, atol=1e-12, msg=name)


@pytest.mark.parametrize("k", [1, 5, 64])
def test_product_key_search_finds_exact_top_k(k):
    layer = make_layer("product_key", k=k)
    x = torch.randn(50, 8, dtype=torch.double)
    got = layer.router(x).indices.sort(-1).values
    want = layer.router.all_scores(x).topk(k, dim=-1).indices.sort(-1).values
    assert torch.equal(got, want)


@pytest.mark.parametrize("router", ["dense", "product_key"])
def test_gradcheck(router):
    layer = make_layer(router, n_units=16, k=3, d=4)
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
