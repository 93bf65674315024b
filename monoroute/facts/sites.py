"""Where a model's units live, and the three ways the fact measurements touch them.

A *site* is one unit set reached through a public hook point: a routed layer's units or a dense
layer's neurons (`blocks.{L}.mlp.hook_post`), or the latents of an SAE / transcoder spliced into a
dense model (their reconstruction replaces the activation they were trained on, so the model that
is measured is the spliced one, as SAELens users run it). Activations are either
`SparseActivations` (routed units, SAE / transcoder latents: (B, T, k) ids and values) or a dense
(B, T, N) tensor (dense neurons). On an activation a site can:

- `ablate`: zero a set of units on every position (a unit that is not selected is already zero);
- `attribution`: act × d(objective)/d(act) summed per unit, from a leaf put in the activation's place;
- `firing`: which units are active (> 0) at each position.

`out_rows` names the weights a unit writes with (routed / transcoder `w_out` rows, dense `down`
columns, SAE `W_dec` rows), which editing rewrites.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor

from monoroute.hooks import HookPoint, SparseActivations


@dataclass
class Site:
    kind: str  # "routed_units" | "dense_neurons" | "sae" | "transcoder"
    layer: int
    n_units: int
    point: HookPoint  # the hook point whose activation holds this site's units
    weight: Tensor  # the tensor holding the units' output directions
    weight_dim: int  # the dimension of `weight` that indexes units
    splice: list = field(default_factory=list)  # model hooks that must be active for this site to exist

    @property
    def label(self) -> str:
        return f"{self.kind}.L{self.layer}"


def model_sites(model) -> list[Site]:
    """One site per FFN layer of the model: routed units or dense neurons."""
    from monoroute.layers import RoutedFFN

    sites = []
    for layer, block in enumerate(model.blocks):
        mlp = block.mlp
        if isinstance(mlp, RoutedFFN):
            sites.append(Site("routed_units", layer, mlp.n_units, mlp.hook_post, mlp.w_out, 0))
        else:
            sites.append(Site("dense_neurons", layer, mlp.down.in_features, mlp.hook_post, mlp.down.weight, 1))
    return sites


def baseline_site(model, baseline) -> Site:
    """The latents of an SAE / transcoder (interp.baselines), spliced into `model` at its layer."""
    if baseline.name == "transcoder":
        seen: dict = {}

        def remember(act, hook):
            seen[hook.name] = act

        def replace(act, hook):
            return (baseline.reconstruct(baseline.input_of(seen)).to(act.dtype)).view_as(act)

        splice = [(baseline.input_hook, remember), (baseline.target_hook, replace)]
        return Site("transcoder", baseline.layer, baseline.n_latents, baseline.ffn.hook_post, baseline.ffn.w_out, 0,
                    splice)
    point = HookPoint()
    point.name = f"sae.L{baseline.layer}.hook_latents"

    def sae_replace(act, hook):
        d = act.shape[-1]
        indices, values = baseline.encode(act.reshape(-1, d))
        lat = point(SparseActivations(indices.view(*act.shape[:-1], -1), values.view(*act.shape[:-1], -1),
                                      baseline.n_latents))
        kk = lat.indices.shape[-1]
        return baseline.decode(lat.indices.reshape(-1, kk), lat.values.reshape(-1, kk)).to(act.dtype).view_as(act)

    return Site("sae", baseline.layer, baseline.n_latents, point, baseline.W_dec, 0,
                [(baseline.input_hook, sae_replace)])


@contextmanager
def attached(pairs: list[tuple[Site, Callable]]):
    """Attach fn(act) -> act | None to each site's hook point for the duration of the block."""
    done = []
    try:
        for site, fn in pairs:
            hook_fn = (lambda f: (lambda act, hook: f(act)))(fn)
            site.point.fns.append(hook_fn)
            done.append((site.point, hook_fn))
        yield
    finally:
        for point, fn in done:
            point.fns.remove(fn)


def ablate(act, units: Tensor):
    """The activation with `units` zeroed everywhere."""
    if isinstance(act, SparseActivations):
        return act.ablate(units.to(act.indices.device))
    return act.index_fill(-1, units.to(act.device), 0.0)


class Attribution:
    """Puts a leaf in the activation's place; after backward, `per_unit()` is act × grad summed per unit."""

    def __init__(self, n_units: int) -> None:
        self.n_units = n_units
        self.leaves: list = []

    def __call__(self, act):
        if isinstance(act, SparseActivations):
            leaf = act.values.detach().requires_grad_(True)
            self.leaves.append((act.indices, leaf))
            return SparseActivations(act.indices, leaf, act.n_units)
        leaf = act.detach().requires_grad_(True)
        self.leaves.append((None, leaf))
        return leaf

    def per_unit(self) -> Tensor:
        total = torch.zeros(self.n_units, dtype=torch.float64)
        for indices, leaf in self.leaves:
            if leaf.grad is None:
                continue
            contrib = (leaf.detach() * leaf.grad).double()
            if indices is None:
                total += contrib.reshape(-1, self.n_units).sum(0).cpu()
            else:
                total.index_add_(0, indices.reshape(-1).cpu(), contrib.reshape(-1).cpu())
        return total


def active_units(act) -> tuple[Tensor, Tensor]:
    """(rows, units) of every active entry (> 0) of the activation flattened to (positions, ...)."""
    if isinstance(act, SparseActivations):
        idx = act.indices.reshape(-1, act.indices.shape[-1])
        val = act.values.reshape(idx.shape)
        rows, slots = (val > 0).nonzero(as_tuple=True)
        return rows, idx[rows, slots]
    flat = act.reshape(-1, act.shape[-1])
    rows, units = (flat > 0).nonzero(as_tuple=True)
    return rows, units
