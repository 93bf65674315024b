"""Metrics for any unit set, on hand-built activations with known answers."""
from __future__ import annotations

import json
import tracemalloc

import numpy as np
import pytest
import scipy.sparse as sp

from monoroute.interp import metrics as M
from monoroute.interp.types import ConceptLabels, Positions, UnitActivations


def acts_from(rows, cols, vals, shape, k=None, name="routed_units") -> UnitActivations:
    m = sp.csr_matrix((np.asarray(vals, dtype=np.float32), (np.asarray(rows), np.asarray(cols))), shape=shape)
    return UnitActivations(name=name, layer=0, matrix=m, k=k)


def random_units(rng, P, n_units, counts, first_unit=0):
    """COO triples for units firing at `counts[i]` random positions each, with values in (0.5, 1)."""
    rows, cols = [], []
    for i, n in zip(range(n_units), counts):
        rows.append(rng.choice(P, size=int(n), replace=False))
        cols.append(np.full(int(n), first_unit + i))
    rows, cols = np.concatenate(rows), np.concatenate(cols)
    return rows, cols, rng.uniform(0.5, 1.0, size=len(rows))


# --- firing statistics -----------------------------------------------------------------------------
def test_firing_stats_exact():
    # 4 positions, 5 units, k = 2. Unit 2 holds only an explicit stored zero, unit 3 only a negative
    # value: neither fires (firing is value > 0 everywhere), so both count as dead.
    rows = [0, 0, 1, 1, 2, 2, 3]
    cols = [0, 1, 0, 2, 1, 0, 3]
    vals = [1.0, 2.0, 0.5, 0.0, -1.0, 1.0, -0.5]
    acts = acts_from(rows, cols, vals, (4, 5), k=2)
    assert acts.matrix.nnz == 7  # the explicit zero is stored
    s = M.firing_stats(acts, min_firings=3)
    assert s["l0"] == pytest.approx(4 / 4)  # firing (> 0) entries per position: the negatives do not count
    assert s["l0_nonzero"] == pytest.approx(6 / 4)  # every nonzero value, the two negatives included
    assert s["live_slot_fraction"] == pytest.approx(4 / 8)
    assert s["dead_fraction"] == pytest.approx(3 / 5)
    assert (s["n_live"], s["n_dead"]) == (2, 3)
    assert s["share_live_frequent"] == pytest.approx(0.5)  # unit 0 fires 3 times, unit 1 once
    assert s["cap_hit_fraction"] is None  # an exact capture
    h = s["density_histogram"]
    assert len(h["edges"]) == len(h["counts"]) + 1 and h["edges"][0] == -7.0 and h["edges"][-1] == 0.0
    assert h["never"] == 3 and sum(h["counts"]) == 2
    # rates 3/4 (log10 -0.125) and 1/4 (log10 -0.602): the last and the third-to-last 0.25-wide bins
    assert h["counts"][-1] == 1 and h["counts"][-3] == 1 and h["counts"][-2] == 0
    dense = M.firing_stats(UnitActivations("dense_neurons", 0, acts.matrix, k=None))
    assert dense["live_slot_fraction"] is None and dense["share_live_frequent"] == 0.0


# --- coverage ------------------------------------------------------------------------------------------
def test_coverage_exact_unit_and_threshold_sweep():
    rng = np.random.default_rng(0)
    P = 400
    L = np.zeros((P, 2), dtype=bool)
    L[0:20, 0] = True  # concept a: 20 positions
    L[50:60, 1] = True  # concept b: 10 positions
    rows = list(range(20)) + list(range(50, 60)) + list(range(100, 140))
    cols = [0] * 20 + [1] * 10 + [1] * 40
    vals = [1.0] * 20 + [1.0] * 10 + [0.05] * 40  # unit 1: strong on b, weak on 40 other positions
    nr, nc, nv = random_units(rng, P, 30, rng.integers(5, 60, size=30), first_unit=2)
    acts = acts_from(rows + list(nr), cols + list(nc), vals + list(nv), (P, 32))
    labels = ConceptLabels(["a", "b"], L)
    cov = M.coverage(acts, labels)  # the in-sample reading: chosen and scored on all positions
    by = {r["concept"]: r for r in cov["per_concept"]}
    assert by["a"]["best_unit_in_sample"] == 0 and by["a"]["f1_in_sample"] == pytest.approx(1.0)
    assert by["a"]["threshold_in_sample"] == 0.0
    assert by["b"]["best_unit_in_sample"] == 1 and by["b"]["f1_in_sample"] == pytest.approx(1.0)
    assert by["b"]["threshold_in_sample"] == pytest.approx(0.1)  # 0.05 > 0.1·1.0 is false: the weak firings drop out
    assert cov["coverage_in_sample"] == pytest.approx(1.0)
    at0 = {r["concept"]: r for r in M.coverage(acts, labels, thresholds=(0.0,))["per_concept"]}
    assert at0["b"]["f1_in_sample"] < 0.5  # at t = 0 unit 1 is on at 50 positions: F1 = 20/60
    assert at0["b"]["best_unit_in_sample"] == 1 and at0["b"]["f1_in_sample"] == pytest.approx(2 * 10 / (50 + 10))
    pur = M.purity(acts, labels, min_firings=20, n_null=2)
    got = dict(zip(pur["per_unit_unit"], pur["per_unit_purity"]))
    assert got[0] == pytest.approx(1.0)
    assert dict(zip(pur["per_unit_unit"], pur["per_unit_best_concept"]))[0] == "a"


def test_coverage_frequency_bins():
    P = 2000
    L = np.zeros((P, 5), dtype=bool)
    for c, n in enumerate([1, 10, 100, 1000]):  # 0.05 %, 0.5 %, 5 %, 50 %
        L[:n, c] = True
    # concept 4 never holds: skipped and counted
    rows = np.arange(100)
    acts = acts_from(rows, np.zeros(100, dtype=int), np.ones(100), (P, 3))  # unit 0 fires exactly on concept 2
    cov = M.coverage(acts, ConceptLabels(["f1", "f10", "f100", "f1000", "never"], L))
    assert cov["n_concepts_in_sample"] == 4 and cov["n_concepts_no_positives"] == 1
    assert cov["concepts_no_positives"] == ["never"]
    bins = {b["bin"]: b for b in cov["by_frequency_in_sample"]}
    assert [bins[b]["n_concepts"] for b in ("<0.1%", "0.1-1%", "1-10%", ">=10%")] == [1, 1, 1, 1]
    by = {r["concept"]: r for r in cov["per_concept"]}
    assert bins["1-10%"]["mean_f1"] == pytest.approx(1.0) == by["f100"]["f1_in_sample"]
    assert bins["<0.1%"]["mean_f1"] == pytest.approx(2 / 101)  # unit 0 covers position 0 among its 100
    assert bins[">=10%"]["mean_f1"] == pytest.approx(2 * 100 / 1100)
    assert cov["coverage_in_sample"] == pytest.approx(np.mean([2 / 101, 2 * 10 / 110, 1.0, 200 / 1100]))
    # held out: one document, so the halves are the first and last 1000 positions; all four concepts
    # hold only in the first half, so none is scored held out.
    assert cov["split"] == "positions" and cov["n_concepts"] == 0 and cov["coverage"] is None
    assert by["f100"]["f1"] is None and by["f100"]["best_unit"] == 0


def halves(n_docs: int, per_doc: int, seed: int = 0):
    """doc ids for n_docs documents of per_doc positions, and the selection / held-out doc lists."""
    doc_ids = np.repeat(np.arange(n_docs), per_doc)
    sel, how = M.doc_split(doc_ids, 0.5, seed)
    assert how == "documents"
    docs_sel = sorted(set(doc_ids[sel].tolist()))
    docs_held = sorted(set(doc_ids[~sel].tolist()))
    return doc_ids, docs_sel, docs_held


def test_coverage_held_out_does_not_reward_a_unit_fit_to_the_selection_half():
    # 40 documents of 10 positions. Concept a holds at positions 0-4 of 4 documents on each side of
    # the split (20 positions a side). Unit 0 is an honest but noisy detector (a's positions + 5
    # others on each side); unit 1 fires exactly on a's positions of the selection half and nowhere
    # else (a unit that "memorised" the selection half). In-sample, unit 0 wins (F1 2·40/90 vs
    # 2·20/60); chosen on the selection half, unit 1 wins (F1 1.0 vs 2·20/45) and scores 0 held out.
    doc_ids, ds, dh = halves(40, 10)
    P = len(doc_ids)
    L = np.zeros((P, 1), dtype=bool)
    on_a = [d * 10 + i for d in ds[:4] + dh[:4] for i in range(5)]
    L[on_a, 0] = True
    noise = [d * 10 + 7 for d in ds[4:9] + dh[4:9]]
    sel_a = [d * 10 + i for d in ds[:4] for i in range(5)]
    rows = on_a + noise + sel_a
    cols = [0] * (len(on_a) + len(noise)) + [1] * len(sel_a)
    acts = acts_from(rows, cols, np.ones(len(rows)), (P, 2))
    cov = M.coverage(acts, ConceptLabels(["a"], L), doc_ids)
    row = cov["per_concept"][0]
    assert row["best_unit_in_sample"] == 0 and row["f1_in_sample"] == pytest.approx(2 * 40 / (50 + 40))
    assert row["best_unit"] == 1 and row["f1_selection"] == pytest.approx(1.0)
    assert row["f1"] == 0.0 and cov["coverage"] == 0.0  # unit 1 never fires on the held-out half
    assert cov["coverage_in_sample"] == pytest.approx(2 * 40 / 90)
    assert (cov["n_selection"], cov["n_heldout"]) == (10 * len(ds), 10 * len(dh))
    # without the memoriser, the honest unit is chosen and scores its F1 on the held-out half
    honest = acts_from(on_a + noise, [0] * (len(on_a) + len(noise)), np.ones(len(on_a) + len(noise)), (P, 2))
    cov = M.coverage(honest, ConceptLabels(["a"], L), doc_ids)
    assert cov["per_concept"][0]["best_unit"] == 0 and cov["coverage"] == pytest.approx(2 * 20 / (25 + 20))


def test_coverage_threshold_is_relative_to_the_selection_half_maximum():
    # Unit 0 fires at 1.0 on concept positions and 0.3 elsewhere on the selection half, but on the
    # held-out half its concept firings are at 10 and others at 2.5: the chosen t = 0.3, times the
    # selection maximum 1.0, keeps every held-out firing (no maximum is recomputed there).
    doc_ids, ds, dh = halves(40, 10, seed=3)
    P = len(doc_ids)
    L = np.zeros((P, 1), dtype=bool)
    pos_s = [d * 10 for d in ds[:5]]
    pos_h = [d * 10 for d in dh[:5]]
    other_s = [d * 10 + 1 for d in ds[:5]]
    other_h = [d * 10 + 1 for d in dh[:5]]
    L[pos_s + pos_h, 0] = True
    rows = pos_s + other_s + pos_h + other_h
    vals = [1.0] * 5 + [0.3] * 5 + [10.0] * 5 + [2.5] * 5
    cov = M.coverage(acts_from(rows, [0] * 20, vals, (P, 1)), ConceptLabels(["a"], L), doc_ids, seed=3)
    row = cov["per_concept"][0]
    assert row["f1_selection"] == pytest.approx(1.0) and row["threshold"] == pytest.approx(0.3)
    assert row["f1"] == pytest.approx(2 * 5 / (10 + 5))  # 0.3 · 1.0 < 2.5: the other firings are on


def test_coverage_at_m_sees_a_concept_split_over_narrow_units():
    # Concept a holds at 3 positions of 12 documents on each side; units 0, 1, 2 each fire on one
    # of the three (feature splitting), unit 3 fires on a's first position and on 30 unrelated ones.
    doc_ids, ds, dh = halves(60, 10, seed=1)
    P = len(doc_ids)
    L = np.zeros((P, 1), dtype=bool)
    docs = ds[:12] + dh[:12]
    rows, cols = [], []
    for d in docs:
        L[d * 10: d * 10 + 3, 0] = True
        for u in range(3):
            rows.append(d * 10 + u)
            cols.append(u)
    extra = [d * 10 + 5 for d in ds[12:27] + dh[12:27]]
    rows += [d * 10 for d in docs] + extra
    cols += [3] * (len(docs) + len(extra))
    acts = acts_from(rows, cols, np.ones(len(rows)), (P, 4))
    cov = M.coverage(acts, ConceptLabels(["a"], L), doc_ids, m=5, seed=1)
    row = cov["per_concept"][0]
    assert row["f1"] == pytest.approx(2 * 12 / (12 + 36))  # one third of a: F1 0.5
    assert sorted(row["units_at_m"]) == [0, 1, 2]  # unit 3 adds only false positives
    assert row["f1_at_m"] == pytest.approx(1.0) and cov["coverage_at_m"] == pytest.approx(1.0)
    assert M.coverage(acts, ConceptLabels(["a"], L), doc_ids, m=2, seed=1)["coverage_at_m"] == pytest.approx(2 * 24 / (24 + 36))
    assert M.coverage(acts, ConceptLabels(["a"], L), doc_ids, m=1, seed=1)["coverage_at_m"] == pytest.approx(0.5)


# --- purity -----------------------------------------------------------------------------------------
def test_purity_random_units_match_null():
    """Random units on a frequent concept look "pure" by chance; the null reproduces it."""
    rng = np.random.default_rng(1)
    P = 20000
    freqs = [0.9, 0.3, 0.05, 0.01]
    L = rng.random((P, len(freqs))) < np.asarray(freqs)
    counts = rng.integers(20, 120, size=400)
    acts = acts_from(*random_units(rng, P, 400, counts), (P, 400))
    pur = M.purity(acts, ConceptLabels(["f90", "f30", "f5", "f1"], L), seed=0, n_null=3)
    assert pur["n_units_scored"] == 400
    # each random unit's purity is about the frequency of its best (here the 0.9) concept
    p = np.asarray(pur["per_unit_purity"])
    n = np.asarray(pur["per_unit_n_firings"])
    assert np.all(np.abs(p - 0.9) < 5 * np.sqrt(0.09 / n) + 0.02)
    assert abs(pur["mean_purity"] - 0.9) < 0.02
    assert abs(pur["excess_purity"]) < 0.01
    assert pur["share_pure_null"] > 0.3  # many rare random units clear 0.9 by chance ...
    assert abs(pur["share_pure"] - pur["share_pure_null"]) < 0.06  # ... and the null says so


def test_purity_planted_unit_beats_null():
    rng = np.random.default_rng(2)
    P = 20000
    L = rng.random((P, 3)) < np.asarray([0.3, 0.1, 0.02])
    planted = np.flatnonzero(L[:, 2])
    rows, cols, vals = random_units(rng, P, 50, rng.integers(30, 300, size=50), first_unit=1)
    acts = acts_from(np.concatenate([planted, rows]), np.concatenate([np.zeros(len(planted), int), cols]),
                     np.concatenate([np.ones(len(planted)), vals]), (P, 51))
    pur = M.purity(acts, ConceptLabels(["a", "b", "planted"], L), seed=0)
    i = pur["per_unit_unit"].index(0)
    assert pur["per_unit_purity"][i] == pytest.approx(1.0)
    assert pur["per_unit_best_concept"][i] == "planted"
    assert pur["per_unit_purity"][i] - pur["per_unit_purity_null"][i] > 0.5
    assert pur["per_unit_lift"][i] == pytest.approx(P / len(planted), rel=1e-3)
    rest = [j for j, u in enumerate(pur["per_unit_unit"]) if u != 0]
    assert abs(np.mean([pur["per_unit_purity"][j] for j in rest]) - 0.3) < 0.03  # random units: base rate
    assert pur["share_significant"] == pytest.approx(1 / 51)  # only the planted unit


# --- sparse probing --------------------------------------------------------------------------------------
def probe_data(rng, with_planted: bool, P=6000, N=200, planted_unit=137):
    doc_ids = np.repeat(np.arange(P // 100), 100)
    L = (rng.random((P, 1)) < 0.1)
    rows, cols, vals = random_units(rng, P, N, np.full(N, 300))
    if with_planted:
        keep = cols != planted_unit
        pos = np.flatnonzero(L[:, 0])
        rows = np.concatenate([rows[keep], pos])
        cols = np.concatenate([cols[keep], np.full(len(pos), planted_unit)])
        vals = np.concatenate([vals[keep], rng.uniform(1.0, 2.0, size=len(pos))])
    return acts_from(rows, cols, vals, (P, N)), ConceptLabels(["c"], L), doc_ids


def test_sparse_probe_recovers_planted_unit():
    rng = np.random.default_rng(3)
    acts, labels, doc_ids = probe_data(rng, True)
    res = M.sparse_probe(acts, labels, doc_ids, ks=(1, 5), seed=0)
    assert res["split"] == "documents" and 0.55 < res["n_train"] / 6000 < 0.85
    row = res["per_concept"][0]
    assert row["k1"]["units"] == [137] and row["k5"]["units"][0] == 137
    assert res["sparse_probe_f1_top1"] > 0.99 and res["sparse_probe_f1"] > 0.99
    assert res["by_k"]["1"]["n_concepts"] == 1


def test_sparse_probe_noise_units_score_low():
    rng = np.random.default_rng(4)
    acts, labels, doc_ids = probe_data(rng, False)
    res = M.sparse_probe(acts, labels, doc_ids, ks=(1, 5), seed=0)
    assert res["sparse_probe_f1_top1"] < 0.35 and res["sparse_probe_f1"] < 0.35
    one_doc = M.sparse_probe(acts, labels, np.zeros(6000, dtype=np.int64), ks=(1,), seed=0)
    assert one_doc["split"] == "positions" and one_doc["n_train"] == 4200 and one_doc["sparse_probe_f1"] is not None


# --- explanations ------------------------------------------------------------------------------------------
def test_ngram_keys_stay_inside_documents():
    keys = M.ngram_keys(np.array([3, 7, 3, 7]), np.array([0, 0, 0, 1]), max_ngram=3)
    assert keys[0, 1] == keys[0, 3] and keys[0, 0] != keys[0, 1]  # unigram "7"
    assert keys[1, 1] >= 0 and keys[1, 3] == -1  # bigram "3 7" ends at 1; at 3 it would cross documents
    assert keys[1, 0] == -1 and keys[2, 1] == -1 and keys[2, 2] >= 0


def test_explanation_finds_bigram_and_rejects_random_unit():
    rng = np.random.default_rng(5)
    P = 12000
    tokens = rng.integers(0, 20, size=P)
    doc_ids = np.repeat(np.arange(P // 200), 200)
    prev_same = np.r_[False, doc_ids[1:] == doc_ids[:-1]]
    prev = np.r_[-1, tokens[:-1]]
    fires = (tokens == 7) & (prev == 3) & prev_same  # unit 0: "7 after 3"; 7 follows other tokens too
    assert fires.sum() > 20 and (tokens == 7).sum() > 5 * fires.sum()
    pos0 = np.flatnonzero(fires)
    pos1 = rng.choice(P, size=600, replace=False)  # unit 1: random
    in_a, _ = M.doc_split(doc_ids, 0.5, seed=0)
    pos2 = rng.choice(np.flatnonzero(~in_a), size=50, replace=False)  # unit 2: fires only on split B
    pos3 = np.flatnonzero(fires)[:3]  # unit 3: the same "7 after 3" detector, but it fires only 3 times
    rows = np.concatenate([pos0, pos1, pos2, pos3])
    cols = np.repeat([0, 1, 2, 3], [len(pos0), len(pos1), len(pos2), len(pos3)])
    acts = acts_from(rows, cols, rng.uniform(0.5, 1.0, size=len(rows)), (P, 4))
    res = M.explanation_scores(acts, tokens, doc_ids, seed=0)
    by = {r["unit"]: r for r in res["per_unit"]}
    assert res["split"] == "documents" and res["n_live"] == 4
    # unit 3 fires below purity's minimum of 20: not sampled, and the share of such live units is reported
    assert 3 not in by and res["n_frequent"] == 3 and res["share_live_below_min"] == pytest.approx(0.25)
    rare = M.explanation_scores(acts, tokens, doc_ids, seed=0, min_firings=1)
    assert {r["unit"] for r in rare["per_unit"]} == {0, 1, 2, 3} and rare["share_live_below_min"] == 0.0
    assert by[0]["explanation"] == [[3, 7]] and by[0]["f1"] == pytest.approx(1.0)
    assert by[0]["precision"] == pytest.approx(1.0) and by[0]["recall"] == pytest.approx(1.0)
    assert by[1]["f1"] < 0.2
    # unit 2 never fires on A: it is scored, with the empty explanation, as 0 (not dropped from the mean)
    assert by[2]["note"] == "no firing on A" and by[2]["explanation"] == [] and by[2]["f1"] == 0.0
    assert res["n_skipped_no_firing_a"] == 1
    assert res["n_scored"] == 3 and res["explanation_f1"] == pytest.approx((1.0 + by[1]["f1"] + 0.0) / 3)
    one = M.explanation_scores(acts, tokens, doc_ids, units=[0], seed=0)["per_unit"]
    assert len(one) == 1 and one[0]["explanation"] == [[3, 7]]


# --- scale: nothing (P, N) dense ---------------------------------------------------------------------------
def test_no_dense_allocation_at_two_million_units():
    rng = np.random.default_rng(6)
    P, N, per_row = 300, 2_000_000, 32
    rows = np.repeat(np.arange(P), per_row)
    cols = rng.integers(0, N, size=P * per_row)
    acts = acts_from(rows, cols, rng.uniform(0.1, 1.0, size=len(rows)), (P, N), k=per_row)
    acts.matrix.sum_duplicates()
    labels = ConceptLabels([f"c{i}" for i in range(20)], rng.random((P, 20)) < 0.1)
    tracemalloc.start()
    try:
        cov = M.coverage(acts, labels)
        pur = M.purity(acts, labels, min_firings=1, n_null=1)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert cov["n_concepts"] == 20 and 0 < cov["coverage_in_sample"] <= 1 and pur["n_units_scored"] > 9000
    # 2M random units, each firing at ~5 positions: the best of them fits a concept in-sample by
    # chance, and that luck does not carry over to the held-out half
    assert cov["coverage"] < 0.5 * cov["coverage_in_sample"]
    dense_bytes = P * N * 4  # 2.4 GB for one float32 (P, N) matrix
    assert peak < 150e6 < dense_bytes / 10


# --- everything together ----------------------------------------------------------------------------------
def test_all_metrics_keys_and_json():
    rng = np.random.default_rng(7)
    P, N = 4000, 64
    tokens = rng.integers(0, 30, size=P)
    doc_ids = np.repeat(np.arange(P // 100), 100)
    positions = Positions(tokens, doc_ids, np.tile(np.arange(100), P // 100))
    L = np.stack([tokens == 5, tokens < 10, rng.random(P) < 0.01], axis=1)
    counts = rng.integers(10, 400, size=N)
    counts[-4:] = 0  # four units never fire: dead
    rows, cols, vals = random_units(rng, P, N, counts)
    # unit 0 is planted: it fires exactly where token 5 is, with value 1
    keep = cols != 0
    five = np.flatnonzero(tokens == 5)
    rows, cols, vals = (np.concatenate([rows[keep], five]), np.concatenate([cols[keep], np.zeros(len(five), int)]),
                        np.concatenate([vals[keep], np.ones(len(five))]))
    acts = acts_from(rows, cols, vals, (P, N), k=4)
    out = M.all_metrics(acts, ConceptLabels(["tok5", "small", "rare"], L), positions, seed=0)
    # known answers from the planted unit and the dead ones, read through all_metrics' wiring
    assert out["dead_fraction"] == pytest.approx(4 / N)
    tok5 = out["details"]["coverage"]["per_concept"][0]
    assert (tok5["concept"], tok5["best_unit"], tok5["f1"], tok5["f1_in_sample"]) == ("tok5", 0, 1.0, 1.0)
    pur = out["details"]["purity"]
    j = pur["per_unit_unit"].index(0)
    assert pur["per_unit_purity"][j] == 1.0 and pur["per_unit_best_concept"][j] == "tok5"
    expl = {r["unit"]: r for r in M.explanation_scores(M.positive_part(acts), tokens, doc_ids, units=[0])["per_unit"]}
    assert expl[0]["explanation"] == [[5]] and expl[0]["f1"] == 1.0
    assert set(out) == set(M_HEADLINE) | {"details", "cap_hit_fraction"}
    assert out["cap_hit_fraction"] is None  # an exact capture has no cap
    assert set(out["details"]) == {"firing", "coverage", "purity", "sparse_probe", "explanation"}
    json.dumps(out)  # plain JSON types only, no numpy scalars
    assert out["l0"] == pytest.approx(acts.matrix.nnz / P) and out["live_slot_fraction"] == pytest.approx(out["l0"] / 4)
    for key in M_HEADLINE:
        assert out[key] is not None, key
    # Known answer from the fixture itself: the live units that fire fewer than 20 times.
    fired_per_unit = np.bincount(cols, minlength=N)
    rare = ((fired_per_unit > 0) & (fired_per_unit < 20)).sum() / (fired_per_unit > 0).sum()
    assert 0 < rare < 1 and out["explanation_share_live_below_min"] == pytest.approx(rare)


M_HEADLINE = ("l0", "live_slot_fraction", "dead_fraction", "coverage", "coverage_in_sample", "coverage_at_m",
              "mean_purity", "mean_purity_null",
              "share_pure", "share_pure_null", "sparse_probe_f1", "sparse_probe_f1_top1", "explanation_f1",
              "explanation_share_live_below_min")


def test_positive_part_keeps_exactly_the_firings_and_no_score_that_reads_firing_changes():
    rng = np.random.default_rng(11)
    P, N = 3000, 40
    dense = rng.normal(size=(P, N)).astype(np.float32)  # signed, like exactly captured GELU neurons
    acts = UnitActivations("dense_neurons", 0, sp.csr_matrix(dense))
    fired = M.positive_part(acts)
    assert fired.matrix.nnz == int((dense > 0).sum()) and (fired.matrix.data > 0).all()
    np.testing.assert_array_equal(fired.matrix.toarray(), np.where(dense > 0, dense, 0))
    assert M.positive_part(fired) is fired  # nothing to drop: the same object
    doc_ids = np.repeat(np.arange(P // 100), 100)
    L = np.stack([dense[:, 0] > 1.0, rng.random(P) < 0.2], axis=1)
    labels = ConceptLabels(["u0", "noise"], L)
    a, b = M.coverage(acts, labels, doc_ids), M.coverage(fired, labels, doc_ids)
    assert a["coverage"] == b["coverage"] and a["coverage_at_m"] == b["coverage_at_m"]
    assert a["per_concept"][0]["best_unit"] == 0 and a["per_concept"][0]["f1"] > 0.8  # unit 0 at t = 0.3 or so
    assert M.firing_stats(acts)["l0"] == M.firing_stats(fired)["l0"] == pytest.approx((dense > 0).sum() / P)
    assert M.firing_stats(acts)["l0_nonzero"] == pytest.approx(N)
