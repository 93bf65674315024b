"""Routers: pick k of N units for each token.

Both routers return `Routing(indices (T, k), scores (T, k))` and can score any given set of units
on every token (`score_units`), which the dead-unit revival loss uses.

- `DenseRouter` is the exact reference: the score of unit i is its own pre-activation
  w_in[i]·x + b_i, and the top-k by value are chosen. It costs O(N·d) per token, as much as a
  dense layer of width N, so it is for correctness, small N, and the "TopK MLP" baseline.
- `ProductKeyRouter` (product-key memory, Lample et al. 2019; PEER, He 2024) scores units with a
  separate query: q = W_q x is split into halves (q1, q2), each scored against sqrt(N) sub-keys,
  and unit (a, b) = a*sqrt(N) + b has score q1·K1[a] + q2·K2[b]. The exact top-k of these N sums
  lies inside topk(q1·K1) x topk(q2·K2), so k_sub^2 candidates suffice: O(sqrt(N)·d) per token.
  Fewer still: with both sub-top-k lists sorted, the pair of ranks (i, j) is beaten by the
  (i+1)(j+1) - 1 pairs of lower ranks, so only pairs with (i+1)(j+1) <= k can make the top k:
  about k·ln(k) candidates (119 instead of 1024 at k=32), a fixed pattern computed once.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from monoroute.errors import MonorouteError

ROUTERS = ("dense", "product_key")


class Routing(NamedTuple):
    indices: Tensor  # (T, k) int64 unit ids
    scores: Tensor  # (T, k) routing scores of those units (differentiable for product_key)
    # product_key: this step's (T, n_sub) half scores (s1, s2), with gradient, so `score_units`
    # can score other units on the same tokens without running the query and sub-keys again.
    halves: tuple[Tensor, Tensor] | None = None


class DenseRouter(nn.Module):
    """Exact top-k over all N pre-activations. Holds no parameters: it reads the layer's w_in."""

    def __init__(self, n_units: int, k: int) -> None:
        super().__init__()
        self.n_units, self.k = n_units, k

    def all_scores(self, x: Tensor, w_in: Tensor, b_in: Tensor | None) -> Tensor:
        scores = x @ w_in.t()  # (T, N): the O(N·d) cost this router exists to show
        return scores if b_in is None else scores + b_in

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
        scores = x @ F.embedding(units, w_in, sparse=sparse_grad).t()  # row-sparse gradient if asked
        return scores if b_in is None else scores + b_in[units]


class ProductKeyRouter(nn.Module):
    """Sub-linear top-k routing with product keys. n_units must be a perfect square."""

    def __init__(self, d_model: int, n_units: int, k: int, d_key: int | None = None) -> None:
        super().__init__()
        n_sub = math.isqrt(n_units)
        if n_sub * n_sub != n_units:
            below, above = n_sub**2, (n_sub + 1) ** 2
            raise MonorouteError(
                f"router 'product_key' needs n_units to be a perfect square, got {n_units}; "
                f"use {below} or {above}, or router='dense'"
            )
        d_key = d_key or d_model
        if d_key % 2:
            raise MonorouteError(f"d_key must be even to split the query in halves, got {d_key}")
        self.n_units, self.k, self.n_sub, self.d_half = n_units, k, n_sub, d_key // 2
        # k_sub^2 >= k candidates always: k <= n_sub gives k^2 >= k, else n_sub^2 = N >= k.
        self.k_sub = min(k, n_sub)
        ranks = torch.arange(self.k_sub)
        cand_i, cand_j = torch.cartesian_prod(ranks, ranks).unbind(-1)
        # The only rank pairs that can reach the top k. The pattern holds >= k pairs: the top k of
        # any score grid (with distinct values) lies inside it, and the grid has k_sub^2 >= k pairs.
        keep = (cand_i + 1) * (cand_j + 1) <= k
        self.register_buffer("cand_i", cand_i[keep], persistent=False)  # (C,) rank in the first list
        self.register_buffer("cand_j", cand_j[keep], persistent=False)  # (C,) rank in the second list
        self.query = nn.Linear(d_model, d_key, bias=False)
        self.keys = nn.Parameter(torch.randn(2, n_sub, self.d_half) / math.sqrt(self.d_half))
        self.log_scale = nn.Parameter(torch.full((1,), math.log(4.0)))  # gate sharpness; (1,) as FSDP2 shards no scalars

    def half_scores(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Scaled cosine similarity of each query half to its sub-keys: (T, n_sub) each.

        Cosine, not dot product: with raw dot products a few keys grow in norm and win for every
        token (router collapse: 98 % dead units in our cpu-small run). Normalised, a key wins only
        by pointing where queries point. The shared scale sets the gate's sharpness, not the choice.
        """
        q = self.query(x)  # (T, d_key)
        q1, q2 = F.normalize(q[..., : self.d_half], dim=-1), F.normalize(q[..., self.d_half :], dim=-1)
        k1, k2 = F.normalize(self.keys, dim=-1).unbind(0)  # (n_sub, d_half) each
        scale = self.log_scale.exp()
        return scale * (q1 @ k1.t()), scale * (q2 @ k2.t())

    def forward(self, x: Tensor, w_in: Tensor | None = None, b_in: Tensor | None = None) -> Routing:
        s1, s2 = self.half_scores(x)  # (T, n_sub) each
        with torch.no_grad():  # selection only; the chosen scores are re-read below with gradient
            top1 = s1.topk(self.k_sub, dim=-1)  # (T, k_sub), sorted: the candidate pattern is by rank
            top2 = s2.topk(self.k_sub, dim=-1)
            cand = top1.values.index_select(1, self.cand_i) + top2.values.index_select(1, self.cand_j)  # (T, C)
            best = cand.topk(self.k, dim=-1, sorted=False).indices  # (T, k) into the C candidates
            a = top1.indices.gather(-1, self.cand_i[best])  # (T, k) first sub-key of each unit
            b = top2.indices.gather(-1, self.cand_j[best])
        # Gathering k of the half scores keeps the backward at O(T·k), with no (T, k_sub^2) tensor.
        scores = s1.gather(-1, a) + s2.gather(-1, b)  # (T, k)
        return Routing(a * self.n_sub + b, scores, (s1, s2))

    def all_scores(self, x: Tensor) -> Tensor:
        """(T, N) scores of every unit: the dense reference the candidate search must match."""
        s1, s2 = self.half_scores(x)
        return (s1.unsqueeze(-1) + s2.unsqueeze(-2)).flatten(-2)

    def score_units(self, x: Tensor, units: Tensor, w_in: Tensor | None = None, b_in: Tensor | None = None,
                    sparse_grad: bool = False, routing: Routing | None = None) -> Tensor:
        """(T, d), (U,) -> (T, U) scores of the given units on every token. Given the forward's
        `routing` of the same x, its half scores are indexed (gradient included) instead of
        running the query projection and sub-key scoring a second time."""
        s1, s2 = routing.halves if routing is not None and routing.halves is not None else self.half_scores(x)
        return s1[:, units // self.n_sub] + s2[:, units % self.n_sub]  # (T, U)


def build_router(name: str, d_model: int, n_units: int, k: int, d_key: int | None = None) -> nn.Module:
    if name == "dense":
        return DenseRouter(n_units, k)
    if name == "product_key":
        return ProductKeyRouter(d_model, n_units, k, d_key)
    raise MonorouteError(f"unknown router {name!r}; choose one of {', '.join(ROUTERS)}")
