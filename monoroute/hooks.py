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
    unit, `with_unit` to add a unit's activation for steering, `clamp` to hold a unit at a value).
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
        """A copy with one more column: `unit` at `value` on every token, ADDED to what it already has.

        Where `unit` was already among the selected slots its total activation becomes
        original + value (steering by adding); elsewhere it becomes value. To hold the unit at
        exactly `value` everywhere use `clamp`."""
        extra_idx = torch.full_like(self.indices[..., :1], unit)
        extra_val = torch.as_tensor(value, dtype=self.values.dtype, device=self.values.device)
        extra_val = extra_val.expand_as(self.values[..., :1])
        return SparseActivations(
            torch.cat([self.indices, extra_idx], -1), torch.cat([self.values, extra_val], -1), self.n_units
        )

    def clamp(self, unit: int, value: Tensor | float) -> "SparseActivations":
        """A copy in which `unit` has activation exactly `value` on every token (`to_dense()[..., unit]
        == value`), every other unit unchanged.

        `value` is a scalar or a tensor broadcastable to the leading shape (...,). Where the unit is
        among the selected slots, its first slot is set to `value` and any duplicate slots to 0;
        elsewhere the value goes into one added column (on tokens that already had the unit the added
        column holds the unit with 0), so the result always has k + 1 columns."""
        lead = self.values.shape[:-1]
        val = torch.as_tensor(value, dtype=self.values.dtype, device=self.values.device).expand(lead)
        hit = self.indices == unit  # (..., k)
        first = hit & (hit.cumsum(-1) == 1)
        values = torch.where(first, val.unsqueeze(-1), self.values.masked_fill(hit, 0))
        present = hit.any(-1, keepdim=True)  # (..., 1)
        extra_idx = torch.full_like(self.indices[..., :1], unit)
        extra_val = val.unsqueeze(-1).masked_fill(present, 0)
        return SparseActivations(
            torch.cat([self.indices, extra_idx], -1), torch.cat([values, extra_val], -1), self.n_units
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
