"""The synthetic-knowledge corpus and the fact measurements, on hand-checked and hand-built cases."""
import json
import math
from collections import Counter
from contextlib import contextmanager

import numpy as np
import pytest
import torch
from torch import nn

from monoroute.data.facts import ATTRIBUTES, FactsSpec, FactsWorld, Span, attribute_index, name_space, render
from monoroute.errors import MonorouteError
from monoroute.facts import measure
from monoroute.facts.score import encode_query, score_queries
from monoroute.facts.sites import Site, model_sites
from monoroute.hooks import HookPoint

FAST_TRAIN = ["--no-progress", "--device", "cpu", "--steps", "12", "--log-every", "4", "--eval-every", "6",
              "--eval-batches", "1", "--ckpt-every", "6", "--batch-size", "8"]


# --- the generator ---------------------------------------------------------------------------------

def test_render_spans_by_hand():
    text, spans = render("{n} works for {v}.", "Ann Bo", "X Labs", 5, "")
    assert text == "Ann Bo works for X Labs."
    assert spans == [Span(0, 6, "name", -1), Span(6, 17, "text", -1), Span(17, 23, "value", 5), Span(23, 24, "text", -1)]
    text, spans = render("The employer of {n} is {v}.", "Ann Bo", "X Labs", 5, "Hi.")
    assert text == "Hi.The employer of Ann Bo is X Labs."
    assert spans[1] == Span(19, 25, "name", -1) and spans[3] == Span(29, 35, "value", 5)


def test_biography_ground_truth():
    world = FactsWorld(FactsSpec.parse("people=4,exposures=3,seed=7"))
    assert len(set(world.names)) == 4
    orders = set()
    for p in range(4):
        for e in range(3):
            text, spans = world.biography(p, e)
            values = [s for s in spans if s.kind == "value"]
            assert sorted(s.attribute for s in values) == list(range(len(ATTRIBUTES)))  # every attribute once
            for s in values:
                assert text[s.start:s.end] == world.value(p, s.attribute)
            names = [s for s in spans if s.kind == "name"]
            assert len(names) == len(ATTRIBUTES) and all(text[s.start:s.end] == world.names[p] for s in names)
            assert "".join(text[s.start:s.end] for s in spans) == text  # the spans tile the text
            orders.add(tuple(s.attribute for s in values))
    assert len(orders) > 6  # the sentence order is shuffled per biography
    # the same spec gives the same world; another seed another
    assert FactsWorld(FactsSpec.parse("people=4,exposures=3,seed=7")).values == world.values
    assert FactsWorld(FactsSpec.parse("people=4,exposures=3,seed=8")).names != world.names


def test_queries_training_and_heldout_templates():
    world = FactsWorld(FactsSpec.parse("people=3"))
    a = attribute_index("birth_city")
    q = world.query(1, a, "heldout")
    assert q.prefix == f"{world.names[1]} is a native of " and q.value == world.value(1, a)
    for t, template in enumerate(ATTRIBUTES[a].templates):
        q = world.query(1, a, "train", template=t)
        assert template.replace("{n}", world.names[1]).replace("{v}", q.value) == q.prefix + q.value + "."
    # the held-out family never occurs in the training corpus
    corpus = " ".join(text for _, text in world.documents(0.1))
    for attr in ATTRIBUTES:
        assert attr.heldout.replace("{n}", world.names[0]).split("{v}")[0] not in corpus


def test_documents_split_and_token_store(tmp_path):
    from monoroute.data import DataConfig, prepare_data

    world = FactsWorld(FactsSpec.parse("people=3,exposures=2"))
    docs = list(world.documents(0.2))
    train = [k for k, _ in docs if k.fixed_split == "train"]
    val = [k for k, _ in docs if k.fixed_split == "val"]
    assert sorted(train) == sorted(f"p{p}/e{e}" for p in range(3) for e in range(2))
    assert val == ["p0/e2"]  # round(3 * 2 * 0.2) = 1 further rendering, never a training one
    store = prepare_data(DataConfig(source="facts:people=3,exposures=2", val_fraction=0.2, cache_dir=str(tmp_path)))
    expected = sum(len(t) + 2 for k, t in docs if k.fixed_split == "train")  # + the 2-byte separator
    assert store.n_tokens("train") == expected


@pytest.mark.parametrize("spec, message", [
    ("people=5,colour=3", "colour"), ("people=x", "integer"), ("people=0", ">= 1"),
    (f"people={name_space(0) + 1}", "name space"), (f"people={name_space(1) + 1},middle=1", "name space"),
    ("people", "KEY=INT"),
])
def test_bad_specs(spec, message):
    with pytest.raises(MonorouteError, match=message):
        FactsSpec.parse(spec)


def test_unknown_attribute():
    with pytest.raises(MonorouteError, match="unknown attribute 'shoe_size'"):
        attribute_index("shoe_size")


# --- scoring against a float64 reference --------------------------------------------------------------

def tiny_model(ffn="routed"):
    from monoroute.models.config import GPTConfig
    from monoroute.models.gpt import GPT

    cfg = GPTConfig(vocab_size=256, n_layer=2, n_head=2, d_model=32, block_size=96, ffn=ffn, n_units=256, k=8,
                    d_ff=64)
    return GPT(cfg).eval()


def test_scores_equal_float64_reference():
    from monoroute.data.tokenizers import ByteTokenizer

    torch.manual_seed(1)
    model = tiny_model()
    tok = ByteTokenizer()
    world = FactsWorld(FactsSpec.parse("people=2"))
    encoded = [encode_query(tok, world.query(p, a)) for p in range(2) for a in (0, 5)]
    with torch.no_grad():
        fast = score_queries(lambda idx: model(idx)[0], encoded, "cpu")
    ref_model = tiny_model()
    ref_model.load_state_dict(model.state_dict())
    ref_model.double()
    for enc, scores in zip(encoded, fast):
        for c, cand in enumerate(enc.candidates):
            ids = torch.tensor([enc.prompt + cand])
            with torch.no_grad():
                logp = ref_model(ids)[0][0].double().log_softmax(-1)
            ref = sum(float(logp[len(enc.prompt) - 1 + i, t]) for i, t in enumerate(cand))
            assert abs(float(scores[c]) - ref) < 2e-4
    # recall's accuracy and bits follow from those scores
    subject = measure.Subject(model, tok, model_sites(model))
    facts = [(p, a) for p in range(2) for a in (0, 5)]
    rec = measure.recall(subject, world, facts)
    right = [bool(s[e.true] > torch.cat([s[:e.true], s[e.true + 1:]]).max()) for e, s in zip(encoded, fast)]
    assert rec["accuracy"] == pytest.approx(np.mean(right))
    ce = np.mean([-float(s.double().log_softmax(0)[e.true]) / math.log(2) for e, s in zip(encoded[::2], fast[::2])])
    month = rec["per_attribute"]["birth_month"]
    assert month["cross_entropy_bits"] == pytest.approx(ce, rel=1e-5)
    assert month["bits"] == pytest.approx(2 * max(0.0, math.log2(12) - ce))


# --- erase on a hand-built model: one unit stores one fact ----------------------------------------------

class OneFactModel(nn.Module):
    """Byte logits that know every fact of a world directly (+12 on the next byte of the true value),
    except fact `stored` in the renderings `where` (template indices of the training family, and
    "heldout"), which only unit 0 of a 16-unit site knows: unit 0 is 1 on the lookup positions of those
    renderings (the prompt's last and the value's bytes) and there adds +24 to the next byte of the true
    value, while the direct path prefers a wrong value (+12). Units 1..15 fire everywhere and do nothing."""

    def __init__(self, world: FactsWorld, tokenizer, stored: tuple[int, int], where=None) -> None:
        super().__init__()
        self.world, self.tok, self.stored = world, tokenizer, stored
        self.point = HookPoint()
        self.unused = nn.Parameter(torch.zeros(16, 4))
        self.paths = {}
        n_t = len(world.attributes[stored[1]].templates)
        where = set(range(n_t)) | {"heldout"} if where is None else set(where)
        for p in range(world.n_people):
            for a in range(len(world.attributes)):
                for family in ("train", "heldout"):
                    for t in range(len(world.attributes[a].templates)):
                        q = world.query(p, a, family, template=t)
                        prompt = tuple(tokenizer.boundary_ids()) + tuple(tokenizer.encode(q.prefix))
                        values = world.attributes[a].values
                        own = (t if family == "train" else "heldout") in where
                        if (p, a) == stored and own:
                            wrong = values[(values.index(q.value) + 1) % len(values)]
                            self.paths[prompt] = [(tokenizer.encode(q.value + "."), True),
                                                  (tokenizer.encode(wrong + "."), False)]
                        else:
                            self.paths[prompt] = [(tokenizer.encode(q.value + "."), False)]

    @contextmanager
    def hooks(self, pairs):
        yield self

    def forward(self, idx):
        B, T = idx.shape
        logits = torch.zeros(B, T, 256)
        direct = torch.zeros(B, T, 256)
        boost = torch.zeros(B, T, 256)
        fire = torch.zeros(B, T, 16)
        fire[..., 1:] = 1.0
        for b in range(B):
            row = idx[b].tolist()
            for prompt, paths in self.paths.items():
                n = len(prompt)
                if tuple(row[:n]) != prompt:
                    continue
                for value, stored in paths:
                    for i, byte in enumerate(value):
                        t = n - 1 + i
                        if t >= T or (i and row[n + i - 1] != value[i - 1]):
                            break
                        if stored:
                            fire[b, t, 0] = 1.0
                            boost[b, t, byte] = 24.0
                        else:
                            direct[b, t, byte] = 12.0
        acts = self.point(fire)
        return logits + direct + acts[..., :1] * boost, None


def one_fact_subject(stored=(1, 2), where=None):
    from monoroute.data.tokenizers import ByteTokenizer

    world = FactsWorld(FactsSpec.parse("people=3"))
    tok = ByteTokenizer()
    model = OneFactModel(world, tok, stored, where)
    site = Site("dense_neurons", 0, 16, model.point, model.unused, 0)
    return world, measure.Subject(model, tok, [site])


def test_erase_finds_the_one_unit_scored_where_it_was_not_chosen():
    # positive control: unit 0 alone stores fact (1, 2) in every sentence
    world, subject = one_fact_subject()
    out = measure.erase(subject, world, [(1, 2), (0, 1)], max_units=16, n_other=6, n_random=8)
    stored, other = out["facts"]
    assert stored["units"] == 1 and stored["unit_ids"] == [["dense_neurons.L0", 0]]
    assert stored["units_everywhere"] == 1
    # chosen on two training templates, lost on the other two and on the held-out family
    assert stored["known_scoring"] == {"train_other": 2, "heldout": 1}
    assert stored["lost"] == {"train_other": 1.0, "heldout": 1.0}
    # nothing else moves: the drop in log p of other facts (all of them) is zero
    assert stored["drop_other"] == pytest.approx(0.0, abs=1e-6)
    assert stored["drop_same_person"] == pytest.approx(0.0, abs=1e-6)
    # random-K floor: 1 of the 16 units active on the selection prompts, 8 draws: it rarely hits unit 0
    lost_floor = np.mean([fl["lost"]["train_other"] for fl in stored["random_k"]])
    assert len(stored["random_k"]) == 8 and lost_floor < 0.5
    assert out["lost"]["train_other"] == 1.0 and out["lost_floor"]["train_other"] == pytest.approx(lost_floor)
    # a fact no unit stores cannot be erased: reported, and counted as more than max_units
    assert other["units"] is None and other["ranked"] == 0
    assert out["erased_share"] == 0.5 and out["median_units"] == math.inf


def test_erase_chosen_on_the_selection_prompts_need_not_hold_elsewhere():
    # negative control: unit 0 stores the fact only in the two selection templates' sentences; elsewhere
    # the direct path knows it. Erased where chosen (K = 1), never lost where scored.
    world, _ = one_fact_subject()
    t0 = world.template_drawn(1, 2)
    world, subject = one_fact_subject(where={t0, (t0 + 1) % 4})
    out = measure.erase(subject, world, [(1, 2)], max_units=16, n_other=6)
    (row,) = out["facts"]
    assert row["units"] == 1
    assert row["lost"] == {"train_other": 0.0, "heldout": 0.0}
    assert row["units_everywhere"] is None  # no ranked set loses it everywhere
    # a unit storing it only outside the selection prompts is not found at all (not known -> not tried
    # would be wrong: the fact is known on the selection prompts through the direct path, and nothing erases it)
    world, subject = one_fact_subject(where={(t0 + 2) % 4})
    (row,) = measure.erase(subject, world, [(1, 2)], max_units=16, n_other=6)["facts"]
    assert row["units"] is None


def test_recall_on_the_hand_built_model_and_its_person_blind_floor():
    world, subject = one_fact_subject()
    facts = [(p, a) for p in range(3) for a in range(len(ATTRIBUTES))]
    rec = measure.recall(subject, world, facts)
    assert rec["accuracy"] == 1.0
    # the person-blind floor, exact from the world: the most common value's share per attribute
    expect = np.mean([max(Counter(world.values[p][a] for p in range(3)).values()) / 3 for a in range(len(ATTRIBUTES))])
    assert rec["prior_accuracy"] == pytest.approx(expect) and rec["prior_accuracy"] >= 1 / 3
    assert rec["above_prior"] == pytest.approx(1.0 - expect)
    # bits above the prior never exceed the bits stored, and the two differ by at most the prior's bits
    assert rec["bits_above_prior"] <= rec["bits"] + 1e-9
    assert rec["bits"] - rec["bits_above_prior"] <= rec["prior_bits"] + 1e-6
    ablated = measure.Subject(subject.model, subject.tokenizer, subject.sites)
    scores = ablated.scores([encode_query(subject.tokenizer, world.query(1, 2))], {0: torch.tensor([0])})[0]
    assert not measure.correct(scores, ATTRIBUTES[2].values.index(world.value(1, 2)))


def test_person_blind_floor_matches_the_issue_numbers():
    # issue 30's figures for the first corpus: a model answering each attribute's most common value
    for people, floor in ((25, 0.127), (100, 0.073), (400, 0.047)):
        world = FactsWorld(FactsSpec.parse(f"people={people}"))
        assert np.mean([a["accuracy"] for a in world.prior()]) == pytest.approx(floor, abs=6e-4)


def test_smallest_erasing_search():
    calls = []

    def lost_from(k0):
        def lost(k):
            calls.append(k)
            return k >= k0
        return lost

    for k0 in (1, 2, 5, 37, 64, 100):
        assert measure.smallest_erasing(lost_from(k0), 100, 1000) == k0
    assert measure.smallest_erasing(lost_from(101), 100, 1000) is None  # never lost within the ranked units
    assert measure.smallest_erasing(lost_from(50), 100, 40) is None  # nor within max_units
    assert measure.smallest_erasing(lost_from(1), 0, 10) is None
    # a known lower bound (K everywhere >= K on the selection prompts) starts the search there
    calls.clear()
    assert measure.smallest_erasing(lost_from(37), 100, 1000, start=30) == 37 and min(calls) >= 30
    assert measure.smallest_erasing(lost_from(5), 100, 1000, start=5) == 5
    assert measure.smallest_erasing(lost_from(5), 10, 1000, start=11) is None


# --- selectivity on hand-built counts --------------------------------------------------------------------

def test_dedicated_people_by_hand():
    positions = np.array([20, 40, 10])
    counts = {(7, 0): 19, (7, -1): 1,  # precision 0.95, recall 0.95: person 0 has a dedicated unit
              (8, 1): 10,  # precision 1.0 but recall 10 / 40 = 0.25: not dedicated
              (9, 2): 9, (9, 1): 2}  # precision 9 / 11 = 0.82 < 0.9: not dedicated
    assert measure.dedicated_people(counts, positions, 3) == {0}
    sel = measure.site_selectivity(counts, positions, 3)
    assert sel["dedicated_people_share"] == pytest.approx(1 / 3)
    assert sel["live_units"] == 3 and sel["units_min_firings"] == 1  # only unit 7 fired >= 20 times
    assert sel["median_top_person_share"] == pytest.approx(0.95)


def test_selectivity_counts_on_the_hand_built_model():
    world, subject = one_fact_subject()
    out = measure.selectivity(subject, world)
    site = out["dense_neurons.L0"]
    # units 1..15 fire on every position of every sentence: their top person holds about 1/3 of it
    assert site["median_top_person_share"] < 0.4 and site["dedicated_people_share"] == 0.0


# --- edit keeps the model intact; the CLI end to end -------------------------------------------------------

def test_rewritten_restores_weights_exactly():
    model = tiny_model("dense").requires_grad_(False)  # as facts eval freezes it
    site = model_sites(model)[1]
    assert site.weight_dim == 1  # a dense neuron writes with a column of `down`
    before = site.weight.detach().clone()
    with measure.rewritten(measure.Subject(model, None, [site]), {0: [3, 5]}) as step:
        x = torch.randint(0, 256, (2, 10))
        for _ in range(3):
            step(model(x)[0].logsumexp(-1).mean(), 0.5)
        changed = (site.weight.detach() != before).any(0)
    assert changed.nonzero().flatten().tolist() == [3, 5]  # only the named rows moved
    assert torch.equal(site.weight.detach(), before) and not site.weight.requires_grad


def test_facts_cli(tmp_path, capsys):
    from monoroute.cli import main

    assert main(["facts", "make", "people=3,exposures=2", "--out", str(tmp_path / "corpus")]) == 0
    truth = json.loads((tmp_path / "corpus" / "truth.json").read_text())
    assert [p["name"] for p in truth["people"]] == FactsWorld(FactsSpec.parse("people=3")).names
    assert (tmp_path / "corpus" / "corpus.txt").read_text().count("\n\n") == 3 * 2 + 1 - 1  # 6 + 1 validation
    run = tmp_path / "run"
    short = tmp_path / "short"
    assert main(["train", "--preset", "tiny", "--data", "facts:people=3,exposures=20", "--out", str(short),
                 *FAST_TRAIN, "--steps", "2"]) == 0
    capsys.readouterr()
    assert main(["facts", "eval", str(short)]) == 2  # block_size 64: the queries do not fit
    assert "--block-size" in capsys.readouterr().err
    assert main(["train", "--preset", "tiny", "--data", "facts:people=3,exposures=20", "--block-size", "96",
                 "--out", str(run), *FAST_TRAIN]) == 0
    capsys.readouterr()
    assert main(["facts", "eval", str(run), "--facts", "0", "--erase", "2", "--edit", "1", "--json"]) == 0
    head = json.loads(capsys.readouterr().out)
    report = json.loads((run / "facts" / "units.json").read_text())
    assert report["recall"]["n_facts"] == 3 * len(ATTRIBUTES)
    assert head["recall"] == report["recall"]["accuracy"] and head["units"] == "routed_units"
    assert report["sites"] == ["routed_units.L0", "routed_units.L1"]
    # every reading beside its floor: the person-blind prior, the untrained model, random K, shuffled labels
    world = FactsWorld(FactsSpec.parse("people=3"))
    assert head["recall_prior"] == pytest.approx(np.mean([a["accuracy"] for a in world.prior()]))
    assert head["recall_untrained"] is not None and "recall_qa" not in report  # scheme 0 has no QA
    assert report["lookup"]["renderings"] == 3 * len(ATTRIBUTES) * 4
    assert {"dedicated_facts", "dedicated_facts_floor", "dedicated_facts_untrained", "route_margin",
            "route_margin_floor", "top_person_share_floor"} <= set(head)
    for row in report["erase"]["facts"]:
        if row["units"] is not None:
            assert row["random_k"] and set(row["lost"]) == {"train_other", "heldout"}


def test_facts_eval_refuses_other_corpora(tmp_path, capsys):
    from monoroute.cli import main

    run = tmp_path / "run"
    assert main(["train", "--preset", "tiny", "--max-bytes", "20000", "--out", str(run), *FAST_TRAIN]) == 0
    capsys.readouterr()
    assert main(["facts", "eval", str(run)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not a facts corpus" in err[0]
    assert not (run / "facts").exists()
    assert main(["facts", "make", "people=99999999", "--out", str(tmp_path / "c")]) == 2
    assert "name space" in capsys.readouterr().err and not (tmp_path / "c").exists()


def test_capacity_points_group_and_sort():
    from monoroute.facts.report import capacity_points

    reps = [{"run": f"runs/{m}-p{p}", "spec": f"facts:people={p},exposures=1,seed=0,middle=0",
             "recall": {"accuracy": acc, "facts_recalled": acc * p * 6}}
            for m, p, acc in (("dense", 200, 0.2), ("dense", 50, 0.6), ("routed", 50, 0.3), ("routed", 50, 0.5))]
    curves = capacity_points(reps, lambda r: r["run"].split("/")[1].split("-")[0])
    # two routed seeds at 50 people: their mean, and the min-max for the error bar
    assert curves == {"dense": [(50, 0.6, 180.0, 0.6, 0.6), (200, 0.2, 240.0, 0.2, 0.2)],
                      "routed": [(50, pytest.approx(0.4), pytest.approx(120.0), 0.3, 0.5)]}


def test_capacity_plot_carries_the_person_blind_floor(tmp_path):
    from monoroute.facts.report import plot_capacity, prior_points

    reps = [{"spec": f"facts:people={p},exposures=1,seed=0,middle=0", "recall": {"accuracy": 0.5, "prior_accuracy": f}}
            for p, f in ((100, 0.073), (25, 0.127), (25, 0.127))] + [{"spec": "facts:people=7", "recall": {"accuracy": 1}}]
    assert prior_points(reps) == [(25, 0.127), (100, 0.073)]  # old reports without the floor are skipped
    plot_capacity({"dense": [(25, 1.0, 150.0, 1.0, 1.0), (100, 0.2, 120.0, 0.2, 0.2)]}, tmp_path / "c.png",
                  prior_points(reps))
    assert (tmp_path / "c.png").stat().st_size > 1000


def test_selectivity_floor_is_the_untrained_unit_set(tmp_path, capsys):
    """Known answers for the floor: a run that has not moved from its initialisation (lr 1e-30) reads
    exactly as its floor; an SAE's floor is the untrained SAE of the same width, k, seed and layer."""
    from monoroute.cli import main
    from monoroute.facts.measure import Subject, selectivity
    from monoroute.facts.report import headline
    from monoroute.facts.sites import baseline_site
    from monoroute.interp import baselines as B
    from monoroute.train.trainer import load

    data = ["--data", "facts:people=4,exposures=20", "--block-size", "96"]
    still = tmp_path / "still"
    assert main(["train", "--preset", "tiny", *data, "--out", str(still), *FAST_TRAIN, "--steps", "2",
                 "--lr", "1e-30", "--min-lr", "1e-30",
                 "--set", "query_norm=none"]) == 0  # a query BatchNorm's running statistics move without lr
    assert main(["facts", "eval", str(still), "--facts", "0", "--erase", "0", "--edit", "0"]) == 0
    report = json.loads((still / "facts" / "units.json").read_text())
    floor, sel = report["selectivity_floor"], report["selectivity"]
    assert floor["of"] == "random_init" and set(floor) == set(sel) | {"of"}
    for site in ("routed_units.L0", "routed_units.L1"):
        assert sel[site]["live_units"] > 20  # a reading with something in it
        for key in ("live_units", "units_min_firings", "median_top_person_share", "units_precision_ge_0.9",
                    "dedicated_people_share"):
            assert floor[site][key] == sel[site][key], (site, key)
        assert "unit_people" in sel[site] and "unit_people" not in floor[site]
    row = headline(report)
    assert row["top_person_share"] == row["top_person_share_floor"] == pytest.approx(
        (sel["routed_units.L0"]["median_top_person_share"] + sel["routed_units.L1"]["median_top_person_share"]) / 2)

    dense = tmp_path / "dense"
    assert main(["train", "--preset", "tiny", "--ffn", "dense", *data, "--out", str(dense), *FAST_TRAIN]) == 0
    capsys.readouterr()
    assert main(["facts", "eval", str(dense), "--facts", "0", "--erase", "0", "--edit", "0", "--sae", "--latents", "64",
                 "--latent-k", "4", "--baseline-tokens", "4096", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["dedicated_people_floor"] is not None
    floor = json.loads((dense / "facts" / "sae.json").read_text())["selectivity_floor"]
    assert floor["of"] == "sae_init" and set(floor) == {"of", "sae.L1", "all_sites"}
    loaded = load(dense)
    loaded.model.eval().requires_grad_(False)
    from monoroute.data import prepare_data

    init = B.init_sae(loaded.model, prepare_data(loaded.config.data), 1, 64, 4, seed=0, device="cpu")
    world = FactsWorld(FactsSpec.parse("people=4,exposures=20"))
    ref = selectivity(Subject(loaded.model, loaded.tokenizer, [baseline_site(loaded.model, init)]), world)["sae.L1"]
    for key in ("live_units", "units_min_firings", "median_top_person_share", "dedicated_people_share"):
        assert floor["sae.L1"][key] == ref[key], key


# --- where facts live: the value-lookup positions, dedication, route overlap ----------------------------

def test_lookup_positions_are_the_prompts_last_and_the_values_bytes():
    from monoroute.data.tokenizers import ByteTokenizer
    from monoroute.facts.lookup import renderings

    world = FactsWorld(FactsSpec.parse("people=2"))
    rend = renderings(world, ByteTokenizer(), [(1, 2)])
    assert [r[1] for r in rend] == [0, 1, 2, 3]  # every training template
    for _, t, ids, first, last in rend:
        q = world.query(1, 2, "train", template=t)
        text = bytes(ids[2:]).decode()  # after the 2-byte separator
        assert text == q.prefix + q.value
        assert first == 2 + len(q.prefix) - 1 and last == len(ids) - 2  # predicts the value's first .. last byte


def test_where_facts_live_positive_and_negative_controls():
    from monoroute.facts.lookup import where_facts_live

    facts = [(p, a) for p in range(3) for a in range(len(ATTRIBUTES))]
    # positive: unit 0 stores fact (1, 2) in every rendering: that fact, and only it, has a dedicated unit
    world, subject = one_fact_subject()
    out = where_facts_live(subject, world, facts, quantile=0.9, n_perm=3, n_pairs=500)
    site = out["dense_neurons.L0"]
    assert out["renderings"] == len(facts) * 4
    assert site["dedicated"] == [[1, 2]] and site["dedicated_facts_share"] == pytest.approx(1 / len(facts))
    assert site["dedicated_facts_share_floor"] == 0.0  # its renderings shuffled among people: no fact keeps them
    # unit 0 fires from the prompt's last position on: dedicated before any byte of the value as well
    assert site["dedicated_facts_share_prompt_end"] == pytest.approx(1 / len(facts))
    # units 1..15 fire on every lookup position: routes are identical, so the margin is zero
    assert site["route_overlap"]["margin"] == pytest.approx(0.0, abs=0.02)
    # negative: unit 0 stores it in one sentence only (1 of 4 renderings): not dedicated
    world, subject = one_fact_subject(where={0})
    site = where_facts_live(subject, world, facts, quantile=0.9, n_perm=2, n_pairs=200)["dense_neurons.L0"]
    assert site["dedicated_facts_share"] == 0.0


def test_dedication_and_overlap_by_hand():
    import random

    from monoroute.facts.lookup import dedication, overlap, permuted

    # 3 facts x 4 renderings; unit "a" fires on 3 of fact 0's, unit "b" on 4 of fact 1's and 1 of fact 2's
    labels = [0] * 4 + [1] * 4 + [2] * 4
    fire = [{"a"}, {"a"}, {"a"}, set(), {"b"}, {"b"}, {"b"}, {"b"}, {"b"}, set(), set(), set()]
    ded = dedication(labels, fire, 3, [4, 4, 4])
    assert ded["dedicated"] == [0]  # b's precision is 4 / 5 = 0.8 < 0.9
    # the top-fact share is read from units firing on >= 4 renderings: b only (a fired 3 times)
    assert ded["median_top_fact_share"] == pytest.approx(0.8) and ded["units_scored"] == 1
    # routes: same person across templates share everything, same template across people nothing
    facts = [(0, 0), (1, 0), (2, 0)]
    rend = [(f, t, None, 0, 0) for f in range(3) for t in range(4)]
    route = [{f"p{labels[r]}"} for r in range(12)]
    ov = overlap(rend, labels, route, facts, 300, random.Random(0))
    assert ov["same_fact_across_templates"] == 1.0 and ov["same_template_across_people"] == 0.0
    assert ov["different_person_and_template"] == 0.0 and ov["margin"] == 1.0
    # the permutation floor: labels shuffled within (attribute, template): each fake fact mixes people
    perm = permuted(rend, labels, facts, random.Random(1))
    assert sorted(perm) == sorted(labels)
    assert all(sorted(perm[r] for r in range(12) if rend[r][1] == t) == [0, 1, 2] for t in range(4))


# --- the binding corpus (scheme 1) -------------------------------------------------------------------------

def test_binding_corpus_names_values_and_qa():
    from monoroute.data.facts import BINDING_ATTRIBUTES, QA_PREFIX

    world = FactsWorld(FactsSpec.parse("people=40,exposures=2,scheme=1"))
    assert world.attributes is BINDING_ATTRIBUTES
    firsts = [n.split()[0] for n in world.names]
    lasts = [n.split()[1] for n in world.names]
    # collision-free two-part names: either word alone identifies the person
    assert len(set(firsts)) == 40 and len(set(lasts)) == 40 and not set(firsts) & set(lasts)
    # non-compositional values: one choice each, no value a prefix-and-suffix product (no shared first word
    # among the invented ones) and no digits
    for attr in BINDING_ATTRIBUTES:
        assert len(set(attr.values)) == len(attr.values) and not any(c.isdigit() for v in attr.values for c in v)
    assert len({v.split()[0] for v in BINDING_ATTRIBUTES[3].values}) == len(BINDING_ATTRIBUTES[3].values)
    # QA lines in the biographies of exactly half the people; asked of the other half
    assert len(world.qa_seen) == 20 and sorted(world.qa_unseen() + sorted(world.qa_seen)) == list(range(40))
    for p in range(40):
        text, spans = world.biography(p, 0)
        assert (QA_PREFIX in text) == (p in world.qa_seen)
        values = [s for s in spans if s.kind == "value"]
        assert len(values) == (12 if p in world.qa_seen else 6)
        assert all(text[s.start:s.end] == world.value(p, s.attribute) for s in values)
    p = world.qa_unseen()[0]
    q = world.query(p, 2, "qa")
    assert q.prefix == f"Question: Where was {world.names[p]} born? Answer: " and q.value == world.value(p, 2)
    corpus = " ".join(text for _, text in world.documents(0.1))
    assert q.prefix not in corpus  # never asked in training
    assert world.query(sorted(world.qa_seen)[0], 2, "qa").prefix in corpus
    assert world.families() == ("train", "heldout", "qa")


def test_scheme_zero_keeps_its_spec_and_world():
    spec = FactsSpec.parse("people=30,exposures=2")
    assert spec.text() == "facts:people=30,exposures=2,seed=0,middle=0"  # old runs' token caches stay valid
    assert FactsSpec.parse("people=30,scheme=1").text().endswith(",scheme=1")
    world = FactsWorld(spec)
    assert world.attributes is ATTRIBUTES and world.families() == ("train", "heldout") and not world.qa_seen
    with pytest.raises(MonorouteError, match="unknown query family 'qa'"):
        world.query(0, 0, "qa")
    for bad, message in (("scheme=2", "scheme must be 0"), ("scheme=1,middle=1", "drop middle")):
        with pytest.raises(MonorouteError, match=message):
            FactsSpec.parse(bad)


def test_bpe_queries_tokenise_as_the_training_sentence():
    from monoroute.data.tokenizers import BPETokenizer, ByteTokenizer

    world = FactsWorld(FactsSpec.parse("people=6,exposures=3,scheme=1"))
    texts = [t for _, t in world.documents(0.0)]
    bpe = BPETokenizer.train(texts, 600)
    for p, a in ((0, 2), (3, 5), (5, 1)):
        q = world.query(p, a, "train", template=1)
        enc = encode_query(bpe, q)
        sentence = bpe.encode(q.prefix + q.value + ".")
        assert enc.prompt[1:] + enc.candidates[enc.true] == sentence  # after the EOT boundary
        assert all(bpe.decode(c).startswith(" ") for c in enc.candidates)
    # bytes: the prompt keeps its space; prompt + candidate is the sentence's bytes either way
    enc = encode_query(ByteTokenizer(), world.query(0, 2))
    assert bytes(enc.prompt[2:]).decode().endswith(" ") and bytes(enc.candidates[enc.true]).decode()[0] != " "
