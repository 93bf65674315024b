"""The router recipe of the reference designs (issue 29): detached router input, query BatchNorm (also
across gloo ranks), heads that split the re-rank candidates, the re-rank revival threshold, router and
unit-table learning rates, warmup and clipping, separate init and data seeds, and the search diagnostics.
Each against a float64 reference or a hand-built case with a known answer, with a control that fails."""
import json
import math
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from monoroute import GPT, GPTConfig, MonorouteError, RoutedFFN
from monoroute.layers.routing import QueryBatchNorm, distinct_per_row, repeated, search_diagnostics, shared_ratio
from monoroute.train.optim import build_optimizer, clip_grads, group_lr, table_parameters
from ranks import done, spawn_ranks

SMALL = dict(vocab_size=64, block_size=16, n_layer=2, n_head=2, d_model=16, ffn="routed", n_units=64, k=4,
             impl="reference", coupling="rerank", router_candidates=16, d_key=8)


def rerank_layer(**kw):
    kw.setdefault("aux_coef", 0.0)
    kw.setdefault("impl", "reference")
    torch.manual_seed(0)
    return RoutedFFN(8, 64, 4, router="product_key", coupling="rerank", router_candidates=16, **kw).double()


# --- router-only losses reach only the router ------------------------------------------------------------------

def grads_after_aux(detach: bool) -> dict:
    torch.manual_seed(0)
    model = GPT(GPTConfig(**SMALL, router_detach=detach, dead_window=1, dead_grace=0, rank_coef=1.0,
                          l1_coef=0.0)).double().train()
    tokens = torch.randint(0, 64, (2, 16))
    model(tokens)
    model(tokens)  # every unit not chosen at the first forward is now dead: revival acts
    model.aux_loss().backward()
    return {name: p.grad for name, p in model.named_parameters()}


def test_router_only_losses_reach_only_router_parameters_when_detached():
    grads = grads_after_aux(detach=True)
    router_or_table = lambda n: ".mlp.router." in n or n.split(".")[-1] in ("w_in", "b_in", "w_out")  # noqa: E731
    touched = {n for n, g in grads.items() if g is not None and g.abs().sum() > 0}
    assert touched and all(router_or_table(n) for n in touched), sorted(touched)
    assert any(".mlp.router.query" in n for n in touched) and any(n.endswith("w_in") for n in touched)
    # Control: without the detach the same losses reach the trunk (attention, embeddings, LayerNorms).
    trunk = {n for n, g in grads_after_aux(detach=False).items() if g is not None and g.abs().sum() > 0
             and not router_or_table(n)}
    assert any(n.startswith("wte") or ".attn." in n for n in trunk)


def test_router_detach_leaves_the_forward_and_the_lm_gradient_of_the_trunk_unchanged():
    torch.manual_seed(0)
    plain = GPT(GPTConfig(**SMALL, aux_coef=0.0, l1_coef=0.0, rank_coef=0.0)).double()
    detached = GPT(GPTConfig(**SMALL, aux_coef=0.0, l1_coef=0.0, rank_coef=0.0, router_detach=True)).double()
    detached.load_state_dict(plain.state_dict())
    tokens = torch.randint(0, 64, (2, 16))
    loss_a, loss_b = plain(tokens, tokens)[1], detached(tokens, tokens)[1]
    assert loss_a.item() == loss_b.item()
    loss_a.backward(), loss_b.backward()
    # Re-ranking has no gate, so the LM loss never reached the router's query: the trunk's gradient is the same.
    torch.testing.assert_close(plain.wte.weight.grad, detached.wte.weight.grad)


def test_router_detach_refused_for_the_factored_router():
    with pytest.raises(MonorouteError, match="router_detach"):
        RoutedFFN(8, 64, 4, router="factored", router_detach=True)


# --- query BatchNorm ----------------------------------------------------------------------------------------------

def test_query_batchnorm_equals_batchnorm1d_without_affine_in_training_and_eval():
    ours = QueryBatchNorm(6).double()
    ref = torch.nn.BatchNorm1d(6, affine=False, momentum=0.1).double()
    for _ in range(3):
        q = torch.randn(40, 6, dtype=torch.double) * 3 + 5
        torch.testing.assert_close(ours(q), ref(q))
    torch.testing.assert_close(ours.running_mean, ref.running_mean)
    torch.testing.assert_close(ours.running_var, ref.running_var)
    ours.eval(), ref.eval()
    q = torch.randn(7, 6, dtype=torch.double)
    torch.testing.assert_close(ours(q), ref(q))
    # Gradients as BatchNorm's.
    ours.train(), ref.train()
    q = (torch.randn(30, 6, dtype=torch.double) + 2).requires_grad_()
    w = torch.randn(30, 6, dtype=torch.double)
    (g_ours,) = torch.autograd.grad((ours(q) * w).sum(), q)
    (g_ref,) = torch.autograd.grad((ref(q) * w).sum(), q)
    torch.testing.assert_close(g_ours, g_ref)


def test_query_batchnorm_removes_the_shared_component_that_collapses_proposals():
    """A query whose shared part is twice the per-token spread makes tokens propose the same few sub-keys;
    with the BatchNorm the share of units proposed returns to (nearly) all of them."""
    torch.manual_seed(0)
    plain = RoutedFFN(16, 1024, 8, router="product_key", aux_coef=0.0, impl="reference")
    centred = RoutedFFN(16, 1024, 8, router="product_key", aux_coef=0.0, impl="reference", query_norm="batch")
    centred.load_state_dict(plain.state_dict(), strict=False)
    shared, noise = torch.randn(16), torch.randn(512, 16)
    ratios = {}
    for name, lay, mult in (("reference", plain, 0), ("plain", plain, 2), ("centred", centred, 2)):
        x = mult * shared * (16 ** 0.5) / shared.norm() + noise  # |shared| = 2x the per-token spread
        lay.router.diagnose = True
        lay(x)
        ratios[name] = lay.router.diagnostics
    assert ratios["reference"]["query_shared_ratio"] < 0.1 < 1.0 < ratios["plain"]["query_shared_ratio_raw"]
    assert ratios["centred"]["query_shared_ratio"] < 1e-6
    # Without a shared part the 512 tokens propose 76 % of the units; with it 20 %; centred, 76 % again.
    reference = ratios["reference"]["proposed_share"]
    assert ratios["plain"]["proposed_share"] < 0.4 * reference
    assert ratios["centred"]["proposed_share"] == pytest.approx(reference, abs=0.02)


def _bn_worker(rank, port, path):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        torch.manual_seed(0)
        q = torch.randn(20, 4, dtype=torch.double) * 2 + 1  # the same global batch on both ranks
        weights = torch.randn(20, 4, dtype=torch.double)
        mine = slice(0, 8) if rank == 0 else slice(8, 20)  # uneven shares: the count must be summed too
        bn = QueryBatchNorm(4).double()
        part = q[mine].clone().requires_grad_()
        out = bn(part)
        (out * weights[mine]).sum().backward()
        torch.save({"out": out.detach(), "grad": part.grad, "mean": bn.running_mean, "var": bn.running_var},
                   os.path.join(path, f"rank{rank}.pt"))
        done(path, rank)
        dist.barrier()  # no teardown while the other rank may still finish the backward's all-reduce
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="torch built without gloo")
def test_query_batchnorm_across_two_gloo_ranks_equals_the_whole_batch(tmp_path):
    spawn_ranks(_bn_worker, (free_port(), str(tmp_path)), 2, str(tmp_path))
    torch.manual_seed(0)
    q = (torch.randn(20, 4, dtype=torch.double) * 2 + 1).requires_grad_()
    weights = torch.randn(20, 4, dtype=torch.double)
    ref = torch.nn.BatchNorm1d(4, affine=False).double()
    out = ref(q)
    (out * weights).sum().backward()
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    torch.testing.assert_close(torch.cat([r0["out"], r1["out"]]), out.detach())
    torch.testing.assert_close(torch.cat([r0["grad"], r1["grad"]]), q.grad)
    for r in (r0, r1):  # both ranks keep the whole batch's running statistics
        torch.testing.assert_close(r["mean"], ref.running_mean)
        torch.testing.assert_close(r["var"], ref.running_var)


def test_query_norm_refused_where_there_is_no_query():
    with pytest.raises(MonorouteError, match="query_norm"):
        RoutedFFN(8, 64, 4, router="cluster", query_norm="batch")
    with pytest.raises(MonorouteError, match="query_norm"):
        RoutedFFN(8, 64, 4, router="product_key", query_norm="layer")


# --- heads that split the candidates ---------------------------------------------------------------------------

def test_rerank_heads_each_propose_c_over_h_and_no_unit_runs_twice():
    lay = rerank_layer(router_heads=2)
    x = torch.randn(40, 8, dtype=torch.double)
    got = lay.router(x, lay.w_in, lay.b_in)
    heads = lay.router.head_scores(x)  # (T, H, N) float64 reference
    pre = x @ lay.w_in.t() + lay.b_in
    assert got.candidates.shape == (40, 16)
    for t in range(40):
        proposed = set()
        for h in range(2):
            proposed |= set(heads[t, h].topk(8).indices.tolist())
        assert set(got.candidates[t].tolist()) == proposed
        ids = sorted(proposed)
        want = {ids[i] for i in pre[t, ids].topk(4).indices.tolist()}
        assert set(got.indices[t].tolist()) == want and len(set(got.indices[t].tolist())) == 4


def test_repeated_marks_every_occurrence_after_the_first():
    units = torch.tensor([[3, 1, 3, 2, 1, 3], [0, 1, 2, 3, 4, 5]])
    assert repeated(units).tolist() == [[False, False, True, False, True, True], [False] * 6]


def test_rank_loss_with_repeated_candidates_equals_the_loss_over_distinct_ones():
    lay = rerank_layer(router_heads=2, rank_coef=1.0)
    x = torch.randn(25, 8, dtype=torch.double)
    routing = lay.router(x, lay.w_in, lay.b_in)
    assert routing.candidate_repeat.any()  # the two heads do propose some units twice here
    loss = lay.rank_loss(routing)
    total = 0.0
    for t in range(25):
        keep = ~routing.candidate_repeat[t]
        pre = routing.candidate_pre[t, keep]
        target = torch.softmax((pre - pre.mean()) / (pre.std() + 1e-6), -1)
        scores = lay.router.all_scores(x[t:t + 1])[0, routing.candidates[t, keep]]
        total = total + (target * (target.log() - torch.log_softmax(scores, -1))).sum()
    torch.testing.assert_close(loss, total / 25)


def test_rerank_heads_need_k_proposals_per_head():
    with pytest.raises(MonorouteError, match="fewer than k"):
        RoutedFFN(8, 64, 4, router="product_key", coupling="rerank", router_candidates=12, router_heads=4)


# --- the re-rank revival threshold --------------------------------------------------------------------------------

def test_rerank_revival_aims_at_the_proposal_and_kth_preactivation_thresholds():
    lay = rerank_layer(aux_coef=1.0, aux_units=64, revival_target="selection", dead_window=1, dead_grace=0)
    x = torch.randn(30, 8, dtype=torch.double)
    lay.train()
    lay.tokens_seen.fill_(10)  # every unit never fired, past the grace: all dead
    routing = lay.router(x, lay.w_in, lay.b_in)
    torch.manual_seed(1)
    loss = lay.revival_loss(x, routing)
    torch.manual_seed(1)
    units = torch.arange(64)[torch.randperm(64)[:64]]
    scores = lay.router.all_scores(x)[:, units]  # (T, U)
    best = scores.argmax(0)
    score = scores[best, torch.arange(64)]
    proposed_min = lay.router.all_scores(x).gather(-1, routing.candidates).min(-1).values[best]
    pre_all = x @ lay.w_in.t() + lay.b_in
    kth = pre_all.gather(-1, routing.candidates).topk(4, -1).values[:, -1][best].clamp(min=0)
    pre = pre_all[best, units]
    want = F.relu(proposed_min - score).mean() + F.relu(kth - pre).mean()
    torch.testing.assert_close(loss, want)
    # Control: the old target ("score") asks for the lowest *selected* score and pre > 0: a different number.
    old = rerank_layer(aux_coef=1.0, aux_units=64, dead_window=1, dead_grace=0)
    old.tokens_seen.fill_(10)
    torch.manual_seed(1)
    assert abs(old.revival_loss(x, old.router(x, old.w_in, old.b_in)).item() - want.item()) > 1e-3


def test_a_dead_unit_already_proposed_and_above_the_kth_preactivation_costs_nothing():
    lay = rerank_layer(aux_coef=1.0, revival_target="selection", dead_window=1, dead_grace=0)
    x = torch.randn(1, 8, dtype=torch.double)  # one token: it is every unit's best token
    routing = lay.router(x, lay.w_in, lay.b_in)
    lay.tokens_seen.fill_(10)

    def loss_with_dead(unit: int) -> float:
        lay.last_fired.fill_(10)
        lay.last_fired[unit] = -1  # only this unit counts as dead
        return lay.revival_loss(x, routing).item()

    selected = routing.indices[0, 0].item()  # proposed, and in the top k by pre-activation
    assert loss_with_dead(selected) == 0.0
    never_proposed = next(u for u in range(64) if u not in routing.candidates[0].tolist())
    assert loss_with_dead(never_proposed) > 0.0  # control: its score is below every proposal's


# --- learning rates, warmup, clipping -----------------------------------------------------------------------------

def test_router_groups_get_their_multiplier_and_warmup():
    torch.manual_seed(0)
    model = GPT(GPTConfig(**SMALL))
    opt = build_optimizer(model, lr=1e-3, weight_decay=0.1, router_lr_mult=0.25, router_warmup=10)
    by_name = {g["name"]: g for g in opt.param_groups}
    router = {id(p) for g in ("router_decay", "router_no_decay") for p in by_name[g]["params"]}
    want = {id(p) for n, p in model.named_parameters() if ".mlp.router." in n}
    assert router == want and len(want) == 2 * 3  # query, sub-keys, scale in each of 2 layers
    assert group_lr(1e-3, by_name["router_decay"], 0) == pytest.approx(1e-3 * 0.25 / 10)
    assert group_lr(1e-3, by_name["router_decay"], 9) == pytest.approx(1e-3 * 0.25)
    assert group_lr(1e-3, by_name["decay"], 0) == pytest.approx(1e-3)
    # Without a multiplier or warmup the layout is the old two groups (older checkpoints resume).
    assert [g["name"] for g in build_optimizer(model, lr=1e-3, weight_decay=0.1).param_groups] == ["decay", "no_decay"]


def test_unit_tables_clipped_by_their_own_norm_and_the_rest_by_grad_clip():
    torch.manual_seed(0)
    model = GPT(GPTConfig(**SMALL, aux_coef=0.0)).double()
    tokens = torch.randint(0, 64, (2, 16))
    model(tokens, tokens)[1].backward()
    tables = {id(p) for p in table_parameters(model)}
    before = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    table_norm = math.sqrt(sum(p.grad.square().sum().item() for p in table_parameters(model)))
    rest_norm = math.sqrt(sum(p.grad.square().sum().item() for p in model.parameters()
                              if p.grad is not None and id(p) not in tables))
    norm, tnorm = clip_grads(model, grad_clip=rest_norm / 4, table_grad_clip=table_norm / 2)
    assert norm == pytest.approx(rest_norm) and tnorm == pytest.approx(table_norm)
    for n, p in model.named_parameters():
        if n in before:
            scale = 0.5 if id(p) in tables else 0.25
            torch.testing.assert_close(p.grad, before[n] * scale, rtol=1e-5, atol=0)
    # table_grad_clip 0: one joint clip, as clip_grad_norm_.
    for n, p in model.named_parameters():
        if n in before:
            p.grad = before[n].clone()
    joint, none = clip_grads(model, grad_clip=0.1)
    assert none is None and joint == pytest.approx(math.sqrt(table_norm ** 2 + rest_norm ** 2))


def test_unit_init_fan_in_sets_w_in_to_d_to_the_minus_half():
    torch.manual_seed(0)
    cfg = dict(SMALL, d_model=64, n_units=4096, n_head=2)
    std = GPT(GPTConfig(**cfg, unit_init="fan_in")).blocks[0].mlp.w_in.std().item()
    assert std == pytest.approx(64 ** -0.5, rel=0.03)
    assert GPT(GPTConfig(**cfg)).blocks[0].mlp.w_in.std().item() == pytest.approx(0.02, rel=0.03)
    with pytest.raises(MonorouteError, match="unit_init"):
        GPTConfig(**cfg, unit_init="xavier").validate()


# --- diagnostics ------------------------------------------------------------------------------------------------

def test_search_diagnostics_on_a_hand_built_batch():
    # N = 4 units on a 2 x 2 grid (unit = a·2 + b). Token 0 proposes {0, 1}: rows a = {0}, columns b = {0, 1}
    # -> 1.5 distinct; token 1 proposes {1, 2}: a = {0, 1}, b = {1, 0} -> 2. Units proposed: {0, 1, 2} of 4.
    got = search_diagnostics(torch.tensor([[0, 1], [1, 2]]), torch.tensor([[1], [1]]), 4, 2)
    assert got == {"proposed_share": 0.75, "chosen_share": 0.25, "distinct_rows": 1.75}
    assert distinct_per_row(torch.tensor([[5, 5, 5], [1, 2, 3]])).tolist() == [1, 3]


def test_distinct_per_row_by_table_matches_the_sort():
    # The table form (values known to lie in [0, size)) against the sort form on random rows with many
    # repeats, a row of one value and a row of all distinct values.
    g = torch.Generator().manual_seed(0)
    values = torch.randint(0, 16, (64, 40), generator=g)
    values[0] = 7
    values[1, :16] = torch.arange(16)
    values[1, 16:] = 3
    by_sort, by_table = distinct_per_row(values), distinct_per_row(values, 16)
    assert torch.equal(by_sort, by_table)
    assert by_table[0] == 1 and by_table[1] == 16 and 1 < by_table[2:].float().mean() < 16


def test_shared_ratio_known_answers():
    # One head, 1-d: tokens 2 and 0 -> mean 1, spread 1; tokens 1 and -1 -> mean 0.
    assert shared_ratio(torch.tensor([[[2.0]], [[0.0]]])) == pytest.approx(1.0)
    assert shared_ratio(torch.tensor([[[1.0]], [[-1.0]]])) == pytest.approx(0.0)


# --- seeds -------------------------------------------------------------------------------------------------------

def test_data_seed_changes_only_the_data_order(tmp_path, monkeypatch):
    from monoroute.data.token_store import TokenStore
    from monoroute.train.config import build_run_config
    from monoroute.train.trainer import load_run, train

    seen = []
    original = TokenStore.batch

    def spy(self, step, batch_size, block_size, seed, *args, **kwargs):
        seen.append(seed)
        return original(self, step, batch_size, block_size, seed, *args, **kwargs)

    monkeypatch.setattr(TokenStore, "batch", spy)
    runs = {}
    for name, seed, data_seed in (("a", 1, 7), ("b", 2, 7), ("c", 1, None)):
        seen.clear()
        cfg = build_run_config("tiny", {"out": str(tmp_path / name), "steps": 1, "seed": seed, "data_seed": data_seed,
                                        "eval_every": 1, "ckpt_every": 1, "lr": 1e-30, "warmup": 0})
        train(cfg, show_progress=False)
        runs[name] = (set(seen), load_run(tmp_path / name)[1].state_dict())
    assert runs["a"][0] == runs["b"][0] == {7} and runs["c"][0] == {1}
    wte = lambda r: runs[r][1]["wte.weight"]  # noqa: E731  (lr 1e-30: still the initialisation)
    assert torch.equal(wte("a"), wte("c")) and not torch.equal(wte("a"), wte("b"))


def test_data_seed_must_be_a_whole_number():
    from monoroute.train.config import build_run_config

    with pytest.raises(MonorouteError, match="data_seed"):
        build_run_config("tiny", {"data_seed": 1.5}).train.check()


def test_training_logs_early_dynamics_every_5_steps_and_eval_reports_the_search(tmp_path):
    import json

    from monoroute.train.config import build_run_config
    from monoroute.train.evaluation import eval_report
    from monoroute.train.trainer import train

    out = tmp_path / "run"
    cfg = build_run_config("tiny", {"out": str(out), "steps": 30, "log_every": 10, "eval_every": 10,
                                    "dense_log_until": 20, "query_norm": "batch", "router_detach": True})
    train(cfg, show_progress=False)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [5, 10, 15, 20, 30]
    for r in records:
        assert 0 < r["chosen_share"] <= r["proposed_share"] <= 1
        assert 1 <= r["distinct_rows"] <= 16  # 256 units: 16 sub-key rows per half
        assert r["query_shared_ratio"] < 1e-3 <= r["query_shared_ratio_raw"]  # centred in training
        assert set(r["diagnostics"]) == {"blocks.0.mlp", "blocks.1.mlp"}
    report = eval_report(out)
    assert 0 < report["proposed_share"] <= 1 and "distinct_rows" in report["routed"]["blocks.1.mlp"]


def test_a_run_saved_before_the_recipe_keys_loads_as_it_was_trained(tmp_path):
    from monoroute.train.trainer import LEGACY_MODEL_DEFAULTS, read_run_config

    saved = {"run": {"preset": "tiny", "out": str(tmp_path), "model": {"ffn": "routed", "n_units": 256, "k": 8},
                     "data": {}, "train": {}}}
    (tmp_path / "config.json").write_text(json.dumps(saved))
    model = read_run_config(tmp_path).model
    assert model.router_detach is False and model.query_norm == "none" and model.revival_target == "score"
    assert model.unit_init == "gpt" and model.dense_beside == 0 and model.aux_units == 256
    assert model.coupling == "none" and set(LEGACY_MODEL_DEFAULTS) >= {"router_detach", "query_norm", "unit_init"}


def test_the_default_is_the_recipe_and_an_old_auto_config_keeps_its_design(tmp_path):
    from monoroute.train.trainer import read_run_config

    new = GPTConfig(ffn="routed", d_model=64, n_units=1024, k=8)
    assert (new.layer_coupling, new.layer_d_key, new.layer_router_detach, new.layer_query_norm) == \
        ("rerank", 32, True, "batch")
    layer = GPT(new).blocks[0].mlp
    assert layer.coupling == "rerank" and layer.router_detach and layer.router.query_norm is not None
    assert layer.router.d_half == 16 and layer.rank_coef == 0.1 and layer.revival_target == "score"
    # Routers without a query get neither the detach nor the BatchNorm (no error for an unasked setting),
    # but an explicit request is still refused where it cannot apply.
    for router in ("cluster", "dense", "factored"):
        cfg = GPTConfig(ffn="routed", d_model=64, n_units=1024, k=8, router=router)
        assert (cfg.layer_coupling, cfg.layer_router_detach, cfg.layer_query_norm) == ("none", False, "none")
        GPT(cfg)
    with pytest.raises(MonorouteError, match="router_detach"):
        GPT(GPTConfig(ffn="routed", d_model=64, n_units=1024, k=8, router="factored", router_detach=True))
    # A config saved before defaults_version existed says coupling "auto" and d_key null: it meant preact
    # with full-width keys, and must load as that model (negative control: today's reading differs).
    saved = {"run": {"preset": "tiny", "out": str(tmp_path), "data": {}, "train": {},
                     "model": {"ffn": "routed", "d_model": 64, "n_units": 1024, "k": 8, "coupling": "auto",
                               "d_key": None, "rank_coef": 1.0}}}
    (tmp_path / "config.json").write_text(json.dumps(saved))
    old = read_run_config(tmp_path).model
    assert (old.defaults_version, old.layer_coupling, old.layer_d_key) == (1, "preact", None)
    assert GPT(old).blocks[0].mlp.router.d_half == 32
    assert GPTConfig(**{**old.to_dict(), "defaults_version": 2}).layer_coupling == "rerank"
    with pytest.raises(MonorouteError, match="defaults_version"):
        GPTConfig(defaults_version=3).validate()


def test_an_in_place_upcycle_keeps_upcycles_design_unless_set():
    from monoroute.train.config import build_run_config

    cfg = build_run_config("tiny", {"dense_fraction": 0.5}).model
    assert (cfg.layer_coupling, cfg.layer_query_norm, cfg.aux_units, cfg.out_bias) == ("preact", "none", 256, True)
    given = build_run_config("tiny", {"dense_fraction": 0.5, "query_norm": "batch", "coupling": "rerank"}).model
    assert (given.layer_coupling, given.layer_query_norm) == ("rerank", "batch")
    assert build_run_config("tiny").model.layer_coupling == "rerank"  # control: no dense phase, today's default


def test_the_cpu_presets_are_the_hybrid_and_dense_runs_stay_plain_dense():
    from monoroute.train.config import build_run_config

    def flops(overrides):
        with torch.device("meta"):
            return GPT(build_run_config("cpu-small", overrides).model).flops_per_token()

    hybrid, routed, dense = flops({}), flops({"dense_beside": 0}), flops({"ffn": "dense"})
    assert build_run_config("cpu-long").model.dense_beside == 48
    assert hybrid["dense_ffn"] == 4 * 2 * 2 * 128 * 48 and routed["dense_ffn"] == 0  # 4 layers, up + down
    assert round(hybrid["total"] / dense["total"], 2) == 0.74 and round(routed["total"] / dense["total"], 2) == 0.69
    assert dense["dense_ffn"] == 4 * 2 * 2 * 128 * 512  # --ffn dense: plain dense 4·d, nothing beside it
