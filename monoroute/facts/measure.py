"""The fact measurements: recall and stored bits, erase, edit, entity selectivity.

Everything reads a model through its hook points (facts.sites), so it works on any run, dense or
routed, and on a dense model with an SAE or transcoder spliced in.

- recall: multiple-choice accuracy (score.py) per attribute, on a training template and on the
  held-out template family (extraction). Stored knowledge in bits, Allen-Zhu & Li's way of
  counting what the model's distribution over values gives away: per attribute
  P · max(0, log2 V − mean cross-entropy of the true value in bits), summed over attributes.
- erase: per known fact, units are ranked by attribution (act × grad of the true value's
  log-probability among the candidates, summed over the prompt's positions, every site); the
  smallest K such that zeroing the top K makes the model lose the fact — the true value's
  probability among the candidates falls below chance, 1/V, so a fact known by a thin margin is
  not "erased" by nudging it off the top — is found by doubling then bisection. Specificity under that ablation: the share of control facts the model knew that it
  still knows: the same person's other attributes, and other people's facts.
- edit: the erase set's output rows (a routed unit's w_out row, a dense neuron's down column, a
  latent's decoder row) are optimised so that a new value wins on the prompt; success means it
  also wins on a paraphrase (another training template); specificity as for erase.
- entity selectivity: on unseen renderings of every biography's sentences, per unit the share of
  its firings (activation > 0) on the person it fires most on (precision) and the share of that
  person's positions it fires on (recall); a person has a dedicated unit when some unit has
  precision ≥ 0.9 and recall ≥ 0.5. A person's positions are those from the last byte of the
  name on (before it, nothing in a sentence says who it is about).
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from monoroute.data.facts import FactsWorld, render
from monoroute.facts.score import Encoded, correct, encode_query, score_queries, score_sequences, sequences
from monoroute.facts.sites import Attribution, Site, ablate, active_units, attached

MIN_FIRINGS = 20  # a unit's selectivity is read only from this many firings on (as purity does)
DEDICATED_PRECISION, DEDICATED_RECALL = 0.9, 0.5


@dataclass
class Subject:
    """The model measured: its sites and any splice hooks (SAE / transcoder) that are always on."""

    model: object
    tokenizer: object
    sites: list[Site]

    @property
    def device(self):
        return next(self.model.parameters()).device

    def splice(self) -> list:
        return [h for s in self.sites for h in s.splice]

    def forward(self, idx: Tensor) -> Tensor:
        with self.model.hooks(self.splice()):
            return self.model(idx)[0]

    def ablated(self, ablation: dict[int, Tensor] | None):
        """Context: the given units (site index -> unit ids) zeroed on every position."""
        return attached([(self.sites[i], (lambda u: (lambda act: ablate(act, u)))(units))
                         for i, units in (ablation or {}).items() if len(units)])

    def scores(self, encoded: list[Encoded], ablation: dict[int, Tensor] | None = None) -> list[Tensor]:
        """Candidate scores per query, with the given units zeroed."""
        with torch.no_grad(), self.ablated(ablation):
            return score_queries(self.forward, encoded, self.device)


def sample_facts(world: FactsWorld, n: int | None, seed: int) -> list[tuple[int, int]]:
    facts = [(p, a) for p in range(world.n_people) for a in range(len(world.attributes))]
    if n is None or n >= len(facts):
        return facts
    return random.Random(f"facts-sample-{seed}").sample(facts, n)


# --- recall --------------------------------------------------------------------------------------

def recall(subject: Subject, world: FactsWorld, facts: list[tuple[int, int]], family: str = "train") -> dict:
    """Accuracy per attribute and overall, and the stored bits, on `facts` (all or a sample), each beside
    the person-blind floor (FactsWorld.prior): the accuracy of answering every attribute's most common
    value on the same facts, and the bits a person-blind distribution gives away. Bits above the prior
    count only what the model knows about the person: P · max(0, H(value frequencies) − cross-entropy)."""
    queries = [world.query(p, a, family) for p, a in facts]
    encoded = [encode_query(subject.tokenizer, q) for q in queries]
    prior = world.prior()
    right = {a.name: [] for a in world.attributes}
    blind = {a.name: [] for a in world.attributes}
    ce_bits = {a.name: [] for a in world.attributes}
    for at in range(0, len(encoded), 64):
        chunk = encoded[at:at + 64]
        for enc, s in zip(chunk, subject.scores(chunk)):
            a = enc.query.attribute
            name = world.attributes[a].name
            right[name].append(correct(s, enc.true))
            blind[name].append(enc.query.value == prior[a]["mode"])
            ce_bits[name].append(-float(s.double().log_softmax(0)[enc.true]) / math.log(2))
    per_attr, bits, above, prior_bits = {}, 0.0, 0.0, 0.0
    for a, attr in enumerate(world.attributes):
        if not right[attr.name]:
            continue
        ce = float(np.mean(ce_bits[attr.name]))
        h = prior[a]["entropy_bits"]
        stored = world.n_people * max(0.0, math.log2(len(attr.values)) - ce)
        per_attr[attr.name] = {"accuracy": float(np.mean(right[attr.name])),
                               "prior_accuracy": float(np.mean(blind[attr.name])), "uniform_chance": 1 / len(attr.values),
                               "n": len(right[attr.name]), "cross_entropy_bits": ce, "prior_entropy_bits": h,
                               "bits": stored, "bits_above_prior": world.n_people * max(0.0, h - ce)}
        bits += stored
        above += per_attr[attr.name]["bits_above_prior"]
        prior_bits += world.n_people * (math.log2(len(attr.values)) - h)
    everything = [r for v in right.values() for r in v]
    capacity = sum(world.n_people * math.log2(len(a.values)) for a in world.attributes)
    accuracy = float(np.mean(everything)) if everything else None
    prior_acc = float(np.mean([b for v in blind.values() for b in v])) if everything else None
    return {"family": family, "accuracy": accuracy, "prior_accuracy": prior_acc,
            "above_prior": None if accuracy is None else accuracy - prior_acc, "n_facts": len(everything),
            "facts_recalled": (accuracy or 0.0) * world.n_people * len(world.attributes),
            "bits": bits, "prior_bits": prior_bits, "bits_above_prior": above, "bits_possible": capacity,
            "per_attribute": per_attr}


# --- erase ---------------------------------------------------------------------------------------

def attribution(subject: Subject, encs: list[Encoded]) -> list[tuple[float, int, int]]:
    """(score, site index, unit) for every unit with positive attribution to the true value (summed over
    the prompts `encs`), best first."""
    totals = [torch.zeros(s.n_units, dtype=torch.float64) for s in subject.sites]
    for enc in encs:
        recorders = [Attribution(s.n_units) for s in subject.sites]
        with attached(list(zip(subject.sites, recorders))):
            seqs = sequences(enc)
            scores = score_sequences(subject.forward, seqs, subject.device)
            scores.log_softmax(0)[enc.true].backward()
        for i, rec in enumerate(recorders):
            totals[i] += rec.per_unit()
    ranked = []
    for i, per in enumerate(totals):
        units = (per > 0).nonzero().flatten()
        ranked.extend((float(per[u]), i, int(u)) for u in units)
    ranked.sort(key=lambda t: -t[0])
    return ranked


def as_ablation(ranked: list[tuple], k: int) -> dict[int, Tensor]:
    out: dict[int, list[int]] = {}
    for item in ranked[:k]:
        site, unit = item[-2], item[-1]
        out.setdefault(site, []).append(unit)
    return {s: torch.tensor(u) for s, u in out.items()}


def smallest_erasing(lost, n: int, max_units: int, start: int = 1) -> int | None:
    """The smallest K in start..min(n, max_units) with lost(K) true, by doubling then bisection (assumes
    that losing is monotone in K, as ablating more of the ranked units does, and that lost(start - 1) is
    false); None if lost(top) is false."""
    top = min(n, max_units)
    if top == 0 or start > top:
        return None
    k, prev = start, start - 1
    while not lost(k):
        if k == top:
            return None
        prev, k = k, min(2 * k, top)
    lo, hi = prev, k  # lost(hi), not lost(lo) (lo = 0: nothing ablated, the fact is known)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if lost(mid):
            hi = mid
        else:
            lo = mid
    return hi


def control_facts(world: FactsWorld, person: int, attribute: int, n_other: int, seed: int):
    same = [(person, a) for a in range(len(world.attributes)) if a != attribute]
    rng = random.Random(f"facts-controls-{seed}-{person}-{attribute}")
    others = [p for p in range(world.n_people) if p != person]
    other = [(p, rng.randrange(len(world.attributes))) for p in rng.sample(others, min(n_other, len(others)))]
    return same, other


class Controls:
    """Control queries, and whether the unablated model knows each (computed once per query)."""

    def __init__(self, subject: Subject, world: FactsWorld) -> None:
        self.subject, self.world = subject, world
        self.known: dict[tuple, bool] = {}
        self.value_logp: dict[tuple, float] = {}  # log p(true value | prompt), unablated
        self.encoded: dict[tuple, Encoded] = {}

    def enc(self, fact) -> Encoded:
        if fact not in self.encoded:
            self.encoded[fact] = encode_query(self.subject.tokenizer, self.world.query(*fact, "train"))
        return self.encoded[fact]

    def knows(self, facts) -> list[bool]:
        todo = [f for f in facts if f not in self.known]
        for f, s in zip(todo, self.subject.scores([self.enc(f) for f in todo]) if todo else []):
            self.known[f] = correct(s, self.enc(f).true)
        return [self.known[f] for f in facts]

    def retained(self, facts, ablation) -> float | None:
        """The share of the facts known unablated that are still known under the ablation (None: none known)."""
        known = [f for f, k in zip(facts, self.knows(facts)) if k]
        if not known:
            return None
        scores = self.subject.scores([self.enc(f) for f in known], ablation)
        return float(np.mean([correct(s, self.enc(f).true) for f, s in zip(known, scores)]))

    def drop(self, facts, ablation) -> float | None:
        """Mean drop in log p(true value | prompt) over every fact (known or not): how much the ablation
        hurts facts it was not chosen for. One sequence per fact (prompt + true value), not the multiple
        choice: 50 controls cost 50 sequences, not 50 x V."""
        if not facts:
            return None
        todo = [f for f in facts if f not in self.value_logp]
        if todo:
            for f, lp in zip(todo, self.true_value_logp(todo, None)):
                self.value_logp[f] = lp
        after = self.true_value_logp(facts, ablation)
        return float(np.mean([self.value_logp[f] - lp for f, lp in zip(facts, after)]))

    def true_value_logp(self, facts, ablation) -> list[float]:
        seqs = [(self.enc(f).prompt + self.enc(f).candidates[self.enc(f).true], len(self.enc(f).prompt)) for f in facts]
        with torch.no_grad(), self.subject.ablated(ablation):
            return score_sequences(self.subject.forward, seqs, self.subject.device).double().tolist()


def erase_prompts(world: FactsWorld, person: int, attribute: int) -> tuple[list, dict[str, list]]:
    """The selection prompts (two training templates: the one recall uses and the next) and the scoring
    prompts by family (the other training templates, the held-out family, QA where the world has it)."""
    n_t = len(world.attributes[attribute].templates)
    t0 = world.template_drawn(person, attribute)
    chosen = [t0, (t0 + 1) % n_t]
    select = [world.query(person, attribute, "train", template=t) for t in chosen]
    score = {"train_other": [world.query(person, attribute, "train", template=t) for t in range(n_t)
                             if t not in chosen],
             "heldout": [world.query(person, attribute, "heldout")]}
    if "qa" in world.families():
        score["qa"] = [world.query(person, attribute, "qa")]
    return select, score


def active_on(subject: Subject, encs: list[Encoded]) -> list[tuple[int, int]]:
    """Every (site, unit) active (> 0) somewhere on the prompts followed by their true value: the pool
    the random-K floor draws from, so it ablates units that take part in the computation."""
    pool: set[tuple[int, int]] = set()
    seen: list = [None] * len(subject.sites)
    recorders = [(s, (lambda i: (lambda act: seen.__setitem__(i, active_units(act))))(i))
                 for i, s in enumerate(subject.sites)]
    for enc in encs:
        ids = torch.tensor([enc.prompt + enc.candidates[enc.true]], device=subject.device)
        with torch.no_grad(), attached(recorders):
            subject.forward(ids)
        for i, (_, units) in enumerate(seen):
            pool.update((i, int(u)) for u in units.unique().tolist())
    return sorted(pool)


def erase(subject: Subject, world: FactsWorld, facts: list[tuple[int, int]], max_units: int = 4096,
          n_other: int = 50, seed: int = 0, n_random: int = 1, stop_after: int | None = None) -> dict:
    """Per fact known on both selection prompts: units ranked by attribution summed over the selection
    prompts; K = the smallest top-K whose ablation loses the fact on both (lost = true value below chance
    among the candidates). Scored where K was not chosen: lost on each scoring prompt the model knew,
    and the mean drop in log p(true value) over n_other other people's facts and the person's other
    attributes, all of them, known or not (log p of the value after its prompt). Beside each, the random-K floor: K units drawn (n_random
    times) from those active on the selection prompts. K_everywhere: the smallest top-K (same ranking)
    that loses the fact on every prompt, selection and scoring (in-sample for K, reported as such)."""
    controls = Controls(subject, world)
    rng = random.Random(f"facts-erase-random-{seed}")
    rows = []
    for person, attribute in facts:
        if stop_after is not None and len(rows) >= stop_after:
            break
        select_q, score_q = erase_prompts(world, person, attribute)
        select = [encode_query(subject.tokenizer, q) for q in select_q]
        if not all(correct(s, e.true) for e, s in zip(select, subject.scores(select))):
            continue
        scoring = {fam: [encode_query(subject.tokenizer, q) for q in qs] for fam, qs in score_q.items()}
        known_scoring = {fam: [e for e, s in zip(encs, subject.scores(encs)) if correct(s, e.true)]
                         for fam, encs in scoring.items()}
        ranked = attribution(subject, select)

        def lost_on(encs, ablation):
            return [below_chance(subject, e, ablation) for e in encs]

        k = smallest_erasing(lambda k: all(lost_on(select, as_ablation(ranked, k))), len(ranked), max_units)
        row = {"person": person, "attribute": world.attributes[attribute].name, "units": k, "ranked": len(ranked),
               "known_scoring": {f: len(e) for f, e in known_scoring.items()}}
        if k is not None:
            ablation = as_ablation(ranked, k)
            same, other = control_facts(world, person, attribute, n_other, seed)
            row["lost"] = {f: (float(np.mean(lost_on(e, ablation))) if e else None) for f, e in known_scoring.items()}
            row["drop_other"] = controls.drop(other, ablation)
            row["drop_same_person"] = controls.drop(same, ablation)
            row["specificity_other"] = controls.retained(other, ablation)
            row["sites"] = sorted({subject.sites[s].label for s in ablation})
            row["unit_ids"] = [[subject.sites[s].label, int(u)] for _, s, u in ranked[:k]]
            everywhere = select + [e for encs in known_scoring.values() for e in encs]
            # it includes the selection prompts, so it is at least K: the search starts there
            row["units_everywhere"] = smallest_erasing(lambda kk: all(lost_on(everywhere, as_ablation(ranked, kk))),
                                                       len(ranked), max_units, start=k)
            pool = active_on(subject, select)
            floor = []
            for _ in range(n_random):
                drawn = rng.sample(pool, min(k, len(pool)))
                rand = as_ablation(drawn, len(drawn))
                floor.append({"lost_select": float(np.mean(lost_on(select, rand))),
                              "lost": {f: (float(np.mean(lost_on(e, rand))) if e else None)
                                       for f, e in known_scoring.items()},
                              "drop_other": controls.drop(other, rand),
                              "drop_same_person": controls.drop(same, rand)})
            row["random_k"] = floor
        rows.append(row)
    return summarise_erase(rows, max_units)


def below_chance(subject: Subject, enc: Encoded, ablation: dict[int, Tensor]) -> bool:
    """Lost: under the ablation the true value's probability among the candidates falls below chance
    (1/V), not only off the top, so a fact known by a thin margin is not "erased" by a nudge."""
    scores = subject.scores([enc], ablation)[0]
    return float(scores.double().log_softmax(0)[enc.true]) < math.log(1 / len(enc.candidates))


def paraphrase(world: FactsWorld, person: int, attribute: int):
    """A training template erase did not select on (its first scoring prompt): where an edit is scored."""
    return erase_prompts(world, person, attribute)[1]["train_other"][0]


def _mean(vals) -> float | None:
    vals = [v for v in vals if v is not None]
    return float(np.mean(vals)) if vals else None


def summarise_erase(rows: list[dict], max_units: int) -> dict:
    erased = [r for r in rows if r["units"] is not None]
    families = sorted({f for r in erased for f in r.get("lost", {})})
    floors = [fl for r in erased for fl in r.get("random_k", [])]

    # not erased within max_units counts as more than max_units in the median over every tried fact
    sizes = [r["units"] if r["units"] is not None else math.inf for r in rows]
    return {"n_facts": len(rows), "erased_share": len(erased) / len(rows) if rows else None,
            "median_units": float(np.median(sizes)) if rows else None,
            "median_units_erased": float(np.median([r["units"] for r in erased])) if erased else None,
            "median_units_everywhere": (float(np.median([r.get("units_everywhere") or math.inf for r in erased]))
                                        if erased else None),
            "max_units": max_units,
            "lost": {f: _mean(r["lost"].get(f) for r in erased) for f in families},
            "lost_floor": {f: _mean(fl["lost"].get(f) for fl in floors) for f in families},
            "lost_select_floor": _mean(fl["lost_select"] for fl in floors),
            "drop_other": _mean(r.get("drop_other") for r in erased),
            "drop_other_floor": _mean(fl["drop_other"] for fl in floors),
            "drop_same_person": _mean(r.get("drop_same_person") for r in erased),
            "drop_same_person_floor": _mean(fl["drop_same_person"] for fl in floors),
            "specificity_other": _mean(r.get("specificity_other") for r in erased),
            "facts": rows}


# --- edit ----------------------------------------------------------------------------------------

def edit(subject: Subject, world: FactsWorld, erase_rows: list[dict], n: int = 32, steps: int = 60,
         lr: float = 0.2, n_other: int = 20, seed: int = 0) -> dict:
    """Rewrite one fact at a time through its erase set's output rows; every edit is undone after."""
    labels = {s.label: i for i, s in enumerate(subject.sites)}
    controls = Controls(subject, world)
    rows = []
    for row in [r for r in erase_rows if r["units"] is not None][:n]:
        person, attribute = row["person"], [a.name for a in world.attributes].index(row["attribute"])
        values = world.attributes[attribute].values
        rng = random.Random(f"facts-edit-{seed}-{person}-{attribute}")
        old = world.values[person][attribute]
        new = rng.choice([v for v in range(len(values)) if v != old])
        prompts = [encode_query(subject.tokenizer, q)
                   for q in (world.query(person, attribute, "train"), paraphrase(world, person, attribute))]
        for enc in prompts:
            enc.true = new
        units: dict[int, list[int]] = {}
        for label, u in row["unit_ids"]:
            units.setdefault(labels[label], []).append(u)
        with rewritten(subject, units) as step:
            for _ in range(steps):
                scores = score_sequences(subject.forward, sequences(prompts[0]), subject.device)
                if correct(scores.detach(), new) and float(scores.detach().log_softmax(0)[new]) > math.log(0.9):
                    break
                step(-scores.log_softmax(0)[new], lr)
            with torch.no_grad():
                s_edit, s_para = subject.scores(prompts)
            same, other = control_facts(world, person, attribute, n_other, seed)
            spec_other, spec_same = (retained_after(controls, f) for f in (other, same))
        rows.append({"person": person, "attribute": row["attribute"], "new_value": values[new],
                     "units": row["units"], "success_prompt": correct(s_edit, new),
                     "success_paraphrase": correct(s_para, new),
                     "specificity_other": spec_other, "specificity_same_person": spec_same})
    if not rows:
        return {"n_edits": 0}

    def share(key):
        return float(np.mean([r[key] for r in rows]))

    def median(key):
        vals = [r[key] for r in rows if r[key] is not None]
        return float(np.median(vals)) if vals else None

    return {"n_edits": len(rows), "success": float(np.mean([r["success_prompt"] and r["success_paraphrase"]
                                                           for r in rows])),
            "success_prompt": share("success_prompt"), "success_paraphrase": share("success_paraphrase"),
            "specificity_other": median("specificity_other"),
            "specificity_same_person": median("specificity_same_person"), "edits": rows}


def retained_after(controls: Controls, facts) -> float | None:
    """Like Controls.retained, with the model as it is now (edited) against what it knew before."""
    known = [f for f, k in zip(facts, controls.knows(facts)) if k]
    if not known:
        return None
    with torch.no_grad():
        scores = controls.subject.scores([controls.enc(f) for f in known])
    return float(np.mean([correct(s, controls.enc(f).true) for f, s in zip(known, scores)]))


class rewritten:
    """Context: `step(loss, lr)` takes an Adam step on the given units' output rows only; on exit the
    rows are restored exactly."""

    def __init__(self, subject: Subject, units: dict[int, list[int]]) -> None:
        self.subject = subject
        self.items = [(subject.sites[i], torch.tensor(u, device=subject.sites[i].weight.device))
                      for i, u in units.items()]

    def __enter__(self):
        self.saved = [site.weight.detach().clone() for site, _ in self.items]
        self.grad_flags = [site.weight.requires_grad for site, _ in self.items]
        for site, _ in self.items:
            site.weight.requires_grad_(True)
        self.deltas = [torch.zeros_like(site.weight.detach().index_select(site.weight_dim, u)).requires_grad_(True)
                       for site, u in self.items]
        self.opt = torch.optim.Adam(self.deltas, lr=1.0)
        return self.step

    def step(self, loss: Tensor, lr: float) -> None:
        weights = [site.weight for site, _ in self.items]
        grads = torch.autograd.grad(loss, weights, allow_unused=True)
        for (site, u), g, d in zip(self.items, grads, self.deltas):
            g = torch.zeros_like(site.weight) if g is None else (g.to_dense() if g.is_sparse else g)
            d.grad = g.index_select(site.weight_dim, u)
        for group in self.opt.param_groups:
            # Adam's step is ~lr per coordinate: scale it to the rows' own size.
            group["lr"] = lr * float(np.mean([s.abs().mean().item() for s in self.saved]))
        self.opt.step()
        with torch.no_grad():
            for (site, u), d, orig in zip(self.items, self.deltas, self.saved):
                site.weight.index_copy_(site.weight_dim, u, orig.index_select(site.weight_dim, u) + d)

    def __exit__(self, *exc):
        with torch.no_grad():
            for (site, _), orig, flag in zip(self.items, self.saved, self.grad_flags):
                site.weight.copy_(orig)
                site.weight.requires_grad_(flag)
        return False


# --- entity selectivity --------------------------------------------------------------------------

def person_sentences(world: FactsWorld, tokenizer, exposure: int = 10**6):
    """Every person's sentences (unseen renderings, one template draw per attribute) as (ids, person,
    first person position): separator + sentence, the person's positions from the name's last byte."""
    out = []
    for p in range(world.n_people):
        rng = random.Random(f"facts-select-{world.spec.seed}-{p}-{exposure}")
        for a, attr in enumerate(world.attributes):
            text, spans = render(rng.choice(attr.templates), world.names[p], world.value(p, a), a, "")
            sep = list(tokenizer.boundary_ids())
            name_end = next(s.end for s in spans if s.kind == "name")
            out.append((sep + tokenizer.encode(text), p, len(sep) + name_end - 1))
    return out


def selectivity(subject: Subject, world: FactsWorld, batch: int = 256) -> dict:
    """Per site: units' precision on their top person, and the share of people with a dedicated unit."""
    sents = person_sentences(world, subject.tokenizer)
    n_people = world.n_people
    counts = [dict() for _ in subject.sites]  # per site: {(unit, person or -1): count}
    positions_of = np.zeros(n_people, dtype=np.int64)
    for lo in range(0, len(sents), batch):
        chunk = sents[lo:lo + batch]
        width = max(len(ids) for ids, _, _ in chunk)
        idx = torch.zeros(len(chunk), width, dtype=torch.long)
        owner = torch.full((len(chunk), width), -2, dtype=torch.long)  # -2 padding, -1 no person yet
        for row, (ids, p, first) in enumerate(chunk):
            idx[row, :len(ids)] = torch.tensor(ids)
            owner[row, :len(ids)] = -1
            owner[row, first:len(ids)] = p
            positions_of[p] += len(ids) - first
        seen: list = [None] * len(subject.sites)
        recorders = [(s, (lambda i: (lambda act: seen.__setitem__(i, active_units(act))))(i))
                     for i, s in enumerate(subject.sites)]
        with torch.no_grad(), attached(recorders):
            subject.forward(idx.to(subject.device))
        flat_owner = owner.reshape(-1).numpy()
        for i, (rows, units) in enumerate(seen):
            who = flat_owner[rows.cpu().numpy()]
            keep = who != -2
            pairs = np.stack([units.cpu().numpy()[keep], who[keep]], 1)
            uniq, cnt = np.unique(pairs, axis=0, return_counts=True)
            c = counts[i]
            for (u, w), n in zip(uniq.tolist(), cnt.tolist()):
                c[(u, w)] = c.get((u, w), 0) + n
    out = {s.label: site_selectivity(counts[i], positions_of, n_people, world.names)
           for i, s in enumerate(subject.sites)}
    return out | {"all_sites": combined_dedicated(counts, positions_of, n_people)}


def unit_tables(counts: dict, n_people: int):
    """per unit: total firings and {person: firings on that person's positions}."""
    total: dict[int, int] = {}
    by_person: dict[int, dict[int, int]] = {}
    for (u, w), n in counts.items():
        total[u] = total.get(u, 0) + n
        if w >= 0:
            by_person.setdefault(u, {})[w] = n
    return total, by_person


def dedicated_people(counts: dict, positions_of: np.ndarray, n_people: int) -> set[int]:
    total, by_person = unit_tables(counts, n_people)
    out = set()
    for u, people in by_person.items():
        for p, n in people.items():
            if n / total[u] >= DEDICATED_PRECISION and positions_of[p] and n / positions_of[p] >= DEDICATED_RECALL:
                out.add(p)
    return out


def site_selectivity(counts: dict, positions_of: np.ndarray, n_people: int, names: list[str] | None = None,
                     top: int = 3) -> dict:
    """Selectivity of one site; with `names`, also each unit's top people (units firing >= MIN_FIRINGS
    times: [name, firings on that person, total firings]) and each person's most selective unit."""
    total, by_person = unit_tables(counts, n_people)
    live = [u for u, n in total.items() if n >= MIN_FIRINGS]
    precision = [max(by_person.get(u, {0: 0}).values()) / total[u] for u in live]
    out = {"live_units": len(total), "units_min_firings": len(live),
           "median_top_person_share": float(np.median(precision)) if precision else None,
           "units_precision_ge_0.9": int(sum(p >= DEDICATED_PRECISION for p in precision)),
           "dedicated_people_share": len(dedicated_people(counts, positions_of, n_people)) / n_people}
    if names is not None:
        out["unit_people"] = {str(u): [[names[p], n, total[u]] for p, n in
                                       sorted(by_person.get(u, {}).items(), key=lambda t: -t[1])[:top]]
                              for u in live}
        best: dict[int, tuple] = {}
        for u, people in by_person.items():
            for p, n in people.items():
                score = (n / total[u]) * (n / positions_of[p] if positions_of[p] else 0.0)
                if score > best.get(p, (-1.0,))[0]:
                    best[p] = (score, u, n / total[u], n / positions_of[p] if positions_of[p] else 0.0)
        out["person_best_unit"] = {names[p]: {"unit": u, "precision": prec, "recall": rec}
                                   for p, (_, u, prec, rec) in sorted(best.items())}
    return out


def combined_dedicated(counts: list[dict], positions_of: np.ndarray, n_people: int) -> dict:
    people = set()
    for c in counts:
        people |= dedicated_people(c, positions_of, n_people)
    return {"dedicated_people_share": len(people) / n_people}
