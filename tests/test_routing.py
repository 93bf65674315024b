"""Sub-linear routing at exact-selection quality: selection recall, the clustered index, candidate
re-ranking. Every fast path against a float64 reference; recall on hand-built layers with known answers."""
import math

import pytest
import torch
import torch.nn.functional as F

from monoroute import GPT, GPTConfig, MonorouteError, RoutedFFN
from monoroute.layers.recall import model_selection_recall, recall_of, selection_recall
from monoroute.layers.routing import balanced_kmeans, capacity_assign, cluster_preacts, preacts


def layer(router="cluster", n_units=64, k=4, d=8, **kw):
    kw.setdefault("aux_coef", 0.0)
    kw.setdefault("impl", "reference")
    torch.manual_seed(0)
    return RoutedFFN(d, n_units, k, router=router, **kw).double()


# --- selection recall -------------------------------------------------------------------------------------------

def test_recall_of_a_hand_built_case():
    # Token 0: pre-activations 5, 4, 3, 2, -1 on units 0..4; k = 2, exact top-2 = {0, 1}; chosen {0, 2}.
    # Token 1: exact top-2 = {3, 4} (values 0.5, -2: only 0.5 is positive mass); chosen {3, 4}.
    pre = torch.tensor([[5.0, 4.0, 3.0, 2.0, -1.0], [-3.0, -3.0, -3.0, 0.5, -2.0]])
    chosen = torch.tensor([[0, 2], [4, 3]])
    got = recall_of(chosen, pre, 2)
    assert got["recall"] == pytest.approx(3 / 4)  # 1 of 2, then 2 of 2
    assert got["mass"] == pytest.approx((5 + 0.5) / (5 + 4 + 0.5))
    assert got["tokens"] == 2


def test_recall_of_with_no_positive_mass_and_a_total_miss():
    pre = torch.tensor([[-1.0, -2.0, -3.0, -4.0]])
    got = recall_of(torch.tensor([[2, 3]]), pre, 2)
    assert got["recall"] == 0.0 and got["mass"] is None  # nothing positive to capture: not a fake 0 or 1


def test_dense_router_recall_is_one_and_product_keys_are_below_at_init():
    dense = layer("dense", n_units=256, k=8)
    x = torch.randn(200, 8, dtype=torch.double)
    assert selection_recall(dense, x)["recall"] == 1.0
    pk = layer("product_key", n_units=256, k=8)
    got = selection_recall(pk, x)
    # Random keys are unrelated to w_in: recall near the chance share k / N = 0.03, far from 1.
    assert got["recall"] < 0.2


def test_cluster_router_that_probes_every_cluster_is_exact():
    exhaustive = layer("cluster", n_units=64, k=4, router_clusters=8, router_probes=8)
    x = torch.randn(100, 8, dtype=torch.double)
    assert selection_recall(exhaustive, x) == {"recall": 1.0, "mass": 1.0, "tokens": 100}


def test_cluster_router_misses_a_unit_whose_cluster_ranks_low():
    """Hand-built: 4 clusters of 2 units in d = 2; the token x = (1, 0). Cluster 0 holds units 0, 1 with
    rows (3, 0) and (-3, 0): mean pre 0, though unit 0's pre is 3, the largest. Clusters 1..3 have mean
    pre 1, 0.5, -1. One probe picks cluster 1 (units 2, 3: pre 1.5, 0.5), so the exact top-1 (unit 0) is
    missed: recall 0, mass 0; two probes still skip cluster 0 (cluster 2 ranks above it)."""
    lay = layer("cluster", n_units=8, k=1, d=2, router_clusters=4, router_probes=1, bias=False)
    with torch.no_grad():
        lay.w_in.copy_(torch.tensor([[3, 0], [-3, 0], [1.5, 0], [0.5, 0], [0.6, 0], [0.4, 0], [-1, 0], [-1, 0.]]))
        lay.router.members.copy_(torch.arange(8).view(4, 2))
    x = torch.tensor([[1.0, 0.0]], dtype=torch.double)
    assert lay.router(x, lay.w_in, lay.b_in).indices.tolist() == [[2]]
    assert selection_recall(lay, x) == {"recall": 0.0, "mass": 0.0, "tokens": 1}
    lay.router.probes, lay.router.candidates = 2, 4
    assert selection_recall(lay, x)["recall"] == 0.0
    lay.router.probes, lay.router.candidates = 3, 6
    assert selection_recall(lay, x)["recall"] == 1.0


def test_model_selection_recall_per_layer_and_dense_models():
    cfg = dict(vocab_size=32, block_size=16, n_layer=2, n_head=2, d_model=16, n_units=64, k=4, impl="reference")
    routed = GPT(GPTConfig(ffn="dense,routed", router="dense", **cfg))
    got = model_selection_recall(routed, torch.randint(0, 32, (2, 16)), max_tokens=20)
    assert list(got["layers"]) == ["blocks.1.mlp"] and got["layers"]["blocks.1.mlp"]["tokens"] == 20
    assert got["recall"] == 1.0
    assert model_selection_recall(GPT(GPTConfig(ffn="dense", **cfg)), torch.randint(0, 32, (1, 8))) == {}


# --- the clustered index -----------------------------------------------------------------------------------------

def test_cluster_preacts_match_the_reference_dot():
    lay = layer("cluster", n_units=64, k=4, router_clusters=8, router_probes=3)
    x = torch.randn(40, 8, dtype=torch.double)
    probed = lay.router.probe(x, lay.w_in, lay.b_in)
    cand, pre = cluster_preacts(x, lay.w_in, lay.b_in, lay.router.members, probed)
    assert cand.shape == (40, 24)
    want = torch.stack([lay.router.members[probed[t]].flatten() for t in range(40)])
    assert torch.equal(cand, want)
    torch.testing.assert_close(pre, (x.unsqueeze(1) * lay.w_in[cand]).sum(-1) + lay.b_in[cand], rtol=0, atol=1e-12)


def test_cluster_selection_is_the_exact_top_k_of_the_probed_clusters():
    lay = layer("cluster", n_units=64, k=4, router_clusters=8, router_probes=2)
    x = torch.randn(30, 8, dtype=torch.double)
    got = lay.router(x, lay.w_in, lay.b_in).indices
    pre = x @ lay.w_in.t() + lay.b_in  # (T, N) float64 reference
    mu = lay.w_in[lay.router.members].mean(1)
    cscore = x @ mu.t() + lay.b_in[lay.router.members].mean(1)
    for t in range(30):
        units = lay.router.members[cscore[t].topk(2).indices].flatten()
        want = units[pre[t, units].topk(4).indices]
        assert set(got[t].tolist()) == set(want.tolist())


def test_cluster_layer_matches_the_dense_masked_reference_with_gradients():
    lay = layer("cluster", n_units=64, k=4, router_clusters=8, router_probes=2)
    lay.eval()
    x = torch.randn(20, 8, dtype=torch.double, requires_grad=True)
    idx = lay.router(x, lay.w_in, lay.b_in).indices
    y = lay(x)
    w = torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)
    (y * w).sum().backward()
    fast = {"x": x.grad.clone(), **{n: p.grad.clone() for n, p in lay.named_parameters()}}
    lay.zero_grad()
    x2 = x.detach().clone().requires_grad_()
    pre = x2 @ lay.w_in.t() + lay.b_in
    mask = torch.zeros_like(pre).scatter(-1, idx, 1.0)
    ref = (F.relu(pre) * mask) @ lay.w_out
    torch.testing.assert_close(y, ref)
    (ref * w).sum().backward()
    for name, g in (("x", x2.grad), *((n, p.grad) for n, p in lay.named_parameters())):
        torch.testing.assert_close(fast[name], g, rtol=1e-10, atol=1e-12, msg=name)


def test_capacity_assign_fills_every_group_and_keeps_free_preferences():
    aff = torch.randn(600, 6)
    members = capacity_assign(aff, 100)
    assert members.shape == (6, 100)
    assert torch.equal(members.flatten().sort().values, torch.arange(600))
    # When every unit's favourite group has room, each unit gets its favourite.
    easy = torch.full((6, 3), -1.0)
    for u, g in enumerate([0, 0, 1, 1, 2, 2]):
        easy[u, g] = 1.0
    assert capacity_assign(easy, 2).tolist() == [[0, 1], [2, 3], [4, 5]]
    # Over-subscribed: 3 units want group 0 (room 2); the weakest one goes to its second choice.
    tight = torch.tensor([[3.0, 0.0], [2.0, 0.0], [1.0, 0.5], [0.0, 1.0]])
    assert capacity_assign(tight, 2).tolist() == [[0, 1], [2, 3]]


def test_balanced_kmeans_recovers_planted_clusters():
    torch.manual_seed(1)
    centres = torch.randn(4, 6) * 5
    truth = torch.arange(40) % 4
    rows = centres[truth] + 0.1 * torch.randn(40, 6)
    start = torch.randperm(40).view(4, 10)
    got = balanced_kmeans(rows, start, iterations=5)
    groups = {frozenset(truth[g].tolist()) for g in got}
    assert groups == {frozenset([0]), frozenset([1]), frozenset([2]), frozenset([3])}


def test_cluster_router_balances_probing_and_reclusters_on_schedule():
    lay = layer("cluster", n_units=64, k=4, router_clusters=8, router_probes=1, recluster_every=3,
                cluster_balance=0.05)
    with torch.no_grad():  # make cluster 0 win every token at the start
        lay.w_in[lay.router.members[0]] += torch.ones(8, dtype=torch.double)
    x = torch.randn(64, 8, dtype=torch.double).abs()
    lay.train()
    before = lay.router.members.clone()
    for _ in range(2):
        lay(x)
    assert lay.router.probe_bias[0] < 0 and (lay.router.probe_bias[1:] > 0).all()  # the hog falls, the rest rise
    assert torch.equal(lay.router.members, before)  # not yet: every 3 calls
    lay(x)
    assert int(lay.router.calls) == 3 and not torch.equal(lay.router.members, before)
    assert torch.equal(lay.router.members.flatten().sort().values, torch.arange(64))
    lay.eval()
    calls = int(lay.router.calls)
    lay(x)
    assert int(lay.router.calls) == calls  # eval forwards never touch the index
    clone = layer("cluster", n_units=64, k=4, router_clusters=8, router_probes=1, recluster_every=3)
    clone.load_state_dict(lay.state_dict())  # the index and the bias are saved with the weights
    assert torch.equal(clone.router.members, lay.router.members)
    assert torch.equal(clone.router.probe_bias, lay.router.probe_bias)


# --- candidate re-ranking (product keys) ---------------------------------------------------------------------

def test_rerank_selects_the_top_k_preact_among_the_top_c_by_score():
    lay = layer("product_key", n_units=64, k=4, coupling="rerank", router_candidates=16)
    assert lay.gate == "none"
    x = torch.randn(30, 8, dtype=torch.double)
    got = lay.router(x, lay.w_in, lay.b_in)
    scores = lay.router.all_scores(x)
    pre = x @ lay.w_in.t() + lay.b_in
    for t in range(30):
        cand = scores[t].topk(16).indices
        assert set(got.candidates[t].tolist()) == set(cand.tolist())
        assert set(got.indices[t].tolist()) == set(cand[pre[t, cand].topk(4).indices].tolist())
    torch.testing.assert_close(got.candidate_pre, preacts(x, lay.w_in, lay.b_in, got.candidates, "reference"))


@pytest.mark.parametrize("heads", [1, 2])
def test_grid_proposals_are_each_heads_top_g_subkeys_crossed_and_the_top_k_preact_among_them(heads):
    """router_proposals='grid': each head proposes {a*n + b : a in its top g of half 1, b in its top g of
    half 2}, g = ceil(sqrt(C / H)); the k with the largest pre-activation among their union run.
    Against a float64 brute force. Negative control: the grid is not the exact top C by score."""
    lay = layer("product_key", n_units=256, k=4, coupling="rerank", router_candidates=18, router_heads=heads,
                router_proposals="grid")
    g = math.ceil(math.sqrt(-(-18 // heads)))
    assert lay.router.k_grid == g
    x = torch.randn(30, 8, dtype=torch.double)
    got = lay.router(x, lay.w_in, lay.b_in)
    assert got.candidates.shape == (30, heads * g * g)
    s1, s2 = lay.router.half_scores(x)  # (T, H, 16) each
    pre = x @ lay.w_in.t() + lay.b_in
    exact_differs = 0
    for t in range(30):
        proposed = set()
        for h in range(heads):
            rows, cols = s1[t, h].topk(g).indices.tolist(), s2[t, h].topk(g).indices.tolist()
            proposed |= {a * 16 + b for a in rows for b in cols}
        assert set(got.candidates[t].tolist()) == proposed
        ids = sorted(proposed)
        assert set(got.indices[t].tolist()) == {ids[i] for i in pre[t, ids].topk(4).indices.tolist()}
        exact = set(lay.router.all_scores(x[t:t + 1])[0].topk(len(proposed)).indices.tolist())
        exact_differs += exact != proposed
    assert exact_differs > 0
    torch.testing.assert_close(got.candidate_pre, preacts(x, lay.w_in, lay.b_in, got.candidates, "reference"))
    lay.rank_loss(got).backward()  # the ranking loss reads the grid as it reads any proposals
    assert lay.router.keys.grad.abs().sum() > 0


def test_grid_proposals_count_their_own_candidates_in_the_flops():
    from monoroute.models.flops import router_flops

    base = dict(n_units=16384, k=32, d_model=128, router_candidates=256, coupling="rerank")
    exact, grid = (router_flops(GPTConfig(**base, router_proposals=p)) for p in ("exact", "grid"))
    assert grid == exact  # 16 x 16 = 256 candidates: the same pre-activations
    three = router_flops(GPTConfig(**{**base, "router_candidates": 250}, router_proposals="grid"))
    assert three - router_flops(GPTConfig(**{**base, "router_candidates": 250})) == 2 * (256 - 250) * 128


def test_rank_loss_is_listwise_kl_and_trains_only_the_router():
    lay = layer("product_key", n_units=64, k=4, coupling="rerank", router_candidates=16, rank_coef=1.0)
    x = torch.randn(12, 8, dtype=torch.double)
    routing = lay.router(x, lay.w_in, lay.b_in)
    loss = lay.rank_loss(routing)
    pre = routing.candidate_pre
    target = torch.softmax((pre - pre.mean(-1, keepdim=True)) / (pre.std(-1, keepdim=True) + 1e-6), -1)
    s = lay.router.all_scores(x).gather(-1, routing.candidates)
    want = (target * (target.log() - torch.log_softmax(s, -1))).sum(-1).mean()
    torch.testing.assert_close(loss, want)
    loss.backward()
    assert lay.w_in.grad is None and lay.router.keys.grad.abs().sum() > 0
    # A proposer whose scores rank as the standardised pre-activations do pays nothing; a flat one pays.
    flat = F.kl_div(torch.log_softmax(torch.zeros_like(pre), -1), target, reduction="batchmean")
    aligned = F.kl_div(torch.log_softmax(pre / (pre.std(-1, keepdim=True) + 1e-6), -1), target, reduction="batchmean")
    assert aligned < 1e-9 < flat


def test_rank_loss_on_a_token_sample_is_the_loss_of_those_tokens_and_unbiased():
    lay = layer("product_key", n_units=64, k=4, coupling="rerank", router_candidates=16, rank_coef=1.0)
    x = torch.randn(40, 8, dtype=torch.double)
    routing = lay.router(x, lay.w_in, lay.b_in)
    full = lay.rank_loss(routing)
    lay.rank_tokens = 10
    torch.manual_seed(5)
    sampled = lay.rank_loss(routing)
    torch.manual_seed(5)
    rows = torch.randperm(40)[:10]  # the draw the loss made
    s1, s2 = routing.halves
    subset = routing._replace(halves=(s1[rows], s2[rows]), candidates=routing.candidates[rows],
                              candidate_pre=routing.candidate_pre[rows])
    lay.rank_tokens = None
    torch.testing.assert_close(sampled, lay.rank_loss(subset))
    assert not torch.allclose(sampled, full)  # control: a sample of 10 of 40 is not the full loss
    # unbiased: over many draws its mean is the full loss (the per-token losses' spread / sqrt(2,000) ~ 1 %)
    lay.rank_tokens = 10
    draws = torch.stack([lay.rank_loss(routing).detach() for _ in range(2000)])
    torch.testing.assert_close(draws.mean(), full.detach(), rtol=0.03, atol=0)
    lay.rank_tokens = 40  # a sample as large as the batch is the full loss, drawing nothing
    torch.testing.assert_close(lay.rank_loss(routing), full)
    with pytest.raises(MonorouteError, match="rank_tokens must be a whole number"):
        RoutedFFN(8, 64, 4, coupling="rerank", rank_tokens=0)


# --- config, FLOPs, refusals ---------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, message", [
    (dict(router="cluster", router_clusters=7), "equal"),
    (dict(router="cluster", router_clusters=8, router_probes=9), "exceeds"),
    (dict(router="cluster", router_clusters=32, router_probes=1, k=4), "candidates"),
    (dict(router="cluster", router_heads=2), "router 'cluster'"),
    (dict(router="cluster", recluster_iters=0), "recluster_iters"),
    (dict(router="dense", coupling="rerank"), "product-key"),
    (dict(router="product_key", router_candidates=16), "rerank"),
    (dict(router="product_key", coupling="rerank", router_candidates=2), "between"),
    (dict(router="product_key", coupling="rerank", rank_coef=-1.0), "rank_coef"),
    (dict(router="product_key", coupling="preact", router_proposals="grid"), "needs coupling='rerank'"),
    (dict(router="cluster", router_proposals="grid"), "router_proposals"),
    (dict(router="product_key", coupling="rerank", router_proposals="nearest"), "unknown router_proposals"),
])
def test_bad_routing_settings_give_one_clear_error(kwargs, message):
    kwargs = {"k": 4, **kwargs}
    k = kwargs.pop("k")
    with pytest.raises(MonorouteError, match=message):
        RoutedFFN(8, 64, k, impl="reference", **kwargs)


def test_router_flops_of_the_new_designs():
    base = dict(vocab_size=64, block_size=32, n_layer=1, n_head=2, d_model=32, n_units=256, k=4, ffn="routed")
    cluster = GPT(GPTConfig(**base, router="cluster", router_probes=3)).flops_per_token()
    assert cluster["router"] == 2 * 16 * 32 + 2 * 3 * 16 * 32  # 16 centroids, then 3 clusters of 16 units
    rerank = GPT(GPTConfig(**base, coupling="rerank", router_candidates=40, d_key=32)).flops_per_token()
    plain = GPT(GPTConfig(**base, coupling="none", d_key=32)).flops_per_token()
    assert rerank["router"] - plain["router"] == 2 * 40 * 32
    assert math.isqrt(256) == 16


def test_cluster_revival_scores_a_unit_only_where_its_cluster_is_probed():
    lay = layer("cluster", n_units=64, k=4, router_clusters=8, router_probes=2, revive_where_probed=True)
    x = torch.randn(30, 8, dtype=torch.double)
    routing = lay.router(x, lay.w_in, lay.b_in)
    units = torch.arange(64)
    plain = layer("cluster", n_units=64, k=4, router_clusters=8, router_probes=2)  # the default: every token
    torch.testing.assert_close(plain.router.score_units(x, units, lay.w_in, lay.b_in, routing=routing),
                               x @ lay.w_in.t() + lay.b_in)
    scores = lay.router.score_units(x, units, lay.w_in, lay.b_in, routing=routing)
    pre = x @ lay.w_in.t() + lay.b_in
    in_cand = torch.zeros(30, 64, dtype=torch.bool).scatter(1, routing.candidates, True)
    torch.testing.assert_close(scores[in_cand], pre[in_cand])
    torch.testing.assert_close(scores[~in_cand], pre[~in_cand] - 1e4)
    assert 0 < in_cand.float().mean() < 1  # both cases occur: 2 of 8 clusters per token


def test_reclustering_runs_the_configured_lloyd_steps(monkeypatch):
    import monoroute.layers.routing.cluster as R

    seen = []
    real = R.balanced_kmeans
    monkeypatch.setattr(R, "balanced_kmeans", lambda rows, members, it: seen.append(it) or real(rows, members, it))
    for iters in (3, 10):
        lay = layer("cluster", n_units=64, k=4, router_clusters=8, router_probes=2, recluster_every=1,
                    recluster_iters=iters)
        lay.train()
        lay(torch.randn(16, 8, dtype=torch.double))
    assert seen == [3, 10]


@pytest.mark.parametrize("k_search, n_sub", [(256, 128), (64, 128), (32, 8), (5, 4)])
def test_product_topk_is_the_exact_top_of_all_sums_and_matches_the_index_select_form(k_search, n_sub):
    from monoroute.layers.routing.product_key import pair_pattern, product_topk

    torch.manual_seed(k_search + n_sub)
    s1, s2 = torch.randn(80, 2, n_sub, dtype=torch.float64), torch.randn(80, 2, n_sub, dtype=torch.float64)  # 160 rows: the rank-row form
    cand_i, cand_j = pair_pattern(k_search, n_sub)
    units, values = product_topk(s1, s2, k_search, cand_i, cand_j, impl="torch")  # the compiled kernel: test_compiled.py
    # float64 brute force over all n_sub^2 sums: the same set of units, with their sums
    every = (s1.unsqueeze(-1) + s2.unsqueeze(-2)).flatten(-2)  # (..., n_sub^2), unit a * n_sub + b
    ref = every.topk(k_search, dim=-1)
    assert torch.equal(units.sort(-1).values, ref.indices.sort(-1).values)
    assert torch.allclose(values.sort(-1).values, ref.values.sort(-1).values)
    # the per-row broadcast is the former two-index_select form, value for value in the same order
    k_sub = int(cand_i.max()) + 1
    t1, t2 = s1.topk(k_sub, dim=-1), s2.topk(k_sub, dim=-1)
    old = (t1.values.index_select(-1, cand_i) + t2.values.index_select(-1, cand_j)).topk(k_search, dim=-1,
                                                                                        sorted=False)
    assert torch.equal(values, old.values)
    # few tokens (decoding) take the index_select form: the same answer
    few_units, few_values = product_topk(s1[:3], s2[:3], k_search, cand_i, cand_j, impl="torch")
    assert torch.equal(few_units, units[:3]) and torch.equal(few_values, values[:3])


@pytest.mark.parametrize("heads", [1, 2])  # one head: no max over heads
@pytest.mark.parametrize("n_units", [256, 225])  # n_sub 16 (shift and mask) and 15 (division)
def test_product_key_unit_scores_and_score_units_match_the_dense_reference_in_value_and_gradient(n_units, heads):
    lay = layer("product_key", n_units=n_units, k=4, router_heads=heads, coupling="none")
    router = lay.router
    units = torch.randperm(n_units)[:40]
    a, b = router.split(units)
    assert torch.equal(a, units // router.n_sub) and torch.equal(b, units % router.n_sub)
    x = torch.randn(12, 8, dtype=torch.double)
    dense = router.all_scores(x)  # (T, N) float64 reference: max over heads of every unit's score
    got = router.score_units(x, units)
    torch.testing.assert_close(got, dense[:, units])
    per_token = units[torch.randint(0, 40, (12, 5))]  # different units on each token
    s1, s2 = router.half_scores(x)
    torch.testing.assert_close(router.unit_scores(s1, s2, per_token), dense.gather(1, per_token))
    w_tok = torch.randn(12, 5, dtype=torch.double)
    (g_tok,) = torch.autograd.grad((router.unit_scores(s1, s2, per_token) * w_tok).sum(), router.keys)
    (g_tok_ref,) = torch.autograd.grad((router.all_scores(x).gather(1, per_token) * w_tok).sum(), router.keys)
    torch.testing.assert_close(g_tok, g_tok_ref)
    weights = torch.randn(12, 40, dtype=torch.double)
    (g_got,) = torch.autograd.grad((got * weights).sum(), router.keys)
    (g_ref,) = torch.autograd.grad((router.all_scores(x)[:, units] * weights).sum(), router.keys)
    torch.testing.assert_close(g_got, g_ref)
