"""Computation in superposition: learn y = |x| through one hidden ReLU layer (Elhage et al. 2022).

x (B, n) with x_i = 0 w.p. 1 - density, else U[-1, 1]; target y = |x|; loss Σ_i I_i (y_i - ŷ_i)^2
with I_i = decay^i. Every model has the same shape

    h = units(x)           # (B, U) hidden unit activations, non-negative
    ŷ = ReLU(out(h) + b)   # (B, n)

and differs only in its hidden layer. The units are the thing whose monosemanticity we measure:

- dense:       U = m ReLU neurons, h = ReLU(W1 x + b1) (the paper's model, W1 (m, n));
- dense_l1:    the same plus an L1 penalty on h (the classic way to kill superposition);
- dense_wide:  U = N ReLU neurons, no sparsity (the "compression" view: capable, polysemantic);
- routed_*:    a RoutedFFN with d_model = n read directly from the features: N units of which at
               most k = m fire (w_in (N, n) reads features, w_out (N, n) writes outputs).

Why the routed layer takes x directly (no embedding n -> m first): its units must sit where the
dense model's m neurons sit, one nonlinearity between features and outputs, so that "unit
monosemanticity" means the same thing for both. The fair budget is equal *active* units (m
per input), not equal parameters; dense_wide is the equal-parameter reference.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from monoroute.data.toy_features import sparse_uniform
from monoroute.errors import MonorouteError
from monoroute.layers import RoutedFFN
from monoroute.toy import metrics
from monoroute.devices import resolve_device
from monoroute.toy.common import fit, generator

REPRESENTED = 0.5  # feature i is computed when ŷ_i >= 0.5 for both x = e_i and x = -e_i


class DenseHidden(nn.Module):
    """x (B, n) -> h = ReLU(W1 x + b1) (B, U), with an optional L1 penalty on h."""

    def __init__(self, n: int, units: int, l1_coef: float) -> None:
        super().__init__()
        self.lin = nn.Linear(n, units)
        self.l1_coef = l1_coef
        self.penalty = torch.zeros(())

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu(self.lin(x))
        self.penalty = self.l1_coef * h.abs().sum(-1).mean()
        return h

    def input_weights(self) -> Tensor:
        return self.lin.weight  # (U, n)


class RoutedHidden(nn.Module):
    """x (B, n) -> dense view (B, N) of a RoutedFFN's at most k non-zero unit activations.

    The RoutedFFN's own output y = Σ h_i w_out[i] is the model's readout, so `readout` is
    the layer itself; `penalty` is its auxiliary loss (dead-unit revival + its L1 on h).
    """

    def __init__(self, n: int, units: int, k: int, router: str, l1_coef: float) -> None:
        super().__init__()
        self.ffn = RoutedFFN(n, units, k, router=router, activation="relu", l1_coef=l1_coef)
        self.penalty = torch.zeros(())

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        y = self.ffn(x)  # (B, n)
        self.penalty = self.ffn.aux_loss if self.training else torch.zeros(())
        return self.ffn.last_activations.to_dense(), y  # (B, N), (B, n)

    def input_weights(self) -> Tensor:
        return self.ffn.w_in  # (N, n)


class AbsModel(nn.Module):
    """ŷ = ReLU(readout(h) + b) around either hidden layer; forward returns (ŷ, h)."""

    def __init__(self, hidden: DenseHidden | RoutedHidden, n: int, units: int) -> None:
        super().__init__()
        self.hidden = hidden
        self.readout = nn.Linear(units, n, bias=False) if isinstance(hidden, DenseHidden) else None
        self.b_out = nn.Parameter(torch.zeros(n))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        if self.readout is None:
            h, y = self.hidden(x)
        else:
            h = self.hidden(x)
            y = self.readout(h)
        return F.relu(y + self.b_out), h


@dataclass
class ModelSpec:
    name: str
    kind: str  # "dense" or "routed"
    units: int
    k: int = 0  # routed only: most units active per input
    router: str = "dense"
    l1_coef: float = 0.0


@dataclass
class AbsConfig:
    n_features: int = 100
    d_hidden: int = 40  # m: the dense width and the routed layers' k
    n_units: int = 400  # N for routed and dense_wide (a perfect square, for the product-key router)
    importance_decay: float = 0.8
    densities: list[float] = field(default_factory=lambda: [1.0, 0.1, 0.03, 0.01])
    headline_density: float = 0.03
    unit_sweep: list[int] = field(default_factory=lambda: [1024])  # extra N at the headline density
    l1_routed: float = 1e-4
    l1_dense: float = 1e-3
    steps: int = 2500
    batch: int = 512
    lr: float = 1e-2
    eval_batch: int = 8192
    seed: int = 0
    device: str = "cpu"

    def models(self, n_units: int | None = None) -> list[ModelSpec]:
        n_units = n_units or self.n_units
        m = self.d_hidden
        return [
            ModelSpec("dense", "dense", m),
            ModelSpec("dense_l1", "dense", m, l1_coef=self.l1_dense),
            ModelSpec("dense_wide", "dense", n_units),
            ModelSpec("routed_dense", "routed", n_units, m, "dense"),
            ModelSpec("routed_dense_l1", "routed", n_units, m, "dense", self.l1_routed),
            ModelSpec("routed_pk", "routed", n_units, m, "product_key"),
            ModelSpec("routed_pk_l1", "routed", n_units, m, "product_key", self.l1_routed),
        ]


def quick_config(**overrides) -> AbsConfig:
    cfg = AbsConfig(n_units=256, densities=[0.1, 0.03], unit_sweep=[], steps=600, batch=256, eval_batch=4096)
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


def build(spec: ModelSpec, n: int, seed: int, device: torch.device) -> AbsModel:
    with torch.random.fork_rng(devices=[]):  # RoutedFFN initialises from the global RNG
        torch.manual_seed(seed)
        if spec.kind == "dense":
            hidden = DenseHidden(n, spec.units, spec.l1_coef)
        else:
            hidden = RoutedHidden(n, spec.units, spec.k, spec.router, spec.l1_coef)
        return AbsModel(hidden, n, spec.units).to(device)


def abs_loss(y_hat: Tensor, x: Tensor, importance: Tensor) -> Tensor:
    return (importance * (y_hat - x.abs()) ** 2).sum(-1).mean()


def zero_output_loss(n: int, decay: float, density: float) -> float:
    """Expected loss of ŷ = 0: density * Σ_i I_i * E[x^2] with x ~ U[-1, 1]. Divides the loss so
    that densities compare (1 = learned nothing, 0 = exact)."""
    return density * sum(decay**i for i in range(n)) / 3


def train_model(spec: ModelSpec, cfg: AbsConfig, density: float, device: torch.device) -> AbsModel:
    model = build(spec, cfg.n_features, cfg.seed, device)
    gen = generator(cfg.seed + 1, device)
    importance = cfg.importance_decay ** torch.arange(cfg.n_features, dtype=torch.float32, device=device)

    def loss_fn() -> Tensor:
        x = sparse_uniform(cfg.batch, cfg.n_features, density, gen, low=-1.0, high=1.0, device=device)
        y_hat, _ = model(x)
        return abs_loss(y_hat, x, importance) + model.hidden.penalty

    fit(model, loss_fn, cfg.steps, cfg.lr)
    return model


@torch.no_grad()
def evaluate(model: AbsModel, cfg: AbsConfig, density: float, device: torch.device) -> dict:
    """Loss on fresh data, features computed, and unit monosemanticity by weights and behaviour."""
    n = cfg.n_features
    importance = cfg.importance_decay ** torch.arange(n, dtype=torch.float32, device=device)
    x = sparse_uniform(cfg.eval_batch, n, density, generator(cfg.seed + 2, device), -1.0, 1.0, device)
    y_hat, h = model(x)
    fired = (h > 0).any(0)  # (U,) units that fire on data
    # Probes: each feature alone at +1 and at -1, and the zero input as the baseline.
    eye = torch.eye(n, device=device)
    y_probe, h_probe = model(torch.cat([eye, -eye, torch.zeros(1, n, device=device)]))
    base = h_probe[-1]  # (U,)
    response = ((h_probe[:n] - base).abs() + (h_probe[n : 2 * n] - base).abs()).t()  # (U, n)
    represented = (y_probe[:n].diagonal() >= REPRESENTED) & (y_probe[n : 2 * n].diagonal() >= REPRESENTED)
    summary = metrics.unit_summary(response, fired, model.hidden.input_weights().detach())
    loss = abs_loss(y_hat, x, importance).item()
    return {
        "loss": loss,
        "relative_loss": loss / zero_output_loss(n, cfg.importance_decay, density),
        "features_represented": int(represented.sum()),
        "mean_active_units": (h > 0).sum(-1).float().mean().item(),
        **summary,
    }


def train_and_evaluate(spec: ModelSpec, cfg: AbsConfig, density: float, device: torch.device) -> dict:
    return evaluate(train_model(spec, cfg, density, device), cfg, density, device)


def run_abs(config: AbsConfig) -> dict:
    """Train every model at every density (and the extra N at the headline density); return metrics.

    results["models"][name] holds the headline-density metrics at the top level and the whole
    sweep under "by_density"; results["unit_sweep"][N][name] the routed models at other N.
    """
    if config.headline_density not in config.densities:
        raise MonorouteError(
            f"headline_density {config.headline_density} is not among densities {config.densities}; add it"
        )
    device = resolve_device(config.device)
    models = {}
    for spec in config.models():
        by_density = {str(d): train_and_evaluate(spec, config, d, device) for d in config.densities}
        models[spec.name] = {**by_density[str(config.headline_density)], "units": spec.units, "k": spec.k,
                             "by_density": by_density}
    unit_sweep = {}
    for n_units in config.unit_sweep:
        specs = [s for s in config.models(n_units) if s.kind == "routed"]
        unit_sweep[str(n_units)] = {
            s.name: train_and_evaluate(s, config, config.headline_density, device) for s in specs
        }
    return {"experiment": "abs", "config": asdict(config), "models": models, "unit_sweep": unit_sweep}


def table(results: dict) -> str:
    cfg = results["config"]
    lines = [
        f"abs task at density {cfg['headline_density']} "
        f"(n={cfg['n_features']}, m={cfg['d_hidden']}, N={cfg['n_units']})",
        f"{'model':<17}{'loss':>9}{'rel':>7}{'mono':>7}{'mono_w':>8}{'feat/unit':>10}{'dead':>7}{'repr':>6}{'active':>8}",
    ]
    for name, r in results["models"].items():
        lines.append(
            f"{name:<17}{r['loss']:>9.4f}{r['relative_loss']:>7.3f}{r['monosemantic_fraction']:>7.2f}"
            f"{r['monosemantic_fraction_weights']:>8.2f}"
            f"{r['features_per_unit']:>10.2f}{r['dead_fraction']:>7.2f}{r['features_represented']:>6}"
            f"{r['mean_active_units']:>8.1f}"
        )
    return "\n".join(lines)
