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
    assert report["n_positions"] == 4096 and report["layer"] == 1
    for name, s in report["unit_sets"].items():
        for key in SETS:
            assert key in s, (name, key)
        assert 0 <= s["coverage"] <= 1 and 0 <= s["mean_purity"] <= 1
        assert 0 <= s["l0"] <= 8  # tiny preset: k = 8
        assert s["live_slot_fraction"] == pytest.approx(s["l0"] / 8)
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


def test_analyze_dense_run_with_post_hoc_baselines(runs, capsys):
    _, dense = runs
    assert main(["analyze", str(dense), *ANALYZE, "--sae", "--transcoder", "--baseline-tokens", "4096",
                 "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    sets = summary["unit_sets"]
    assert set(sets) == {"dense_neurons", "random_init", "sae", "transcoder"}
    for kind in ("sae", "transcoder"):
        assert sets[kind]["explained_variance"] <= 1
        assert sets[kind]["spliced_val_loss"] > 0
        assert sets[kind]["train_tokens"] == 4096  # --baseline-tokens reaches the trainer
        assert sets[kind]["l0"] <= 512  # tiny routed width stands in for N; k caps L0 below
    assert main(["compare", str(runs[0]), str(dense)]) == 0
    table = capsys.readouterr().out
    assert "routed_units" in table and "dense_neurons" in table and "sae" in table and "purity null" in table


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
