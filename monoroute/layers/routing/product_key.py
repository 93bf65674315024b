"""Product-key routing (product-key memory, Lample et al. 2019; PEER, He 2024).

`ProductKeyRouter` scores units with a separate query: q = W_q x is split into halves (q1, q2), each
scored against sqrt(N) sub-keys, and unit (a, b) = a*sqrt(N) + b has score q1·K1[a] + q2·K2[b]. The
exact top-k of these N sums lies inside topk(q1·K1) x topk(q2·K2), so k_sub^2 candidates suffice:
O(sqrt(N)·d) per token. Fewer still: with both sub-top-k lists sorted, the pair of ranks (i, j) is
beaten by the (i+1)(j+1) - 1 pairs of lower ranks, so only pairs with (i+1)(j+1) <= k can make the
top k: about k·ln(k) candidates (119 instead of 1024 at k=32), a fixed pattern computed once
(`pair_pattern`, `product_topk`, which the factored router reuses). Options: `heads` query heads over
shared sub-keys (PEER), `select="preact"` (keep firing units among the top 2k) or `"rerank"`
(re-rank C proposals by exact pre-activation), `query_norm="batch"`; see the class docstring.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from monoroute.errors import MonorouteError
from monoroute.layers.compiled import kernels_for
from monoroute.layers.routing.base import Routing, preacts, repeated
from monoroute.layers.routing.diagnostics import search_diagnostics, shared_ratio
from monoroute.layers.routing.query_norm import QUERY_NORMS, QueryBatchNorm


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

    proposals="grid" (re-ranking only): instead of the exact top C sums, each head proposes the
    g x g grid of its top g = ceil(sqrt(C / H)) sub-keys per half (product-key memory's own
    candidate set, Lample et al. 2019): two partial sorts of g and one broadcast add, instead of two
    full sorts, ~C·ln C pair sums and a top-C over them. It contains the top g sums but not the exact
    top C (a pair of ranks (0, g) is left out), which the pre-activation re-ranking and the ranking
    loss do not need.
    """

    SELECTS = ("score", "preact", "rerank")
    PROPOSALS = ("exact", "grid")

    def __init__(self, d_model: int, n_units: int, k: int, d_key: int | None = None, heads: int = 1,
                 select: str = "score", impl: str = "auto", balance: bool = False,
                 candidates: int | None = None, query_norm: str = "none", proposals: str = "exact") -> None:
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
        if query_norm not in QUERY_NORMS:
            raise MonorouteError(f"unknown query_norm {query_norm!r}; choose one of {', '.join(QUERY_NORMS)}")
        if select == "rerank":
            candidates = candidates or 8 * k
            if isinstance(candidates, bool) or not isinstance(candidates, int) or not k <= candidates <= n_units:
                raise MonorouteError(f"router_candidates must be a whole number between k={k} and n_units={n_units}, "
                                     f"got {candidates!r}; e.g. {min(8 * k, n_units)}")
            if heads > 1 and -(-candidates // heads) < k:
                raise MonorouteError(f"router_candidates={candidates} split over router_heads={heads} gives each head "
                                     f"fewer than k={k} proposals; use at least {k * heads} candidates or fewer heads")
        elif candidates is not None:
            raise MonorouteError("router_candidates needs coupling='rerank' (candidate re-ranking)")
        if proposals not in self.PROPOSALS:
            raise MonorouteError(f"unknown router_proposals {proposals!r}; choose one of {', '.join(self.PROPOSALS)}")
        if proposals == "grid" and select != "rerank":
            raise MonorouteError("router_proposals='grid' proposes candidates for re-ranking; it needs "
                                 "coupling='rerank' (the other selections need the exact top-k by score)")
        self.proposals = proposals
        self.n_units, self.n_sub, self.d_half, self.heads = n_units, n_sub, d_key // 2, heads
        self.select, self.impl, self.balance, self.candidates = select, impl, balance, candidates
        self.set_k(k)
        self.query = nn.Linear(d_model, heads * d_key, bias=False)
        # Centre (and scale) every query channel over the batch before the cosine: a component shared
        # by all tokens would otherwise make every token propose the same few sub-key rows.
        self.query_norm = QueryBatchNorm(heads * d_key) if query_norm == "batch" else None
        self.diagnose = False  # set by the trainer / eval: record `diagnostics` at the next forward
        self.diagnostics: dict | None = None
        self.keys = nn.Parameter(torch.randn(2, n_sub, self.d_half) / math.sqrt(self.d_half))
        self.log_scale = nn.Parameter(torch.full((1,), math.log(4.0)))  # gate sharpness; (1,) as FSDP2 shards no scalars

    def set_k(self, k: int) -> None:
        """Set k and the candidate pattern of the search (also used by the k schedule to shrink k)."""
        self.k = k
        if self.select == "rerank":
            self.candidates = max(self.candidates, k)  # a k schedule may start above C
        # Per head. Re-ranking splits its C proposals over the heads (C / H each, PEER-style heads at
        # about one head's cost: the C exact pre-activations dominate, and they stay C).
        rerank_per_head = -(-self.candidates // self.heads) if self.select == "rerank" else None
        self.k_search = {"preact": min(2 * k, self.n_units), "rerank": rerank_per_head}.get(self.select, k)
        # k_sub^2 >= k_search candidates always: k_search <= n_sub gives k_search^2 >= k_search, else n_sub^2 = N.
        self.k_sub = min(self.k_search, self.n_sub)
        # grid proposals: g sub-keys per half and head, g^2 >= C / H (all of them when g reaches n_sub)
        self.k_grid = grid_side(self.candidates, self.heads, self.n_sub) if self.select == "rerank" else None
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
        q = self.query(x)  # (T, H·d_key)
        if self.diagnose:
            self.diagnostics = {"query_shared_ratio_raw": shared_ratio(q.detach().view(x.shape[0], self.heads, -1))}
        if self.query_norm is not None:
            q = self.query_norm(q)
        q = q.view(x.shape[0], self.heads, 2 * self.d_half)  # (T, H, d_key)
        if self.diagnose:
            self.diagnostics["query_shared_ratio"] = shared_ratio(q.detach())
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
        if self.heads == 1:  # no max over heads (amax's backward builds a mask and a count of ties)
            a, b = self.split(units)
            return s1[:, 0].gather(-1, a) + s2[:, 0].gather(-1, b)
        a, b = (i.unsqueeze(1).expand(-1, self.heads, -1) for i in self.split(units))
        return (s1.gather(-1, a) + s2.gather(-1, b)).amax(1)

    def split(self, units: Tensor) -> tuple[Tensor, Tensor]:
        """Unit ids -> (row a, column b) with id = a·n_sub + b. For a power-of-two n_sub by shift and
        mask (int64 division is several times slower on the CPU: ~2 ms per (2048, 256) ids)."""
        if self.n_sub & (self.n_sub - 1) == 0:
            shift = self.n_sub.bit_length() - 1
            return units >> shift, units & (self.n_sub - 1)
        return units // self.n_sub, units % self.n_sub

    @torch.no_grad()
    def search_heads(self, s1: Tensor, s2: Tensor) -> tuple[Tensor, Tensor]:
        """Each head's exact top-k_search units: ids and scores, (T, H, k_search) each."""
        return product_topk(s1, s2, self.k_search, self.cand_i, self.cand_j)

    @torch.no_grad()
    def grid_heads(self, s1: Tensor, s2: Tensor) -> Tensor:
        """Each head's g x g grid of its top-g sub-keys per half, as unit ids: (T, H, g^2)."""
        a = s1.topk(self.k_grid, dim=-1, sorted=False).indices  # (T, H, g)
        b = s2.topk(self.k_grid, dim=-1, sorted=False).indices
        return (a.unsqueeze(-1) * self.n_sub + b.unsqueeze(-2)).flatten(-2)

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
        if self.select == "rerank":
            # Each head proposes its own top C / H: their union (a unit proposed twice counted once)
            # is re-ranked by exact pre-activation.
            proposed = self.grid_heads(s1, s2) if self.proposals == "grid" else self.search_heads(s1, s2)[0]
            cand = proposed.flatten(1)  # (T, C) proposals (H·g^2 for the grid)
            with torch.no_grad():
                repeat = repeated(cand) if self.heads > 1 else None
                if repeat is None:  # the k largest exact pre-activations (one fused kernel on the CPU)
                    # the kernel unless the layer asks for the reference unit compute (tests)
                    search = "auto" if self.impl in ("auto", "cpu") else "torch"
                    pre, top = rerank_topk(x, w_in, b_in, cand, self.k, search, self.impl)
                else:  # a unit proposed by two heads runs once
                    pre = preacts(x, w_in, b_in, cand, self.impl)  # (T, C) exact pre-activations
                    top = pre.masked_fill(repeat, float("-inf")).topk(self.k, dim=-1, sorted=False).indices
            units = cand.gather(-1, top)
            self.record(cand, units)
            return Routing(units, self.unit_scores(s1, s2, units), (s1, s2), cand, pre, candidate_repeat=repeat)
        units, scores = self.search(s1, s2)  # selection only, no gradient
        proposed = units
        if self.select == "preact":
            units = self.keep_firing(x, units, scores, w_in, b_in)
        self.record(proposed, units)
        # The chosen units' scores are re-read from the half scores, with gradient.
        return Routing(units, self.unit_scores(s1, s2, units), (s1, s2))

    @torch.no_grad()
    def fused_layer(self, x: Tensor, w_in: Tensor, b_in: Tensor | None, w_out: Tensor):
        """Inference only: the re-ranking layer with ReLU units, fused per token in the compiled CPU
        kernel (query, BatchNorm's running statistics, cosine sub-key scores, the exact top C, their
        pre-activations, the top k, y = sum relu(pre) w_out): (y (T, d), units (T, k), h (T, k)), or
        None where it does not apply (then the layer runs op by op, with the same result to rounding).
        It applies in eval mode to one query head, exact proposals, no score balancing and no
        diagnostics, on plain CPU float tensors where the kernel built."""
        if (self.training or self.select != "rerank" or self.heads != 1 or self.proposals != "exact" or self.balance
                or self.diagnose):
            return None
        # A decoding step runs this once per layer and token, so the module's tensors are read from its
        # dicts (each nn.Module attribute lookup costs ~0.5 us, about what the kernel's search does).
        bn = self._modules.get("query_norm")  # None (a plain attribute) without query BatchNorm
        if bn is not None and bn.training:
            return None
        wq, log_scale = self._modules["query"]._parameters["weight"], self._parameters["log_scale"]
        keys = self._parameters["keys"]
        mean, var = (bn._buffers["running_mean"], bn._buffers["running_var"]) if bn is not None else (None, None)
        tensors = (x, w_in, w_out, wq, keys) + (() if b_in is None else (b_in,)) + (() if bn is None else (mean, var))
        kernels = kernels_for(*tensors)
        if kernels is None:
            return None
        empty = x.new_empty(0)
        return kernels.rerank_infer(
            x, wq, empty if bn is None else mean, empty if bn is None else var, bn.eps if bn is not None else 0.0,
            keys, float(log_scale.exp()), w_in, empty if b_in is None else b_in, w_out, self.candidates, self.k)

    @torch.no_grad()
    def record(self, proposed: Tensor, chosen: Tensor) -> None:
        """With `diagnose` set, add this forward's search statistics to `diagnostics` (see
        `search_diagnostics`), then clear the flag: it is asked for one forward at a time."""
        if self.diagnose:
            self.diagnostics = {**(self.diagnostics or {}), **search_diagnostics(proposed, chosen, self.n_units,
                                                                                 self.n_sub)}
            self.diagnose = False

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
        # The same units on every token: one index_select per half instead of a (T, U) gather.
        a, b = self.split(units)  # (U,) each
        return (s1.index_select(-1, a) + s2.index_select(-1, b)).amax(1)  # (T, U)


def balance_scores(s: Tensor, eps: float = 1e-6) -> Tensor:
    """(..., n_sub) one half's sub-key scores standardised per token (mean 0, std 1 over the sub-keys).

    A unit's score is s1[a] + s2[b]. When one half's scores are far more spread than the other's, the
    top k is one or two rows a combined with many columns b: trained layers pick their 32 units from
    2-6 rows (or columns) of 128 where random units would span 28 (`monoroute bench agreement`).
    Standardising each half gives both the same spread, so the k units come from several rows and
    several columns. Still an exact top-k of a sum of per-half scores, so the product-key search holds."""
    mean = s.mean(-1, keepdim=True)
    return (s - mean) / (s.std(-1, keepdim=True) + eps)


def grid_side(candidates: int, heads: int, n_sub: int) -> int:
    """g of grid proposals: each head's g x g grid holds at least its C / H candidates (at most n_sub)."""
    return min(math.ceil(math.sqrt(-(-candidates // heads))), n_sub)


ROWS_FORM_MIN = 128  # token-heads from which product_topk builds the pair sums rank by rank


def pair_pattern(k_search: int, n_sub: int) -> tuple[Tensor, Tensor]:
    """The rank pairs (i, j) of two sorted lists of n_sub scores that can reach the top k_search of
    their sums: with both lists sorted, pair (i, j) is beaten by the (i+1)(j+1) - 1 pairs of lower
    ranks, so only (i+1)(j+1) <= k_search can make it (about k·ln k pairs). The pattern holds >=
    k_search pairs (k_sub = min(k_search, n_sub) ranks per list: k_sub^2 >= k_search)."""
    k_sub = min(k_search, n_sub)
    ranks = torch.arange(k_sub, device="cpu")  # on the CPU even under a meta device context (a model sized unbuilt)
    cand_i, cand_j = torch.cartesian_prod(ranks, ranks).unbind(-1)
    keep = (cand_i + 1) * (cand_j + 1) <= k_search
    return cand_i[keep], cand_j[keep]


SEARCH_IMPLS = ("auto", "torch", "compiled")


def search_kernels(impl: str, *tensors: Tensor):
    """The compiled kernels a search with `impl` uses on these tensors, or None for the torch form:
    "auto" where they take them, "torch" never, "compiled" always (else one clear error)."""
    if impl not in SEARCH_IMPLS:
        raise MonorouteError(f"unknown search impl {impl!r}; choose one of {', '.join(SEARCH_IMPLS)}")
    kernels = None if impl == "torch" else kernels_for(*tensors)
    if kernels is None and impl == "compiled":
        raise MonorouteError("the compiled CPU routing kernels are unavailable here (plain CPU float tensors of one "
                             "dtype, a C++ compiler and ninja are needed, and MONOROUTE_CPU_KERNELS must not be 0); "
                             "use impl='auto'")
    return kernels


@torch.no_grad()
def rerank_topk(x: Tensor, w_in: Tensor, b_in: Tensor | None, cand: Tensor, k: int, impl: str = "auto",
                unit_impl: str = "auto") -> tuple[Tensor, Tensor]:
    """(T, d) inputs, (T, C) candidate ids -> their exact pre-activations (T, C) and the positions in
    `cand` of the k largest per token (T, k), in no particular order.

    impl "auto": the compiled CPU kernel where it built (one SIMD dot per candidate row and a radix
    select, fused; float32 sums in another order than sparse_sampled_addmm's, so pre-activations agree
    to rounding), else the torch form: `preacts` (sparse_sampled_addmm) and topk. "torch" always the
    torch form (the kernel's reference; its pre-activations by the unit-compute impl `unit_impl`);
    "compiled" the kernel or an error."""
    kernels = search_kernels(impl, x, w_in, *([] if b_in is None else [b_in]))
    if kernels is not None:
        bias = w_in.new_empty(0) if b_in is None else b_in.detach()
        return tuple(kernels.rerank(x.detach(), w_in.detach(), bias, cand, k))
    pre = preacts(x, w_in, b_in, cand, unit_impl)  # (T, C) exact pre-activations
    return pre, pre.topk(k, dim=-1, sorted=False).indices


@torch.no_grad()
def product_topk(s1: Tensor, s2: Tensor, k_search: int, cand_i: Tensor, cand_j: Tensor,
                 impl: str = "auto") -> tuple[Tensor, Tensor]:
    """(..., n) scores of two halves -> the exact top-k_search of all n^2 sums s1[a] + s2[b]: unit ids
    a·n + b and their sums, (..., k_search) each (in no particular order), from the `pair_pattern`
    candidates only (cand_i, cand_j = pair_pattern(k_search, n)).

    impl "auto": the compiled CPU kernel (layers/compiled.py) for float32/float64 CPU tensors where it
    built, else the torch form below; "torch" always the torch form (the kernel's reference);
    "compiled" the kernel or an error. Both give the same units and sums (a tie at the k-th sum may
    be broken differently)."""
    kernels = search_kernels(impl, s1, s2)
    if kernels is not None:
        n_sub, lead = s1.shape[-1], s1.shape[:-1]
        units, values = kernels.product_topk(s1.reshape(-1, n_sub), s2.reshape(-1, n_sub), k_search)
        return units.view(*lead, k_search), values.view(*lead, k_search)
    n_sub = s1.shape[-1]
    k_sub = int(cand_i.max()) + 1
    top1 = s1.topk(k_sub, dim=-1)  # sorted: the candidate pattern is by rank
    top2 = s2.topk(k_sub, dim=-1)
    v1, v2 = top1.values, top2.values
    if v1.numel() // k_sub >= ROWS_FORM_MIN:
        # The pattern is row-major with each row a prefix (rank i pairs with ranks 0..J_i - 1 of the other
        # list), so its sums are one broadcast add per rank: 2.8x faster on the CPU than two index_select
        # along the last dimension at 2,048 tokens, the same values in the same order. Its ~k_sub small
        # ops cost more than they save for a few tokens (decoding), where the index_select form runs.
        widths = torch.bincount(cand_i, minlength=k_sub).tolist()
        cand = torch.cat([v1[..., i:i + 1] + v2[..., :w] for i, w in enumerate(widths) if w], -1)  # (..., C)
    else:
        cand = v1.index_select(-1, cand_i) + v2.index_select(-1, cand_j)  # (..., C)
    best = cand.topk(k_search, dim=-1, sorted=False)
    a = top1.indices.gather(-1, cand_i[best.indices])  # first half of each unit
    b = top2.indices.gather(-1, cand_j[best.indices])
    return a * n_sub + b, best.values
