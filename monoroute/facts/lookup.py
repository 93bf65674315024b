"""Where facts live: units at the value-lookup positions, and the routes a fact takes.

A fact is looked up where the model must produce its value: the last position of the prompt (it
predicts the value's first token) and the positions inside the value (each predicts the next). A
person's other positions say who the sentence is about, not what they know, so "fires on half of a
person's positions" (measure.selectivity) cannot find a unit that stores one fact. Here every fact
is rendered in each of its attribute's training templates (R ≥ 4 renderings), and per rendering the
units that fire anywhere on its lookup positions are collected:

- firing: a routed unit or an SAE / transcoder latent fires when selected with a value > 0; a dense
  neuron when its activation reaches its *own* high quantile (`quantile`, over all lookup positions)
  and is > 0, so "fires" means the same rarity for a GELU neuron as for a sparse unit, not "> 0"
  (about half of all positions).
- dedication: a fact has a dedicated unit when some unit fires on ≥ 3/4 of the fact's R renderings
  and ≥ `precision` of all the renderings it fires on are that fact's; read over all lookup positions
  and, separately, at the prompt's last position alone (before any byte of the value: inside the
  value a unit may be reading the value's spelling, which at small P is as unique as the fact).
- top-fact share: per unit firing on ≥ R renderings, the share of them on its most frequent fact.
- route overlap: the Jaccard similarity of the units firing at the lookup position (the prompt's last
  position) for one fact across templates, against the same attribute and template across people,
  and across both (different person, different template).

Every reading has a permutation floor: the renderings' fact labels shuffled within each attribute
and template (so each fake fact keeps one rendering per template but mixes people), the same
readings recomputed (mean of `n_perm` shuffles). A reading above its floor says the person matters.
"""
from __future__ import annotations

import math
import random
from collections import Counter, defaultdict

import numpy as np
import torch

from monoroute.data.facts import FactsWorld
from monoroute.facts.score import encode_query
from monoroute.facts.sites import attached
from monoroute.hooks import SparseActivations

DEDICATED_PRECISION = 0.9


def renderings(world: FactsWorld, tokenizer, facts: list[tuple[int, int]]):
    """[(fact index, template, token ids, first lookup position, last lookup position)]: each fact in
    every training template, followed by its true value; the lookup positions are the prompt's last
    and every value token but the last."""
    out = []
    for f, (p, a) in enumerate(facts):
        for t in range(len(world.attributes[a].templates)):
            enc = encode_query(tokenizer, world.query(p, a, "train", template=t))
            value = enc.candidates[enc.true][:-1]  # without the sentence's "."
            ids = enc.prompt + value
            out.append((f, t, ids, len(enc.prompt) - 1, len(ids) - 2))
    return out


def lookup_firing(subject, world: FactsWorld, facts: list[tuple[int, int]], quantile: float = 0.99,
                  batch: int = 128) -> tuple[list, list[list[set]], list[list[set]]]:
    """Per rendering (renderings()), per site: the units firing anywhere on its lookup positions, and
    the units firing at its first lookup position (the route)."""
    rend = renderings(world, subject.tokenizer, facts)
    n_sites = len(subject.sites)
    spans: list[list] = [[] for _ in range(n_sites)]  # per site, per rendering: (positions, n_units) dense or lists
    for lo in range(0, len(rend), batch):
        chunk = rend[lo:lo + batch]
        width = max(len(r[2]) for r in chunk)
        idx = torch.zeros(len(chunk), width, dtype=torch.long)
        for row, r in enumerate(chunk):
            idx[row, :len(r[2])] = torch.tensor(r[2])
        seen: list = [None] * n_sites
        recorders = [(s, (lambda i: (lambda act: seen.__setitem__(i, act)))(i)) for i, s in enumerate(subject.sites)]
        with torch.no_grad(), attached(recorders):
            subject.forward(idx.to(subject.device))
        for i, act in enumerate(seen):
            for row, (_, _, _, first, last) in enumerate(chunk):
                if isinstance(act, SparseActivations):
                    ids = act.indices[row, first:last + 1].cpu()
                    vals = act.values[row, first:last + 1].float().cpu()
                    spans[i].append([set(ids[j][vals[j] > 0].tolist()) for j in range(ids.shape[0])])
                else:
                    spans[i].append(act[row, first:last + 1].float().cpu())
    fire: list[list[set]] = [[set() for _ in subject.sites] for _ in rend]
    route: list[list[set]] = [[set() for _ in subject.sites] for _ in rend]
    for i in range(n_sites):
        if spans[i] and isinstance(spans[i][0], torch.Tensor):
            allpos = torch.cat(spans[i])  # (positions, N)
            if allpos.numel() > 8_000_000:  # torch.quantile's input limit: a seeded sample of positions
                g = torch.Generator().manual_seed(0)
                allpos = allpos[torch.randperm(allpos.shape[0], generator=g)[:8_000_000 // allpos.shape[1]]]
            thr = torch.quantile(allpos, quantile, dim=0) if allpos.shape[0] > 1 else allpos[0]
            for r, a in enumerate(spans[i]):
                on = (a >= thr) & (a > 0)  # (positions, N)
                fire[r][i] = set(on.any(0).nonzero().flatten().tolist())
                route[r][i] = set(on[0].nonzero().flatten().tolist())
        else:
            for r, per_pos in enumerate(spans[i]):
                fire[r][i] = set().union(*per_pos) if per_pos else set()
                route[r][i] = per_pos[0] if per_pos else set()
    return rend, fire, route


def dedication(labels: list[int], fire: list[set], n_facts: int, n_renders: list[int], min_share: float = 0.75,
               precision: float = DEDICATED_PRECISION) -> dict:
    """labels[r]: the fact of rendering r; fire[r]: its firing units (hashable ids). A fact is dedicated
    when a unit fires on >= min_share of its renderings and >= precision of that unit's renderings are
    the fact's."""
    per_unit: dict = defaultdict(Counter)
    for f, units in zip(labels, fire):
        for u in units:
            per_unit[u][f] += 1
    dedicated = set()
    top_shares = []
    r_min = min(n_renders) if n_renders else 1
    for u, counts in per_unit.items():
        total = sum(counts.values())
        f, n = counts.most_common(1)[0]
        if total >= r_min:
            top_shares.append(n / total)
        if n >= math.ceil(min_share * n_renders[f]) and n / total >= precision:
            dedicated.add(f)
    return {"dedicated_facts_share": len(dedicated) / n_facts if n_facts else None,
            "dedicated": sorted(dedicated),
            "median_top_fact_share": float(np.median(top_shares)) if top_shares else None,
            "units_scored": len(top_shares), "units_firing": len(per_unit)}


def jaccard(a: set, b: set) -> float | None:
    return len(a & b) / len(a | b) if a | b else None


def overlap(rend: list, labels: list[int], route: list[set], facts: list[tuple[int, int]], n_pairs: int,
            rng: random.Random) -> dict:
    """Mean Jaccard of routes: same fact across templates; same attribute and template across people;
    same attribute, different person and template (what same-fact would be if the person did not matter)."""
    by_fact: dict = defaultdict(list)
    by_attr_t: dict = defaultdict(list)
    by_attr: dict = defaultdict(list)
    for r, (_, t, *_rest) in enumerate(rend):
        f = labels[r]
        by_fact[f].append(r)
        by_attr_t[(facts[f][1], t)].append(r)
        by_attr[facts[f][1]].append(r)
    same_fact = [jaccard(route[x], route[y]) for rs in by_fact.values() for i, x in enumerate(rs) for y in rs[i + 1:]]
    same_t, cross = [], []
    groups = [g for g in by_attr_t.values() if len(g) > 1]
    attrs = [g for g in by_attr.values() if len(g) > 1]
    for _ in range(n_pairs if groups else 0):
        x, y = rng.sample(rng.choice(groups), 2)
        if labels[x] != labels[y] and facts[labels[x]][0] != facts[labels[y]][0]:
            same_t.append(jaccard(route[x], route[y]))
    for _ in range(n_pairs if attrs else 0):
        x, y = rng.sample(rng.choice(attrs), 2)
        if facts[labels[x]][0] != facts[labels[y]][0] and rend[x][1] != rend[y][1]:
            cross.append(jaccard(route[x], route[y]))

    def mean(v):
        v = [x for x in v if x is not None]
        return float(np.mean(v)) if v else None

    js, jt, jc = mean(same_fact), mean(same_t), mean(cross)
    return {"same_fact_across_templates": js, "same_template_across_people": jt,
            "different_person_and_template": jc,
            "margin": None if js is None or jt is None else js - jt}


def permuted(rend: list, labels: list[int], facts: list[tuple[int, int]], rng: random.Random) -> list[int]:
    """Fact labels shuffled among the renderings of one attribute and template: each fake fact keeps one
    rendering per template, of a random person."""
    groups: dict = defaultdict(list)
    for r, (_, t, *_rest) in enumerate(rend):
        groups[(facts[labels[r]][1], t)].append(r)
    out = list(labels)
    for rs in groups.values():
        shuffled = [labels[r] for r in rs]
        rng.shuffle(shuffled)
        for r, lab in zip(rs, shuffled):
            out[r] = lab
    return out


def where_facts_live(subject, world: FactsWorld, facts: list[tuple[int, int]], quantile: float = 0.99,
                     n_perm: int = 5, n_pairs: int = 4000, seed: int = 0) -> dict:
    """Dedication, top-fact share and route overlap per site and over all sites, each beside its
    permutation floor."""
    rend, fire, route = lookup_firing(subject, world, facts, quantile)
    labels = [r[0] for r in rend]
    n_renders = [0] * len(facts)
    for f in labels:
        n_renders[f] += 1
    views = {s.label: ([x[i] for x in fire], [x[i] for x in route]) for i, s in enumerate(subject.sites)}
    views["all_sites"] = ([{(i, u) for i, us in enumerate(x) for u in us} for x in fire],
                          [{(i, u) for i, us in enumerate(x) for u in us} for x in route])
    out = {"facts": len(facts), "renderings": len(rend), "quantile": quantile, "n_perm": n_perm}
    for name, (f_sets, r_sets) in views.items():
        rng = random.Random(f"facts-lookup-{seed}-{name}")
        ded = dedication(labels, f_sets, len(facts), n_renders)
        ded_end = dedication(labels, r_sets, len(facts), n_renders)
        ov = overlap(rend, labels, r_sets, facts, n_pairs, rng)
        floors_d, floors_e, floors_o = [], [], []
        for _ in range(n_perm):
            perm = permuted(rend, labels, facts, rng)
            floors_d.append(dedication(perm, f_sets, len(facts), n_renders))
            floors_e.append(dedication(perm, r_sets, len(facts), n_renders))
            floors_o.append(overlap(rend, perm, r_sets, facts, n_pairs, rng))

        def fmean(rows, key):
            vals = [r[key] for r in rows if r[key] is not None]
            return float(np.mean(vals)) if vals else None

        out[name] = {"dedicated_facts_share": ded["dedicated_facts_share"],
                     "dedicated_facts_share_floor": fmean(floors_d, "dedicated_facts_share"),
                     # at the prompt's last position only: before any byte of the value, so a unit
                     # that reads the value's spelling (inside it) cannot pass for one that retrieves it
                     "dedicated_facts_share_prompt_end": ded_end["dedicated_facts_share"],
                     "dedicated_facts_share_prompt_end_floor": fmean(floors_e, "dedicated_facts_share"),
                     "median_top_fact_share": ded["median_top_fact_share"],
                     "median_top_fact_share_floor": fmean(floors_d, "median_top_fact_share"),
                     "units_firing": ded["units_firing"], "units_scored": ded["units_scored"],
                     "mean_firing_per_rendering": float(np.mean([len(s) for s in f_sets])) if f_sets else 0.0,
                     "route_overlap": ov,
                     "route_margin_floor": fmean(floors_o, "margin"),
                     "route_same_fact_floor": fmean(floors_o, "same_fact_across_templates"),
                     "dedicated": [list(facts[f]) for f in ded["dedicated"]][:50]}
    return out
