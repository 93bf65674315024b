"""`monoroute train` with the multi-pool revival threshold as it was before commit 453de66.

    python docs/multipool_revival_before.py --preset cpu-small --router multi_pool --set router_pools=4 \
        --set d_key=32 --out runs/x/mp-before

Before the fix a dead unit's revival loss pulled its score up to the token's lowest selected score over
*all* pools; since then, to its own pool's lowest selected score (`RoutedFFN.selection_threshold`).
This script restores the old threshold for one training run, so the two can be compared at the same
seed and code otherwise (docs/upcycle.md).
"""
from __future__ import annotations

import sys

from monoroute.cli import main
from monoroute.layers.routed_ffn import RoutedFFN


def global_threshold(self, routing, units):  # the old rule: one threshold per token, over every pool
    return routing.scores.detach().min(-1, keepdim=True).values.expand(-1, units.numel())


if __name__ == "__main__":
    RoutedFFN.selection_threshold = global_threshold
    raise SystemExit(main(["train", *sys.argv[1:]]))
