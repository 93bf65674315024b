"""Exact top-k of a product-structured pre-activation, re-ranked with a per-unit residual."""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from monoroute.errors import MonorouteError
from monoroute.layers.routing.base import Routing, dense_preacts, preacts, unit_preacts
from monoroute.layers.routing.product_key import pair_pattern, product_topk


class FactoredRouter(nn.Module):
    """Exact top-k of a product-structured pre-activation, re-ranked with a per-unit residual.

    A unit u = (i, j) = i·n + j (n = sqrt(N)) has input weights A[i] + B[j] + w_in[u]: two shared
    factor rows (n x d each, owned here) and its own residual row (the layer's w_in). Its
    pre-activation is therefore a_i + b_j + w_in[u]·x + b_u with a = A x, b = B x: the factor part is
    a sum of two half scores, so the product-key search (`product_topk`) finds its exact top C in
    O(n·d) per token, and the C candidates are re-ranked by their full pre-activation (the residual
    dot, O(C·d)). With a zero residual the selection is the exact top-k of every unit's own
    pre-activation; the residual lets a unit leave its factors' span, and re-ranking keeps its
    selection exact among the C proposals. Unlike product keys there is no second score to train into
    agreement: the search key *is* part of the pre-activation, so the LM loss trains it directly.
    The factor part reaches the layer as `Routing.pre_offset` (with gradient); the layer adds it to
    the residual dot it computes, and runs without a gate (a TopK MLP)."""

    def __init__(self, d_model: int, n_units: int, k: int, candidates: int | None = None, impl: str = "auto") -> None:
        super().__init__()
        n_sub = math.isqrt(n_units)
        if n_sub * n_sub != n_units:
            raise MonorouteError(f"router 'factored' needs n_units to be a perfect square, got {n_units}; use "
                                 f"{n_sub ** 2} or {(n_sub + 1) ** 2}")
        self.n_units, self.n_sub, self.impl = n_units, n_sub, impl
        self.candidates_wanted = candidates
        # Each factor contributes about as much as the residual at init (w_in is uniform(-1, 1)/sqrt(d)).
        self.factors = nn.Parameter(torch.empty(2, n_sub, d_model).uniform_(-1, 1) / math.sqrt(d_model))
        self.set_k(k)

    def set_k(self, k: int) -> None:
        candidates = self.candidates_wanted or 4 * k
        if isinstance(candidates, bool) or not isinstance(candidates, int) or not 1 <= candidates <= self.n_units:
            raise MonorouteError(f"router_candidates must be a whole number between 1 and n_units={self.n_units}, "
                                 f"got {candidates!r}")
        self.k, self.candidates = k, max(candidates, k)
        device = self.cand_i.device if hasattr(self, "cand_i") else None
        cand_i, cand_j = pair_pattern(self.candidates, self.n_sub)
        self.register_buffer("cand_i", cand_i.to(device), persistent=False)
        self.register_buffer("cand_j", cand_j.to(device), persistent=False)

    def halves(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(T, d) -> (a, b), (T, n) each: the factor rows' dot products with x (with gradient)."""
        return x @ self.factors[0].t(), x @ self.factors[1].t()

    def factor_part(self, a: Tensor, b: Tensor, units: Tensor) -> Tensor:
        """(T, n) halves, (T, m) units -> (T, m) a_i + b_j, with gradient."""
        return a.gather(-1, units // self.n_sub) + b.gather(-1, units % self.n_sub)

    def forward(self, x: Tensor, w_in: Tensor, b_in: Tensor | None) -> Routing:
        a, b = self.halves(x)
        cand, factor = product_topk(a.detach(), b.detach(), self.candidates, self.cand_i, self.cand_j)  # (T, C)
        with torch.no_grad():
            pre = factor + preacts(x, w_in, b_in, cand, self.impl)  # (T, C) full pre-activations
            top = pre.topk(self.k, dim=-1, sorted=False)
        units = cand.gather(-1, top.indices)
        offset = self.factor_part(a, b, units)  # (T, k) with gradient to the factors and x
        return Routing(units, top.values, (a, b), cand, pre, offset)

    def all_preacts(self, x: Tensor, w_in: Tensor, b_in: Tensor | None) -> Tensor:
        """(T, N) every unit's full pre-activation (the reference of the selection)."""
        a, b = self.halves(x)
        return (a.unsqueeze(-1) + b.unsqueeze(-2)).flatten(-2) + dense_preacts(x, w_in, b_in)

    def score_units(self, x: Tensor, units: Tensor, w_in: Tensor, b_in: Tensor | None, sparse_grad: bool = False,
                    routing: Routing | None = None) -> Tensor:
        """(T, d), (U,) -> (T, U) full pre-activations of the given units (the revival loss's score)."""
        a, b = routing.halves if routing is not None and routing.halves is not None else self.halves(x)
        units_t = units.expand(x.shape[0], -1)
        return self.factor_part(a, b, units_t) + unit_preacts(x, units, w_in, b_in, sparse_grad)
