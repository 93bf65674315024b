"""Several independent product-key routers, each over its own pool of units."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from monoroute.errors import MonorouteError
from monoroute.layers.routing.base import Routing
from monoroute.layers.routing.product_key import ProductKeyRouter


class MultiPoolRouter(nn.Module):
    """Several independent product-key routers, each over its own pool of N / P units, each picking
    k / P of them ("sparsely gated tiny linear experts", Schug 2026: several channels, each choosing
    a few single-unit experts from its own pool, the score scaling the unit, which here is the
    layer's sigmoid gate). Pool p owns units [p·N/P, (p+1)·N/P). A token always gets k / P units
    from every pool, so the pools cannot collapse onto one region of the table, and each pool's
    search is a product-key search over sqrt(N / P) sub-keys per half."""

    def __init__(self, d_model: int, n_units: int, k: int, pools: int, d_key: int | None = None, heads: int = 1,
                 select: str = "score", impl: str = "auto", balance: bool = False, query_norm: str = "none") -> None:
        super().__init__()
        if isinstance(pools, bool) or not isinstance(pools, int) or pools < 1:
            raise MonorouteError(f"router_pools must be a whole number >= 1, got {pools!r}")
        if n_units % pools or k % pools:
            raise MonorouteError(f"router 'multi_pool' splits n_units={n_units} and k={k} evenly over "
                                 f"router_pools={pools}; pick pools dividing both (e.g. 4 with n_units 16384, k 32)")
        self.n_units, self.k, self.pools, self.pool_size = n_units, k, pools, n_units // pools
        self.routers = nn.ModuleList(ProductKeyRouter(d_model, self.pool_size, k // pools, d_key, heads, select, impl,
                                                      balance, query_norm=query_norm) for _ in range(pools))

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
