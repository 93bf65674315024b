"""Superposition, monosemanticity and feature-recovery metrics on known ground truth.

Conventions: W (..., m, n) maps n features into m hidden dimensions, so feature i is the column
W[..., :, i]; leading dims are instances. Unit tables are (U, n) (a unit's weights over features)
or (U, d) (a learned direction per unit).
"""
from __future__ import annotations

from torch import Tensor

EPS = 1e-12


def feature_norms(w: Tensor) -> Tensor:
    """(..., m, n) -> (..., n): ‖W_i‖, how strongly each feature is represented."""
    return w.norm(dim=-2)


def _overlaps_sq(w: Tensor) -> Tensor:
    """(..., m, n) -> (..., n, n): (Ŵ_i · W_j)^2, row i normalised."""
    unit = w / (feature_norms(w).unsqueeze(-2) + EPS)
    return (unit.transpose(-1, -2) @ w) ** 2


def superposition(w: Tensor) -> Tensor:
    """(..., m, n) -> (..., n): Σ_{j≠i} (Ŵ_i · W_j)^2, how much other features interfere with i."""
    sq = _overlaps_sq(w)
    return sq.sum(-1) - sq.diagonal(dim1=-2, dim2=-1)


def feature_dimensionality(w: Tensor) -> Tensor:
    """(..., m, n) -> (..., n): D_i = ‖W_i‖^2 / Σ_j (Ŵ_i · W_j)^2 (Elhage et al. 2022).

    1 for a feature with a dimension of its own, 1/2 for an antipodal pair, 0 for an
    unrepresented feature.
    """
    return feature_norms(w) ** 2 / (_overlaps_sq(w).sum(-1) + EPS)


def dimensions_per_feature(w: Tensor) -> Tensor:
    """(..., m, n) -> (...): D* = m / ‖W‖_F^2, hidden dimensions spent per represented feature."""
    return w.shape[-2] / (w**2).sum((-1, -2))


def weight_monosemanticity(w_units: Tensor) -> Tensor:
    """(U, n) unit input weights over features -> (U,): share of squared weight on the top feature."""
    sq = w_units**2
    return sq.max(-1).values / (sq.sum(-1) + EPS)


def response_monosemanticity(response: Tensor) -> Tensor:
    """(U, n) non-negative unit responses to each feature alone -> (U,): max_i r / Σ_i r."""
    return response.max(-1).values / (response.sum(-1) + EPS)


def features_per_unit(response: Tensor) -> Tensor:
    """(U, n) -> (U,): participation ratio (Σ r)^2 / Σ r^2 — 1 for one feature, 2 for two equal ones."""
    return response.sum(-1) ** 2 / ((response**2).sum(-1) + EPS)


def unit_summary(response: Tensor, live: Tensor, w_units: Tensor | None = None, threshold: float = 0.9) -> dict:
    """Fractions over live units (those that fire on data and respond to some feature).

    response: (U, n) responses; live: (U,) bool; w_units: optional (U, n) input weights for the
    weight-based monosemanticity. A unit counts as monosemantic at score >= threshold.
    """
    live = live & (response.sum(-1) > EPS)
    n_live = int(live.sum())
    out = {"units": response.shape[0], "live_units": n_live, "dead_fraction": 1 - n_live / response.shape[0]}
    if n_live == 0:
        return {**out, "monosemantic_fraction": 0.0, "features_per_unit": 0.0, "monosemantic_fraction_weights": 0.0}
    out["monosemantic_fraction"] = (response_monosemanticity(response[live]) >= threshold).float().mean().item()
    out["features_per_unit"] = features_per_unit(response[live]).mean().item()
    if w_units is not None:
        mono_w = weight_monosemanticity(w_units[live])
        out["monosemantic_fraction_weights"] = (mono_w >= threshold).float().mean().item()
    return out


def cosine_matrix(truth: Tensor, learned: Tensor) -> Tensor:
    """(F, d), (U, d) -> (F, U) cosine similarities."""
    t = truth / (truth.norm(dim=-1, keepdim=True) + EPS)
    l_ = learned / (learned.norm(dim=-1, keepdim=True) + EPS)
    return t @ l_.t()


def recovery_scores(truth: Tensor, learned: Tensor, threshold: float = 0.9) -> dict:
    """Mean max cosine similarity both ways, and the share of truth recovered at cos >= threshold.

    mmcs_truth: mean over ground-truth features of the best cosine to any learned direction (does
    the dictionary contain every feature?); mmcs_learned: mean over learned directions of the best
    cosine to any ground-truth feature (is every learned direction a real feature?). Pass only the
    live learned directions so that dead units do not count.
    """
    if learned.shape[0] == 0:
        return {"mmcs_truth": 0.0, "mmcs_learned": 0.0, "recovered_fraction": 0.0}
    cos = cosine_matrix(truth, learned)
    best_for_truth = cos.max(1).values
    return {
        "mmcs_truth": best_for_truth.mean().item(),
        "mmcs_learned": cos.max(0).values.mean().item(),
        "recovered_fraction": (best_for_truth >= threshold).float().mean().item(),
    }


def normalised_mse(x: Tensor, x_hat: Tensor) -> float:
    """Σ‖x - x̂‖^2 / Σ‖x - mean(x)‖^2: 0 is perfect, 1 is as good as predicting the mean."""
    return (((x - x_hat) ** 2).sum() / (((x - x.mean(0)) ** 2).sum() + EPS)).item()
