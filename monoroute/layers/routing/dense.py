"""The exact reference router: top-k of every unit's own pre-activation (O(N·d) per token)."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from monoroute.layers.routing.base import Routing, dense_preacts, unit_preacts


class DenseRouter(nn.Module):
    """Exact top-k over all N pre-activations. Holds no parameters: it reads the layer's w_in."""

    def __init__(self, n_units: int, k: int) -> None:
        super().__init__()
        self.n_units, self.k = n_units, k

    def set_k(self, k: int) -> None:
        self.k = k

    def all_scores(self, x: Tensor, w_in: Tensor, b_in: Tensor | None) -> Tensor:
        return dense_preacts(x, w_in, b_in)  # (T, N): the O(N·d) cost this router exists to show

    def forward(self, x: Tensor, w_in: Tensor, b_in: Tensor | None) -> Routing:
        # Selection is not differentiable; the layer recomputes the chosen pre-activations
        # sparsely, so no (T, N) tensor is kept for backward.
        with torch.no_grad():
            top = self.all_scores(x, w_in, b_in).topk(self.k, dim=-1, sorted=False)
        return Routing(top.indices, top.values)

    def score_units(self, x: Tensor, units: Tensor, w_in: Tensor, b_in: Tensor | None, sparse_grad: bool = False,
                    routing: Routing | None = None) -> Tensor:
        """(T, d), (U,) -> (T, U) scores of the given units on every token (`routing` is not needed:
        the O(T·U·d) product is all there is to compute)."""
        return unit_preacts(x, units, w_in, b_in, sparse_grad)
