"""Toy Models of Superposition (Elhage et al. 2022), batched over instances as in ARENA.

x (B, I, n) with x_i = 0 w.p. S_inst, else U[0, 1]; per instance W (m, n), b (n):

    h  = W x            # (B, I, m)
    x' = W^T h + b      # (B, I, n), then ReLU for the ReLU model
    loss = Σ_inst mean_B Σ_i I_i (x_i - x'_i)^2

Each instance has its own feature density, so one training run is a whole sparsity sweep
(instances share nothing but the optimizer step; Adam's per-parameter scaling keeps them
independent).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor, nn

from monoroute.data.toy_features import sparse_uniform
from monoroute.toy import metrics
from monoroute.devices import resolve_device
from monoroute.toy.common import fit, generator

REPRESENTED_NORM = 0.5  # ‖W_i‖ above this: feature i is represented (Elhage et al. use the same cut)
SUPERPOSED = 0.1  # Σ_{j≠i}(Ŵ_i·W_j)^2 above this: feature i shares its direction


class TMSModel(nn.Module):
    """I independent instances of x' = act(W^T W x + b); W (I, m, n), b (I, n)."""

    def __init__(self, n_instances: int, n_features: int, d_hidden: int, relu: bool, gen: torch.Generator) -> None:
        super().__init__()
        # Xavier-normal per instance (nn.init would count the instance dim into the fans).
        std = (2 / (d_hidden + n_features)) ** 0.5
        self.w = nn.Parameter(torch.randn(n_instances, d_hidden, n_features, generator=gen) * std)
        self.b = nn.Parameter(torch.zeros(n_instances, n_features))
        self.relu = relu

    def forward(self, x: Tensor) -> Tensor:
        h = torch.einsum("imn,bin->bim", self.w, x)  # (B, I, m)
        out = torch.einsum("imn,bim->bin", self.w, h) + self.b  # (B, I, n)
        return torch.relu(out) if self.relu else out


@dataclass
class TMSSweep:
    """One batched training run: instance i has feature density densities[i]."""

    n_features: int
    d_hidden: int
    importance_decay: float  # I_i = decay^i; 1.0 is uniform importance
    densities: list[float]
    relu: bool = True


@dataclass
class TMSConfig:
    # (a) n=20, m=5, I_i = 0.7^i, dense to very sparse, ReLU and linear models.
    small: TMSSweep = field(default_factory=lambda: TMSSweep(20, 5, 0.7, [1.0, 0.3, 0.1, 0.03, 0.01]))
    # (b) n=400, m=30, uniform importance: D* against density shows the 1 and 1/2 plateaus.
    large: TMSSweep = field(
        default_factory=lambda: TMSSweep(400, 30, 1.0, torch.logspace(0, -2, 12).tolist())
    )
    steps: int = 2500
    batch: int = 512
    lr: float = 5e-3
    seed: int = 0
    device: str = "cpu"


def quick_config(**overrides) -> TMSConfig:
    """A sweep that finishes in well under a minute on 2 CPU cores."""
    cfg = TMSConfig(
        large=TMSSweep(400, 30, 1.0, [1.0, 0.5, 0.33, 0.24, 0.1, 0.03]), steps=1000, batch=256, lr=1e-2
    )
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


def train_sweep(sweep: TMSSweep, steps: int, batch: int, lr: float, seed: int, device: torch.device) -> TMSModel:
    gen = generator(seed, device)
    init_gen = torch.Generator().manual_seed(seed)  # CPU init, so a seed gives the same start on any device
    model = TMSModel(len(sweep.densities), sweep.n_features, sweep.d_hidden, sweep.relu, init_gen).to(device)
    importance = sweep.importance_decay ** torch.arange(sweep.n_features, dtype=torch.float32, device=device)
    density = torch.tensor(sweep.densities, device=device)

    def loss_fn() -> Tensor:
        x = sparse_uniform(batch, sweep.n_features, density, gen, device=device)  # (B, I, n)
        return (importance * (model(x) - x) ** 2).sum(-1).mean(0).sum()

    fit(model, loss_fn, steps, lr)
    return model


def describe(w: Tensor, densities: list[float]) -> list[dict]:
    """Per-instance geometry of W (I, m, n)."""
    norms = metrics.feature_norms(w)  # (I, n)
    sup = metrics.superposition(w)  # (I, n)
    dim = metrics.feature_dimensionality(w)  # (I, n)
    d_star = metrics.dimensions_per_feature(w)  # (I,)
    rows = []
    for i, density in enumerate(densities):
        represented = norms[i] > REPRESENTED_NORM
        rows.append(
            {
                "density": density,
                "sparsity": 1 - density,
                "features_represented": int(represented.sum()),
                "features_superposed": int((represented & (sup[i] > SUPERPOSED)).sum()),
                "mean_superposition": sup[i][represented].mean().item() if represented.any() else 0.0,
                "dimensions_per_feature": d_star[i].item(),
                "norms": norms[i].tolist(),
                "superposition": sup[i].tolist(),
                "feature_dimensionality": dim[i].tolist(),
            }
        )
    return rows


def run_tms(config: TMSConfig) -> dict:
    """Train (a) ReLU and linear small models and (b) the large ReLU sweep; return all geometry."""
    device = resolve_device(config.device)
    results = {"experiment": "tms", "config": asdict(config)}
    for name, sweep in [
        ("small_relu", config.small),
        ("small_linear", TMSSweep(**{**asdict(config.small), "relu": False})),
        ("large_relu", config.large),
    ]:
        model = train_sweep(sweep, config.steps, config.batch, config.lr, config.seed, device)
        instances = describe(model.w.detach().cpu(), sweep.densities)
        results[name] = {"m": sweep.d_hidden, "n": sweep.n_features, "instances": instances}
    return results


def table(results: dict) -> str:
    lines = [f"{'model':<13}{'density':>9}{'represented':>13}{'superposed':>12}{'D*':>8}"]
    for name in ("small_relu", "small_linear", "large_relu"):
        res = results[name]
        for row in res["instances"]:
            lines.append(
                f"{name:<13}{row['density']:>9.3f}{row['features_represented']:>8}/{res['n']:<4}"
                f"{row['features_superposed']:>12}{row['dimensions_per_feature']:>8.3f}"
            )
    return "\n".join(lines)
