"""The nodes a circuit is made of, and their ablation values.

A node is one channel of one hook point, with one mask value shared over positions and prompts
(Gao et al. 2025):

    kind "units"      blocks.{i}.mlp.hook_post       dense neurons (d_ff) or routed units (N)
    kind "residual"   blocks.{i}.ln_1.hook_normalized, blocks.{i}.ln_2.hook_normalized   channels a block reads
                      blocks.{i}.hook_attn_out, blocks.{i}.hook_mlp_out               channels it writes
                      ln_f.hook_normalized                                            what the unembedding reads
    kind "attention"  blocks.{i}.attn.hook_q / hook_k / hook_v                         q, k, v channels

A pruned node takes its mean over the pretraining distribution (the run's training split), or 0
with zero-ablation. A node that cannot change under ablation (a constant channel under
mean-ablation, a routed unit that never fired) is not *live*: it is never counted in a circuit.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from monoroute.hooks import SparseActivations

KINDS = ("units", "residual", "attention")


@dataclass
class NodeGroup:
    hook: str          # hook point name
    kind: str          # one of KINDS
    layer: int         # block index; n_layer for ln_f
    size: int          # channels (units) at this hook
    routed: bool = False
    mean: Tensor | None = None   # (size,) ablation value (zeros under zero-ablation)
    live: Tensor | None = None   # (size,) bool
    extra: dict = field(default_factory=dict)

    @property
    def short(self) -> str:
        return self.hook.replace("blocks.", "L").replace(".hook_normalized", "").replace("hook_", "")


def node_groups(model) -> list[NodeGroup]:
    """Every maskable hook of `model`, in forward order."""
    from monoroute.layers.routed_ffn import RoutedFFN

    d = model.cfg.d_model
    groups = []
    for i, block in enumerate(model.blocks):
        p = f"blocks.{i}"
        routed = isinstance(block.mlp, RoutedFFN)
        n_units = block.mlp.n_units if routed else block.mlp.up.out_features
        groups += [NodeGroup(f"{p}.ln_1.hook_normalized", "residual", i, d),
                   NodeGroup(f"{p}.attn.hook_q", "attention", i, d),
                   NodeGroup(f"{p}.attn.hook_k", "attention", i, d),
                   NodeGroup(f"{p}.attn.hook_v", "attention", i, d),
                   NodeGroup(f"{p}.hook_attn_out", "residual", i, d),
                   NodeGroup(f"{p}.ln_2.hook_normalized", "residual", i, d),
                   NodeGroup(f"{p}.mlp.hook_post", "units", i, n_units, routed=routed),
                   NodeGroup(f"{p}.hook_mlp_out", "residual", i, d)]
    groups.append(NodeGroup("ln_f.hook_normalized", "residual", len(model.blocks), d))
    return groups


@torch.no_grad()
def compute_means(model, groups: list[NodeGroup], windows: Tensor, ablation: str = "mean",
                  batch_size: int = 32, eps: float = 1e-6) -> None:
    """Fill each group's `mean` and `live` from the (B, T) token windows (the training split).

    Under mean-ablation a channel is live when it varies over the windows; under zero-ablation when
    it is ever non-zero. A routed unit's mean counts the tokens it was not selected on as 0 (its
    contribution there), and it is live when it ever fired."""
    stats = {g.hook: {"sum": torch.zeros(g.size, dtype=torch.float64), "min": torch.full((g.size,), float("inf")),
                      "max": torch.full((g.size,), float("-inf"))} for g in groups}
    by_hook = {g.hook: g for g in groups}
    count = 0

    def observe(act, hook):
        s, g = stats[hook.name], by_hook[hook.name]
        if g.routed:
            idx, val = act.indices.reshape(-1), act.values.reshape(-1).double()
            s["sum"].index_add_(0, idx, val)
            fired = torch.zeros(g.size, dtype=torch.bool).index_fill_(0, idx[val != 0], True)
            s["max"] = torch.where(fired, torch.ones(()), s["max"])  # only "ever fired" is used for routed units
        else:
            flat = act.reshape(-1, g.size)
            s["sum"] += flat.double().sum(0)
            s["min"] = torch.minimum(s["min"], flat.min(0).values.float())
            s["max"] = torch.maximum(s["max"], flat.max(0).values.float())
        return None

    was_training = model.training
    model.eval()
    with model.hooks([(g.hook, observe) for g in groups]):
        for start in range(0, windows.shape[0], batch_size):
            chunk = windows[start:start + batch_size]
            model(chunk)
            count += chunk.numel()
    model.train(was_training)
    for g in groups:
        s = stats[g.hook]
        mean = (s["sum"] / max(count, 1)).float()
        if g.routed:
            g.live = s["max"] > 0
        elif ablation == "zero":
            g.live = torch.maximum(s["max"].abs(), s["min"].abs()) > eps
        else:
            g.live = (s["max"] - s["min"]) > eps
        g.mean = torch.zeros_like(mean) if ablation == "zero" else mean


def unit_ablation_output(mlp, mean: Tensor, keep: Tensor) -> Tensor:
    """(d,) what a routed layer's pruned units add under ablation: sum_i (1 - keep_i) mean_i w_out[i]."""
    return ((1 - keep) * mean) @ mlp.w_out


def masked_sparse(act: SparseActivations, keep: Tensor) -> SparseActivations:
    """A routed layer's selected activations with each unit's value times its mask."""
    return SparseActivations(act.indices, act.values * keep[act.indices], act.n_units)
