"""`monoroute sweep` on sweeps/tiny.yaml: outputs, nothing retrained on a re-run, resume after an
interruption (between runs and inside one), and refusals that write nothing."""
import contextlib
import copy
import csv
import io
import json
import math
import shutil
from pathlib import Path

import pytest
import yaml

from monoroute.cli import main
from monoroute.interp import analyze as A
from monoroute.sweep import execute
from monoroute.sweep.plots import coverage_points, plot_coverage_vs_loss
from monoroute.sweep.results import COLUMNS, analysis_numbers, row
from monoroute.sweep.spec import load_spec
from monoroute.train import trainer

TINY = Path(__file__).resolve().parents[1] / "sweeps" / "tiny.yaml"
NAMES = ["dense-32", "dense-64", "routed"]
OUTPUTS = ("sweep.json", "sweep.csv", "loss_vs_flops.png", "coverage_vs_loss.png")


def error_line(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("monoroute: error: "), err
    return err[0]


def sweep(spec, out, *extra):
    return main(["sweep", str(spec), "--out", str(out), "--no-progress", *extra])


def tiny_spec(tmp_path, edit=None, name="spec.yaml"):
    """sweeps/tiny.yaml, changed by `edit(spec_dict)`, written to tmp_path."""
    spec = yaml.safe_load(TINY.read_text())
    if edit:
        edit(spec)
    path = tmp_path / name
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def no_analysis(spec):
    for body in spec["runs"].values():
        body["analyze"] = False


def doc(out):
    return json.loads((Path(out) / "sweep.json").read_text())


def eval_numbers(entry):
    """The evaluation without its one timing-dependent number."""
    return {k: v for k, v in entry["eval"].items() if k != "tokens_per_s"}


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """One torch thread and one BLAS thread for this module. Its tiny models and the analyses'
    hundreds of small logistic regressions are all overhead; on 2 cores shared with other jobs, two
    threads spin-wait for each other (measured here: a 20-step tiny training 10 s vs 0.5-1.4 s, one
    analysis 30 s vs 1.7 s). Every sweep the tests compare runs under this same setting."""
    import sklearn.linear_model  # noqa: F401  # a BLAS limit only reaches the libraries already loaded
    import torch
    from threadpoolctl import threadpool_limits

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with threadpool_limits(1, user_api="blas"):
            yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep") / "tiny"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert sweep(TINY, out, "--json") == 0
    return out, json.loads(printed.getvalue())


def test_tiny_sweep_writes_record_table_and_plots(swept):
    out, printed = swept
    for name in OUTPUTS:
        assert (out / name).is_file(), name
    for name in OUTPUTS[2:]:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    record = doc(out)
    assert [e["name"] for e in record["runs"]] == NAMES
    assert all(e["status"] == "done" and e["action"] == "train" for e in record["runs"])
    assert printed == {"out": str(out), "rows": record["rows"]}  # --json: the table, one object
    rows = {r["run"]: r for r in record["rows"]}
    for r in rows.values():
        assert math.isfinite(r["val_loss"]) and 0 < r["val_loss"] < 6  # byte vocab: ln 256 = 5.5 at chance
        assert r["flops_per_token"] > 0 and 0 < r["active_params"] <= r["params"]
        assert r["tokens_per_s"] > 0 and r["step"] == r["steps"] == 20
    assert rows["dense-64"]["d_ff"] == 64 and rows["dense-64"]["n_units"] is None
    assert rows["dense-64"]["coverage"] is None and not (out / "dense-64" / "analysis").exists()  # analyze: false
    assert rows["dense-32"]["unit_set"] == "dense_neurons" and rows["routed"]["unit_set"] == "routed_units"
    routed = rows["routed"]
    assert (routed["n_units"], routed["k"]) == (256, 8)
    assert 0 < routed["l0"] <= 8 and routed["live_slot_fraction"] == pytest.approx(routed["l0"] / 8)
    assert 0 <= routed["dead_fraction"] <= 1
    assert rows["routed"]["active_params"] < rows["routed"]["params"]  # only k of N units per token
    for name in ("dense-32", "routed"):
        for key in ("coverage", "coverage_random_init", "mean_purity", "mean_purity_null", "sparse_probe_f1",
                    "sparse_probe_f1_random_init", "explanation_f1", "explanation_f1_random_init"):
            assert 0 <= rows[name][key] <= 1, (name, key)
        report = json.loads((out / name / "analysis" / "report.json").read_text())
        assert report["n_positions"] == rows[name]["n_positions"] == 4096  # the spec's analyze_tokens
        assert report["unit_sets"]["random_init"]["coverage"] == rows[name]["coverage_random_init"]
    with open(out / "sweep.csv", newline="") as f:
        table = list(csv.reader(f))
    assert table[0] == COLUMNS and [line[0] for line in table[1:]] == NAMES
    assert float(table[1 + NAMES.index("routed")][COLUMNS.index("val_loss")]) == routed["val_loss"]


def test_a_sweep_run_is_an_ordinary_run(swept, capsys):
    out, _ = swept
    capsys.readouterr()
    assert main(["eval", str(out / "routed"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["val_loss"] == doc(out)["rows"][2]["val_loss"]


def test_text_table_and_dry_run(swept, tmp_path, capsys):
    out, _ = swept
    capsys.readouterr()
    assert sweep(TINY, out) == 0  # everything is done: prints the aligned table
    table = capsys.readouterr().out.splitlines()
    assert table[0].split()[:4] == ["run", "ffn", "width", "val"]
    assert [line.split()[0] for line in table[1:4]] == NAMES
    assert sweep(TINY, out, "--dry-run", "--json") == 0
    plan = json.loads(capsys.readouterr().out)
    assert [(r["name"], r["action"], r["step"]) for r in plan["runs"]] == [(n, "skip", 20) for n in NAMES]
    fresh = tmp_path / "fresh"
    assert sweep(TINY, fresh, "--dry-run") == 0
    text = capsys.readouterr().out
    assert "d_ff=32" in text and "n_units=256 k=8" in text and text.count("  train  ") == 3
    assert not fresh.exists()  # a dry run writes nothing


def test_json_and_toml_specs_plan_like_the_yaml_one(tmp_path, capsys):
    spec = yaml.safe_load(TINY.read_text())
    (tmp_path / "s.json").write_text(json.dumps(spec))
    toml = ["preset = 'tiny'", "analyze_tokens = 4096", "[set]", "steps = 20", "batch_size = 8", "warmup = 5",
            "eval_every = 10", "eval_batches = 1", "log_every = 5", "ckpt_every = 10", "device = 'cpu'",
            "[analyze_options]", "interventions = 0", "dashboards = 0",
            "[runs.dense-32]", "ffn = 'dense'", "d_ff = 32", "[runs.dense-64]", "ffn = 'dense'", "d_ff = 64",
            "analyze = false", "[runs.routed]"]
    (tmp_path / "s.toml").write_text("\n".join(toml) + "\n")
    plans = []
    for path in (TINY, tmp_path / "s.json", tmp_path / "s.toml"):
        assert sweep(path, tmp_path / "out", "--dry-run", "--json") == 0
        plans.append(json.loads(capsys.readouterr().out)["runs"])
    assert plans[0] == plans[1] == plans[2]
    assert [(r["name"], r["config"].get("d_ff"), r["analyze"]) for r in plans[0]] == [
        ("dense-32", 32, True), ("dense-64", 64, False), ("routed", None, True)]  # routed: no d_ff


def test_running_again_trains_and_analyses_nothing(swept, monkeypatch, capsys):
    out, _ = swept
    before = doc(out)

    def refuse(*args, **kwargs):
        raise AssertionError("a finished run was worked on again")

    monkeypatch.setattr(trainer, "train", refuse)
    monkeypatch.setattr(A, "analyze", refuse)
    monkeypatch.setattr(execute, "eval_report", refuse)
    capsys.readouterr()
    assert sweep(TINY, out) == 0
    err = capsys.readouterr().err
    assert err.count("not trained again") == 3 and err.count("analysis reused") == 2
    after = doc(out)
    assert after["rows"] == before["rows"]
    assert [e["checkpoint"] for e in after["runs"]] == [e["checkpoint"] for e in before["runs"]]


def test_an_interrupted_sweep_resumes_and_matches_the_uninterrupted_one(swept, tmp_path, monkeypatch, capsys):
    out_full, _ = swept
    spec = tiny_spec(tmp_path, lambda s: s["runs"].pop("routed"))  # dense-32 (analysed), dense-64
    out = tmp_path / "out"
    real_train, calls = trainer.train, []

    def killed_on_second_run(cfg, *args, **kwargs):
        calls.append(Path(cfg.out).name)
        if len(calls) == 2:
            raise KeyboardInterrupt  # Ctrl-C (or a kill) while the second run starts
        return real_train(cfg, *args, **kwargs)

    monkeypatch.setattr(trainer, "train", killed_on_second_run)
    assert sweep(spec, out) == 130
    record = doc(out)  # written after the first run, before the interruption
    assert [(e["name"], e["status"]) for e in record["runs"]] == [("dense-32", "done"), ("dense-64", "pending")]
    assert not (out / "sweep.lock").exists() and not (out / "dense-64").exists()
    def counted(cfg, *args, **kwargs):
        calls.append(Path(cfg.out).name)
        return real_train(cfg, *args, **kwargs)

    monkeypatch.setattr(trainer, "train", counted)
    assert sweep(spec, out) == 0
    assert calls == ["dense-32", "dense-64", "dense-64"]  # dense-32 was not trained twice
    assert "dense-32: analysis reused" in capsys.readouterr().err
    full = {e["name"]: e for e in doc(out_full)["runs"]}
    for entry in doc(out)["runs"]:
        assert entry["status"] == "done"
        assert eval_numbers(entry) == eval_numbers(full[entry["name"]]), entry["name"]
        assert entry["checkpoint"] == full[entry["name"]]["checkpoint"]  # bit-identical weights
    first, first_full = doc(out)["runs"][0]["analysis"], full["dense-32"]["analysis"]
    assert first["units"]["coverage"] is not None
    assert {**first, "seconds": None} == {**first_full, "seconds": None}


def test_a_run_stopped_mid_training_is_resumed_exactly(swept, tmp_path, capsys):
    out_full, _ = swept
    spec = tiny_spec(tmp_path, lambda s: (s["runs"].pop("dense-32"), s["runs"].pop("dense-64"), no_analysis(s)))
    out = tmp_path / "out"
    cfg = load_spec(spec, out).run("routed").config
    trainer.train(cfg, until=10, show_progress=False)  # a run killed after its step-10 checkpoint
    assert sweep(spec, out) == 0
    assert "routed: resuming from step 10" in capsys.readouterr().err
    (entry,) = doc(out)["runs"]
    assert entry["action"] == "resume" and entry["eval"]["step"] == 20
    full = next(e for e in doc(out_full)["runs"] if e["name"] == "routed")
    assert eval_numbers(entry) == eval_numbers(full)
    assert entry["checkpoint"] == full["checkpoint"]


SPEC_HEAD = "preset: tiny\nset: {steps: 2}\n"


@pytest.mark.parametrize("text, message", [
    (SPEC_HEAD + "runs:\n  ok: {}\n  bad: {n_unit: 4}\n", "run 'bad': unknown config key 'n_unit'; valid keys:"),
    (SPEC_HEAD + "runs:\n  a: {}\n  a: {k: 4}\n", "key 'a' appears twice in one mapping (line 5)"),
    (SPEC_HEAD + "runs:\n  - {name: a}\n  - {name: a, k: 4}\n", "run name 'a' is used twice"),
    (SPEC_HEAD + "runs:\n  a: 5\n", "run 'a' must be a mapping of config keys to values"),
    (SPEC_HEAD + "runs:\n  a: [ffn, dense]\n", "run 'a' must be a mapping"),
    (SPEC_HEAD + "runs: []\n", "no runs; add at least one under runs:"),
    (SPEC_HEAD + "runs: {}\n", "no runs"),
    (SPEC_HEAD + "runs:\n  ok: {}\n  bad: {k: 300}\n", "run 'bad': k must be between 1 and n_units=256"),
    (SPEC_HEAD + "runs:\n  r: {sae: true}\n", "sae: true needs a dense FFN at the analysed layer 1"),
    (SPEC_HEAD + "runs:\n  r: {analyze: maybe}\n", "analyze must be true or false"),
    (SPEC_HEAD + "runs:\n  r: {out: elsewhere}\n", "may not set 'out'"),
    (SPEC_HEAD + "runs:\n  ../r: {}\n", "run name '../r' cannot be a folder name"),
    (SPEC_HEAD + "runs:\n  r: {sparse_grad: true}\n", "sparse_grad=true needs the row-sparse optimizer"),
    (SPEC_HEAD + "runs:\n  r: {}\nstep: 3\n", "unknown top-level key(s) step"),
    ("runs:\n  r: {}\n", "needs a base preset"),
    (SPEC_HEAD + "runs:\n  r: {data: 2024-01-01}\n", "holds a value JSON cannot store"),
])
def test_a_bad_spec_gives_one_error_line_and_writes_nothing(text, message, tmp_path, capsys):
    spec = tmp_path / "bad.yaml"
    spec.write_text(text)
    out = tmp_path / "out"
    assert sweep(spec, out) == 2
    assert message in error_line(capsys)
    assert not out.exists()


def test_a_missing_spec_file_is_one_line(tmp_path, capsys):
    assert sweep(tmp_path / "nope.yaml", tmp_path / "out") == 2
    assert "sweep spec" in error_line(capsys) and not (tmp_path / "out").exists()


def test_a_run_dir_with_another_config_is_refused(swept, tmp_path, capsys):
    out_full, _ = swept
    out = tmp_path / "out"
    shutil.copytree(out_full / "dense-32", out / "dense-32")
    pointer = (out / "dense-32" / "checkpoint.json").read_bytes()
    spec = tiny_spec(tmp_path, lambda s: s["runs"]["dense-32"].update(d_ff=48))
    assert sweep(spec, out) == 2
    line = error_line(capsys)
    assert "run 'dense-32'" in line and "holds a run with a different config (d_ff is 32 there, 48 in the spec)" in line
    assert sorted(p.name for p in out.iterdir()) == ["dense-32"]  # no sweep.json, no other run trained
    assert (out / "dense-32" / "checkpoint.json").read_bytes() == pointer
    (out / "dense-64").mkdir()
    (out / "dense-64" / "notes.txt").write_text("not a run")
    assert sweep(tiny_spec(tmp_path), out) == 2
    assert "dense-64 is not empty and holds no monoroute run" in error_line(capsys)


def test_sae_numbers_reach_the_row_and_the_plot(tmp_path):
    """The SAE path costs minutes to run for real, so its bookkeeping is checked on a report of the
    shape analyze writes (test_interp_analyze.py runs the SAE itself)."""
    sets = {"dense_neurons": {"coverage": 0.30, "mean_purity": 0.5, "sparse_probe_f1": 0.4, "explanation_f1": 0.2},
            "random_init": {"coverage": 0.10, "mean_purity": 0.3, "sparse_probe_f1": 0.2, "explanation_f1": 0.1},
            "sae": {"coverage": 0.45, "sparse_probe_f1": 0.5, "spliced_val_loss": 3.4, "explained_variance": 0.8}}
    report = {"layer": 1, "n_positions": 4096, "unit_sets": copy.deepcopy(sets), "seconds": 1.0}
    entry = {"name": "dense", "status": "done", "config": {"ffn": "dense", "d_ff": 64, "steps": 20},
             "eval": {"val_loss": 3.1, "flops_per_token": 100}, "analysis": analysis_numbers(report)}
    r = row(entry)
    assert (r["sae_coverage"], r["sae_sparse_probe_f1"], r["sae_spliced_val_loss"]) == (0.45, 0.5, 3.4)
    assert (r["coverage"], r["coverage_random_init"]) == (0.30, 0.10)
    points = coverage_points([r])
    assert ("sae", "dense + SAE", 3.4, 0.45, 0.10) in points and ("dense", "dense", 3.1, 0.30, 0.10) in points
    plot_coverage_vs_loss([r], tmp_path / "c.png")
    assert (tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG"


def test_sweep_rows_and_table_carry_selection_recall():
    from monoroute.sweep.results import row, text_table

    entry = {"name": "cluster", "status": "done",
             "config": {"ffn": "routed", "n_units": 64, "k": 4, "router": "cluster", "steps": 10},
             "eval": {"step": 10, "val_loss": 2.5, "selection_recall": 0.625, "selection_mass": 0.75}}
    r = row(entry)
    assert (r["selection_recall"], r["selection_mass"]) == (0.625, 0.75)
    table = text_table([r]).splitlines()
    assert "recall" in table[0].split() and "0.625" in table[1].split()


def test_every_shipped_sweep_spec_plans(capsys):
    """Each spec in sweeps/ parses and plans (a dry run trains nothing): a renamed key would fail here."""
    from monoroute.cli import main

    specs = sorted((Path(__file__).parent.parent / "sweeps").glob("*.yaml"))
    assert any(p.name == "router-cpu.yaml" for p in specs)
    for spec in specs:
        assert main(["sweep", str(spec), "--dry-run"]) == 0, spec
    assert "cluster-p4" in capsys.readouterr().out
