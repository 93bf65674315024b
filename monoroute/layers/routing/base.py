"""What every router shares: the `Routing` it returns, and the pre-activations of given units
(all of them for the exact reference, a sampled set for re-ranking and revival)."""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn


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
    # Re-ranking with several heads: (T, C) True where a candidate repeats one proposed by another head
    # (never selected, left out of the ranking loss); None when no candidate can repeat.
    candidate_repeat: Tensor | None = None


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


def preacts(x: Tensor, w_in: Tensor, b_in: Tensor | None, units: Tensor, impl: str = "auto") -> Tensor:
    """(T, d), (T, m) unit ids -> (T, m) pre-activations w_in[u]·x + b_u (a sparse dot; no (T, N) tensor)."""
    from monoroute.layers.compute import sampled_dot  # compute.py imports nothing from here

    pre = sampled_dot(x, w_in, units, impl)
    return pre if b_in is None else pre + b_in[units]


def repeated(units: Tensor) -> Tensor:
    """(T, P) unit ids -> (T, P) True at every occurrence of a unit after its first in the row."""
    ordered, order = units.sort(dim=-1, stable=True)
    again = torch.zeros_like(ordered, dtype=torch.bool)
    again[:, 1:] = ordered[:, 1:] == ordered[:, :-1]
    return torch.zeros_like(again).scatter(-1, order, again)
