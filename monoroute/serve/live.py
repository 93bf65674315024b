"""The live prompt: which units fire on each token of a user's text, and what one unit does to the
next-token distribution and to a continuation when it is ablated, clamped or steered.

Works for every unit set of an analysed run:
- the model's own units (routed units, dense neurons): `interventions.make_hook`, exactly as
  `monoroute analyze` measures specificity;
- post-hoc latents (SAE, transcoder): interventions that keep the dictionary's error term, i.e. only
  the latent's own contribution changes: out = act + (target − a_i(x)) · d_i, with a_i(x) the latent's
  activation on this input and d_i its decoder row (ablate: target 0; clamp: target α). Steering
  adds α · (the latent's residual direction) to the MLP output, as for any unit.

Limits (requests past them get a 4xx, see app.py): MAX_PROMPT_CHARS characters, the model's context
(the last block_size − max_new_tokens tokens are kept), MAX_NEW_TOKENS generated tokens.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from monoroute.errors import MonorouteError

MAX_PROMPT_CHARS = 2000
MAX_NEW_TOKENS = 64
TOP_UNITS = 8  # units listed per token
TOP_NEXT = 10  # next-token candidates shown before / after
KINDS = ("ablate", "clamp", "steer")
CLEAN_CACHE = 32  # clean passes (next-token distribution + continuation) kept per store, oldest dropped first


class PromptError(ValueError):
    """A request the server answers with 400 (too long, empty, unknown unit, ...)."""


def encode_prompt(store, text: str, reserve: int = 0) -> tuple[list[int], bool]:
    """Token ids of `text` (the last block_size − reserve of them) and whether it was cut."""
    if not isinstance(text, str) or not text:
        raise PromptError("the prompt is empty; type some text")
    if len(text) > MAX_PROMPT_CHARS:
        raise PromptError(f"the prompt has {len(text)} characters; the limit is {MAX_PROMPT_CHARS}")
    try:
        ids = store.tokenizer.encode(text)
    except UnicodeEncodeError as exc:  # a lone surrogate such as "\ud800" has no UTF-8 form
        raise PromptError(f"the prompt holds a character that is not valid Unicode text "
                          f"({exc.object[exc.start:exc.end]!a} at position {exc.start}); remove it") from None
    if not ids:
        raise PromptError("the prompt encodes to no tokens")
    # At least one prompt token is kept: with reserve >= block_size, `ids[-0:]` would keep them all
    # (a 500 from the model). Generation crops its own context to block_size, so the reserve only
    # decides how much of the prompt the first positions see.
    room = max(1, store.model.cfg.block_size - reserve)
    return ids[-room:], len(ids) > room


def _extractor(store, set_name: str):
    """(hook names, cache -> (indices, values) (T, k') each) for one unit set."""
    from monoroute.interp.capture import model_unit_sets

    if set_name == store.own_set:
        s = model_unit_sets(store.model, layers=[store.layer], keep=TOP_UNITS)[0]
        return [s.hook], s.extract
    base = store.baseline(set_name)
    return base.hooks, base.extractor()


@torch.no_grad()
def token_units(store, text: str, set_name: str, top: int = TOP_UNITS) -> dict:
    """Per token of the prompt: its text and its `top` firing units [(unit, activation)], largest first."""
    ids, cut = encode_prompt(store, text)
    hooks, extract = _extractor(store, set_name)
    model = store.model
    x = torch.tensor([ids], device=next(model.parameters()).device)
    _, cache = model.run_with_cache(x, names_filter=hooks)
    idx, val = extract(cache)[:2]  # (T, k') each (a capped extractor adds its cap-hit count)
    val = val.float()
    order = val.argsort(dim=-1, descending=True)[:, :top]
    idx, val = idx.gather(-1, order), val.gather(-1, order)
    tokens = []
    for t, tok in enumerate(ids):
        units = [{"unit": int(u), "act": round(float(a), 4)} for u, a in zip(idx[t], val[t]) if a > 0]
        tokens.append({"token": store.strings[tok], "id": int(tok), "units": units})
    return {"tokens": tokens, "truncated": cut, "set": set_name, "layer": store.layer}


def _latent_hooks(store, set_name: str, unit: int, kind: str, alpha: float) -> list:
    """Error-preserving ablate / clamp of one SAE or transcoder latent (see the module docstring)."""
    base = store.baseline(set_name)
    d = store.direction(set_name, unit) if set_name == "transcoder" else base.W_dec[unit].detach()
    target = 0.0 if kind == "ablate" else float(alpha)
    seen: dict = {}

    def latent(x: Tensor) -> Tensor:
        idx, val = base.encode(x.to(base.device))
        return (val.float() * (idx == unit)).sum(-1)  # (T,)

    if set_name == "sae":  # reads and writes the same hook (the MLP's hidden activations)
        def edit(act, hook):
            a = latent(base.input_of({base.input_hook: act}))
            return act + ((target - a).view(*act.shape[:-1], 1) * d.to(act.dtype)).to(act.device)
        return [(base.input_hook, edit)]

    def remember(act, hook):
        seen["x"] = act

    def edit(act, hook):
        a = latent(base.input_of({base.input_hook: seen["x"]}))
        return act + ((target - a).view(*act.shape[:-1], 1) * d.to(act.dtype)).to(act.device)
    return [(base.input_hook, remember), (base.target_hook, edit)]


def intervention_hooks(store, set_name: str, unit: int, kind: str, alpha: float) -> list:
    from monoroute.interp.interventions import make_hook

    if kind not in KINDS:
        raise PromptError(f"unknown intervention {kind!r}; choose one of {', '.join(KINDS)}")
    if not math.isfinite(alpha) or abs(alpha) > 1e4:
        raise PromptError(f"alpha must be a finite number of magnitude at most 1e4, got {alpha}")
    try:
        store.check_unit(set_name, unit)
    except IndexError as exc:
        raise PromptError(str(exc)) from None
    if kind == "steer":
        direction = store.direction(set_name, unit)
        return [(f"blocks.{store.layer}.hook_mlp_out", lambda act, hook: act + alpha * direction.to(act))]
    if set_name == store.own_set:
        return make_hook(store.model, store.layer, unit, kind, value=alpha if kind == "clamp" else None)
    return _latent_hooks(store, set_name, unit, kind, alpha)


def _next(store, logits: Tensor) -> tuple[Tensor, list[dict]]:
    logp = torch.log_softmax(logits.double(), -1)
    top = logp.topk(TOP_NEXT)
    return logp, [{"token": store.strings[int(i)], "id": int(i), "p": round(float(p.exp()), 5)}
                  for p, i in zip(top.values, top.indices)]


@torch.no_grad()
def intervene(store, text: str, set_name: str, unit: int, kind: str, alpha: float = 0.0,
              max_new_tokens: int = 24) -> dict:
    """Next-token distribution after the prompt and a greedy continuation, clean and with the
    intervention applied at every position (prompt and generated tokens alike)."""
    from monoroute.models.gpt import generate

    if not isinstance(max_new_tokens, int) or not 0 <= max_new_tokens <= MAX_NEW_TOKENS:
        raise PromptError(f"max_new_tokens must be an integer from 0 to {MAX_NEW_TOKENS}, got {max_new_tokens}")
    ids, cut = encode_prompt(store, text, reserve=max_new_tokens)
    hooks = intervention_hooks(store, set_name, unit, kind, alpha)
    model = store.model
    was_training = model.training
    model.eval()
    try:
        x = torch.tensor([ids], device=next(model.parameters()).device)
        cache = store.__dict__.setdefault("_clean_passes", {})  # (prompt ids, max_new_tokens) -> clean pass
        key = (tuple(ids), max_new_tokens)
        if key not in cache:  # trying several units on one prompt reuses the clean pass
            clean_logp, clean_top = _next(store, model(x)[0][0, -1])
            seq = generate(model, x, max_new_tokens, temperature=1e-6, top_k=1)[0, len(ids):].tolist()
            cache[key] = (clean_logp, clean_top, store.tokenizer.decode(seq))
            while len(cache) > CLEAN_CACHE:
                cache.pop(next(iter(cache)))
        clean_logp, clean_top, clean_text = cache[key]
        with model.hooks(hooks):
            after_logp, after_top = _next(store, model(x)[0][0, -1])
            seq = generate(model, x, max_new_tokens, temperature=1e-6, top_k=1)[0, len(ids):].tolist()
        out = {"clean": clean_text, "intervened": store.tokenizer.decode(seq)}
    finally:
        model.train(was_training)
    kl = float((clean_logp.exp() * (clean_logp - after_logp)).sum())
    return {"before": clean_top, "after": after_top, "kl": kl, "continuation_before": out["clean"],
            "continuation_after": out["intervened"], "truncated": cut, "set": set_name, "unit": unit,
            "kind": kind, "alpha": alpha, "layer": store.layer}
