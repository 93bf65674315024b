"""Feature recovery from superposed activations (Sharkey et al. 2022), with known ground truth.

Activations a = Σ_i c_i g_i (B, d) from F unit directions g_i; feature i fires with probability
p_i ∝ decay^i (≈ mean_active per sample), c_i ~ U[0, 1]. Dictionaries trained on the same
stream: a TopK SAE and an L1 SAE through sae-lens, and RoutedFFN autoencoders

    â = RoutedFFN(a - b_dec) + b_dec      # learned directions: the rows of w_out (N, d)

All are scored against the g_i (MMCS both ways, share recovered at cos >= 0.9) and on held-out
samples (L0, dead units, normalised MSE).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn

from monoroute.data.toy_features import SuperposedActivations, decaying_firing_probabilities, unit_directions
from monoroute.layers import RoutedFFN
from monoroute.toy import metrics, sae_baselines
from monoroute.devices import resolve_device
from monoroute.toy.common import fit, generator


@dataclass
class RecoveryConfig:
    d: int = 256
    n_features: int = 512
    mean_active: float = 5.0
    decay: float = 0.99
    correlation: float = 0.0  # > 0: features fire together in groups of `group_size` (Gaussian copula)
    group_size: int = 4
    dict_size: int = 1024  # every dictionary gets this many units (a perfect square for product keys)
    k: int = 8  # TopK SAE's k and the routed layers' cap on active units
    l1_sae: float = 0.3
    l1_routed: float = 0.03
    steps: int = 1500
    batch: int = 512
    lr: float = 2e-3
    eval_batch: int = 8192
    seed: int = 0
    device: str = "cpu"


def quick_config(**overrides) -> RecoveryConfig:
    cfg = RecoveryConfig(d=64, n_features=128, dict_size=256, steps=800, batch=256, eval_batch=4096)
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


class RoutedAutoencoder(nn.Module):
    """â = RoutedFFN(a - b_dec) + b_dec; encode gives the (B, N) dense view of unit activations."""

    def __init__(self, d: int, units: int, k: int, router: str, l1_coef: float) -> None:
        super().__init__()
        self.ffn = RoutedFFN(d, units, k, router=router, activation="relu", l1_coef=l1_coef)
        self.b_dec = nn.Parameter(torch.zeros(d))

    def forward(self, a: Tensor) -> Tensor:
        return self.ffn(a - self.b_dec) + self.b_dec

    def encode(self, a: Tensor) -> Tensor:
        self.ffn(a - self.b_dec)
        return self.ffn.last_activations.to_dense()

    def decode(self, h: Tensor) -> Tensor:
        """(B, N) dense unit activations -> (B, d); equals forward() on the routed activations."""
        return h @ self.ffn.w_out + self.b_dec

    def decoder_directions(self) -> Tensor:
        return self.ffn.w_out.detach()  # (N, d)


def train_routed(
    cfg: RecoveryConfig, data: SuperposedActivations, router: str, l1_coef: float, device: torch.device
) -> RoutedAutoencoder:
    with torch.random.fork_rng(devices=[]):  # RoutedFFN initialises from the global RNG
        torch.manual_seed(cfg.seed)
        model = RoutedAutoencoder(cfg.d, cfg.dict_size, cfg.k, router, l1_coef).to(device)

    def loss_fn() -> Tensor:
        a = next(data)
        mse = ((model(a) - a) ** 2).sum(-1).mean()  # the same reconstruction loss as sae-lens
        return mse + model.ffn.aux_loss

    fit(model, loss_fn, cfg.steps, cfg.lr)
    return model


@torch.no_grad()
def score(encode, decode, directions: Tensor, truth: Tensor, a: Tensor) -> dict:
    """Recovery and reconstruction metrics of one dictionary on held-out activations a (B, d)."""
    acts = encode(a)  # (B, U)
    live = (acts != 0).any(0)
    return {
        **metrics.recovery_scores(truth, directions[live]),
        "l0": (acts != 0).sum(-1).float().mean().item(),
        "dead_fraction": 1 - live.float().mean().item(),
        "nmse": metrics.normalised_mse(a, decode(acts)),
    }


def make_data(cfg: RecoveryConfig, device: torch.device, seed_offset: int) -> SuperposedActivations:
    # The directions and probabilities come from the seed alone; the sample stream from seed+offset,
    # so training and evaluation share the ground truth but not the samples.
    truth = unit_directions(cfg.n_features, cfg.d, generator(cfg.seed, device), device)
    probs = decaying_firing_probabilities(cfg.n_features, cfg.mean_active, cfg.decay).to(device)
    return SuperposedActivations(
        truth, probs, cfg.batch, generator(cfg.seed + seed_offset, device), cfg.correlation, cfg.group_size
    )


def run_recovery(config: RecoveryConfig) -> dict:
    device = resolve_device(config.device)
    truth = make_data(config, device, 0).directions
    a_eval, _ = make_data(config, device, 2).sample(config.eval_batch)
    models = {}
    for name, sae in sae_baselines.train_saes(config, make_data(config, device, 1)).items():
        models[name] = score(sae.encode, sae.decode, sae.W_dec.detach(), truth, a_eval)
    for name, router, l1 in [
        ("routed_dense", "dense", 0.0),
        ("routed_dense_l1", "dense", config.l1_routed),
        ("routed_pk", "product_key", 0.0),
        ("routed_pk_l1", "product_key", config.l1_routed),
    ]:
        model = train_routed(config, make_data(config, device, 1), router, l1, device)
        models[name] = score(model.encode, model.decode, model.decoder_directions(), truth, a_eval)
    return {"experiment": "recovery", "config": asdict(config), "models": models}


def table(results: dict) -> str:
    cfg = results["config"]
    lines = [
        f"feature recovery: d={cfg['d']}, {cfg['n_features']} true features, {cfg['dict_size']} units, k={cfg['k']}",
        f"{'model':<17}{'mmcs':>7}{'mmcs_l':>8}{'rec@.9':>8}{'L0':>7}{'dead':>7}{'nmse':>8}",
    ]
    for name, r in results["models"].items():
        lines.append(
            f"{name:<17}{r['mmcs_truth']:>7.3f}{r['mmcs_learned']:>8.3f}{r['recovered_fraction']:>8.2f}"
            f"{r['l0']:>7.2f}{r['dead_fraction']:>7.2f}{r['nmse']:>8.4f}"
        )
    return "\n".join(lines)
