"""`monoroute analyze` / `compare` end to end on tiny runs, and their refusals."""
import json
import shutil
from pathlib import Path

import pytest

from monoroute.cli import main

FAST = ["--no-progress", "--device", "cpu", "--steps", "20", "--log-every", "5", "--eval-every", "10",
        "--eval-batches", "1", "--ckpt-every", "10", "--batch-size", "8"]
ANALYZE = ["--tokens", "4096", "--no-progress", "--interventions", "2", "--dashboards", "2"]
SETS = ("l0", "live_slot_fraction", "dead_fraction", "coverage", "mean_purity", "mean_purity_null",
        "share_pure", "sparse_probe_f1", "explanation_f1")


def error_line(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("monoroute: error: "), err
    return err[0]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("analyze")
    routed, dense = root / "routed", root / "dense"
    assert main(["train", "--preset", "tiny", "--out", str(routed), *FAST]) == 0
    assert main(["train", "--preset", "tiny", "--ffn", "dense", "--d-ff", "64", "--out", str(dense), *FAST]) == 0
    assert main(["analyze", str(routed), *ANALYZE]) == 0
    return routed, dense


def test_analyze_routed_run_writes_a_complete_analysis(runs, capsys):
    routed, _ = runs
    out = routed / "analysis"
    names = {p.name for p in out.iterdir()}
    assert {"report.json", "report.html", "unit_sets.csv", "coverage_per_concept.csv", "per_layer.csv"} <= names
    assert not (routed / ".analysis-work").exists()
    report = json.loads((out / "report.json").read_text())
    assert set(report["unit_sets"]) == {"routed_units", "random_init"}
    assert report["n_positions"] == 4096 and report["layer"] == 1 and report["split"] == "val"
    assert report["unit_sets"]["routed_units"]["floor"] == "random_init"
    for name, s in report["unit_sets"].items():
        for key in SETS:
            assert key in s, (name, key)
        assert s["live_slot_fraction"] == pytest.approx(s["l0"] / 8)  # tiny preset: k = 8
        cov = s["details"]["coverage"]
        assert cov["n_selection"] + cov["n_heldout"] == 4096  # the headline is checked against a reference below
    assert set(report["per_layer"]) == {"L0", "L1"}
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") >= 4 and "http" not in html.split("<body>")[1].replace(
        "http://www.w3", "")  # self-contained: no external resources
    assert report["dashboards"] and report["dashboards"][0]["top"]
    assert {r["kind"] for r in report["interventions"]} >= {"ablate", "clamp", "steer"}
    assert main(["compare", str(routed), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["rows"]
    assert rows[0]["unit_set"] == "routed_units"
    assert rows[0]["coverage_random_init"] == report["unit_sets"]["random_init"]["coverage"]
    # beside explanation F1: the share of live units too rare (< 20 firings) to be sampled for it
    expl = report["unit_sets"]["routed_units"]["details"]["explanation"]
    assert rows[0]["explanation_share_live_below_min"] == pytest.approx(1 - expl["n_frequent"] / expl["n_live"])


def test_coverage_in_the_report_equals_a_float64_reference_on_independently_reloaded_activations(runs, tmp_path):
    """Recompute held-out coverage from the captured activations with a brute-force reference (every unit,
    every threshold, dense arrays) and check the report's per-concept rows against it: the chosen
    detector is a best one on the selection half (ties allowed), its held-out F1 is the reported one,
    the headline is their mean, and each concept's OR starts from a unit as good as the best single one."""
    import numpy as np

    from monoroute.interp import analyze as AZ
    from monoroute.interp.capture import Capture
    from monoroute.interp.metrics import THRESHOLDS, doc_split

    routed, _ = runs
    report = json.loads((routed / "analysis" / "report.json").read_text())
    copy = tmp_path / "run"  # a copy: the fixture's run keeps its analysis untouched
    shutil.copytree(routed, copy, ignore=shutil.ignore_patterns("analysis", "tensorboard"))
    job = AZ.prepare(copy, AZ.AnalyzeOptions(tokens=4096, progress=False))
    AZ.capture_model(job)
    labels = AZ.job_labels(job)
    acts = Capture(job.work / "capture").load("routed_units.L1")
    A = np.maximum(acts.matrix.toarray(), 0).astype(np.float32)  # (P, N): firing values only
    L = labels.matrix
    sel, _ = doc_split(job.stream.positions.doc_ids, 0.5, 0)
    colmax = A[sel].max(0)  # (N,) each unit's maximum on the selection half

    def f1(on, y):  # on (P', N, ...) bool, y (P',) bool -> F1 per unit
        tp = (on & y[:, None]).sum(0).astype(np.float64)
        denom = on.sum(0) + y.sum()
        return np.where(denom > 0, 2 * tp / np.maximum(denom, 1), 0.0)

    ons = [(A > 0) & (A > np.float32(t) * colmax) for t in THRESHOLDS]  # (P, N) per threshold
    rows = {r["concept"]: r for r in report["unit_sets"]["routed_units"]["details"]["coverage"]["per_concept"]}
    held = []
    for c, name in enumerate(labels.names):
        r = rows.get(name)
        y = L[:, c]
        if r is None or r["f1"] is None:
            assert r is None or not y[sel].any() or not y[~sel].any()
            continue
        sel_f1 = np.stack([f1(on[sel], y[sel]) for on in ons])  # (T, N)
        assert r["f1_selection"] == pytest.approx(sel_f1.max(), abs=1e-9), name
        if r["best_unit"] is None:
            assert sel_f1.max() == 0 and r["f1"] == 0
            held.append(0.0)
            continue
        t, u = THRESHOLDS.index(r["threshold"]), r["best_unit"]
        assert sel_f1[t, u] == pytest.approx(sel_f1.max(), abs=1e-9), name  # a best detector, ties allowed
        ref = float(f1(ons[t][~sel][:, [u]], y[~sel])[0])
        assert r["f1"] == pytest.approx(ref, abs=1e-9), name
        held.append(ref)
        first = r["units_at_m"][0]
        assert sel_f1[:, first].max() == pytest.approx(sel_f1.max(), abs=1e-9), name
        assert len(set(r["units_at_m"])) == len(r["units_at_m"])
    units = report["unit_sets"]["routed_units"]
    assert len(held) == units["details"]["coverage"]["n_concepts"] > 10
    assert units["coverage"] == pytest.approx(np.mean(held), abs=1e-9)
    # in-sample: chosen and scored on every position
    colmax_all = A.max(0)
    present = [c for c in range(len(labels.names)) if L[:, c].any()]
    in_sample = [max(f1((A > 0) & (A > np.float32(t) * colmax_all), L[:, c]).max() for t in THRESHOLDS)
                 for c in present]
    assert units["coverage_in_sample"] == pytest.approx(np.mean(in_sample), abs=1e-9)


def test_analyze_dense_run_with_post_hoc_baselines(runs, capsys):
    _, dense = runs
    assert main(["analyze", str(dense), *ANALYZE, "--sae", "--transcoder", "--baseline-tokens", "4096",
                 "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    sets = summary["unit_sets"]
    assert set(sets) == {"dense_neurons", "random_init", "sae", "transcoder", "sae_init", "transcoder_init"}
    assert summary["dense_cap"] is None and summary["split"] == "val"
    report = json.loads((dense / "analysis" / "report.json").read_text())
    # dense neurons are captured exactly: with GELU, L0 (> 0) is not cut at any cap, and the signed
    # values are there (L0 counting every nonzero value is the full width, 64)
    firing = report["unit_sets"]["dense_neurons"]["details"]["firing"]
    assert firing["cap_hit_fraction"] is None and firing["l0_nonzero"] == pytest.approx(64, abs=0.5)
    assert 0 < firing["l0"] < firing["l0_nonzero"]
    clean = report["model"]["val_loss"]
    for kind in ("sae", "transcoder"):
        s = report["unit_sets"][kind]
        assert s["floor"] == f"{kind}_init" and sets[kind]["floor"] == f"{kind}_init"
        assert sets[kind]["train_tokens"] == 4096  # --baseline-tokens reaches the trainer
        # the spliced loss is measured on the same validation windows as the model's own val loss
        assert s["clean_val_loss"] == pytest.approx(clean, abs=1e-6)
        assert s["loss_recovered"] == pytest.approx((s["zero_ablation_val_loss"] - s["spliced_val_loss"])
                                                    / (s["zero_ablation_val_loss"] - clean))
        # capture and explained_variance encode the same 4096 positions independently: same L0
        assert s["ev_positions"] == 4096 and s["l0"] == pytest.approx(s["ev_l0"], rel=1e-6)
        # the floor is that architecture untrained, not the dense model's neurons at init
        floor = report["unit_sets"][f"{kind}_init"]
        # untrained TopK latents fire exactly k per position (their top k pre-activations are positive at
        # init), unlike the dense model's GELU neurons at init (about half of 64 fire)
        init = report["unit_sets"]["random_init"]
        assert (floor["n_units"], floor["k"]) == (s["n_units"], s["k"]) and init["n_units"] == 64
        assert floor["l0"] == pytest.approx(s["k"]) and init["l0"] > 2 * s["k"]
    assert main(["compare", str(runs[0]), str(dense), "--json"]) == 0
    rows = {(r["run"], r["unit_set"]): r for r in json.loads(capsys.readouterr().out)["rows"]}
    assert ("%s" % dense, "sae_init") not in rows  # floors are columns, not rows
    for kind, floor in (("sae", "sae_init"), ("transcoder", "transcoder_init"), ("dense_neurons", "random_init")):
        row = rows[(str(dense), kind)]
        assert row["floor_set"] == floor
        assert row["coverage_at_m_random_init"] == report["unit_sets"][floor]["coverage_at_m"]
    assert main(["compare", str(runs[0]), str(dense)]) == 0
    table = capsys.readouterr().out
    assert "routed_units" in table and "dense_neurons" in table and "coverage@5" in table and "purity null" in table
    assert "expl. <20 fires" in table


def test_bad_inputs_give_one_line_and_leave_no_analysis(runs, tmp_path, capsys):
    routed, _ = runs
    no_weights = tmp_path / "no-weights"
    no_weights.mkdir()
    shutil.copy(routed / "config.json", no_weights / "config.json")
    shutil.copy(routed / "tokenizer.json", no_weights / "tokenizer.json")
    assert main(["analyze", str(no_weights), *ANALYZE]) == 2
    assert "missing" in error_line(capsys)
    assert not (no_weights / "analysis").exists()

    copy = tmp_path / "copy"
    shutil.copytree(routed, copy, ignore=shutil.ignore_patterns("analysis", "tensorboard"))
    bad = tmp_path / "concepts.yaml"
    bad.write_text("concepts:\n  x: 'a+'\ncolours: 3\n")
    assert main(["analyze", str(copy), *ANALYZE, "--concepts", str(bad)]) == 2
    assert "colours" in error_line(capsys)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["analyze", str(copy), *ANALYZE, "--data", str(empty)]) == 2
    error_line(capsys)
    assert main(["analyze", str(copy), "--tokens", "0"]) == 2
    assert "--tokens" in error_line(capsys)
    assert main(["compare", str(copy)]) == 2
    assert "monoroute analyze" in error_line(capsys)
    assert not (copy / "analysis").exists() and not (copy / ".analysis-work").exists()


def test_analyze_data_file_reads_all_of_it_by_default(runs, tmp_path, capsys):
    """A held-out file passed with --data is analysed whole (--split all), not 1/16 of it; --split val
    takes what training would have held out, and the number of positions is printed."""
    routed, _ = runs
    copy = tmp_path / "copy"
    shutil.copytree(routed, copy, ignore=shutil.ignore_patterns("analysis", "tensorboard"))
    text = tmp_path / "held_out.py"
    text.write_text("".join(f"def f{i}(x):\n    return x + {i}\n\n" for i in range(3000)))  # ~90 KB, one file
    n_bytes = len(text.read_bytes())
    args = ["analyze", str(copy), "--data", str(text), "--tokens", "200000", "--no-progress",
            "--interventions", "0", "--dashboards", "0"]
    assert main(args) == 0
    out = capsys.readouterr().out
    report = json.loads((copy / "analysis" / "report.json").read_text())
    assert report["split"] == "all"
    # byte tokenizer: every byte is a token, plus a 2-byte separator after each ~4 KB chunk (the
    # file's documents), cut to whole 64-token windows
    assert report["n_documents"] > 10
    assert report["n_positions"] == (n_bytes + 2 * report["n_documents"]) // 64 * 64
    assert f"analysed {report['n_positions']:,} positions" in out
    assert main(args + ["--split", "val"]) == 0
    val = json.loads((copy / "analysis" / "report.json").read_text())
    assert val["split"] == "val" and 0 < val["n_positions"] < report["n_positions"] // 4
