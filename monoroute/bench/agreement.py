"""Does a routed layer's choice agree with its units' firing? Two numbers per layer:

- live_slot_fraction: the share of the k selected slots whose unit fires (act(pre) != 0);
- score_pre_corr: Pearson r between the routing score and the pre-activation over all selected
  (token, slot) pairs. For the dense router the score is the pre-activation (r = 1); for product
  keys at init they are independent (r ~ 0), which is why about half the slots are silent.

A third, for product keys (issue 9's "correlated selection"): unit u sits at (row, col) =
(u // √N, u % √N) of the sub-key grid, and a token's k units can only come from the rows and columns
its two half-queries rank highest. `grid_rows` / `grid_cols` are the mean number of distinct rows /
columns among a token's k selected units; `grid_random` is the same for k distinct units drawn
uniformly at random (s · (1 − C(N − s, k) / C(N, k)), s = √N). Far below it means the k units share
sub-keys: they are chosen jointly, not independently.

`monoroute bench agreement` reports them for a freshly built layer on random inputs and for the
routed layers of trained runs on their validation windows.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from monoroute.layers import RoutedFFN
from monoroute.layers.routing import ProductKeyRouter
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
    out = {"live_slot_fraction": live.double().mean().item(), "score_pre_corr": torch.corrcoef(pairs)[0, 1].item()}
    if isinstance(layer.router, ProductKeyRouter):
        out.update(grid_spread(routing.indices, layer.n_units))
    return out


def distinct_per_row(values: Tensor) -> Tensor:
    """(T,) number of distinct entries in each row of values (T, k)."""
    v = values.sort(-1).values
    return 1 + (v[:, 1:] != v[:, :-1]).sum(-1)


def grid_spread(indices: Tensor, n_units: int) -> dict[str, float]:
    """Distinct grid rows / columns among each token's k units, and the uniform-random expectation."""
    s = math.isqrt(n_units)
    k = indices.shape[-1]
    rows = distinct_per_row(indices // s).double().mean().item()
    cols = distinct_per_row(indices % s).double().mean().item()
    # P(a given row holds none of k distinct uniform units) = C(N - s, k) / C(N, k)
    log_p = (math.lgamma(n_units - s + 1) - math.lgamma(n_units - s - k + 1)
             - math.lgamma(n_units + 1) + math.lgamma(n_units - k + 1))
    return {"grid_rows": rows, "grid_cols": cols, "grid_random": s * (1 - math.exp(log_p))}


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
    def grid(r: dict) -> str:
        if "grid_rows" not in r:
            return "– | – |"
        return f"{r['grid_rows']:.1f} / {r['grid_cols']:.1f} | {r['grid_random']:.1f} |"

    lines = ["| what | live-slot fraction | score–pre r | distinct grid rows / cols per token | random |",
             "|---|---:|---:|---:|---:|"]
    for key, r in result["fresh"].items():
        lines.append(f"| fresh layer, {key} | {r['live_slot_fraction']:.3f} | {r['score_pre_corr']:+.3f} | {grid(r)}")
    for run, info in result["runs"].items():
        for name, r in info["layers"].items():
            lines.append(f"| {run} (coupling={info['coupling']}, step {info['step']}) {name} | "
                         f"{r['live_slot_fraction']:.3f} | {r['score_pre_corr']:+.3f} | {grid(r)}")
    return "\n".join(lines)
