"""Does a routed layer's choice agree with its units' firing? Two numbers per layer:

- live_slot_fraction: the share of the k selected slots whose unit fires (act(pre) != 0);
- score_pre_corr: Pearson r between the routing score and the pre-activation over all selected
  (token, slot) pairs. For the dense router the score is the pre-activation (r = 1); for product
  keys at init they are independent (r ~ 0), which is why about half the slots are silent.

`monoroute bench agreement` reports them for a freshly built layer on random inputs and for the
routed layers of trained runs on their validation windows.
"""
from __future__ import annotations

import torch
from torch import Tensor

from monoroute.layers import RoutedFFN
from monoroute.layers.compute import sampled_dot, unit_activation


@torch.no_grad()
def routing_agreement(layer: RoutedFFN, x: Tensor) -> dict[str, float]:
    """live_slot_fraction and score_pre_corr of `layer` on inputs x (..., d)."""
    xt = x.reshape(-1, layer.d_model)
    routing = layer.router(xt, layer.w_in, layer.b_in)
    pre = sampled_dot(xt, layer.w_in, routing.indices, "reference")  # (T, k)
    if layer.b_in is not None:
        pre = pre + layer.b_in[routing.indices]
    live = unit_activation(pre, None, layer.activation) != 0
    pairs = torch.stack([routing.scores.flatten(), pre.flatten()]).double()
    return {"live_slot_fraction": live.double().mean().item(), "score_pre_corr": torch.corrcoef(pairs)[0, 1].item()}


@torch.no_grad()
def model_agreement(model, batches) -> dict[str, dict[str, float]]:
    """routing_agreement of every routed layer of a GPT on the inputs it receives from `batches` of token ids."""
    inputs: dict[str, list[Tensor]] = {}
    layers = {name: m for name, m in model.named_modules() if isinstance(m, RoutedFFN)}
    handles = [m.register_forward_pre_hook(lambda m, args, name=name: inputs.setdefault(name, []).append(args[0]))
               for name, m in layers.items()]
    was_training = model.training
    model.eval()
    try:
        for tokens in batches:
            model(tokens)
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    return {name: routing_agreement(layers[name], torch.cat([x.reshape(-1, x.shape[-1]) for x in xs]))
            for name, xs in inputs.items()}


def fresh_layer_agreement(d_model: int, n_units: int, k: int, tokens: int, seed: int = 0, **layer_kw) -> dict:
    torch.manual_seed(seed)
    layer = RoutedFFN(d_model, n_units, k, impl="reference", **layer_kw)
    return routing_agreement(layer, torch.randn(tokens, d_model))


def run_agreement(runs: list[str], d_model: int, n_units: int, k: int, tokens: int, couplings: list[str],
                  heads: list[int]) -> dict:
    from monoroute.data import prepare_data
    from monoroute.train.trainer import load

    result: dict = {"fresh": {}, "runs": {}}
    for coupling in couplings:
        for h in heads:
            key = f"coupling={coupling},router_heads={h}"
            result["fresh"][key] = fresh_layer_agreement(d_model, n_units, k, tokens, coupling=coupling,
                                                         router_heads=h)
    for run in runs:
        loaded = load(run)
        cfg = loaded.config
        store = prepare_data(cfg.data)
        batches = [x for x, _ in store.eval_batches(cfg.train.batch_size, cfg.model.block_size, cfg.train.eval_batches)]
        result["runs"][run] = {"coupling": cfg.model.coupling, "router_heads": cfg.model.router_heads,
                               "step": loaded.step, "layers": model_agreement(loaded.model, batches)}
    return result


def format_agreement(result: dict) -> str:
    lines = ["| what | live-slot fraction | score–pre r |", "|---|---:|---:|"]
    for key, r in result["fresh"].items():
        lines.append(f"| fresh layer, {key} | {r['live_slot_fraction']:.3f} | {r['score_pre_corr']:+.3f} |")
    for run, info in result["runs"].items():
        for name, r in info["layers"].items():
            lines.append(f"| {run} (coupling={info['coupling']}, step {info['step']}) {name} | "
                         f"{r['live_slot_fraction']:.3f} | {r['score_pre_corr']:+.3f} |")
    return "\n".join(lines)
