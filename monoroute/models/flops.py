"""Analytic forward FLOPs per token, by component (a multiply-add counts 2).

Conventions match `torch.utils.flop_counter.FlopCounterMode`: matrix products only (norms,
activations, softmax and the product-key candidate sums are negligible and not counted), and
attention scores over the full T x T context (a causal kernel may skip half of that work).
Training costs about 3x these forward numbers.
"""
from __future__ import annotations

import math

from monoroute.models.config import GPTConfig


def flops_per_token(cfg: GPTConfig) -> dict[str, int]:
    d, T = cfg.d_model, cfg.block_size
    counts = {"attention": 0, "dense_ffn": 0, "router": 0, "active_units": 0}
    for kind in cfg.ffn_kinds():
        kv = d // cfg.n_head * cfg.kv_heads  # grouped-query attention projects fewer keys and values
        counts["attention"] += 2 * d * (d + 2 * kv) + 2 * d * d + 2 * 2 * T * d  # qkv, out proj, QK^T and AV
        if kind == "dense":
            counts["dense_ffn"] += (3 if cfg.ffn_gated else 2) * 2 * d * cfg.ffn_width  # gated: gate, up, down
        else:
            counts["router"] += router_flops(cfg)
            counts["active_units"] += (3 if cfg.ffn_gated else 2) * 2 * cfg.k * d  # k dots in (and gate), k rows out
            counts["dense_ffn"] += 2 * 2 * d * cfg.dense_beside  # the hybrid's slim dense FFN, if any
    counts["unembedding"] = 2 * d * cfg.vocab_size
    counts["total"] = sum(counts.values())
    return counts


def router_flops(cfg: GPTConfig) -> int:
    d = cfg.d_model
    if cfg.router == "dense":
        return 2 * cfg.n_units * d  # every unit's pre-activation
    if cfg.router == "cluster":
        clusters = cfg.router_clusters or math.isqrt(cfg.n_units)
        # Centroid scores, then the exact pre-activations of the probed clusters' members. The
        # centroids (a mean over the table per batch) and the periodic reclustering are not per token.
        return 2 * clusters * d + 2 * cfg.router_probes * (cfg.n_units // clusters) * d
    if cfg.router == "factored":
        # Both factor tables against x, then the residual dots of the C candidates.
        return 2 * 2 * math.isqrt(cfg.n_units) * d + 2 * (cfg.router_candidates or 4 * cfg.k) * d
    d_key, heads = cfg.layer_d_key or d, cfg.router_heads
    pools = cfg.router_pools if cfg.router == "multi_pool" else 1
    n_sub = math.isqrt(cfg.n_units // pools)
    # Per head and pool: query projection, both halves against sqrt(N / pools) sub-keys.
    flops = pools * heads * (2 * d * d_key + 2 * n_sub * d_key)
    if cfg.layer_coupling == "preact":
        flops += 2 * min(2 * cfg.k, cfg.n_units) * d  # pre-activations of the 2k candidates
    if cfg.layer_coupling == "rerank":
        c = cfg.router_candidates or 8 * cfg.k
        if cfg.router_proposals == "grid":  # each head's g x g grid
            from monoroute.layers.routing.product_key import grid_side

            c = heads * grid_side(c, heads, n_sub) ** 2
        flops += 2 * c * d  # pre-activations of the C candidates
    return flops
