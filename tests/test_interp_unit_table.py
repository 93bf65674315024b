"""The browser's per-unit table and the analysis store, on hand-built cases with known answers."""
import json

import numpy as np
import pytest
import scipy.sparse as sp

from monoroute.errors import MonorouteError
from monoroute.interp.dashboards import best_concepts
from monoroute.interp.store import AnalysisStore, load_labels, save_labels
from monoroute.interp.types import ConceptLabels, Positions, UnitActivations
from monoroute.interp.unit_table import build_unit_table, read_unit_table, top_tokens, write_unit_table


def hand_case():
    """P = 40 positions, 3 units, 2 concepts.
    unit 0 fires (1.0) exactly where concept "a" holds (positions 0..19 even -> 10 firings)
    unit 1 fires at positions 0..24 with value 2.0 on token 7 and 0.5 elsewhere: 25 firings
    unit 2 never fires."""
    P = 40
    token_ids = np.array([7 if p % 3 == 0 else 5 for p in range(P)])
    a = np.zeros(P, bool)
    a[0:20:2] = True
    b = np.zeros(P, bool)
    b[0:30] = True
    rows, cols, vals = [], [], []
    for p in np.flatnonzero(a):
        rows.append(p), cols.append(0), vals.append(1.0)
    for p in range(25):
        rows.append(p), cols.append(1), vals.append(2.0 if token_ids[p] == 7 else 0.5)
    A = sp.csr_matrix((np.array(vals, np.float32), (rows, cols)), shape=(P, 3))
    labels = ConceptLabels(["a", "b"], np.stack([a, b], 1))
    positions = Positions(token_ids, np.repeat(np.arange(4), 10), np.tile(np.arange(10), 4))
    strings = [f"t{i}" for i in range(8)]
    return UnitActivations("routed_units", 0, A, k=2), labels, positions, strings


def test_unit_table_columns_have_the_known_answers():
    acts, labels, positions, strings = hand_case()
    cols = build_unit_table(acts, labels, positions, strings)
    assert cols["n_firings"].tolist() == [10, 25, 0]
    assert cols["density"].tolist() == pytest.approx([10 / 40, 25 / 40, 0])
    assert cols["max_act"].tolist() == pytest.approx([1.0, 2.0, 0.0])
    n7 = sum(1 for p in range(25) if p % 3 == 0)  # 9 positions with token 7 among the first 25
    assert cols["mean_act"][1] == pytest.approx((2.0 * n7 + 0.5 * (25 - n7)) / 25)
    # unit 0: fires exactly where "a" holds: F1 1.0 on "a" (its purity is NaN: 10 < 20 firings)
    assert cols["f1_concept"][0] == "a" and cols["f1"][0] == pytest.approx(1.0)
    # unit 1: b holds at all 25 firings -> purity 1, lift 1 / (30/40); F1 vs b = 2*25/(25+30)
    assert cols["best_concept"][1] == "b" and cols["purity"][1] == pytest.approx(1.0)
    assert cols["lift"][1] == pytest.approx(40 / 30)
    assert cols["f1_concept"][1] == "b" and cols["f1"][1] == pytest.approx(50 / 55)
    assert np.isnan(cols["purity"][2]) and cols["best_concept"][2] == "" and cols["f1"][2] == 0
    # top tokens by summed activation: unit 1 -> t7 (9 x 2.0 = 18) before t5 (16 x 0.5 = 8)
    assert cols["top_tokens"][1] == "t7 · t5" and cols["top_tokens"][2] == ""
    assert cols["explanation"][2] == "" and np.isnan(cols["explanation_f1"][2])


def test_purity_needs_min_firings():
    acts, labels, positions, strings = hand_case()
    cols = build_unit_table(acts, labels, positions, strings)
    assert np.isnan(cols["purity"][0])  # 10 firings, below metrics.purity's min_firings = 20
    assert cols["purity"][1] == pytest.approx(1.0)


def test_top_tokens_ties_and_cap():
    # unit 0 fires on tokens 3, 1, 2 with equal sums, and on 0 with more: order 0, then 1, 2, 3 (id breaks ties)
    token_ids = np.array([3, 1, 2, 0, 0])
    A = sp.csc_matrix((np.ones(5, np.float32), ([0, 1, 2, 3, 4], [0] * 5)), shape=(5, 1))
    assert top_tokens(A, token_ids, ["a", "b", "c", "d"], top=3) == ["a · b · c"]


def test_table_roundtrip_and_best_concepts_match_coverage(tmp_path):
    acts, labels, positions, strings = hand_case()
    cols = build_unit_table(acts, labels, positions, strings)
    df = read_unit_table(write_unit_table(cols, tmp_path / "t.parquet"))
    assert df["unit"].tolist() == [0, 1, 2] and df["top_tokens"][1] == "t7 · t5"
    save_labels(labels, tmp_path / "labels.safetensors")
    back = load_labels(tmp_path / "labels.safetensors", labels.names)
    assert (back.matrix == labels.matrix).all()
    # the dashboards' best-concept search (one column, firing positions only) is coverage's detector:
    # the reference is metrics.coverage on that one column
    rng = np.random.default_rng(0)
    P, N = 500, 6
    A = sp.random(P, N, density=0.2, random_state=1, format="csr", dtype=np.float32)
    L = ConceptLabels([f"c{i}" for i in range(4)], rng.random((P, 4)) < 0.3)
    for u in range(N):
        assert best_concepts(A, u, L) == coverage_reference(A, u, L)
        assert best_concepts(A.tocsc(), u, L, counts=L.matrix.sum(0)) == coverage_reference(A, u, L)


def coverage_reference(A, unit, labels, top=5):
    from monoroute.interp.metrics import coverage

    rows = coverage(UnitActivations("unit", 0, sp.csr_matrix(A[:, [unit]])), labels)["per_concept"]
    # a dashboard describes the unit on every analysed position: coverage's in-sample detector
    rows = sorted((r for r in rows if r["f1_in_sample"] > 0), key=lambda r: -r["f1_in_sample"])[:top]
    return [{"concept": r["concept"], "f1": round(r["f1_in_sample"], 4), "precision": round(r["precision_in_sample"], 4),
             "recall": round(r["recall_in_sample"], 4), "threshold": r["threshold_in_sample"]} for r in rows]


def test_store_refuses_missing_old_and_corrupt_analyses(analysed_runs, tmp_path):
    import shutil

    routed, _ = analysed_runs
    with pytest.raises(MonorouteError, match="has no analysis"):
        AnalysisStore(tmp_path)
    copy = tmp_path / "copy"
    shutil.copytree(routed, copy)
    report = json.loads((copy / "analysis" / "report.json").read_text())
    report.pop("store_format")
    (copy / "analysis" / "report.json").write_text(json.dumps(report))
    with pytest.raises(MonorouteError, match="older `monoroute analyze`"):
        AnalysisStore(copy)
    (copy / "analysis" / "report.json").write_text("{not json")
    with pytest.raises(MonorouteError, match="corrupt"):
        AnalysisStore(copy)
    shutil.rmtree(copy)
    shutil.copytree(routed, copy)
    (copy / "analysis" / "units" / "routed_units.parquet").write_bytes(b"PAR1 torn")
    with pytest.raises(MonorouteError, match="corrupt unit table"):
        AnalysisStore(copy).warm()
