"""Seeded synthetic feature generators: shapes, marginals, correlation, reproducibility."""
import pytest
import torch

from monoroute.data.toy_features import (
    SuperposedActivations,
    correlated_firing,
    decaying_firing_probabilities,
    sparse_uniform,
    unit_directions,
)
from monoroute.errors import MonorouteError


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_sparse_uniform_per_instance_density_and_range():
    x = sparse_uniform(20000, 10, torch.tensor([1.0, 0.1]), gen(), low=-1.0, high=1.0)
    assert x.shape == (20000, 2, 10)
    assert x.min() >= -1 and x.max() <= 1
    density = (x != 0).float().mean((0, 2))
    assert density.tolist() == pytest.approx([1.0, 0.1], abs=0.01)
    torch.testing.assert_close(x, sparse_uniform(20000, 10, torch.tensor([1.0, 0.1]), gen(), low=-1.0, high=1.0))


def test_sparse_uniform_rejects_bad_density():
    with pytest.raises(MonorouteError, match="density"):
        sparse_uniform(4, 3, 0.0, gen())


def test_decaying_probabilities_sum_to_mean_active():
    p = decaying_firing_probabilities(512, 5.0)
    assert p.sum().item() == pytest.approx(5.0, rel=1e-5)
    assert p[1] / p[0] == pytest.approx(0.99)
    with pytest.raises(MonorouteError, match="mean_active"):
        decaying_firing_probabilities(4, 5.0)


def test_correlation_keeps_marginals_and_raises_cofiring():
    probs = torch.full((8,), 0.2)
    indep = correlated_firing(40000, probs, 0.0, 4, gen()).float()
    corr = correlated_firing(40000, probs, 0.8, 4, gen()).float()
    assert corr.mean(0).tolist() == pytest.approx([0.2] * 8, abs=0.015)
    cofire = lambda f, i, j: (f[:, i] * f[:, j]).mean().item()  # noqa: E731
    assert cofire(indep, 0, 1) == pytest.approx(0.04, abs=0.01)
    assert cofire(corr, 0, 1) > 0.1  # same group: fire together
    assert cofire(corr, 0, 4) == pytest.approx(0.04, abs=0.01)  # different groups: independent


def test_superposed_activations_are_sums_of_directions():
    dirs = unit_directions(6, 4, gen())
    assert dirs.norm(dim=-1).tolist() == pytest.approx([1.0] * 6)
    data = SuperposedActivations(dirs, torch.full((6,), 0.5), batch=3, generator=gen(1))
    a, coef = data.sample(5)
    torch.testing.assert_close(a, coef @ dirs)
    assert next(data).shape == (3, 4)
