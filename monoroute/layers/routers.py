"""Routers: pick k of N units for each token.

Both routers return `Routing(indices (T, k), scores (T, k), halves)` and can score any given set of
units on every token (`score_units`), which the dead-unit revival loss uses (the product-key router
from the forward's `halves`, without recomputing them).

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
  Options: `heads` query heads over shared sub-keys (PEER) and `select="preact"` (keep firing
  units among the top 2k); see the class docstring.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from monoroute.errors import MonorouteError

ROUTERS = ("dense", "product_key", "multi_pool")


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

    def set_k(self, k: int) -> None:
        self.k = k

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
    """Sub-linear top-k routing with product keys. n_units must be a perfect square.

    heads=h (PEER): h query projections share one set of sub-keys. A unit's score is its best
    head's, max_h (q1_h·K1[a] + q2_h·K2[b]). Each head retrieves its own exact top-k; the k best of
    their union (a unit found by several heads counted once, at its best score) are the exact
    top-k of that max score, because a unit in the overall top k is in the top k of the head that
    gives its max. Shared keys, as PEER: a unit keeps one identity (one key pair) and one score
    the gate and the revival loss can use; the heads are h points in one key space, so a token
    can reach units in h directions at an extra cost of only h-1 query projections and sub-key
    scorings. Query normalisation is the cosine below (each half L2-normalised per token), which
    needs no running statistics (BatchNorm's would differ per rank and between train and eval).

    select="preact" makes the selection agree with firing: search the top 2k units by score,
    compute their pre-activations (a sparse dot, no gradient) and keep the k best-scoring of those
    whose pre-activation is > 0 (silent ones only fill slots when fewer than k fire), so a chosen
    slot is a live one. It needs the layer's w_in/b_in in forward and doubles the sampled dot.
    """

    SELECTS = ("score", "preact")

    def __init__(self, d_model: int, n_units: int, k: int, d_key: int | None = None, heads: int = 1,
                 select: str = "score", impl: str = "auto", balance: bool = False) -> None:
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
        if isinstance(heads, bool) or not isinstance(heads, int) or heads < 1:
            raise MonorouteError(f"router_heads must be a whole number >= 1, got {heads!r}; 1 is a single query")
        if select not in self.SELECTS:
            raise MonorouteError(f"unknown select {select!r}; choose one of {', '.join(self.SELECTS)}")
        self.n_units, self.n_sub, self.d_half, self.heads = n_units, n_sub, d_key // 2, heads
        self.select, self.impl, self.balance = select, impl, balance
        self.set_k(k)
        self.query = nn.Linear(d_model, heads * d_key, bias=False)
        self.keys = nn.Parameter(torch.randn(2, n_sub, self.d_half) / math.sqrt(self.d_half))
        self.log_scale = nn.Parameter(torch.full((1,), math.log(4.0)))  # gate sharpness; (1,) as FSDP2 shards no scalars

    def set_k(self, k: int) -> None:
        """Set k and the candidate pattern of the search (also used by the k schedule to shrink k)."""
        self.k = k
        self.k_search = min(2 * k, self.n_units) if self.select == "preact" else k  # units each head retrieves
        # k_sub^2 >= k_search candidates always: k_search <= n_sub gives k_search^2 >= k_search, else n_sub^2 = N.
        self.k_sub = min(self.k_search, self.n_sub)
        ranks = torch.arange(self.k_sub)
        cand_i, cand_j = torch.cartesian_prod(ranks, ranks).unbind(-1)
        # The only rank pairs that can reach the top k_search. The pattern holds >= k_search pairs: the
        # top of any score grid (with distinct values) lies inside it, and the grid has enough pairs.
        keep = (cand_i + 1) * (cand_j + 1) <= self.k_search
        device = self.cand_i.device if hasattr(self, "cand_i") else None
        self.register_buffer("cand_i", cand_i[keep].to(device), persistent=False)  # (C,) rank in the first list
        self.register_buffer("cand_j", cand_j[keep].to(device), persistent=False)  # (C,) rank in the second list

    def half_scores(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Scaled cosine similarity of each head's query halves to the sub-keys: (T, H, n_sub) each.

        Cosine, not dot product: with raw dot products a few keys grow in norm and win for every
        token (router collapse: 98 % dead units in our cpu-small run). Normalised, a key wins only
        by pointing where queries point. The shared scale sets the gate's sharpness, not the choice.
        """
        q = self.query(x).view(x.shape[0], self.heads, 2 * self.d_half)  # (T, H, d_key)
        q1, q2 = F.normalize(q[..., : self.d_half], dim=-1), F.normalize(q[..., self.d_half :], dim=-1)
        k1, k2 = F.normalize(self.keys, dim=-1).unbind(0)  # (n_sub, d_half) each
        scale = self.log_scale.exp()
        s1, s2 = q1 @ k1.t(), q2 @ k2.t()
        if self.balance:  # both halves on one scale: neither's spread alone decides the k units (see balance_scores)
            s1, s2 = balance_scores(s1), balance_scores(s2)
        return scale * s1, scale * s2

    def unit_scores(self, s1: Tensor, s2: Tensor, units: Tensor) -> Tensor:
        """(T, H, n_sub) halves, (T, m) unit ids -> (T, m) scores max_h s1[h, a] + s2[h, b], with
        gradient (to the best head). Gathering keeps the backward at O(T·H·m): no (T, N) tensor."""
        a, b = (i.unsqueeze(1).expand(-1, self.heads, -1) for i in (units // self.n_sub, units % self.n_sub))
        return (s1.gather(-1, a) + s2.gather(-1, b)).amax(1)

    @torch.no_grad()
    def search_heads(self, s1: Tensor, s2: Tensor) -> tuple[Tensor, Tensor]:
        """Each head's exact top-k_search units: ids and scores, (T, H, k_search) each."""
        top1 = s1.topk(self.k_sub, dim=-1)  # (T, H, k_sub), sorted: the candidate pattern is by rank
        top2 = s2.topk(self.k_sub, dim=-1)
        cand = top1.values.index_select(-1, self.cand_i) + top2.values.index_select(-1, self.cand_j)  # (T, H, C)
        best = cand.topk(self.k_search, dim=-1, sorted=False)  # into the C candidates
        a = top1.indices.gather(-1, self.cand_i[best.indices])  # first sub-key of each unit
        b = top2.indices.gather(-1, self.cand_j[best.indices])
        return a * self.n_sub + b, best.values

    @torch.no_grad()
    def search(self, s1: Tensor, s2: Tensor) -> tuple[Tensor, Tensor]:
        """The exact top-k_search units by max-over-heads score, no unit twice: (T, k_search) ids, scores."""
        units, values = (t.flatten(1) for t in self.search_heads(s1, s2))  # (T, H·k_search)
        if self.heads == 1:
            return units, values
        # A unit found by several heads: keep its best score once. Sorted by score, then stably by
        # unit, each unit's first slot holds its best score; the repeats drop out of the top-k.
        order = values.argsort(-1, descending=True)
        units, values = units.gather(-1, order), values.gather(-1, order)
        units, by_unit = units.sort(dim=-1, stable=True)
        values = values.gather(-1, by_unit)
        repeat = torch.zeros_like(units, dtype=torch.bool)
        repeat[:, 1:] = units[:, 1:] == units[:, :-1]
        best = values.masked_fill(repeat, float("-inf")).topk(self.k_search, dim=-1, sorted=False)
        return units.gather(-1, best.indices), best.values

    @torch.no_grad()
    def keep_firing(self, x: Tensor, units: Tensor, scores: Tensor, w_in: Tensor, b_in: Tensor | None) -> Tensor:
        """(T, k_search) candidates -> (T, k): the best-scoring ones whose pre-activation is > 0 first."""
        from monoroute.layers.compute import sampled_dot  # compute.py imports nothing from here

        pre = sampled_dot(x, w_in, units, self.impl)
        if b_in is not None:
            pre = pre + b_in[units]
        # |cosine score| <= 2·scale, so this penalty ranks every firing unit above every silent one
        # and keeps the score order within each group.
        penalty = (4 * self.log_scale.exp() + 1) * (pre <= 0)
        return units.gather(-1, (scores - penalty).topk(self.k, dim=-1, sorted=False).indices)

    def forward(self, x: Tensor, w_in: Tensor | None = None, b_in: Tensor | None = None) -> Routing:
        s1, s2 = self.half_scores(x)  # (T, H, n_sub) each
        units, scores = self.search(s1, s2)  # selection only, no gradient
        if self.select == "preact":
            units = self.keep_firing(x, units, scores, w_in, b_in)
        # The chosen units' scores are re-read from the half scores, with gradient.
        return Routing(units, self.unit_scores(s1, s2, units), (s1, s2))

    def head_scores(self, x: Tensor) -> Tensor:
        """(T, H, N) every head's score of every unit: the dense reference the search must match."""
        s1, s2 = self.half_scores(x)
        return (s1.unsqueeze(-1) + s2.unsqueeze(-2)).flatten(-2)

    def all_scores(self, x: Tensor) -> Tensor:
        """(T, N) scores of every unit (best head): the dense reference of the selection."""
        return self.head_scores(x).amax(1)

    def score_units(self, x: Tensor, units: Tensor, w_in: Tensor | None = None, b_in: Tensor | None = None,
                    sparse_grad: bool = False, routing: Routing | None = None) -> Tensor:
        """(T, d), (U,) -> (T, U) scores of the given units on every token. Given the forward's
        `routing` of the same x, its half scores are indexed (gradient included) instead of
        running the query projection and sub-key scoring a second time."""
        s1, s2 = routing.halves if routing is not None and routing.halves is not None else self.half_scores(x)
        return self.unit_scores(s1, s2, units.expand(x.shape[0], -1))  # (T, U)


def balance_scores(s: Tensor, eps: float = 1e-6) -> Tensor:
    """(..., n_sub) one half's sub-key scores standardised per token (mean 0, std 1 over the sub-keys).

    A unit's score is s1[a] + s2[b]. When one half's scores are far more spread than the other's, the
    top k is one or two rows a combined with many columns b: trained layers pick their 32 units from
    2-6 rows (or columns) of 128 where random units would span 28 (`monoroute bench agreement`).
    Standardising each half gives both the same spread, so the k units come from several rows and
    several columns. Still an exact top-k of a sum of per-half scores, so the product-key search holds."""
    mean = s.mean(-1, keepdim=True)
    return (s - mean) / (s.std(-1, keepdim=True) + eps)


class MultiPoolRouter(nn.Module):
    """Several independent product-key routers, each over its own pool of N / P units, each picking
    k / P of them ("sparsely gated tiny linear experts", Schug 2026: several channels, each choosing
    a few single-unit experts from its own pool, the score scaling the unit, which here is the
    layer's sigmoid gate). Pool p owns units [p·N/P, (p+1)·N/P). A token always gets k / P units
    from every pool, so the pools cannot collapse onto one region of the table, and each pool's
    search is a product-key search over sqrt(N / P) sub-keys per half."""

    def __init__(self, d_model: int, n_units: int, k: int, pools: int, d_key: int | None = None, heads: int = 1,
                 select: str = "score", impl: str = "auto", balance: bool = False) -> None:
        super().__init__()
        if isinstance(pools, bool) or not isinstance(pools, int) or pools < 1:
            raise MonorouteError(f"router_pools must be a whole number >= 1, got {pools!r}")
        if n_units % pools or k % pools:
            raise MonorouteError(f"router 'multi_pool' splits n_units={n_units} and k={k} evenly over "
                                 f"router_pools={pools}; pick pools dividing both (e.g. 4 with n_units 16384, k 32)")
        self.n_units, self.k, self.pools, self.pool_size = n_units, k, pools, n_units // pools
        self.routers = nn.ModuleList(ProductKeyRouter(d_model, self.pool_size, k // pools, d_key, heads, select, impl,
                                                      balance) for _ in range(pools))

    def set_k(self, k: int) -> None:
        if k % self.pools:
            raise MonorouteError(f"k={k} must be a multiple of router_pools={self.pools}")
        self.k = k
        for router in self.routers:
            router.set_k(k // self.pools)

    def _slice(self, p: int, w: Tensor | None) -> Tensor | None:
        return None if w is None else w[p * self.pool_size:(p + 1) * self.pool_size]

    def forward(self, x: Tensor, w_in: Tensor | None = None, b_in: Tensor | None = None) -> Routing:
        picks = [router(x, self._slice(p, w_in), self._slice(p, b_in)) for p, router in enumerate(self.routers)]
        units = torch.cat([r.indices + p * self.pool_size for p, r in enumerate(picks)], dim=-1)  # (T, k)
        return Routing(units, torch.cat([r.scores for r in picks], dim=-1))

    def all_scores(self, x: Tensor) -> Tensor:
        """(T, N) every unit's score in its own pool (the dense reference of each pool's selection)."""
        return torch.cat([router.all_scores(x) for router in self.routers], dim=-1)

    def score_units(self, x: Tensor, units: Tensor, w_in: Tensor | None = None, b_in: Tensor | None = None,
                    sparse_grad: bool = False, routing: Routing | None = None) -> Tensor:
        """(T, d), (U,) -> (T, U) scores of the given units on every token, each by its own pool."""
        out = x.new_zeros(x.shape[0], units.numel())
        pool = units // self.pool_size
        for p, router in enumerate(self.routers):
            mine = (pool == p).nonzero().squeeze(1)
            if mine.numel():
                out[:, mine] = router.score_units(x, units[mine] - p * self.pool_size)
        return out


def build_router(name: str, d_model: int, n_units: int, k: int, d_key: int | None = None, heads: int = 1,
                 select: str = "score", impl: str = "auto", balance: bool = False, pools: int = 1) -> nn.Module:
    if name != "multi_pool" and pools != 1:
        raise MonorouteError(f"router_pools={pools} needs router='multi_pool'")
    if name == "multi_pool":
        return MultiPoolRouter(d_model, n_units, k, pools, d_key, heads, select, impl, balance)
    if name == "dense":
        if heads != 1 or select != "score" or balance:
            raise MonorouteError("router_heads, router_balance and coupling='preact' need router='product_key'; the dense router "
                                 "already scores every unit by its own pre-activation")
        return DenseRouter(n_units, k)
    if name == "product_key":
        return ProductKeyRouter(d_model, n_units, k, d_key, heads, select, impl, balance)
    raise MonorouteError(f"unknown router {name!r}; choose one of {', '.join(ROUTERS)}")
