"""Unit interventions: clamp semantics, ablate/clamp/steer hooks for dense and routed units,
intervention_effect against independent computations, direct logit effects, the specificity table."""
import copy

import numpy as np
import pytest
import scipy.sparse as sp
import torch
import torch.nn.functional as F

from monoroute import GPT, GPTConfig, MonorouteError, SparseActivations
from monoroute.data.tokenizers import ByteTokenizer
from monoroute.interp.interventions import (
    firing_value, intervention_effect, make_hook, specificity_table, unit_direction, unit_logit_effect,
)
from monoroute.interp.types import UnitActivations

TINY = dict(vocab_size=256, block_size=16, n_layer=2, n_head=2, d_model=32, impl="reference")
FFNS = {"dense": dict(ffn="dense", d_ff=64), "routed": dict(ffn="routed", n_units=64, k=4, router="dense")}


def tiny(kind: str) -> GPT:
    model = GPT(GPTConfig(**TINY, **FFNS[kind])).eval()
    with torch.no_grad():  # a non-trivial final LayerNorm weight, so the logit effect must use it
        model.ln_f.weight.uniform_(0.5, 1.5)
    return model


def windows(b: int = 4) -> torch.Tensor:
    return torch.randint(0, 256, (b, 17))  # (B, T + 1) with T = block_size


def fired_unit(model: GPT, layer: int, x: torch.Tensor) -> int:
    """A unit that fires on some but not all positions of x (routed), or neuron 5 (dense)."""
    _, cache = model.run_with_cache(x, names_filter=f"blocks.{layer}.mlp.hook_post")
    acts = cache[f"blocks.{layer}.mlp.hook_post"]
    if not isinstance(acts, SparseActivations):
        return 5
    dense = acts.to_dense()
    fires = (dense != 0).flatten(0, -2).float().mean(0)  # (N,) firing rate
    return int(torch.where((fires > 0) & (fires < 1), fires, torch.zeros_like(fires)).argmax())


# --- SparseActivations.clamp ----------------------------------------------------------------------
def test_clamp_sets_the_unit_exactly_where_it_fired_and_where_not():
    acts = SparseActivations(torch.tensor([[1, 3], [3, 3], [0, 2]]), torch.tensor([[0.5, 2.0], [1.0, 1.5], [0.7, 0.2]]), 5)
    before = acts.to_dense()
    clamped = acts.clamp(3, 4.0).to_dense()
    assert clamped[:, 3].tolist() == [4.0, 4.0, 4.0]  # fired once, fired in two slots, did not fire
    others = [0, 1, 2, 4]
    assert torch.equal(clamped[:, others], before[:, others])
    # with_unit adds: where the unit fired the result is original + value, not value
    added = acts.with_unit(3, 4.0).to_dense()
    assert added[:, 3].tolist() == [2.0 + 4.0, 1.0 + 1.5 + 4.0, 4.0]
    assert not torch.equal(added[:, 3], clamped[:, 3])
    # a per-position value, and clamp to 0 equals ablation
    per_pos = acts.clamp(1, torch.tensor([1.0, 2.0, 3.0])).to_dense()
    assert per_pos[:, 1].tolist() == [1.0, 2.0, 3.0]
    assert torch.equal(acts.clamp(3, 0.0).to_dense(), acts.ablate([3]).to_dense())


def test_clamp_on_real_routed_activations():
    model, x = tiny("routed"), windows()[:, :-1]
    _, cache = model.run_with_cache(x, names_filter="blocks.1.mlp.hook_post")
    acts = cache["blocks.1.mlp.hook_post"]
    unit = fired_unit(model, 1, x)
    before, after = acts.to_dense(), acts.clamp(unit, 0.75).to_dense()
    fired = before[..., unit] != 0
    assert fired.any() and (~fired).any()
    assert (after[..., unit] == 0.75).all()
    rest = torch.arange(64) != unit
    assert torch.equal(after[..., rest], before[..., rest])


# --- hooks ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["dense", "routed"])
def test_ablate_equals_zeroing_the_output_direction(kind):
    model, x = tiny(kind), windows()[:, :-1]
    unit = fired_unit(model, 0, x)
    ablated = model.run_with_hooks(x, make_hook(model, 0, unit, "ablate"))
    reference = copy.deepcopy(model)
    with torch.no_grad():
        mlp = reference.blocks[0].mlp
        if kind == "routed":
            mlp.w_out[unit] = 0
        else:
            mlp.down.weight[:, unit] = 0
    expected = reference(x)[0]
    torch.testing.assert_close(ablated, expected, atol=1e-6, rtol=0)
    assert (ablated - model(x)[0]).abs().max() > 1e-4  # the unit mattered


@pytest.mark.parametrize("kind", ["dense", "routed"])
def test_clamp_holds_the_activation_at_the_value(kind):
    model, x = tiny(kind), windows()[:, :-1]
    unit, seen = fired_unit(model, 1, x), {}
    observe = ("blocks.1.mlp.hook_post", lambda act, hook: seen.update(act=act))  # runs after the clamp
    model.run_with_hooks(x, make_hook(model, 1, unit, "clamp", value=1.25) + [observe])
    act = seen["act"]
    col = act.to_dense()[..., unit] if kind == "routed" else act[..., unit]
    assert (col == 1.25).all()
    zero = model.run_with_hooks(x, make_hook(model, 1, unit, "clamp", value=0.0))
    torch.testing.assert_close(zero, model.run_with_hooks(x, make_hook(model, 1, unit, "ablate")), atol=1e-6, rtol=0)


@pytest.mark.parametrize("kind", ["dense", "routed"])
def test_steer_adds_alpha_times_the_direction_to_mlp_out(kind):
    model, x, alpha = tiny(kind), windows()[:, :-1], 3.0
    unit = 7
    steered = model.run_with_hooks(x, make_hook(model, 0, unit, "steer", alpha=alpha))
    mlp = model.blocks[0].mlp
    direction = (mlp.w_out[unit] if kind == "routed" else mlp.down.weight[:, unit]).detach()
    manual = model.run_with_hooks(x, [("blocks.0.hook_mlp_out", lambda act, hook: act + alpha * direction)])
    torch.testing.assert_close(steered, manual, atol=0, rtol=0)
    # the same as adding alpha to the unit's activation
    if kind == "routed":
        add = ("blocks.0.mlp.hook_post", lambda acts, hook: acts.with_unit(unit, alpha))
    else:
        add = ("blocks.0.mlp.hook_post", lambda act, hook: act + alpha * F.one_hot(torch.tensor(unit), 64))
    torch.testing.assert_close(steered, model.run_with_hooks(x, [add]), atol=1e-5, rtol=1e-5)
    assert (steered - model(x)[0]).abs().max() > 1e-3


def test_make_hook_errors():
    model = tiny("routed")
    with pytest.raises(MonorouteError, match="unknown intervention kind"):
        make_hook(model, 0, 1, "boost")
    with pytest.raises(MonorouteError, match="needs a value"):
        make_hook(model, 0, 1, "clamp")
    with pytest.raises(MonorouteError, match="out of range"):
        make_hook(model, 0, 64, "ablate")


def test_firing_value_is_a_quantile_of_positive_activations():
    vals = np.array([0.0, 0.0, 1.0, 2.0, 3.0, 4.0, 5.0, -1.0])
    assert firing_value(vals, q=0.5) == 3.0
    assert firing_value(torch.tensor(vals), q=1.0) == 5.0
    assert firing_value(sp.csr_matrix(vals.reshape(-1, 1)), q=0.0) == 1.0
    assert firing_value(np.zeros(4)) == 0.0


# --- intervention_effect --------------------------------------------------------------------------
def test_identity_intervention_has_no_effect():
    model, w = tiny("routed"), windows(5)
    mask = torch.rand(5, 16) < 0.3
    identity = [("blocks.0.hook_mlp_out", lambda act, hook: act.clone()), ("blocks.1.mlp.hook_post", lambda a, h: None)]
    res = intervention_effect(model, w, mask, identity, batch_size=2)
    for key in ("kl", "kl_concept", "kl_elsewhere", "dloss", "dloss_concept", "dloss_elsewhere"):
        assert res[key] == 0.0, key
    assert res["n_concept"] == int(mask.sum()) and res["n_elsewhere"] == int((~mask).sum())


@pytest.mark.parametrize("kind", ["dense", "routed"])
def test_effect_confined_to_concept_positions(kind):
    model, w = tiny(kind), windows(5)
    x, y = w[:, :-1], w[:, 1:]
    mask = torch.rand(5, 16) < 0.3
    delta = torch.randn(32) * 2.0

    # the last block's mlp_out feeds only ln_f and lm_head, which act per position
    def perturb(act, hook):
        return act + mask[..., None].to(act.dtype) * delta

    hooks = [("blocks.1.hook_mlp_out", perturb)]
    res = intervention_effect(model, w, mask, hooks, batch_size=5)
    # independent expectation, float64
    with torch.no_grad():
        clean = model(x)[0].double().log_softmax(-1)
        pert = model.run_with_hooks(x, hooks).double().log_softmax(-1)
    kl = F.kl_div(pert, clean, log_target=True, reduction="none").sum(-1)  # KL(clean || pert) per position
    dloss = F.nll_loss(pert.transpose(1, 2), y, reduction="none") - F.nll_loss(clean.transpose(1, 2), y, reduction="none")
    assert res["kl_elsewhere"] == 0.0 and res["dloss_elsewhere"] == 0.0
    assert res["kl_concept"] > 1e-3
    assert res["kl_concept"] == pytest.approx(kl[mask].mean().item(), rel=1e-4)
    assert res["dloss_concept"] == pytest.approx(dloss[mask].mean().item(), rel=1e-4, abs=1e-6)
    assert res["kl"] == pytest.approx(kl.mean().item(), rel=1e-4)
    assert res["dloss"] == pytest.approx(dloss.mean().item(), rel=1e-4, abs=1e-6)
    # the guard: the denominator is floored at eps, the raw values are reported too
    assert res["specificity"] == pytest.approx(res["dloss_concept"] / 1e-4)
    assert res["kl_ratio"] == pytest.approx(res["kl_concept"] / 1e-4)


def test_effect_does_not_depend_on_batching():
    model, w = tiny("routed"), windows(5)
    mask = torch.rand(5, 16) < 0.5
    hooks = make_hook(model, 0, fired_unit(model, 0, w[:, :-1]), "ablate")
    one, many = (intervention_effect(model, w, mask, hooks, batch_size=b) for b in (5, 2))
    for key in ("kl", "kl_concept", "dloss_concept", "dloss_elsewhere"):
        assert one[key] == pytest.approx(many[key], rel=1e-4, abs=1e-7)
    assert one["kl"] > 0
    with pytest.raises(MonorouteError, match="expected \\(B, T\\)"):
        intervention_effect(model, w, mask[:, :-1], hooks)


# --- logit effect ---------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["dense", "routed"])
def test_unit_logit_effect_matches_float64_reference(kind):
    model, unit = tiny(kind), 3
    mlp = model.blocks[1].mlp
    direction = (mlp.w_out[unit] if kind == "routed" else mlp.down.weight[:, unit]).detach().double()
    expected = direction @ torch.diag(model.ln_f.weight.detach().double()) @ model.lm_head.weight.detach().double().T
    eff = unit_logit_effect(model, 1, unit, top=5, tokenizer=ByteTokenizer())
    order = expected.argsort(descending=True)
    assert eff["boosted"] == order[:5].tolist()
    assert eff["suppressed"] == order.flip(0)[:5].tolist()
    np.testing.assert_allclose(eff["boosted_logits"], expected[order[:5]].numpy(), rtol=1e-12)
    np.testing.assert_allclose(eff["suppressed_logits"], expected[order.flip(0)[:5]].numpy(), rtol=1e-12)
    assert all(a >= b for a, b in zip(eff["boosted_logits"], eff["boosted_logits"][1:]))
    assert len(eff["boosted_text"]) == 5 and isinstance(eff["suppressed_text"][0], str)
    strings = [f"t{i}" for i in range(256)]
    assert unit_logit_effect(model, 1, unit, top=2, tokenizer=strings)["boosted_text"] == \
        [f"t{i}" for i in order[:2].tolist()]
    torch.testing.assert_close(unit_direction(model, 1, unit).double(), direction)


# --- specificity table ----------------------------------------------------------------------------
def test_specificity_table_rows_match_single_runs():
    model, w = tiny("routed"), windows(6)
    x = w[:, :-1]
    masks = {"a": torch.rand(6, 16) < 0.3, "b": torch.rand(6, 16) < 0.2}
    ua, ub = fired_unit(model, 1, x), 5
    units = {"a": [(1, ua)], "b": [(1, ua), (0, ub)]}
    rows = specificity_table(model, w, masks, units, batch_size=4)
    assert len(rows) == 3 * 3
    assert [(r["concept"], r["layer"], r["unit"], r["kind"]) for r in rows[:3]] == \
        [("a", 1, ua, "ablate"), ("a", 1, ua, "clamp"), ("a", 1, ua, "steer")]
    assert list(rows[0])[:9] == ["concept", "layer", "unit", "kind", "value", "kl", "dloss_concept",
                                  "dloss_elsewhere", "specificity"]
    # clamp value: firing value of the unit over the windows' positions
    _, cache = model.run_with_cache(x, names_filter="blocks.1.mlp.hook_post")
    value = firing_value(cache["blocks.1.mlp.hook_post"].to_dense()[..., ua], 0.9)
    clamp_b = next(r for r in rows if r["concept"] == "b" and r["unit"] == ua and r["kind"] == "clamp")
    assert clamp_b["value"] == pytest.approx(value)
    single = intervention_effect(model, w, masks["b"], make_hook(model, 1, ua, "clamp", value=clamp_b["value"]))
    for key in ("kl", "dloss_concept", "dloss_elsewhere", "specificity", "kl_concept"):
        assert clamp_b[key] == pytest.approx(single[key], rel=1e-5, abs=1e-8)
    # clamp values taken from captured activations when given
    acts = UnitActivations("routed_units", 1, sp.csr_matrix(np.full((3, 64), 2.0, dtype=np.float32)))
    rows = specificity_table(model, w, masks, {"a": [(1, ua)]}, acts, kinds=("clamp",))
    assert len(rows) == 1 and rows[0]["value"] == 2.0


@pytest.mark.parametrize("kind", ["dense", "routed"])
def test_rerun_from_the_clean_residual_equals_a_full_run(kind):
    from monoroute.interp.interventions import _clean_run, _path_hooks, _run_from, _start_layer

    model, x = tiny(kind), windows()[:, :-1]
    hooks = make_hook(model, 1, 3, "clamp", value=2.0)
    assert _start_layer(hooks) == 1 and _start_layer([("hook_embed", None)]) is None
    path = _path_hooks(model)
    with torch.no_grad():
        _, resid = _clean_run(model, x, path, [1])
        assert torch.equal(_run_from(model, x, path, hooks, resid), model.run_with_hooks(x, path + hooks))
