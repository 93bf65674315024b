"""Selection recall: how much of the exact top-k a sub-linear router finds.

The exact reference (router "dense", a TopK MLP) runs the k units with the largest pre-activation
w_in[i]·x + b_i over all N. For a router's choice S of k units on a token, against the exact top-k E:

    recall = |S ∩ E| / k                                   the share of the exact top-k selected
    mass   = Σ_{i ∈ S ∩ E} relu(pre_i) / Σ_{i ∈ E} relu(pre_i)   the share of its positive activation mass

Both are 1 for the dense router, by construction. `mass` weighs the misses by what they would have
contributed (missing a unit whose pre-activation is barely above the k-th is cheap); it is summed
over tokens before dividing, so tokens whose exact top-k holds no positive pre-activation do not count.
Computed on sampled tokens only: the (T, N) pre-activations exist here, never in training.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from monoroute.layers.routed_ffn import RoutedFFN
from monoroute.layers.routing import all_preacts


@torch.no_grad()
def selection_recall(layer: RoutedFFN, x: Tensor) -> dict:
    """(T, d) layer inputs -> {"recall", "mass", "tokens"} of the layer's router against the exact top-k.

    The router runs in eval mode (no index maintenance, no statistics), as in `monoroute eval`."""
    x = x.reshape(-1, layer.d_model)
    was_training = layer.router.training
    layer.router.eval()
    try:
        chosen = layer.router(x, *layer.select_tables()).indices  # (T, k)
    finally:
        layer.router.train(was_training)
    # gated units: the exact top-k of what selection reads, the gate's pre-activation
    return recall_of(chosen, all_preacts(x, *layer.select_tables(), layer.router), layer.k)


def recall_of(chosen: Tensor, pre: Tensor, k: int) -> dict:
    """(T, k) chosen unit ids, (T, N) every unit's pre-activation -> recall, mass (see the module doc)."""
    exact = pre.topk(k, dim=-1)  # (T, k)
    hit = (exact.indices.unsqueeze(-1) == chosen.unsqueeze(-2)).any(-1)  # (T, k): exact unit j was chosen
    positive = F.relu(exact.values)
    total = positive.sum()
    return {
        "recall": hit.float().mean().item() if hit.numel() else None,
        "mass": (positive * hit).sum().item() / total.item() if total > 0 else None,
        "tokens": int(chosen.shape[0]),
    }


@torch.no_grad()
def model_selection_recall(model: nn.Module, tokens: Tensor, max_tokens: int = 512) -> dict:
    """Run `model(tokens)` once and measure every RoutedFFN's recall on up to `max_tokens` of its
    inputs (an evenly spaced sample). Returns {layer name: {...}, "recall": mean, "mass": mean}, or {}
    for a model with no routed layer."""
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, RoutedFFN)]
    if not layers:
        return {}
    inputs: dict[str, Tensor] = {}
    handles = [m.register_forward_pre_hook(lambda mod, args, name=name: inputs.__setitem__(name, args[0].detach()))
               for name, m in layers]
    was_training = model.training
    model.eval()
    try:
        model(tokens)
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    per_layer = {}
    for name, layer in layers:
        x = inputs[name].reshape(-1, layer.d_model)
        if x.shape[0] > max_tokens:
            x = x[torch.linspace(0, x.shape[0] - 1, max_tokens, device=x.device).long()]
        per_layer[name] = selection_recall(layer, x.to(layer.w_in.dtype))
    out: dict = {"layers": per_layer}
    for key in ("recall", "mass"):
        values = [r[key] for r in per_layer.values() if r[key] is not None]
        out[key] = sum(values) / len(values) if values else None
    return out
