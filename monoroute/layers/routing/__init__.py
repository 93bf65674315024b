"""Routers: pick k of N units for each token, one router per module.

Every router returns `Routing(indices (T, k), scores (T, k), ...)` (base.py) and can score any given
set of units on every token (`score_units`), which the dead-unit revival loss uses.

- `dense.DenseRouter`: the exact reference, top-k of every unit's own pre-activation, O(N·d).
- `product_key.ProductKeyRouter`: product keys (PKM / PEER), O(sqrt(N)·d), with heads, preact
  selection, candidate re-ranking and query BatchNorm (`query_norm.py`).
- `multi_pool.MultiPoolRouter`: several product-key routers over disjoint pools.
- `factored.FactoredRouter`: exact search of a factored part of the pre-activation, re-ranked.
- `cluster.ClusterRouter`: a balanced clustered index over the unit rows.
`diagnostics.py` holds the early-dynamics readings of a search.
"""
from __future__ import annotations

from torch import nn

from monoroute.errors import MonorouteError
from monoroute.layers.routing.base import Routing, all_preacts, dense_preacts, preacts, repeated, unit_preacts
from monoroute.layers.routing.cluster import ClusterRouter, balanced_kmeans, capacity_assign, cluster_preacts
from monoroute.layers.routing.dense import DenseRouter
from monoroute.layers.routing.diagnostics import distinct_per_row, search_diagnostics, shared_ratio
from monoroute.layers.routing.factored import FactoredRouter
from monoroute.layers.routing.multi_pool import MultiPoolRouter
from monoroute.layers.routing.product_key import ProductKeyRouter, balance_scores, pair_pattern, product_topk
from monoroute.layers.routing.query_norm import QUERY_NORMS, QueryBatchNorm

ROUTERS = ("dense", "product_key", "multi_pool", "cluster", "factored")

__all__ = ["ROUTERS", "Routing", "build_router", "DenseRouter", "ProductKeyRouter", "MultiPoolRouter", "FactoredRouter",
           "ClusterRouter", "QueryBatchNorm", "QUERY_NORMS", "all_preacts", "dense_preacts", "unit_preacts", "preacts",
           "repeated", "search_diagnostics", "shared_ratio", "distinct_per_row", "balance_scores", "pair_pattern",
           "product_topk", "cluster_preacts", "balanced_kmeans", "capacity_assign"]


def build_router(name: str, d_model: int, n_units: int, k: int, d_key: int | None = None, heads: int = 1,
                 select: str = "score", impl: str = "auto", balance: bool = False, pools: int = 1,
                 candidates: int | None = None, clusters: int | None = None, probes: int = 4,
                 recluster_every: int = 50, cluster_balance: float = 0.01, revive_where_probed: bool = False,
                 recluster_iters: int = 3, query_norm: str = "none", proposals: str = "exact") -> nn.Module:
    if name != "multi_pool" and pools != 1:
        raise MonorouteError(f"router_pools={pools} needs router='multi_pool'")
    if query_norm != "none" and name not in ("product_key", "multi_pool"):
        raise MonorouteError(f"query_norm={query_norm!r} normalises a product-key query; router {name!r} has none "
                             f"(use query_norm='none')")
    if proposals != "exact" and name != "product_key":
        raise MonorouteError(f"router_proposals={proposals!r} needs router='product_key' with coupling='rerank'")
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
        return MultiPoolRouter(d_model, n_units, k, pools, d_key, heads, select, impl, balance, query_norm)
    if name == "dense":
        if heads != 1 or select != "score" or balance:
            raise MonorouteError("router_heads, router_balance and coupling='preact' need router='product_key'; the dense router "
                                 "already scores every unit by its own pre-activation")
        return DenseRouter(n_units, k)
    if name == "product_key":
        return ProductKeyRouter(d_model, n_units, k, d_key, heads, select, impl, balance, candidates, query_norm,
                                proposals)
    raise MonorouteError(f"unknown router {name!r}; choose one of {', '.join(ROUTERS)}")
