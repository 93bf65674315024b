"""Smoke tests of `monoroute toy ...` at tiny sizes: outputs, the --json contract, bad input."""
import json

import pytest

from monoroute.toy.cli import main

JSON_KEYS = {"loss", "monosemantic_fraction", "features_per_unit", "dead_fraction"}


def run(capsys, *argv):
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize("experiment, figures", [
    ("tms", ["tms_small.png", "tms_dimensionality.png"]),
    ("abs", ["abs_headline.png"]),
    ("recovery", ["recovery.png"]),
])
def test_each_command_writes_results_plots_and_a_table(capsys, tmp_path, experiment, figures):
    out = tmp_path / experiment
    code, stdout, _ = run(capsys, experiment, "--tiny", "--out", str(out))
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    assert results["experiment"] == experiment and results["config"]["seed"] == 0
    for name in figures:
        assert (out / name).stat().st_size > 1000
    assert "results.json" in stdout


def test_abs_json_prints_one_object_per_model(capsys, tmp_path):
    code, stdout, stderr = run(capsys, "abs", "--tiny", "--json", "--out", str(tmp_path / "a"))
    assert code == 0
    models = json.loads(stdout)  # the whole of stdout is one JSON object
    names = {"dense", "dense_l1", "dense_wide", "routed_dense", "routed_pk", "routed_dense_l1", "routed_pk_l1"}
    assert set(models) == names
    for metrics in models.values():
        assert JSON_KEYS <= set(metrics)
        assert 0 <= metrics["monosemantic_fraction"] <= 1 and metrics["loss"] > 0
    assert "model" in stderr  # the table went to stderr


def test_same_seed_same_results(capsys, tmp_path):
    first = run(capsys, "abs", "--tiny", "--json", "--out", str(tmp_path / "a"))[1]
    second = run(capsys, "abs", "--tiny", "--json", "--out", str(tmp_path / "b"))[1]
    assert json.loads(first) == json.loads(second)


def test_refuses_non_empty_out_without_force(capsys, tmp_path):
    (tmp_path / "old.txt").write_text("x")
    code, _, stderr = run(capsys, "tms", "--tiny", "--out", str(tmp_path))
    assert code == 2 and "--force" in stderr and stderr.count("\n") == 1


def test_bad_device_is_one_line_error(capsys, tmp_path):
    code, _, stderr = run(capsys, "abs", "--tiny", "--device", "tpu", "--out", str(tmp_path / "x"))
    assert code == 2 and "--device cpu" in stderr and stderr.count("\n") == 1
