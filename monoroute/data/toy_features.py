"""Seeded synthetic feature generators for the toy-model lab (`monoroute toy ...`).

Every generator takes an explicit `torch.Generator`, so a run is reproducible from its seed.
Dimensions: B batch, I instances (independent models trained side by side), n features,
d activation width, F ground-truth features.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from monoroute.errors import MonorouteError


def check_probability(name: str, p: Tensor | float) -> None:
    p = torch.as_tensor(p)
    if not bool(((p > 0) & (p <= 1)).all()):
        raise MonorouteError(f"{name} must lie in (0, 1], got {p.tolist()}; pass a feature density such as 0.1")


def sparse_uniform(
    batch: int,
    n_features: int,
    density: Tensor | float,
    generator: torch.Generator,
    low: float = 0.0,
    high: float = 1.0,
    device: torch.device | str = "cpu",
) -> Tensor:
    """Features that are 0 with probability 1 - density and U[low, high] otherwise.

    density: a float, or (I,) one density per instance -> output (B, I, n); a float -> (B, n).
    This is the TMS / ARENA data: sparsity S = 1 - density.
    """
    check_probability("density", density)
    density = torch.as_tensor(density, dtype=torch.float32, device=device)
    shape = (batch, *density.shape, n_features)
    values = torch.rand(shape, generator=generator, device=device) * (high - low) + low
    fires = torch.rand(shape, generator=generator, device=device) < density.unsqueeze(-1)
    return values * fires


def decaying_firing_probabilities(n_features: int, mean_active: float, decay: float = 0.99) -> Tensor:
    """(F,) firing probabilities p_i ∝ decay^i, scaled so that sum_i p_i = mean_active (Sharkey et al.)."""
    p = decay ** torch.arange(n_features, dtype=torch.float64)
    p = p * (mean_active / p.sum())
    if p.max() > 1:
        raise MonorouteError(
            f"mean_active={mean_active} needs a firing probability above 1 for feature 0; "
            f"lower mean_active or raise the number of features"
        )
    return p.float()


def correlated_firing(
    batch: int, probs: Tensor, correlation: float, group_size: int, generator: torch.Generator
) -> Tensor:
    """(B, F) booleans: feature i fires with probability probs[i], correlated within groups.

    A Gaussian copula keeps each marginal exact: z_i = sqrt(rho) g + sqrt(1 - rho) e_i with one
    shared g per group of `group_size` consecutive features, and feature i fires when
    Phi(z_i) < probs[i]. correlation=0 gives independent features.
    """
    if not 0 <= correlation < 1:
        raise MonorouteError(f"correlation must lie in [0, 1), got {correlation}")
    n = probs.shape[0]
    own = torch.randn(batch, n, generator=generator, device=probs.device)
    if correlation == 0:
        return torch.special.ndtr(own) < probs
    n_groups = math.ceil(n / group_size)
    shared = torch.randn(batch, n_groups, generator=generator, device=probs.device)
    shared = shared.repeat_interleave(group_size, dim=1)[:, :n]  # (B, F)
    z = math.sqrt(correlation) * shared + math.sqrt(1 - correlation) * own
    return torch.special.ndtr(z) < probs


def unit_directions(n: int, d: int, generator: torch.Generator, device: torch.device | str = "cpu") -> Tensor:
    """(n, d) random unit vectors: the ground-truth feature directions of an activation space."""
    g = torch.randn(n, d, generator=generator, device=device)
    return g / g.norm(dim=-1, keepdim=True)


class SuperposedActivations:
    """Activations a = sum_i c_i g_i built from known directions, as an infinite batch iterator.

    directions: (F, d) unit ground-truth directions; probs: (F,) firing probabilities;
    coefficients c_i ~ U[0, 1] when feature i fires. Iterating yields (B, d) activations;
    `sample` also returns the (B, F) coefficients, for evaluation against the ground truth.
    """

    def __init__(
        self,
        directions: Tensor,
        probs: Tensor,
        batch: int,
        generator: torch.Generator,
        correlation: float = 0.0,
        group_size: int = 4,
    ) -> None:
        self.directions, self.probs, self.batch, self.generator = directions, probs, batch, generator
        self.correlation, self.group_size = correlation, group_size

    def sample(self, batch: int) -> tuple[Tensor, Tensor]:
        fires = correlated_firing(batch, self.probs, self.correlation, self.group_size, self.generator)
        coef = torch.rand(fires.shape, generator=self.generator, device=self.probs.device) * fires  # (B, F)
        return coef @ self.directions, coef  # (B, d), (B, F)

    def __iter__(self) -> "SuperposedActivations":
        return self

    def __next__(self) -> Tensor:
        return self.sample(self.batch)[0]
