"""TransformerLens-style hook points: every activation passes through a named identity module.

A hook is `fn(activation, hook) -> replacement | None`. Returning a value replaces the activation
for the rest of the forward pass (ablation, patching, steering); returning None only observes.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor, nn

HookFn = Callable[[Any, "HookPoint"], Any]


class HookPoint(nn.Module):
    """Identity on its input, except for the hooks attached to it. `name` is its module path."""

    def __init__(self) -> None:
        super().__init__()
        self.name = ""
        self.fns: list[HookFn] = []

    @property
    def active(self) -> bool:
        return bool(self.fns)

    def forward(self, activation: Any) -> Any:
        for fn in self.fns:
            replacement = fn(activation, self)
            if replacement is not None:
                activation = replacement
        return activation


@dataclass
class SparseActivations:
    """The units a routed layer ran on each token and their activations, never a dense (..., N).

    indices: (..., k) int64 unit ids; values: (..., k) activations h_i (zero where a selected unit
    did not fire); n_units: N. A hook may return a modified copy (e.g. a value zeroed to ablate a
    unit, or an extra column to steer with a unit the router did not pick).
    """

    indices: Tensor
    values: Tensor
    n_units: int

    def to_dense(self) -> Tensor:
        """(..., N) dense activations. Only for small N or few tokens: it is O(tokens * N)."""
        dense = self.values.new_zeros(*self.values.shape[:-1], self.n_units)
        return dense.scatter_add(-1, self.indices, self.values)

    def detach(self) -> "SparseActivations":
        return SparseActivations(self.indices.detach(), self.values.detach(), self.n_units)

    def with_unit(self, unit: int, value: Tensor | float) -> "SparseActivations":
        """A copy with one more column: `unit` active at `value` on every token (for steering)."""
        extra_idx = torch.full_like(self.indices[..., :1], unit)
        extra_val = torch.as_tensor(value, dtype=self.values.dtype, device=self.values.device)
        extra_val = extra_val.expand_as(self.values[..., :1])
        return SparseActivations(
            torch.cat([self.indices, extra_idx], -1), torch.cat([self.values, extra_val], -1), self.n_units
        )

    def ablate(self, units: Tensor | list[int]) -> "SparseActivations":
        """A copy in which the given units contribute nothing."""
        units = torch.as_tensor(units, device=self.indices.device)
        keep = ~torch.isin(self.indices, units)
        return SparseActivations(self.indices, self.values * keep, self.n_units)


def name_hook_points(root: nn.Module) -> dict[str, HookPoint]:
    """Give every HookPoint below `root` its module path as name; return them by name."""
    points = {}
    for name, module in root.named_modules():
        if isinstance(module, HookPoint):
            module.name = name
            points[name] = module
    return points
