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

ROUTERS = ("dense", "product_key", "multi_pool", "cluster", "factored")


class Routing(NamedTuple):
    indices: Tensor  # (T, k) int64 unit ids
    scores: Tensor  # (T, k) routing scores of those units (differentiable for product_key)
    # product_key: this step's (T, n_sub) half scores (s1, s2), with gradient, so `score_units`
    # can score other units on the same tokens without running the query and sub-keys again.
    halves: tuple[Tensor, Tensor] | None = None
    # Re-ranking routers: the (T, C) proposed candidates and their exact pre-activations (no
    # gradient), from which the k were chosen; the proposer's ranking loss reads them.
    candidates: Tensor | None = None
    candidate_pre: Tensor | None = None
    # Router "factored": (T, k) the part of the chosen units' pre-activation the router computed
    # (with gradient), which the layer adds to its own w_in·x + b.
    pre_offset: Tensor | None = None


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


def dense_preacts(x: Tensor, w_in: Tensor, b_in: Tensor | None) -> Tensor:
    """(T, d) -> (T, N) every unit's pre-activation w_in·x + b (O(N·d) per token)."""
    scores = x @ w_in.t()
    return scores if b_in is None else scores + b_in


def unit_preacts(x: Tensor, units: Tensor, w_in: Tensor, b_in: Tensor | None, sparse_grad: bool = False) -> Tensor:
    """(T, d), (U,) -> (T, U) the given units' pre-activations on every token, with gradient
    (row-sparse for w_in if asked)."""
    scores = x @ F.embedding(units, w_in, sparse=sparse_grad).t()
    return scores if b_in is None else scores + b_in[units]


def all_preacts(x: Tensor, w_in: Tensor, b_in: Tensor | None, router: nn.Module | None = None) -> Tensor:
    """(T, d) -> (T, N) every unit's pre-activation: the exact selection's scores (O(N·d) per token).
    A router that computes part of the pre-activation itself (FactoredRouter) adds its part."""
    if router is not None and hasattr(router, "all_preacts"):
        return router.all_preacts(x, w_in, b_in)
    return dense_preacts(x, w_in, b_in)


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

    select="rerank" (candidate re-ranking): the keys only *propose* the top `candidates` = C >> k
    units by score; their exact pre-activations are computed (a sparse dot, no gradient) and the k
    with the largest pre-activation run: a TopK MLP restricted to the C candidates, so the unit's
    own pre-activation decides, as in the exact reference. The keys then learn to propose what the
    pre-activation would pick through RoutedFFN's ranking loss (`rank_loss`), not through a gate.
    """

    SELECTS = ("score", "preact", "rerank")

    def __init__(self, d_model: int, n_units: int, k: int, d_key: int | None = None, heads: int = 1,
                 select: str = "score", impl: str = "auto", balance: bool = False,
                 candidates: int | None = None) -> None:
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
        if select == "rerank":
            candidates = candidates or 8 * k
            if isinstance(candidates, bool) or not isinstance(candidates, int) or not k <= candidates <= n_units:
                raise MonorouteError(f"router_candidates must be a whole number between k={k} and n_units={n_units}, "
                                     f"got {candidates!r}; e.g. {min(8 * k, n_units)}")
        elif candidates is not None:
            raise MonorouteError("router_candidates needs coupling='rerank' (candidate re-ranking)")
        self.n_units, self.n_sub, self.d_half, self.heads = n_units, n_sub, d_key // 2, heads
        self.select, self.impl, self.balance, self.candidates = select, impl, balance, candidates
        self.set_k(k)
        self.query = nn.Linear(d_model, heads * d_key, bias=False)
        self.keys = nn.Parameter(torch.randn(2, n_sub, self.d_half) / math.sqrt(self.d_half))
        self.log_scale = nn.Parameter(torch.full((1,), math.log(4.0)))  # gate sharpness; (1,) as FSDP2 shards no scalars

    def set_k(self, k: int) -> None:
        """Set k and the candidate pattern of the search (also used by the k schedule to shrink k)."""
        self.k = k
        if self.select == "rerank":
            self.candidates = max(self.candidates, k)  # a k schedule may start above C
        self.k_search = {"preact": min(2 * k, self.n_units), "rerank": self.candidates}.get(self.select, k)  # per head
        # k_sub^2 >= k_search candidates always: k_search <= n_sub gives k_search^2 >= k_search, else n_sub^2 = N.
        self.k_sub = min(self.k_search, self.n_sub)
        device = self.cand_i.device if hasattr(self, "cand_i") else None
        cand_i, cand_j = pair_pattern(self.k_search, self.n_sub)
        self.register_buffer("cand_i", cand_i.to(device), persistent=False)  # (C,) rank in the first list
        self.register_buffer("cand_j", cand_j.to(device), persistent=False)  # (C,) rank in the second list

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
        return product_topk(s1, s2, self.k_search, self.cand_i, self.cand_j)

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
        pre = preacts(x, w_in, b_in, units, self.impl)
        # |cosine score| <= 2·scale, so this penalty ranks every firing unit above every silent one
        # and keeps the score order within each group.
        penalty = (4 * self.log_scale.exp() + 1) * (pre <= 0)
        return units.gather(-1, (scores - penalty).topk(self.k, dim=-1, sorted=False).indices)

    def forward(self, x: Tensor, w_in: Tensor | None = None, b_in: Tensor | None = None) -> Routing:
        s1, s2 = self.half_scores(x)  # (T, H, n_sub) each
        units, scores = self.search(s1, s2)  # selection only, no gradient
        if self.select == "rerank":
            cand = units  # (T, C) proposals
            with torch.no_grad():
                pre = preacts(x, w_in, b_in, cand, self.impl)  # (T, C) exact pre-activations
                top = pre.topk(self.k, dim=-1, sorted=False)
            units = cand.gather(-1, top.indices)
            return Routing(units, self.unit_scores(s1, s2, units), (s1, s2), cand, pre)
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


def preacts(x: Tensor, w_in: Tensor, b_in: Tensor | None, units: Tensor, impl: str = "auto") -> Tensor:
    """(T, d), (T, m) unit ids -> (T, m) pre-activations w_in[u]·x + b_u (a sparse dot; no (T, N) tensor)."""
    from monoroute.layers.compute import sampled_dot  # compute.py imports nothing from here

    pre = sampled_dot(x, w_in, units, impl)
    return pre if b_in is None else pre + b_in[units]


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


def pair_pattern(k_search: int, n_sub: int) -> tuple[Tensor, Tensor]:
    """The rank pairs (i, j) of two sorted lists of n_sub scores that can reach the top k_search of
    their sums: with both lists sorted, pair (i, j) is beaten by the (i+1)(j+1) - 1 pairs of lower
    ranks, so only (i+1)(j+1) <= k_search can make it (about k·ln k pairs). The pattern holds >=
    k_search pairs (k_sub = min(k_search, n_sub) ranks per list: k_sub^2 >= k_search)."""
    k_sub = min(k_search, n_sub)
    ranks = torch.arange(k_sub)
    cand_i, cand_j = torch.cartesian_prod(ranks, ranks).unbind(-1)
    keep = (cand_i + 1) * (cand_j + 1) <= k_search
    return cand_i[keep], cand_j[keep]


@torch.no_grad()
def product_topk(s1: Tensor, s2: Tensor, k_search: int, cand_i: Tensor, cand_j: Tensor) -> tuple[Tensor, Tensor]:
    """(..., n) scores of two halves -> the exact top-k_search of all n^2 sums s1[a] + s2[b]: unit ids
    a·n + b and their sums, (..., k_search) each, from the `pair_pattern` candidates only."""
    n_sub = s1.shape[-1]
    k_sub = int(cand_i.max()) + 1
    top1 = s1.topk(k_sub, dim=-1)  # sorted: the candidate pattern is by rank
    top2 = s2.topk(k_sub, dim=-1)
    cand = top1.values.index_select(-1, cand_i) + top2.values.index_select(-1, cand_j)  # (..., C)
    best = cand.topk(k_search, dim=-1, sorted=False)
    a = top1.indices.gather(-1, cand_i[best.indices])  # first half of each unit
    b = top2.indices.gather(-1, cand_j[best.indices])
    return a * n_sub + b, best.values


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


class ClusterRouter(nn.Module):
    """A two-level clustered index over the unit table itself (IVF for maximum inner product search).

    The N units are split into `clusters` = G groups of equal size N / G (a balanced k-means of the
    rows [w_in[i], b_i], kept in the `members` buffer). A cluster's centroid is the mean of its
    members' rows, so its score mu_g·x + mean(b) is the *mean pre-activation* of its members on x.
    Per token: score the G centroids (O(G·d)), probe the best `probes` = c clusters, compute the
    exact pre-activations of their c·N/G members (O(c·N/G·d)), and keep the top k: a TopK MLP over
    c·N/G candidates. With G = sqrt(N) both terms are O(sqrt(N)·d), as product keys are.

    Why this proposer and not a better-trained product-key score: a product-key score is the sum of
    two sub-key scores, which cannot express an arbitrary unit's input direction, and it has to be
    taught what the pre-activations would pick. Here the index is built *from* the pre-activation
    weights, so there is no second score to keep in agreement and nothing to learn: a unit is missed
    only when its cluster's mean pre-activation ranks below c others. Training keeps the index true
    (centroids are read from the current rows at every forward; the balanced assignment is redone
    every `recluster_every` training forwards by a few Lloyd steps from the current centroids) and
    the clusters in use: an additive per-cluster bias, used for probing only and never in a unit's
    activation, rises for clusters probed less than average and falls for the others (auxiliary-
    loss-free balancing, Wang et al. 2024), so no cluster of units is left unreachable.
    Selection has no gradient; the chosen units' pre-activations are recomputed with gradient by the
    layer (gate "none", as the dense router)."""

    def __init__(self, n_units: int, k: int, d_model: int, clusters: int | None = None, probes: int = 4,
                 recluster_every: int = 50, balance_rate: float = 0.01, impl: str = "auto",
                 revive_where_probed: bool = False, recluster_iters: int = 3) -> None:
        super().__init__()
        clusters = clusters or math.isqrt(n_units)
        if isinstance(recluster_iters, bool) or not isinstance(recluster_iters, int) or recluster_iters < 1:
            raise MonorouteError(f"recluster_iters must be a whole number >= 1, got {recluster_iters!r}; e.g. 3")
        self.recluster_iters = recluster_iters
        self.revive_where_probed = bool(revive_where_probed)
        for name, value in (("router_clusters", clusters), ("router_probes", probes),
                            ("recluster_every", recluster_every)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise MonorouteError(f"{name} must be a whole number >= 1, got {value!r}")
        if n_units % clusters:
            raise MonorouteError(f"router 'cluster' splits n_units={n_units} into router_clusters={clusters} equal "
                                 f"clusters; pick a divisor (e.g. {math.isqrt(n_units)} when n_units is a square)")
        if probes > clusters:
            raise MonorouteError(f"router_probes={probes} exceeds router_clusters={clusters}; probe at most all")
        if isinstance(balance_rate, bool) or not isinstance(balance_rate, (int, float)) or \
                not 0 <= balance_rate < math.inf:
            raise MonorouteError(f"cluster_balance must be a finite number >= 0, got {balance_rate!r}; e.g. 0.01")
        self.n_units, self.clusters, self.size = n_units, clusters, n_units // clusters
        self.probes, self.recluster_every, self.balance_rate, self.impl = probes, recluster_every, balance_rate, impl
        self.candidates = probes * self.size
        if k > self.candidates:
            raise MonorouteError(f"k={k} exceeds the router_probes x cluster size = {self.candidates} candidates; "
                                 f"raise router_probes or lower k")
        self.k = k
        # A random balanced assignment until the first reclustering (the rows are random then too).
        self.register_buffer("members", torch.randperm(n_units).view(clusters, self.size))  # (G, N/G) unit ids
        self.register_buffer("probe_bias", torch.zeros(clusters))  # (G,) balancing bias, probing only
        self.register_buffer("calls", torch.zeros((), dtype=torch.int64))  # training forwards so far

    def set_k(self, k: int) -> None:
        if k > self.candidates:
            raise MonorouteError(f"k={k} exceeds the {self.candidates} candidates of router 'cluster'")
        self.k = k

    def score_units(self, x: Tensor, units: Tensor, w_in: Tensor, b_in: Tensor | None, sparse_grad: bool = False,
                    routing: Routing | None = None) -> Tensor:
        """(T, d), (U,) -> (T, U) pre-activations of the given units (the revival loss's score). Given
        this forward's `routing` and `revive_where_probed`, a unit on a token that does not probe its
        cluster scores 1e4 lower (a constant: the gradient is the pre-activation's), so revival pulls a
        dead unit up where it can be selected, not where its cluster is never searched. Off by default:
        it cut dead units from 61 % to 9 % but ended 0.1-0.2 nats worse (docs/routing.md)."""
        pre = unit_preacts(x, units, w_in, b_in, sparse_grad)
        if not self.revive_where_probed or routing is None or routing.candidates is None:
            return pre
        cluster_of = torch.empty_like(self.members.flatten())
        cluster_of[self.members.flatten()] = torch.arange(self.clusters, device=units.device).repeat_interleave(self.size)
        probed = cluster_of[routing.candidates[:, :: self.size]]  # (T, c) the clusters each token searched
        visible = (cluster_of[units].view(1, -1, 1) == probed.unsqueeze(1)).any(-1)  # (T, U)
        return pre - 1e4 * (~visible).to(pre.dtype)

    def centroids(self, w_in: Tensor, b_in: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """(G, d) mean row of each cluster and (G,) mean bias: the centroid score is the members' mean pre."""
        mu = w_in.detach()[self.members.flatten()].view(self.clusters, self.size, -1).mean(1)
        return mu, None if b_in is None else b_in.detach()[self.members].mean(1)

    @torch.no_grad()
    def probe(self, x: Tensor, w_in: Tensor, b_in: Tensor | None, centroids=None) -> Tensor:
        """(T, d) -> (T, c) the clusters each token probes (by centroid score plus the balancing bias);
        `centroids` = this forward's `self.centroids(w_in, b_in)`, computed here when not given."""
        mu, mb = centroids if centroids is not None else self.centroids(w_in, b_in)
        scores = x @ mu.t()  # (T, G)
        if mb is not None:
            scores = scores + mb
        return (scores + self.probe_bias).topk(self.probes, dim=-1, sorted=False).indices

    @torch.no_grad()
    def forward(self, x: Tensor, w_in: Tensor, b_in: Tensor | None) -> Routing:
        centroids = self.centroids(w_in, b_in)  # once per forward: probing and balancing share it
        probed = self.probe(x, w_in, b_in, centroids)  # (T, c)
        cand, pre = cluster_preacts(x, w_in, b_in, self.members, probed)  # (T, c·N/G) ids and exact pre
        top = pre.topk(self.k, dim=-1, sorted=False)
        if self.training:
            self.maintain(probed, w_in, b_in, centroids[0])
        return Routing(cand.gather(-1, top.indices), top.values, None, cand, pre)

    @torch.no_grad()
    def maintain(self, probed: Tensor, w_in: Tensor, b_in: Tensor | None, mu: Tensor) -> None:
        """Balance the probing (sign of each cluster's deviation from the mean load, scaled by the
        spread of the centroid scores) and rebuild the assignment every recluster_every calls."""
        load = torch.bincount(probed.flatten(), minlength=self.clusters).to(self.probe_bias.dtype)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(load)  # every rank keeps the same bias
        if self.balance_rate > 0:
            spread = mu.norm(dim=-1).mean()  # a centroid score's typical size on a unit-norm-ish input
            self.probe_bias += self.balance_rate * spread * torch.sign(load.mean() - load)
        self.calls += 1
        if int(self.calls) % self.recluster_every == 0:
            self.recluster(w_in, b_in)

    @torch.no_grad()
    def recluster(self, w_in: Tensor, b_in: Tensor | None, iterations: int | None = None) -> None:
        iterations = iterations or self.recluster_iters
        rows = w_in.detach() if b_in is None else torch.cat([w_in.detach(), b_in.detach().unsqueeze(1)], 1)
        self.members.copy_(balanced_kmeans(rows.float(), self.members, iterations))


def cluster_preacts(x: Tensor, w_in: Tensor, b_in: Tensor | None, members: Tensor, probed: Tensor
                    ) -> tuple[Tensor, Tensor]:
    """(T, d) tokens, (G, S) cluster members, (T, c) probed clusters -> (T, c·S) candidate ids and
    their exact pre-activations, no gradient. Grouped by cluster: every (token, probe) pair of one
    cluster is one dense (n_g, d) x (d, S) product, so the work is T·c·S·d multiply-adds in G
    matrix products, no (T, c·S, d) gather (`preacts` over the same ids is the reference)."""
    T, c = probed.shape
    G, S = members.shape
    flat = probed.flatten()  # (T·c,) pair p = t*c + j
    order = flat.argsort()
    counts = torch.bincount(flat, minlength=G).tolist()
    tokens = order // c
    out = x.new_empty(T * c, S)
    w = w_in.detach()
    start = 0
    for g, n in enumerate(counts):
        if n:
            pairs = order[start:start + n]
            rows = members[g]
            block = x[tokens[start:start + n]] @ w[rows].t()  # (n, S)
            if b_in is not None:
                block = block + b_in.detach()[rows]
            out[pairs] = block
            start += n
    cand = members[probed].view(T, c * S)
    return cand, out.view(T, c * S)


def balanced_kmeans(rows: Tensor, members: Tensor, iterations: int = 3) -> Tensor:
    """(N, e) rows, (G, S) current assignment -> (G, S) a new balanced assignment: a few Lloyd steps
    from the current clusters' centroids, each assigning every row to its nearest centroid that still
    has room (`capacity_assign`)."""
    G, S = members.shape
    assign = members
    for _ in range(iterations):
        mu = rows[assign.flatten()].view(G, S, -1).mean(1)  # (G, e)
        # Nearest centroid = largest r·mu - |mu|^2 / 2 (the |r|^2 term is the same for every centroid).
        affinity = rows @ mu.t() - 0.5 * (mu * mu).sum(-1)  # (N, G)
        assign = capacity_assign(affinity, S)
    return assign


def capacity_assign(affinity: Tensor, capacity: int) -> Tensor:
    """(N, G) affinities -> (G, capacity) unit ids: every unit in exactly one group, every group full.

    Rounds of proposals: each unassigned unit proposes to its best group with room; a group accepts
    its best proposers up to its remaining room and rejects the rest, who then never propose to it
    again. Each round fills at least one group or places every proposer, so it ends in <= G rounds."""
    N, G = affinity.shape
    aff = affinity.clone()
    group = torch.full((N,), -1, dtype=torch.int64, device=aff.device)
    room = torch.full((G,), capacity, dtype=torch.int64, device=aff.device)
    for _ in range(G + 1):
        free = (group < 0).nonzero().squeeze(1)
        if free.numel() == 0:
            break
        aff[:, room == 0] = float("-inf")
        choice = aff[free].argmax(1)  # (F,)
        value = aff[free, choice]
        # Rank the proposals within each group, best first: sort by value, then stably by group.
        by_value = value.argsort(descending=True)
        by_group = choice[by_value].argsort(stable=True)
        order = by_value[by_group]
        ch = choice[order]
        first = torch.searchsorted(ch, ch, right=False)  # index of each group's first proposal in `order`
        rank = torch.arange(ch.numel(), device=aff.device) - first
        accept = rank < room[ch]
        group[free[order[accept]]] = ch[accept]
        room -= torch.bincount(ch[accept], minlength=G)
        rejected = order[~accept]
        aff[free[rejected], choice[rejected]] = float("-inf")
    members = group.argsort(stable=True).view(G, capacity)  # units grouped by their group, ascending
    return members


def build_router(name: str, d_model: int, n_units: int, k: int, d_key: int | None = None, heads: int = 1,
                 select: str = "score", impl: str = "auto", balance: bool = False, pools: int = 1,
                 candidates: int | None = None, clusters: int | None = None, probes: int = 4,
                 recluster_every: int = 50, cluster_balance: float = 0.01, revive_where_probed: bool = False,
                 recluster_iters: int = 3) -> nn.Module:
    if name != "multi_pool" and pools != 1:
        raise MonorouteError(f"router_pools={pools} needs router='multi_pool'")
    if name == "cluster":
        if heads != 1 or select != "score" or balance or d_key is not None or candidates is not None:
            raise MonorouteError("router_heads, router_balance, d_key, router_candidates and coupling need "
                                 "router='product_key'; router 'cluster' scores units by their own pre-activation "
                                 "(set router_probes for more candidates)")
        return ClusterRouter(n_units, k, d_model, clusters, probes, recluster_every, cluster_balance, impl,
                             revive_where_probed, recluster_iters)
    if name == "factored":
        if heads != 1 or select != "score" or balance or d_key is not None:
            raise MonorouteError("router_heads, router_balance, d_key and coupling need router='product_key'; "
                                 "router 'factored' searches the units' own factor rows (set router_candidates)")
        return FactoredRouter(d_model, n_units, k, candidates, impl)
    if name == "multi_pool":
        return MultiPoolRouter(d_model, n_units, k, pools, d_key, heads, select, impl, balance)
    if name == "dense":
        if heads != 1 or select != "score" or balance:
            raise MonorouteError("router_heads, router_balance and coupling='preact' need router='product_key'; the dense router "
                                 "already scores every unit by its own pre-activation")
        return DenseRouter(n_units, k)
    if name == "product_key":
        return ProductKeyRouter(d_model, n_units, k, d_key, heads, select, impl, balance, candidates)
    raise MonorouteError(f"unknown router {name!r}; choose one of {', '.join(ROUTERS)}")
