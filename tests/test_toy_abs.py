"""The |x| task's evaluation on hand-wired models whose answers are known, and the routed model's cap."""
import pytest
import torch

from monoroute.errors import MonorouteError
from monoroute.toy.abs_task import AbsConfig, ModelSpec, build, evaluate, quick_config, run_abs, train_model

CPU = torch.device("cpu")


def wired_dense(n: int, w1: torch.Tensor, readout: torch.Tensor):
    """A dense |x| model with hand-set weights: h = ReLU(w1 x), ŷ = ReLU(readout h)."""
    model = build(ModelSpec("wired", "dense", w1.shape[0]), n, seed=0, device=CPU)
    with torch.no_grad():
        model.hidden.lin.weight.copy_(w1)
        model.hidden.lin.bias.zero_()
        model.readout.weight.copy_(readout)
        model.b_out.zero_()
    return model.eval()


def test_one_unit_per_sign_and_feature_is_exact_and_monosemantic():
    n = 4
    eye = torch.eye(n)
    model = wired_dense(n, torch.cat([eye, -eye]), torch.cat([eye, eye], 1))  # ReLU(x) + ReLU(-x) = |x|
    r = evaluate(model, AbsConfig(n_features=n, eval_batch=512), 0.5, CPU)
    assert r["loss"] == pytest.approx(0.0, abs=1e-10)
    assert r["features_represented"] == n
    assert r["monosemantic_fraction"] == 1.0 and r["monosemantic_fraction_weights"] == 1.0
    assert r["features_per_unit"] == pytest.approx(1.0) and r["dead_fraction"] == 0.0


def test_a_unit_reading_two_features_equally_scores_one_half():
    w1 = torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 1.0]])  # unit 0 reads features 0 and 1 equally
    model = wired_dense(3, w1, torch.eye(3, 2))
    r = evaluate(model, AbsConfig(n_features=3, eval_batch=512), 1.0, CPU)
    assert r["monosemantic_fraction"] == 0.5  # unit 1 is monosemantic, unit 0 scores 1/2
    assert r["features_per_unit"] == pytest.approx(1.5)
    assert r["features_represented"] == 0  # ReLU(x) alone never gets ŷ_i(-e_i) = 1


def test_routed_models_keep_at_most_k_units_active():
    cfg = quick_config(n_features=12, d_hidden=3, n_units=16, steps=20, batch=32, eval_batch=256)
    for router in ("dense", "product_key"):
        spec = ModelSpec("r", "routed", 16, 3, router)
        r = evaluate(train_model(spec, cfg, 0.3, CPU), cfg, 0.3, CPU)
        assert 0 < r["mean_active_units"] <= 3


def test_headline_density_must_be_swept():
    with pytest.raises(MonorouteError, match="headline_density"):
        run_abs(AbsConfig(densities=[1.0], headline_density=0.5))
