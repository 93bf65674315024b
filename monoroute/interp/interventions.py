"""Causal tests of single units: ablate, clamp or steer one unit and measure what changes, and where.

A unit is (layer, unit) of a GPT: a routed unit u of a RoutedFFN (activation in the layer's
SparseActivations, output direction `mlp.w_out[u]`) or a neuron j of a DenseMLP (activation
`hook_post[..., j]`, output direction `mlp.down.weight[:, j]`). Interventions are lists of
(hook_name, fn) for `GPT.run_with_hooks`:

- ablate: the unit's activation is 0 at every position (same as zeroing its output direction);
- clamp:  the unit's activation is exactly `value` at every position (replaced, not added);
- steer:  alpha * (output direction) is added to `blocks.{layer}.hook_mlp_out` at every position,
          which is the same as adding alpha to the unit's activation (the FFN output is linear in it).

`intervention_effect` compares an intervened run with the clean run on the same windows, splitting
positions into those where a concept holds and the rest: the KL of the next-token distribution and
the change of the next-token loss on each side, and their ratio (the *specificity*: damage on the
concept per unit of collateral damage). `specificity_table` does this for several concepts' units
and all three kinds, sharing the clean pass; `unit_logit_effect` gives a unit's direct effect on
the output logits. Everything runs under `torch.no_grad()`, batched over windows.

Shapes: B windows, T input positions (windows are (B, T + 1) token ids: x = w[:, :-1], y = w[:, 1:]),
V vocabulary, d = d_model.
"""
from __future__ import annotations

from typing import Any, Iterable, Sequence

import re

import numpy as np
import scipy.sparse as sp
import torch
from torch import Tensor

from monoroute.errors import MonorouteError
from monoroute.hooks import SparseActivations

KINDS = ("ablate", "clamp", "steer")
Hooks = list  # list[tuple[str, HookFn]]


# --- units and hooks ------------------------------------------------------------------------------
def _mlp(model, layer: int):
    if not 0 <= layer < len(model.blocks):
        raise MonorouteError(f"layer {layer} out of range; the model has {len(model.blocks)} blocks")
    return model.blocks[layer].mlp


def is_routed(model, layer: int) -> bool:
    return hasattr(_mlp(model, layer), "w_out")


def n_units(model, layer: int) -> int:
    mlp = _mlp(model, layer)
    return mlp.n_units if is_routed(model, layer) else mlp.down.weight.shape[1]


def unit_direction(model, layer: int, unit: int) -> Tensor:
    """(d,) what one unit of activation adds to the residual stream: w_out[u] (routed) or down.weight[:, j]."""
    mlp = _mlp(model, layer)
    if not 0 <= unit < n_units(model, layer):
        raise MonorouteError(f"unit {unit} out of range for layer {layer} ({n_units(model, layer)} units)")
    return (mlp.w_out[unit] if is_routed(model, layer) else mlp.down.weight[:, unit]).detach()


def make_hook(model, layer: int, unit: int, kind: str, value: float | None = None,
              alpha: float | None = None) -> Hooks:
    """[(hook_name, fn)] for `run_with_hooks` that ablates, clamps (to `value`) or steers (by `alpha`)
    one unit of one layer, dense neuron or routed unit alike (see the module docstring)."""
    routed = is_routed(model, layer)
    direction = unit_direction(model, layer, unit)  # also checks the range
    post = f"blocks.{layer}.mlp.hook_post"
    if kind == "ablate":
        if routed:
            return [(post, lambda acts, hook: acts.ablate([unit]))]
        return [(post, lambda act, hook: _set_column(act, unit, 0.0))]
    if kind == "clamp":
        if value is None:
            raise MonorouteError("kind='clamp' needs a value (e.g. firing_value(...) of the unit)")
        if routed:
            return [(post, lambda acts, hook: acts.clamp(unit, value))]
        return [(post, lambda act, hook: _set_column(act, unit, value))]
    if kind == "steer":
        if alpha is None:
            raise MonorouteError("kind='steer' needs alpha (the activation to add, e.g. firing_value(...))")
        return [(f"blocks.{layer}.hook_mlp_out", lambda act, hook: act + alpha * direction.to(act.dtype))]
    raise MonorouteError(f"unknown intervention kind {kind!r}; choose one of {', '.join(KINDS)}")


def _set_column(act: Tensor, j: int, value: float) -> Tensor:
    out = act.clone()
    out[..., j] = value
    return out


def firing_value(acts_values: Any, q: float = 0.9) -> float:
    """The clamp (and default steering) value "where the unit fires": the q-quantile of the unit's
    *positive* activations over some positions (for ReLU units, exactly its nonzero activations;
    for GELU neurons, which are almost never exactly 0, the small negative tail is not counted as
    firing). `acts_values` is one unit's activations: a 1-D array / tensor (zeros allowed), or a
    scipy sparse column (its stored entries). 0.0 when the unit never fires (then clamping it is
    the same as ablating it)."""
    if sp.issparse(acts_values):
        acts_values = acts_values.tocoo().data
    if isinstance(acts_values, Tensor):
        acts_values = acts_values.detach().float().cpu().numpy()
    x = np.asarray(acts_values, dtype=np.float64).ravel()
    x = x[x > 0]
    return float(np.quantile(x, q)) if x.size else 0.0


# --- the effect of one intervention ---------------------------------------------------------------
def _path_hooks(model) -> Hooks:
    """No-op observers on every routed layer's hook_post. A routed layer takes a fused path when no
    hook watches it and the two-primitive path otherwise; attaching these to every run (clean and
    intervened) makes all runs take the same path, so the identity intervention changes nothing
    to the last bit and only the intervention itself shows up in the differences."""
    return [(f"blocks.{i}.mlp.hook_post", _observe) for i in range(len(model.blocks)) if is_routed(model, i)]


def _observe(act, hook):
    return None


def _device(model) -> torch.device:
    return next(model.parameters()).device


def _check_windows(windows: Tensor, masks: Iterable[Tensor]) -> tuple[int, int]:
    if windows.ndim != 2 or windows.shape[1] < 2:
        raise MonorouteError(f"windows must be (B, T + 1) token ids with T >= 1, got shape {tuple(windows.shape)}")
    B, T = windows.shape[0], windows.shape[1] - 1
    for mask in masks:
        if tuple(mask.shape) != (B, T):
            raise MonorouteError(f"concept mask has shape {tuple(mask.shape)}; expected (B, T) = {(B, T)} "
                                 "(one entry per input position: windows[:, :-1])")
    return B, T


def _start_layer(hooks: Hooks) -> int | None:
    """The first block an intervention touches: blocks before it compute exactly what the clean run
    computed, so an intervened run may start from the clean residual stream there. None when a hook
    sits outside the blocks (embeddings) or there are no hooks: run the whole model."""
    layers = []
    for name, _ in hooks:
        match = re.match(r"blocks\.(\d+)\.", name)
        if match is None:
            return None
        layers.append(int(match.group(1)))
    return min(layers) if layers else None


def _clean_run(model, x: Tensor, path: Hooks, starts: Iterable[int | None]) -> tuple[Tensor, dict[int, Tensor]]:
    """Clean logits (B, T, V) and the residual stream entering each block in `starts`."""
    resid: dict[int, Tensor] = {}
    store = [(f"blocks.{i}.hook_resid_pre", lambda act, hook, i=i: resid.__setitem__(i, act))
             for i in sorted({s for s in starts if s is not None})]
    return model.run_with_hooks(x, path + store), resid


def _run_from(model, x: Tensor, path: Hooks, hooks: Hooks, resid: dict[int, Tensor]) -> Tensor:
    """Intervened logits (B, T, V) with `path + hooks` attached: from the clean residual entering the
    first block `hooks` touch when there is one (GPT.forward's tail: blocks, ln_f, lm_head), else a
    full forward pass."""
    start = _start_layer(hooks)
    if start is None or start not in resid:
        return model.run_with_hooks(x, path + hooks)
    with model.hooks(path + hooks):
        h = resid[start]
        for block in model.blocks[start:]:
            h = block(h)
        return model.lm_head(model.ln_f(h))


def _log_probs(logits: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """(B, T, V) float32 log-probabilities of the next token and (B, T) loss (NLL of y)."""
    logp = logits.float().log_softmax(-1)
    return logp, -logp.gather(-1, y.unsqueeze(-1)).squeeze(-1)


class _Sums:
    """Running sums of per-position KL and Δloss on concept positions and elsewhere (float64)."""

    def __init__(self) -> None:
        self.kl = [0.0, 0.0]  # concept, elsewhere
        self.dloss = [0.0, 0.0]
        self.n = [0, 0]

    def add(self, kl: Tensor, dloss: Tensor, mask: Tensor) -> None:
        for side, m in enumerate((mask, ~mask)):
            self.kl[side] += kl[m].double().sum().item()
            self.dloss[side] += dloss[m].double().sum().item()
            self.n[side] += int(m.sum())

    def result(self, eps: float) -> dict:
        mean = lambda total, n: total / n if n else None  # noqa: E731
        n = sum(self.n)
        kl_c, kl_e = mean(self.kl[0], self.n[0]), mean(self.kl[1], self.n[1])
        dl_c, dl_e = mean(self.dloss[0], self.n[0]), mean(self.dloss[1], self.n[1])
        return {
            "kl": mean(sum(self.kl), n), "kl_concept": kl_c, "kl_elsewhere": kl_e,
            "dloss": mean(sum(self.dloss), n), "dloss_concept": dl_c, "dloss_elsewhere": dl_e,
            "specificity": None if dl_c is None or dl_e is None else dl_c / max(abs(dl_e), eps),
            "kl_ratio": None if kl_c is None or kl_e is None else kl_c / max(kl_e, eps),
            "n_concept": self.n[0], "n_elsewhere": self.n[1],
        }


def _batches(windows: Tensor, batch_size: int | None, vocab_size: int):
    """Slices of windows; batch_size None: as many windows as keep a (b, T, V) float32 tensor within
    2^26 elements (256 MB), so a large vocabulary does not blow up memory."""
    if batch_size is None:
        batch_size = max(1, (1 << 26) // max(1, (windows.shape[1] - 1) * vocab_size))
    for start in range(0, windows.shape[0], batch_size):
        yield slice(start, start + batch_size)


def _accumulate(clean: tuple[Tensor, Tensor], logits: Tensor, y: Tensor, masks: Sequence[Tensor],
                sums: Sequence[_Sums]) -> None:
    """Add one intervened batch's per-position KL and Δloss to each (mask, sums)."""
    logp_clean, nll_clean = clean
    logp, nll = _log_probs(logits, y)
    # KL(clean || intervened) per position, (B, T); clipped at 0 (float32 rounding can make a ~0 KL slightly negative)
    kl = (logp_clean.exp() * (logp_clean - logp)).sum(-1).clamp_min(0)
    dloss = nll - nll_clean  # (B, T)
    for acc, mask in zip(sums, masks):
        acc.add(kl, dloss, mask)


class _EvalMode:
    def __init__(self, model) -> None:
        self.model = model

    def __enter__(self):
        self.was_training = self.model.training
        self.model.eval()
        self.grad = torch.is_grad_enabled()
        torch.set_grad_enabled(False)

    def __exit__(self, *exc) -> None:
        torch.set_grad_enabled(self.grad)
        self.model.train(self.was_training)


def intervention_effect(model, windows: Tensor, concept_mask: Tensor, hooks: Hooks, batch_size: int | None = None,
                        eps: float = 1e-4) -> dict:
    """How an intervention changes next-token prediction, on concept positions and elsewhere.

    windows: (B, T + 1) token ids (x = windows[:, :-1], y = windows[:, 1:]); concept_mask: (B, T) bool
    over the input positions; hooks: [(hook_name, fn)] as from `make_hook`. Returns (means over positions;
    None where a side has no positions):

    - kl, kl_concept, kl_elsewhere: KL(clean || intervened) of the next-token distribution, in nats;
    - dloss, dloss_concept, dloss_elsewhere: loss_intervened - loss_clean (cross-entropy of y), in nats;
    - specificity = dloss_concept / max(|dloss_elsewhere|, eps): concept damage per unit of collateral
      damage; the denominator is floored at `eps` so an intervention with no effect elsewhere gives a
      large finite number, not inf (read it with the raw dloss values, which are also returned);
    - kl_ratio = kl_concept / max(kl_elsewhere, eps), the same guard;
    - n_concept, n_elsewhere: position counts.

    The model runs in eval mode without gradient. Each batch of windows (`batch_size`; None: as many
    as keep a (b, T, V) float32 tensor within 2^26 elements) gets one clean and one intervened forward
    pass; the intervened one starts from the clean residual stream entering the first block a hook
    touches (the blocks before it would compute the same thing). The per-position KL is clipped at 0
    (float32 rounding can make a vanishing KL slightly negative)."""
    with _EvalMode(model):
        windows, concept_mask = torch.as_tensor(windows), torch.as_tensor(concept_mask)
        _check_windows(windows, [concept_mask])
        device = _device(model)
        windows, concept_mask = windows.to(device).long(), concept_mask.to(device).bool()
        path = _path_hooks(model)
        sums = _Sums()
        hooks = list(hooks)
        for b in _batches(windows, batch_size, model.lm_head.weight.shape[0]):
            x, y = windows[b, :-1], windows[b, 1:]
            logits, resid = _clean_run(model, x, path, [_start_layer(hooks)])
            clean = _log_probs(logits, y)
            _accumulate(clean, _run_from(model, x, path, hooks, resid), y, [concept_mask[b]], [sums])
        return sums.result(eps)


# --- direct logit effect --------------------------------------------------------------------------
def _token_text(tokenizer, i: int) -> str:
    if isinstance(tokenizer, Sequence) and not isinstance(tokenizer, str):
        return tokenizer[i]  # a list of vocab strings (dashboards.vocab_strings)
    if getattr(tokenizer, "kind", None) == "byte":
        text = chr(i) if 32 <= i < 127 or i in (9, 10) else f"<x{i:02X}>"
    else:
        text = tokenizer.decode([i])
    return text.replace("\n", "↵").replace("\t", "⇥")


@torch.no_grad()
def unit_logit_effect(model, layer: int, unit: int, top: int = 10, tokenizer=None) -> dict:
    """A unit's direct effect on the output logits, per unit of its activation:

        effect = (direction * ln_f.weight) @ lm_head.weight.T          (V,)

    with direction = w_out[u] (routed) or down.weight[:, j] (dense). It follows the unit's output
    straight to the unembedding through the final LayerNorm's *weight* only: the LayerNorm's
    normalisation (mean removal and division by the residual's std, which depend on the whole
    residual stream at that position) and its bias (the same for every unit) are left out, as are
    all paths through later blocks. So it is a direction, not a prediction of the logit change.

    Returns boosted / suppressed: the `top` token ids with the largest / most negative effect, in
    order, with their effects (boosted_logits / suppressed_logits), and boosted_text /
    suppressed_text when a tokenizer (or a list of vocab strings) is given. Computed in float64."""
    return dict(direction_logit_effect(model, unit_direction(model, layer, unit), top, tokenizer),
                layer=layer, unit=unit)


@torch.no_grad()
def direction_logit_effect(model, direction: Tensor, top: int = 10, tokenizer=None) -> dict:
    """`unit_logit_effect` for any residual-stream direction (d,), e.g. an SAE latent's decoder row
    mapped through the MLP's down projection."""
    w_ln = model.ln_f.weight.detach().double()
    effect = model.lm_head.weight.detach().double() @ (direction.detach().to(w_ln) * w_ln)  # (V,)
    top = min(top, effect.numel())
    up, down = effect.topk(top), (-effect).topk(top)
    out = {
        "boosted": up.indices.tolist(), "boosted_logits": up.values.tolist(),
        "suppressed": down.indices.tolist(), "suppressed_logits": (-down.values).tolist(),
    }
    if tokenizer is not None:
        out["boosted_text"] = [_token_text(tokenizer, i) for i in out["boosted"]]
        out["suppressed_text"] = [_token_text(tokenizer, i) for i in out["suppressed"]]
    return out


# --- many units, concepts and kinds ---------------------------------------------------------------
def _firing_values_from_acts(acts, layer: int, unit: int, q: float) -> float | None:
    if acts is None:
        return None
    if isinstance(acts, dict):
        acts = acts.get(layer)
        if acts is None:
            return None
    elif getattr(acts, "layer", layer) != layer:
        return None
    return firing_value(acts.matrix[:, unit], q)


def _firing_values_from_windows(model, windows: Tensor, wanted: dict[int, list[int]], q: float,
                                batch_size: int | None) -> dict[tuple[int, int], float]:
    """Each wanted unit's firing value over the windows' input positions (one forward per batch)."""
    found: dict[tuple[int, int], list[Tensor]] = {(l, u): [] for l, units in wanted.items() for u in units}

    def collector(layer: int, units: list[int]):
        ids = torch.tensor(units, device=windows.device)

        def collect(act, hook):
            if isinstance(act, SparseActivations):
                for u in units:
                    found[(layer, u)].append(act.values[act.indices == u].float().cpu())
            else:
                cols = act[..., ids].reshape(-1, len(units)).float().cpu()
                for c, u in enumerate(units):
                    found[(layer, u)].append(cols[:, c])
            return None

        return collect

    hooks = [(f"blocks.{l}.mlp.hook_post", collector(l, units)) for l, units in wanted.items()]
    for b in _batches(windows, batch_size, model.lm_head.weight.shape[0]):
        model.run_with_hooks(windows[b, :-1], hooks)
    return {key: firing_value(torch.cat(vals) if vals else torch.zeros(0), q) for key, vals in found.items()}


def specificity_table(model, windows: Tensor, labels_by_concept: dict[str, Tensor],
                      units_by_concept: dict[str, list[tuple[int, int]]], acts=None,
                      kinds: Sequence[str] = KINDS, q: float = 0.9, alpha: float | None = None,
                      batch_size: int | None = None, eps: float = 1e-4) -> list[dict]:
    """Ablate / clamp / steer each concept's units and measure specificity for that concept.

    windows: (B, T + 1) token ids; labels_by_concept: concept -> (B, T) bool mask over input
    positions; units_by_concept: concept -> [(layer, unit), ...] (e.g. its top units). acts: where to
    take clamp values from: a UnitActivations (its `.layer`), a dict layer -> UnitActivations, or
    None to measure them on the windows (one extra forward per batch). Clamp value = firing_value(q)
    of the unit; steering adds alpha, default that same firing value (the unit "on" everywhere, on
    top of what it has). Returns one row per (concept, layer, unit, kind):

        concept, layer, unit, kind, value (clamp value / alpha; None for ablate), kl, dloss_concept,
        dloss_elsewhere, specificity, then the rest of `intervention_effect`'s keys.

    Each batch of windows gets one clean forward pass shared by all interventions, and one forward
    pass per distinct (layer, unit, kind) shared by the concepts that list it."""
    for kind in kinds:
        if kind not in KINDS:
            raise MonorouteError(f"unknown intervention kind {kind!r}; choose one of {', '.join(KINDS)}")
    missing = sorted(set(units_by_concept) - set(labels_by_concept))
    if missing:
        raise MonorouteError(f"no concept mask for {', '.join(missing)}; labels_by_concept has "
                             f"{', '.join(sorted(labels_by_concept)) or 'none'}")
    with _EvalMode(model):
        device = _device(model)
        windows = torch.as_tensor(windows).to(device).long()
        masks = {c: torch.as_tensor(labels_by_concept[c]).to(device).bool() for c in units_by_concept}
        _check_windows(windows, masks.values())
        units = list(dict.fromkeys((int(l), int(u)) for lst in units_by_concept.values() for l, u in lst))
        for l, u in units:
            unit_direction(model, l, u)  # range checks before any work

        # values: clamp value (and default alpha) per unit
        values: dict[tuple[int, int], float] = {}
        need = [(l, u) for l, u in units if "clamp" in kinds or ("steer" in kinds and alpha is None)]
        for l, u in need:
            v = _firing_values_from_acts(acts, l, u, q)
            if v is not None:
                values[(l, u)] = v
        todo: dict[int, list[int]] = {}
        for l, u in need:
            if (l, u) not in values:
                todo.setdefault(l, []).append(u)
        if todo:
            values.update(_firing_values_from_windows(model, windows, todo, q, batch_size))

        # one intervention per (layer, unit, kind), shared by the concepts that list the unit
        plan: list[dict] = []
        for l, u in units:
            for kind in kinds:
                value = None if kind == "ablate" else values[(l, u)] if kind == "clamp" else \
                    (alpha if alpha is not None else values[(l, u)])
                hooks = make_hook(model, l, u, kind, value=value, alpha=value)
                concepts = [c for c, lst in units_by_concept.items() if (l, u) in {(int(a), int(b)) for a, b in lst}]
                plan.append(dict(layer=l, unit=u, kind=kind, value=value, hooks=hooks, concepts=concepts,
                                 sums=[_Sums() for _ in concepts]))

        path = _path_hooks(model)
        for b in _batches(windows, batch_size, model.lm_head.weight.shape[0]):
            x, y = windows[b, :-1], windows[b, 1:]
            logits, resid = _clean_run(model, x, path, [_start_layer(item["hooks"]) for item in plan])
            clean = _log_probs(logits, y)
            for item in plan:
                logits = _run_from(model, x, path, item["hooks"], resid)
                _accumulate(clean, logits, y, [masks[c][b] for c in item["concepts"]], item["sums"])

        rows = []
        for concept, lst in units_by_concept.items():
            for l, u in dict.fromkeys((int(a), int(b)) for a, b in lst):
                for item in plan:
                    if (item["layer"], item["unit"]) != (l, u):
                        continue
                    res = item["sums"][item["concepts"].index(concept)].result(eps)
                    row = {"concept": concept, "layer": l, "unit": u, "kind": item["kind"], "value": item["value"],
                           "kl": res.pop("kl"), "dloss_concept": res.pop("dloss_concept"),
                           "dloss_elsewhere": res.pop("dloss_elsewhere"), "specificity": res.pop("specificity")}
                    row.update(res)
                    rows.append(row)
        return rows
