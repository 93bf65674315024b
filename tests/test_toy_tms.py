"""The classic Toy Models of Superposition facts, reproduced by short batched training runs."""
import pytest
import torch

from monoroute.toy import metrics
from monoroute.toy.tms import TMSSweep, describe, train_sweep


@pytest.fixture(autouse=True)
def one_thread():
    # Tiny models: extra threads only add contention on a shared CPU.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def trained(sweep: TMSSweep, steps: int, batch: int) -> list[dict]:
    model = train_sweep(sweep, steps, batch, lr=1e-2, seed=0, device=torch.device("cpu"))
    return describe(model.w.detach(), sweep.densities)


def test_small_model_superposes_only_with_relu_and_sparsity():
    # (a) n=20, m=5, I_i = 0.7^i; instance 0 dense (S=0), instance 1 sparse (S=0.97).
    sweep = TMSSweep(20, 5, 0.7, [1.0, 0.03])
    dense, sparse = trained(sweep, 1000, 256)
    assert dense["features_represented"] == 5 and dense["features_superposed"] == 0  # ≈ m, no superposition
    assert sparse["features_represented"] > 5 and sparse["features_superposed"] > 0
    for inst in trained(TMSSweep(**{**sweep.__dict__, "relu": False}), 1000, 256):
        assert inst["features_represented"] <= 5 and inst["features_superposed"] == 0  # linear never superposes


def test_large_model_dimensionality_plateaus_at_one_and_one_half():
    # (b) n=400, m=30, uniform importance: D* = 1 when dense; a run of sparsities sticks at 1/2 (antipodal pairs).
    rows = trained(TMSSweep(400, 30, 1.0, [1.0, 0.33, 0.28, 0.24]), 1000, 256)
    d_star = [r["dimensions_per_feature"] for r in rows]
    assert d_star[0] == pytest.approx(1.0, abs=0.05)
    assert d_star[1:] == pytest.approx([0.5] * 3, abs=0.06)
    # On the 1/2 plateau most represented features sit in antipodal pairs: D_i ≈ 1/2.
    dims = torch.tensor(rows[2]["feature_dimensionality"])
    represented = torch.tensor(rows[2]["norms"]) > 0.5
    assert ((dims[represented] - 0.5).abs() < 0.1).float().mean() > 0.8


def test_describe_counts_a_hand_built_antipodal_model():
    w = torch.tensor([[[1.0, -1.0, 0.0], [0.0, 0.0, 0.1]]])  # (I=1, m=2, n=3): one pair, one tiny feature
    (row,) = describe(w, [0.1])
    assert row["features_represented"] == 2 and row["features_superposed"] == 2
    assert row["dimensions_per_feature"] == pytest.approx(2 / 2.01)
    assert metrics.feature_dimensionality(w)[0, :2].tolist() == pytest.approx([0.5, 0.5])
