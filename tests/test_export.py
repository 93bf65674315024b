"""`monoroute export`: SAELens round trips (our encode/decode and the dense-router layer's own forward),
analysis tables equal to report.json, Neuronpedia JSON and the static HTML site, and refusals."""
import errno
import json
import re
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
import torch

import monoroute
from monoroute.cli import main
from monoroute.interp import export as E
from monoroute.interp.baselines import load_baseline

FAST = ["--no-progress", "--device", "cpu", "--steps", "20", "--log-every", "5", "--eval-every", "10",
        "--eval-batches", "1", "--ckpt-every", "10", "--batch-size", "8"]
ANALYZE = ["--tokens", "4096", "--no-progress", "--interventions", "2", "--dashboards", "2",
           "--baseline-tokens", "4096"]
TIGHT = dict(rtol=1e-9, atol=1e-12)  # float64 on both sides: equal up to summation order
# anything a page would fetch: scripts, stylesheets, images or links off the page's own folder
EXTERNAL = re.compile(r"<script|<link|@import|url\(|(src|href)=[\"']?(https?:|//)", re.I)



def assert_biases_matter(sae, x, expected) -> None:
    """The comparison sees a dropped bias: with b_enc or b_dec zeroed the output moves."""
    for name in ("b_enc", "b_dec"):
        saved = getattr(sae, name).detach().clone()
        getattr(sae, name).data.zero_()
        moved = sae.decode(sae.encode(x))
        getattr(sae, name).data.copy_(saved)
        assert not torch.allclose(moved, expected, **TIGHT), name

def error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("monoroute: error: "), err
    return err[0]


@pytest.fixture(scope="module")
def runs(analysed_runs, tmp_path_factory):
    """pk and dense: conftest's analysed tiny runs (product-key routed; dense at layer 1 with its SAE
    and transcoder); routed: a tiny routed GPT with the dense router (not analysed); mixed: layer 0
    dense (analysed, with a transcoder), layer 1 routed by product keys."""
    pk, dense = analysed_runs
    root = tmp_path_factory.mktemp("export")
    r = SimpleNamespace(pk=pk, dense=dense, routed=root / "routed", mixed=root / "mixed")
    assert main(["train", "--preset", "tiny", "--router", "dense", "--out", str(r.routed), *FAST]) == 0
    assert main(["train", "--preset", "tiny", "--ffn", "dense,routed", "--out", str(r.mixed), *FAST]) == 0
    assert main(["analyze", str(r.mixed), *ANALYZE, "--layer", "0", "--transcoder"]) == 0
    return r


def load_sae(folder: Path, dtype: str = "float64"):
    import sae_lens

    return sae_lens.SAE.load_from_disk(str(folder), dtype=dtype)


def dense_codes(indices, values, n):
    return torch.zeros(indices.shape[0], n, dtype=values.dtype).scatter_add(-1, indices, values)


# --- saelens ------------------------------------------------------------------------------------------
def test_saelens_baselines_round_trip_through_sae_lens(runs, tmp_path, capsys):
    out = tmp_path / "sl"
    assert main(["export", str(runs.dense), "--format", "saelens", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "transcoder-L1" in printed and "'topk'" in printed  # the note that sae-lens has no TopK transcoder
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "sae-L1", "transcoder-L1"]
    for folder in ("sae-L1", "transcoder-L1"):
        assert sorted(p.name for p in (out / folder).iterdir()) == ["cfg.json", "sae_weights.safetensors"]
    torch.manual_seed(1)

    # SAE: sae-lens's TopKSAE on the dense MLP's hook_post, rebuilt from baseline.json/.safetensors
    base = load_baseline(runs.dense / "analysis" / "sae").double()
    sae = load_sae(out / "sae-L1")
    meta = sae.cfg.metadata
    assert type(sae).__name__ == "TopKSAE" and sae.cfg.k == base.k == 8
    assert (meta.model_name, meta.hook_name) == ("monoroute", "blocks.1.mlp.hook_post")
    assert meta.hook_name_out is None and meta.monoroute["run"] == str(runs.dense.resolve())
    assert sae.W_enc.shape == (64, 256) and sae.W_dec.shape == (256, 64)  # (d_in, N), (N, d_in): d_in != N
    assert sae.cfg.rescale_acts_by_decoder_norm == base.rescale_acts_by_decoder_norm
    x = torch.randn(96, 64, dtype=torch.float64).abs() * 0.05  # GELU-output-like
    idx, val = base.encode(x)
    with torch.no_grad():
        codes = sae.encode(x)
        torch.testing.assert_close(codes, dense_codes(idx, val, 256), **TIGHT)
        torch.testing.assert_close(sae.decode(codes), base.reconstruct(x), **TIGHT)
        assert (codes > 0).sum(-1).float().mean() > 4  # real top-k codes, not all zeros
        # the comparison sees a dropped bias: without b_enc / b_dec the numbers move
        assert_biases_matter(sae, x, base.reconstruct(x))

    # transcoder: ln_2 output -> mlp_out, as TopKSAE with apply_b_dec_to_input off
    base = load_baseline(runs.dense / "analysis" / "transcoder").double()
    tc = load_sae(out / "transcoder-L1")
    meta = tc.cfg.metadata
    assert type(tc).__name__ == "TopKSAE" and not tc.cfg.apply_b_dec_to_input
    assert (meta.hook_name, meta.hook_name_out) == ("blocks.1.ln2.hook_normalized", "blocks.1.hook_mlp_out")
    assert "no TopK transcoder class" in meta.monoroute["note"] and meta.monoroute["kind"] == "transcoder"
    assert tc.W_enc.shape == (32, 256) and tc.W_dec.shape == (256, 32)
    assert base.ffn.b_in.abs().max() > 1e-3 and base.b_out.abs().max() > 1e-2  # biases that matter
    x = torch.randn(96, 32, dtype=torch.float64)  # LayerNorm-output-like
    with torch.no_grad():
        y = base.ffn(x)  # the transcoder's own RoutedFFN in float64
        reference = base.ffn.last_activations.to_dense()
        codes = tc.encode(x)
        torch.testing.assert_close(codes, reference, **TIGHT)
        torch.testing.assert_close(tc.decode(codes), y + base.b_out, **TIGHT)
        torch.testing.assert_close(tc.decode(codes), base.reconstruct(x), **TIGHT)
        idx, val = base.encode(x)  # float32 values by contract
        torch.testing.assert_close(codes, dense_codes(idx, val.double(), 256), rtol=0, atol=1e-6)
        assert_biases_matter(tc, x, base.reconstruct(x))


def test_saelens_dense_router_layers_are_the_layers_themselves(runs, tmp_path):
    out = tmp_path / "sl"
    assert main(["export", str(runs.routed), "--format", "saelens", "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "routed_units-L0", "routed_units-L1"]
    run = monoroute.load(runs.routed)
    tokens = torch.tensor([run.tokenizer.encode("def f(x):\n    return x + 1\n" * 3)[:64]])
    for layer in (0, 1):
        ffn = run.model.blocks[layer].mlp
        sae = load_sae(out / f"routed_units-L{layer}")
        meta = sae.cfg.metadata
        assert meta.hook_name_out == f"blocks.{layer}.hook_mlp_out"
        assert meta.monoroute["latents_hook"] == f"blocks.{layer}.mlp.hook_post"
        assert meta.monoroute["step"] == run.step == 20
        assert torch.equal(sae.b_dec, torch.zeros(32, dtype=torch.float64))  # a RoutedFFN has no output bias
        assert ffn.b_in.abs().max() > 1e-3
        # random inputs, float64: sae-lens's encode / decode == the layer's units / output
        x = torch.randn(80, 32, dtype=torch.float64)
        ffn64 = ffn.double()
        with torch.no_grad():
            y = ffn64(x)
            codes = sae.encode(x)
            torch.testing.assert_close(codes, ffn64.last_activations.to_dense(), **TIGHT)
            torch.testing.assert_close(sae.decode(codes), y, **TIGHT)
            sae.b_enc.data.zero_()
            assert not torch.allclose(sae.encode(x), ffn64.last_activations.to_dense(), **TIGHT)
        ffn.float()
        # the metadata's reading on the real model (float32): ln_2(hook_resid_mid) in, hook_mlp_out out
        names = [f"blocks.{layer}.hook_resid_mid", f"blocks.{layer}.mlp.hook_post", f"blocks.{layer}.hook_mlp_out"]
        _, cache = run.model.run_with_cache(tokens, names_filter=names)
        sae32 = load_sae(out / f"routed_units-L{layer}", "float32")
        with torch.no_grad():
            codes = sae32.encode(run.model.blocks[layer].ln_2(cache[names[0]][0]))
            torch.testing.assert_close(codes, cache[names[1]].to_dense()[0], rtol=1e-4, atol=1e-6)
            torch.testing.assert_close(sae32.decode(codes), cache[names[2]][0], rtol=1e-4, atol=1e-6)


def test_saelens_product_key_layers_are_refused_when_asked_and_skipped_otherwise(runs, tmp_path, capsys):
    out = tmp_path / "pk"
    assert main(["export", str(runs.mixed), "--format", "saelens", "--out", str(out), "--set", "routed_units"]) == 2
    line = error_line(capsys)
    assert "product keys" in line and "layer(s) 1" in line and "--router dense" in line
    assert not out.exists()
    # without --set: the transcoder on dense layer 0 is exported, the product-key layer skipped with a note
    assert main(["export", str(runs.mixed), "--format", "saelens", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "note: skipped routed layer(s) 1" in printed and "product keys" in printed
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "transcoder-L0"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert any("product keys" in n for n in manifest["notes"])
    # a run with nothing SAELens can hold: one line naming why
    assert main(["export", str(runs.mixed), "--format", "saelens", "--out", str(tmp_path / "x"), "--layer", "1"]) == 2
    line = error_line(capsys)
    assert "nothing to export" in line and "product keys" in line
    assert main(["export", str(runs.pk), "--format", "saelens", "--out", str(tmp_path / "x")]) == 2
    line = error_line(capsys)
    assert "nothing to export" in line and "layer(s) 0, 1" in line and "product keys" in line
    assert main(["export", str(runs.routed), "--format", "saelens", "--out", str(tmp_path / "x"), "--set", "sae"]) == 2
    assert "no sae baseline" in error_line(capsys)
    assert not (tmp_path / "x").exists()


# --- parquet / csv ------------------------------------------------------------------------------------------
def same(a, b) -> bool:
    if a is None or (isinstance(a, float) and a != a):
        return b is None or pd.isna(b)
    if isinstance(a, float):
        return b == pytest.approx(a, rel=1e-15, abs=0)
    return a == b


def read_table(path: Path, columns=None) -> pd.DataFrame:
    """A parquet file, or a CSV file read as the documented column types (null: NaN / None)."""
    import pyarrow.csv as pcsv

    if path.suffix == ".parquet":
        return pd.read_parquet(path)
    types = dict(columns) if columns is not None else None
    return pcsv.read_csv(path, convert_options=pcsv.ConvertOptions(column_types=types)).to_pandas()


@pytest.mark.parametrize("fmt", ["parquet", "csv"])
def test_tables_equal_report_json(runs, tmp_path, fmt):
    import pyarrow.parquet as pq

    out = tmp_path / fmt
    assert main(["export", str(runs.dense), "--format", fmt, "--out", str(out)]) == 0
    report = json.loads((runs.dense / "analysis" / "report.json").read_text())
    schemas = E._schemas()
    names = {str(p.relative_to(out)) for p in out.rglob(f"*.{fmt}")}
    assert names == {f"{t}.{fmt}" for t in ("unit_sets", "coverage", "per_layer", "interventions")} | {
        f"units/{s}.{fmt}" for s in ("dense_neurons", "sae", "transcoder")}

    sets = read_table(out / f"unit_sets.{fmt}", schemas["unit_sets"])
    assert list(sets.columns) == [c for c, _ in schemas["unit_sets"]]  # stable names and order
    assert list(sets["unit_set"]) == list(report["unit_sets"])
    for _, row in sets.iterrows():
        s = report["unit_sets"][row["unit_set"]]
        assert row["layer"] == report["layer"] == 1
        for col in sets.columns[2:]:
            assert same(s.get(col), row[col]), (row["unit_set"], col, s.get(col), row[col])
    ev = report["unit_sets"]["sae"]["explained_variance"]
    assert sets.set_index("unit_set").loc["sae", "explained_variance"] == ev

    cov = read_table(out / f"coverage.{fmt}", schemas["coverage"])
    expected = [(name, r) for name, s in report["unit_sets"].items() for r in s["details"]["coverage"]["per_concept"]]
    assert len(cov) == len(expected) > 20
    for (name, r), (_, row) in zip(expected, cov.iterrows()):
        assert row["unit_set"] == name and row["concept"] == r["concept"]
        for col in ("frequency", "n_positives", "best_unit", "f1", "precision", "recall", "threshold"):
            assert same(r.get(col), row[col]), (name, r["concept"], col)

    layers = read_table(out / f"per_layer.{fmt}", schemas["per_layer"])
    assert [(f"L{l}", s) for l, s in zip(layers["layer"], layers["unit_set"])] == [
        (l, s) for l, per in report["per_layer"].items() for s in per]
    for _, row in layers.iterrows():
        stats = report["per_layer"][f"L{row['layer']}"][row["unit_set"]]
        for col in ("n_positions", "n_units", "k", "l0", "live_slot_fraction", "dead_fraction", "n_live", "n_dead"):
            assert same(stats.get(col), row[col]), (row["layer"], row["unit_set"], col)

    inter = read_table(out / f"interventions.{fmt}", schemas["interventions"])
    assert len(inter) == len(report["interventions"]) >= 3
    for r, (_, row) in zip(report["interventions"], inter.iterrows()):
        for col in ("concept", "unit", "kind", "value", "kl", "dloss_concept", "dloss_elsewhere", "specificity"):
            assert same(r.get(col), row[col]), col

    for name in ("dense_neurons", "sae", "transcoder"):
        source = runs.dense / "analysis" / "units" / f"{name}.parquet"
        schema = pq.read_schema(source)
        ours = read_table(out / "units" / f"{name}.{fmt}", list(zip(schema.names, schema.types)))
        pd.testing.assert_frame_equal(ours, pd.read_parquet(source))  # float32 printed shortest: exact
        assert len(ours) == report["unit_sets"][name]["n_units"]

    # --set keeps one set's rows; interventions belong to the model's own units
    assert main(["export", str(runs.dense), "--format", fmt, "--out", str(tmp_path / "one"), "--set", "sae"]) == 0
    assert list(read_table(tmp_path / "one" / f"unit_sets.{fmt}", schemas["unit_sets"])["unit_set"]) == ["sae"]
    assert len(read_table(tmp_path / "one" / f"interventions.{fmt}", schemas["interventions"])) == 0
    assert not (tmp_path / "one" / "units" / f"dense_neurons.{fmt}").exists()


# --- neuronpedia / html -------------------------------------------------------------------------------------
def expected_units(report: dict, table: pd.DataFrame, set_name: str, n: int) -> set[int]:
    live = table[table.n_firings > 0].sort_values(["n_firings", "unit"], ascending=[False, True])
    best = {r["best_unit"] for r in report["unit_sets"][set_name]["details"]["coverage"]["per_concept"]
            if r.get("best_unit") is not None}
    return set(live.unit.head(n).astype(int)) | best


@pytest.mark.parametrize("which", ["pk", "dense"])
def test_neuronpedia_feature_json(runs, tmp_path, which):
    from monoroute.interp.interventions import unit_logit_effect
    from monoroute.interp.store import AnalysisStore

    run, out = getattr(runs, which), tmp_path / "np"
    assert main(["export", str(run), "--format", "neuronpedia", "--out", str(out), "--units", "4"]) == 0
    store = AnalysisStore(run)
    index = json.loads((out / "index.json").read_text())
    assert index["layer"] == 1 and [s["set"] for s in index["sets"]] == store.set_names
    assert store.set_names == (["routed_units"] if which == "pk" else ["dense_neurons", "sae", "transcoder"])
    model = monoroute.load(run).model
    for entry in index["sets"]:
        name, table = entry["set"], store.table(entry["set"])
        assert set(entry["units"]) == expected_units(store.report, table, name, 4)
        firings = [int(table.n_firings[u]) for u in entry["units"]]
        assert firings == sorted(firings, reverse=True)  # most firing first
        batch = json.loads((out / name / "batch-0.json").read_text())
        assert [f["feature_index"] for f in batch["features"]] == entry["units"]
        for unit in entry["units"][:3]:
            f = json.loads((out / name / f"{unit}.json").read_text())
            row = table.iloc[unit]
            assert (f["modelId"], f["layer"], f["index"]) == ("monoroute", f"1-{name.replace('_', '-')}", str(unit))
            assert f["maxActApprox"] == pytest.approx(float(row.max_act), rel=1e-6)
            assert f["frac_nonzero"] == pytest.approx(float(row.density), rel=1e-6) and f["frac_nonzero"] > 0
            assert sum(f["freq_hist_data_bar_heights"]) == row.n_firings
            top = f["activations"][0]
            assert top["binMin"] == -1 and len(top["tokens"]) == len(top["values"]) > 1
            assert top["maxValue"] == max(top["values"]) == pytest.approx(float(row.max_act), abs=6e-5)
            assert top["values"][top["maxValueTokenIndex"]] == top["maxValue"]
            assert len(f["activations"]) > len(store.dashboard(name, unit)["top"])  # plus quantile samples
            if row.explanation:
                assert f["explanations"][0]["description"] == row.explanation
            assert len(f["pos_str"]) == len(f["pos_values"]) == 10
            assert f["pos_values"] == sorted(f["pos_values"], reverse=True) and f["neg_values"][0] < 0
            if name in ("dense_neurons", "routed_units"):  # the unit's own direct logit effect, computed apart
                eff = unit_logit_effect(model, 1, unit, top=10, tokenizer=store.strings)
                assert f["pos_str"] == eff["boosted_text"] and f["neg_str"] == eff["suppressed_text"]
            assert f["monoroute"]["row"]["n_firings"] == row.n_firings


def test_html_site_is_static_and_complete(runs, tmp_path):
    from monoroute.interp.store import AnalysisStore

    out = tmp_path / "site"
    assert main(["export", str(runs.dense), "--format", "html", "--out", str(out), "--units", "3",
                 "--set", "transcoder"]) == 0
    store = AnalysisStore(runs.dense)
    table = store.table("transcoder")
    index = (out / "index.html").read_text()
    links = re.findall(r'href="([^"]+)"', index)
    assert {int(re.search(r"unit-(\d+)", l).group(1)) for l in links} == expected_units(store.report, table,
                                                                                       "transcoder", 3)
    assert "dense_neurons" not in index
    coverage = store.report["unit_sets"]["transcoder"]["details"]["coverage"]["per_concept"]
    best = {r["best_unit"]: r["concept"] for r in coverage}
    for link in links:
        page = (out / link).read_text()
        unit = int(re.search(r"unit-(\d+)", link).group(1))
        assert 'href="../index.html"' in page
        assert not EXTERNAL.search(page)  # no server, no CDN
        dash = store.dashboard("transcoder", unit)
        if dash["top"]:
            top = dash["top"][0]
            peak = top["acts"][top["focus"]]
            assert 'class="focus" style="background:rgba(214,39,40,' in page
            assert f'title="{peak:.3f}"' in page  # hover value of the peak token
        if unit in best:
            assert "best unit for" in page
    assert not EXTERNAL.search(index)


# --- bad input ----------------------------------------------------------------------------------------------
def test_bad_input_is_one_line_and_writes_nothing(runs, tmp_path, capsys, monkeypatch):
    out = tmp_path / "o"
    assert main(["export", str(tmp_path / "nope"), "--format", "csv", "--out", str(out)]) == 2
    assert "does not exist" in error_line(capsys)
    assert main(["export", str(runs.dense), "--format", "xlsx", "--out", str(out)]) == 2
    line = error_line(capsys)
    assert "unknown --format 'xlsx'" in line and "saelens" in line
    for fmt in ("parquet", "neuronpedia", "html"):  # the routed run was never analysed
        assert main(["export", str(runs.routed), "--format", fmt, "--out", str(out)]) == 2
        assert "monoroute analyze" in error_line(capsys)
    assert main(["export", str(runs.dense), "--format", "html", "--out", str(out), "--set", "nope"]) == 2
    assert "dense_neurons" in error_line(capsys)
    assert main(["export", str(runs.dense), "--format", "csv", "--out", str(out), "--layer", "0"]) == 2
    assert "--layer" in error_line(capsys)
    assert main(["export", str(runs.dense), "--format", "html", "--out", str(out), "--units", "-1"]) == 2
    assert "--units" in error_line(capsys)
    assert main(["export", str(runs.dense), "--format", "csv", "--out", str(runs.dense / "analysis" / "x")]) == 2
    assert "analysis" in error_line(capsys)
    assert not out.exists()

    # a non-empty --out is kept unless --overwrite; with it, replaced as a whole
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    assert main(["export", str(runs.dense), "--format", "csv", "--out", str(out)]) == 2
    assert "--overwrite" in error_line(capsys) and (out / "mine.txt").read_text() == "keep"

    # a failure mid-export (here: the disk fills after the first table) leaves --out as it was
    real = E.write_tables

    def fill_disk(tables, tmp, fmt):
        real(dict(list(tables.items())[:1]), tmp, fmt)
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp / "coverage.csv"))

    monkeypatch.setattr(E, "write_tables", fill_disk)
    assert main(["export", str(runs.dense), "--format", "csv", "--out", str(out), "--overwrite"]) == 2
    assert "disk full" in error_line(capsys)
    assert sorted(p.name for p in out.iterdir()) == ["mine.txt"]
    assert main(["export", str(runs.dense), "--format", "csv", "--out", str(tmp_path / "new")]) == 2
    error_line(capsys)
    assert not (tmp_path / "new").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp folder left
    monkeypatch.undo()

    assert main(["export", str(runs.dense), "--format", "csv", "--out", str(out), "--overwrite"]) == 0
    assert not (out / "mine.txt").exists() and (out / "unit_sets.csv").is_file()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
