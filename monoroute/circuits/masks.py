"""One mask value per node, applied through the model's hook points.

    a' = mean + keep * (a - mean)                     every channel node (keep 1: as trained; 0: ablated)
    routed units: values * keep[indices] at hook_post, plus sum_i (1 - keep_i) mean_i w_out[i] at hook_mlp_out

(a routed unit is a node like a neuron: its mask multiplies its activation wherever the router
selected it, and a pruned unit adds its mean contribution on every token.)

While learning, keep = hard + s - s.detach() with hard = [tau > 0] and s = sigmoid(tau): the forward
pass sees the hard 0/1 mask, the backward pass the sigmoid's gradient (Gao et al.'s straight-through
surrogate). A fixed mask (`set_fixed`) replaces the learned one for evaluation.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from monoroute.circuits.nodes import NodeGroup, masked_sparse, unit_ablation_output


class CircuitMask(nn.Module):
    def __init__(self, model, groups: list[NodeGroup], init: float = 1.0) -> None:
        super().__init__()
        self.model, self.groups = model, groups
        self.tau = nn.ParameterList(nn.Parameter(torch.full((g.size,), float(init))) for g in groups)
        self.fixed: list[Tensor] | None = None
        self._keep: dict[str, Tensor] = {}

    # --- the mask values -----------------------------------------------------------------------
    def keep_values(self) -> list[Tensor]:
        """Per group (size,) keep in {0, 1} (forward); non-live nodes are always 0 (ablated)."""
        if self.fixed is not None:
            return [f * g.live for f, g in zip(self.fixed, self.groups)]
        out = []
        for t, g in zip(self.tau, self.groups):
            s = torch.sigmoid(t)
            out.append(((t > 0).float() + s - s.detach()) * g.live)
        return out

    def set_fixed(self, keep: list[Tensor] | None) -> None:
        self.fixed = None if keep is None else [k.float() for k in keep]

    def n_kept(self, keep: list[Tensor] | None = None) -> Tensor:
        """Kept live nodes (with the surrogate gradient while learning)."""
        keep = self.keep_values() if keep is None else keep
        return sum(k.sum() for k in keep)

    def scores(self) -> list[Tensor]:
        """Per group (size,) ranking scores: tau, with non-live nodes at -inf."""
        return [torch.where(g.live, t.detach(), torch.full_like(t, float("-inf"))) for t, g in zip(self.tau, self.groups)]

    # --- hooks ---------------------------------------------------------------------------------
    def hooks(self) -> list[tuple[str, object]]:
        """(name, fn) pairs for `model.hooks`; the keep values are computed once per forward pass."""
        hooks = [("hook_embed", self._refresh)]
        for gi, g in enumerate(self.groups):
            if g.routed:
                hooks.append((g.hook, self._routed_units(gi)))
            elif g.hook.endswith("hook_mlp_out") and gi > 0 and self.groups[gi - 1].routed:
                hooks.append((g.hook, self._channels(gi, routed_units=gi - 1)))
            else:
                hooks.append((g.hook, self._channels(gi)))
        return hooks

    def _refresh(self, act, hook):
        self._keep = dict(enumerate(self.keep_values()))
        return None

    def _channels(self, gi: int, routed_units: int | None = None):
        g = self.groups[gi]

        def fn(act: Tensor, hook):
            if routed_units is not None:
                u = self.groups[routed_units]
                act = act + unit_ablation_output(self.model.blocks[u.layer].mlp, u.mean, self._keep[routed_units])
            keep = self._keep[gi]
            return g.mean + keep * (act - g.mean)

        return fn

    def _routed_units(self, gi: int):
        def fn(act, hook):
            return masked_sparse(act, self._keep[gi])

        return fn
