"""Superposition and monosemanticity metrics on hand-built matrices whose answers are known."""
import math

import pytest
import torch

from monoroute.toy import metrics


def reference_dimensionality(w: torch.Tensor) -> torch.Tensor:
    """Loop-based float64 D_i = ‖W_i‖^2 / Σ_j (Ŵ_i·W_j)^2 for one (m, n) matrix."""
    n = w.shape[1]
    out = torch.zeros(n, dtype=torch.float64)
    for i in range(n):
        wi = w[:, i]
        unit = wi / wi.norm()
        out[i] = wi.norm() ** 2 / sum(float(unit @ w[:, j]) ** 2 for j in range(n))
    return out


def test_orthogonal_features_have_a_dimension_each():
    q, _ = torch.linalg.qr(torch.randn(6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0)))
    w = q[:, :4] * torch.tensor([1.0, 2.0, 0.5, 1.0], dtype=torch.float64)  # (m=6, n=4), orthogonal columns
    torch.testing.assert_close(metrics.feature_dimensionality(w), torch.ones(4, dtype=torch.float64))
    torch.testing.assert_close(metrics.superposition(w), torch.zeros(4, dtype=torch.float64))


def test_antipodal_pairs_give_one_half():
    w = torch.tensor([[1.0, -1.0, 0.0, 0.0], [0.0, 0.0, 1.0, -1.0]])  # m=2, n=4: two antipodal pairs
    torch.testing.assert_close(metrics.feature_dimensionality(w), torch.full((4,), 0.5))
    torch.testing.assert_close(metrics.superposition(w), torch.ones(4))
    assert metrics.dimensions_per_feature(w).item() == pytest.approx(0.5)


def test_pentagon_gives_two_fifths():
    angles = torch.arange(5, dtype=torch.float64) * 2 * math.pi / 5
    w = torch.stack([angles.cos(), angles.sin()])  # (2, 5)
    torch.testing.assert_close(metrics.feature_dimensionality(w), torch.full((5,), 0.4, dtype=torch.float64))
    assert metrics.dimensions_per_feature(w).item() == pytest.approx(0.4)


def test_unrepresented_feature_has_zero_dimensionality_and_norm():
    w = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    assert metrics.feature_dimensionality(w).tolist() == pytest.approx([1.0, 0.0])
    assert metrics.feature_norms(w).tolist() == pytest.approx([1.0, 0.0])


def test_dimensionality_matches_loop_reference_and_batches_over_instances():
    w = torch.randn(3, 5, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(1))  # (I, m, n)
    batched = metrics.feature_dimensionality(w)
    assert batched.shape == (3, 12)
    for i in range(3):
        torch.testing.assert_close(batched[i], reference_dimensionality(w[i]))


def test_unit_monosemanticity_one_feature_and_two_equal_features():
    w_units = torch.tensor([[0.0, 3.0, 0.0], [1.0, 1.0, 0.0], [2.0, -1.0, 0.0]])
    assert metrics.weight_monosemanticity(w_units).tolist() == pytest.approx([1.0, 0.5, 0.8])
    response = w_units.abs()
    assert metrics.response_monosemanticity(response).tolist() == pytest.approx([1.0, 0.5, 2 / 3])
    assert metrics.features_per_unit(response).tolist() == pytest.approx([1.0, 2.0, 9 / 5])


def test_unit_summary_counts_only_live_units():
    response = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 0.0], [0.0, 2.0]])
    live = torch.tensor([True, True, True, False])  # unit 2 never responds, unit 3 never fires on data
    s = metrics.unit_summary(response, live, threshold=0.9)
    assert s["live_units"] == 2 and s["dead_fraction"] == pytest.approx(0.5)
    assert s["monosemantic_fraction"] == pytest.approx(0.5)
    assert s["features_per_unit"] == pytest.approx(1.5)


def test_recovery_scores_are_permutation_and_scale_invariant():
    truth = torch.eye(4)
    learned = torch.cat([truth[[2, 0, 3, 1]] * 3.0, torch.tensor([[1.0, 1.0, 0.0, 0.0]])])
    s = metrics.recovery_scores(truth, learned)
    assert s["mmcs_truth"] == pytest.approx(1.0) and s["recovered_fraction"] == pytest.approx(1.0)
    assert s["mmcs_learned"] == pytest.approx((4 + 1 / math.sqrt(2)) / 5)


def test_recovery_threshold_rejects_a_45_degree_direction():
    s = metrics.recovery_scores(torch.tensor([[1.0, 0.0]]), torch.tensor([[1.0, 1.0]]))
    assert s["mmcs_truth"] == pytest.approx(1 / math.sqrt(2)) and s["recovered_fraction"] == 0.0


def test_normalised_mse_is_zero_for_perfect_and_one_for_the_mean():
    x = torch.randn(100, 3, generator=torch.Generator().manual_seed(2))
    assert metrics.normalised_mse(x, x) == pytest.approx(0.0)
    assert metrics.normalised_mse(x, x.mean(0).expand_as(x)) == pytest.approx(1.0)
