"""`monoroute serve`: the JSON API against references, the live prompt's interventions, security, refusals."""
import http.client
import json
import shutil
import socket

import numpy as np
import pytest
import torch

from monoroute.cli import main
from monoroute.interp.store import AnalysisStore
from monoroute.serve import live
from monoroute.serve.app import UnitIndex, create_app
from monoroute.serve.cli import BackgroundServer

PROMPT = "def main(args):\n    return args.x + 1\n"


@pytest.fixture(scope="module")
def stores(analysed_runs):
    return [AnalysisStore(r).warm() for r in analysed_runs]


@pytest.fixture(scope="module")
def client(stores):
    from fastapi.testclient import TestClient

    return TestClient(create_app(stores))


def test_unit_list_sorts_filters_searches_and_pages_like_pandas(stores, client):
    df = stores[0].table("routed_units")
    r = client.get("/api/runs/0/sets/routed_units/units", params={"sort": "density", "order": "desc", "per_page": 7,
                                                                   "page": 1})
    assert r.status_code == 200
    data = r.json()
    ref = df.sort_values(["density", "unit"], ascending=[False, True], kind="stable")
    assert data["total"] == len(df) == data["n_units"]
    assert [row["unit"] for row in data["rows"]] == ref["unit"].tolist()[7:14]
    # search over explanations, concepts and top tokens, case-insensitive, and a density filter
    live_rows = df[df.density >= 0.001]
    word = live_rows.iloc[0]["best_concept"]
    hay = (df.best_concept + "\0" + df.f1_concept + "\0" + df.top_tokens + "\0" + df.explanation).str.lower()
    expect = df[hay.str.contains(word.lower(), regex=False) & (df.density >= 0.001)]
    r = client.get("/api/runs/0/sets/routed_units/units", params={"q": word.upper(), "min_density": 0.001,
                                                                   "per_page": 200, "sort": "unit", "order": "asc"})
    assert [row["unit"] for row in r.json()["rows"]] == expect["unit"].tolist()[:200]
    assert r.json()["total"] == len(expect) > 0
    # NaN purity sorts last in both directions
    rows = client.get("/api/runs/0/sets/routed_units/units", params={"sort": "purity", "order": "asc",
                                                                      "per_page": 200}).json()["rows"]
    vals = [x["purity"] for x in rows]
    finite = [v for v in vals if v is not None]
    assert finite == sorted(finite) and (None not in vals or vals.index(None) >= len(finite))


def test_unit_index_at_a_million_units_is_paged():
    import pandas as pd

    N = 1_000_000
    rng = np.random.default_rng(0)
    df = pd.DataFrame({"unit": np.arange(N, dtype=np.int32), "n_firings": rng.integers(0, 50, N).astype(np.int32),
                       "density": rng.random(N).astype(np.float32), "max_act": rng.random(N).astype(np.float32),
                       "mean_act": rng.random(N).astype(np.float32), "purity": rng.random(N).astype(np.float32),
                       "best_concept": np.where(np.arange(N) % 1000 == 7, "py:kw:lambda", "txt:letter"),
                       "lift": np.ones(N, np.float32), "f1_concept": "txt:letter", "f1": np.zeros(N, np.float32),
                       "top_tokens": "a · b", "explanation": "", "explanation_f1": np.full(N, np.nan, np.float32)})
    index = UnitIndex(df)
    res = index.query(q="LAMBDA", sort="unit", descending=False, per_page=3)
    assert res["total"] == 1000 and [r["unit"] for r in res["rows"]] == [7, 1007, 2007]
    res = index.query(sort="density", per_page=2)
    assert res["rows"][0]["unit"] == int(np.argmax(df.density.to_numpy()))


def test_unit_page_matches_the_capture(stores, client):
    store = stores[0]
    df = store.table("routed_units")
    u = int(df.n_firings.idxmax())
    d = client.get(f"/api/runs/0/sets/routed_units/units/{u}").json()
    col = store.activations("routed_units")[:, u].toarray().ravel()
    assert d["n_firings"] == int((col > 0).sum()) == df.n_firings[u]
    assert d["max"] == pytest.approx(float(col.max()))
    top = d["top"][0]
    assert max(top["acts"]) == pytest.approx(float(col.max()), abs=1e-4)  # the top context holds the peak
    assert top["acts"][top["focus"]] == pytest.approx(float(col.max()), abs=1e-4)
    assert sum(d["histogram"]["counts"]) == d["n_firings"]
    assert d["best_concepts"] and d["best_concepts"][0]["f1"] >= d["best_concepts"][-1]["f1"]
    assert len(d["logit_effect"]["boosted_text"]) == 10
    # the dense run's SAE latents have pages too, and links between sets name real units
    dense = stores[1]
    lat = int(dense.table("sae").n_firings.idxmax())
    d = client.get(f"/api/runs/1/sets/sae/units/{lat}").json()
    assert d["n_firings"] > 0 and d["set"] == "sae"
    for link in d["links"]:
        assert 0 <= link["unit"] < stores[link["run"]].activations(link["set"]).shape[1]


def test_prompt_lists_the_units_the_model_fires(stores, client):
    store = stores[0]
    res = client.post("/api/runs/0/prompt", json={"text": PROMPT}).json()
    ids = store.tokenizer.encode(PROMPT)
    assert [t["id"] for t in res["tokens"]] == ids
    _, cache = store.model.run_with_cache(torch.tensor([ids]), names_filter=[f"blocks.{store.layer}.mlp.hook_post"])
    acts = cache[f"blocks.{store.layer}.mlp.hook_post"].to_dense()[0]  # (T, N)
    for t, tok in enumerate(res["tokens"]):
        fired = {int(u) for u in torch.nonzero(acts[t] > 0).ravel()}
        assert {x["unit"] for x in tok["units"]} <= fired
        if tok["units"]:
            assert tok["units"][0]["act"] == pytest.approx(float(acts[t].max()), rel=1e-3)
    dense = client.post("/api/runs/1/prompt", json={"text": PROMPT, "set": "sae"}).json()
    assert dense["set"] == "sae" and len(dense["tokens"]) == len(ids)
    assert all(len(t["units"]) <= live.TOP_UNITS for t in dense["tokens"])


def test_interventions_change_only_what_they_should(stores):
    store = stores[0]
    ids = store.tokenizer.encode(PROMPT)
    _, cache = store.model.run_with_cache(torch.tensor([ids]), names_filter=[f"blocks.{store.layer}.mlp.hook_post"])
    acts = cache[f"blocks.{store.layer}.mlp.hook_post"].to_dense()[0]
    fired = torch.nonzero(acts.sum(0) > 0).ravel()
    silent = int(torch.nonzero(acts.sum(0) == 0).ravel()[0])
    # ablating a unit that never fires on the prompt changes nothing; one that fires changes the output
    res = live.intervene(store, PROMPT, "routed_units", silent, "ablate", max_new_tokens=4)
    assert res["kl"] == pytest.approx(0.0, abs=1e-12) and res["continuation_before"] == res["continuation_after"]
    store.__dict__.pop("_clean_passes", None)  # the clean pass is cached per prompt: the cached one is the same
    fresh = live.intervene(store, PROMPT, "routed_units", silent + 1, "ablate", max_new_tokens=4)
    assert fresh["before"] == res["before"] and fresh["continuation_before"] == res["continuation_before"]
    strongest = int(fired[acts[:, fired].sum(0).argmax()])
    big = live.intervene(store, PROMPT, "routed_units", strongest, "steer", alpha=50.0, max_new_tokens=4)
    assert big["kl"] > 1e-4
    assert live.intervene(store, PROMPT, "routed_units", strongest, "steer", alpha=0.0, max_new_tokens=0)["kl"] == \
        pytest.approx(0.0, abs=1e-12)
    # SAE latent, error-preserving: clamping a latent to 0 where it is already 0 is exact no-op;
    # ablating a latent that fires changes the next-token distribution
    dense = stores[1]
    base = dense.baseline("sae")
    dids = dense.tokenizer.encode(PROMPT)
    _, dc = dense.model.run_with_cache(torch.tensor([dids]), names_filter=base.hooks)
    idx, val = base.extractor()(dc)
    on = idx[-1][val[-1] > 0]
    never = sorted(set(range(base.n_latents)) - set(idx[val > 0].ravel().tolist()))[0]
    res = live.intervene(dense, PROMPT, "sae", never, "clamp", alpha=0.0, max_new_tokens=0)
    assert res["kl"] == pytest.approx(0.0, abs=1e-10)
    res = live.intervene(dense, PROMPT, "sae", int(on[0]), "ablate", max_new_tokens=0)
    assert res["kl"] > 0
    res = live.intervene(dense, PROMPT, "transcoder", 0, "steer", alpha=10.0, max_new_tokens=0)
    assert res["kl"] > 0


def test_bad_requests_get_4xx_and_the_server_keeps_serving(client):
    bad = [
        ("get", "/api/runs/9/sets/routed_units/units", None, 404),
        ("get", "/api/runs/0/sets/nope/units", None, 404),
        ("get", "/api/runs/0/sets/routed_units/units?sort=__class__", None, 400),
        ("get", "/api/runs/0/sets/routed_units/units?per_page=100000", None, 422),
        ("get", "/api/runs/0/sets/routed_units/units?page=-1", None, 422),
        ("get", "/api/runs/x/sets/routed_units/units", None, 422),
        ("get", "/api/runs/0/sets/routed_units/units/999999", None, 404),
        ("post", "/api/runs/0/prompt", {"text": ""}, 400),
        ("post", "/api/runs/0/prompt", {"text": "x" * (live.MAX_PROMPT_CHARS + 1)}, 400),
        ("post", "/api/runs/0/prompt", {"text": 5}, 422),
        ("post", "/api/runs/0/prompt", [1, 2], 422),
        ("post", "/api/runs/0/intervene", {"text": "ab", "unit": 0, "kind": "delete"}, 400),
        ("post", "/api/runs/0/intervene", {"text": "ab", "unit": 0, "max_new_tokens": live.MAX_NEW_TOKENS + 1}, 400),
        ("post", "/api/runs/0/intervene", {"text": "ab", "unit": 10 ** 9}, 400),
        ("post", "/api/runs/0/intervene", {"text": "ab", "unit": 0, "alpha": "1"}, 422),
        ("post", "/api/runs/0/intervene", {"text": "ab", "unit": 0, "kind": "steer", "alpha": 1e300}, 400),
    ]
    for method, path, body, code in bad:
        r = client.post(path, json=body) if method == "post" else client.get(path)
        assert r.status_code == code, (path, body, r.status_code, r.text)
    r = client.post("/api/runs/0/prompt", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 422
    assert client.get("/api/runs").status_code == 200


def raw_get(url: str, path: str) -> tuple[int, bytes]:
    """A GET with the path sent byte for byte (no client-side normalisation of .. or %2e)."""
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    conn.putrequest("GET", path, skip_host=False, skip_accept_encoding=True)
    conn.endheaders()
    r = conn.getresponse()
    body = r.read()
    conn.close()
    return r.status, body


def test_urls_cannot_reach_files_outside_the_package(stores, analysed_runs):
    secret = analysed_runs[0] / "config.json"
    with BackgroundServer(create_app(stores)) as url:
        for path in ["/static/../../../../etc/passwd", "/static/%2e%2e/%2e%2e/%2e%2e/etc/passwd",
                     "/static/..%2f..%2f..%2fetc%2fpasswd", "/static/%2e%2e%2f%2e%2e%2fconfig.json",
                     f"/static/{secret}", "/api/runs/0/sets/..%2f..%2fconfig.json/units",
                     "/api/runs/..%2f0/sets/routed_units/units", "/%2e%2e/%2e%2e/etc/passwd"]:
            status, body = raw_get(url, path)
            assert 400 <= status < 500, (path, status)
            assert b"root:" not in body and b'"model"' not in body
        assert raw_get(url, "/static/app.js")[0] == 200


def error_line(capsys):
    err = [line for line in capsys.readouterr().err.strip().splitlines() if line.startswith("monoroute: error")]
    assert len(err) == 1, err
    return err[0]


def test_serve_refuses_bad_input_with_one_line(analysed_runs, tmp_path, capsys):
    routed, _ = analysed_runs
    plain = tmp_path / "plain"
    shutil.copytree(routed, plain, ignore=shutil.ignore_patterns("analysis"))
    assert main(["serve", str(plain), "--port", "0"]) == 2
    assert "port" in error_line(capsys)
    free = socket.socket()
    free.bind(("127.0.0.1", 0))
    port = free.getsockname()[1]
    free.close()
    assert main(["serve", str(plain), "--port", str(port)]) == 2
    assert "monoroute analyze" in error_line(capsys)
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)
    try:
        assert main(["serve", str(routed), "--port", str(busy.getsockname()[1])]) == 2
        assert "already in use" in error_line(capsys)
    finally:
        busy.close()
    corrupt = tmp_path / "corrupt"
    shutil.copytree(routed, corrupt)
    cap = corrupt / "analysis" / "capture"
    shard = sorted(cap.glob("shard-*.safetensors"))[0]
    shard.write_bytes(b"\0" * 64)
    assert main(["serve", str(corrupt), "--port", str(port)]) == 2
    assert "corrupt" in error_line(capsys)
    assert main(["serve", str(tmp_path / "missing"), "--port", str(port)]) == 2
    assert "does not exist" in error_line(capsys)


def test_serve_analyze_fills_in_a_missing_analysis(analysed_runs, tmp_path):
    from monoroute.serve.cli import open_stores

    plain = tmp_path / "plain"
    shutil.copytree(analysed_runs[0], plain, ignore=shutil.ignore_patterns("analysis"))
    (store,) = open_stores([str(plain)], analyze_missing=True, device="cpu", analyze_tokens=2048)
    assert store.report["n_positions"] == 2048 and store.set_names == ["routed_units"]
    assert len(store.table("routed_units")) == store.report["unit_sets"]["routed_units"]["n_units"]


def write_fake_circuits(run_dir, layer: int) -> dict:
    """A circuits.json as `monoroute circuits` writes it, with units at the analysed layer and another."""
    from monoroute.circuits.run import write_outputs

    other = 1 - layer
    ok = {"task": "quote", "description": "d", "status": "ok", "full_loss": 0.1, "circuit_loss": 0.14,
          "nodes": {"units": 3, "residual": 1, "attention": 0, "total": 4},
          "live": {"units": 50, "residual": 60, "attention": 70, "total": 180},
          "necessity_loss": 0.9, "control_keep_loss": 0.7, "control_ablate_loss": 0.1, "all_kept_loss_choose": 0.1,
          "units_median": 3.0, "units_min": 2, "units_max": 5, "nodes_median": 4.0, "nodes_min": 3, "nodes_max": 9,
          "unit_necessity_loss": 0.6, "unit_control_loss": 0.5, "seeds_passing": 2,
          "seeds": [{"seed": s, "units": u} for s, u in ((0, 2), (1, 3), (2, 5))],
          "circuit": {f"blocks.{layer}.mlp.hook_post": [3, 5], f"blocks.{other}.mlp.hook_post": [7],
                      "blocks.0.hook_mlp_out": [1]}}
    report = {"run": str(run_dir), "val_loss": 3.0, "target_loss": 0.15, "ablation": "mean", "tasks_done": 1,
              "geomean_units": 3.0, "geomean_nodes": 4.0, "seconds": 1.0, "peak_rss_mb": 100.0,
              "tasks": [ok, {"task": "with_as", "description": "d", "status": "cannot_do", "full_loss": 0.5,
                                 "all_kept_loss_choose": 0.5}]}
    write_outputs(run_dir / "circuits", report)
    return report


def test_circuits_task_view_lists_each_circuits_units_and_links_the_analysed_layer(analysed_runs, tmp_path):
    from fastapi.testclient import TestClient

    run = tmp_path / "routed"
    shutil.copytree(analysed_runs[0], run)
    store = AnalysisStore(run).warm()
    write_fake_circuits(run, store.layer)
    client = TestClient(create_app([store, AnalysisStore(analysed_runs[1]).warm()]))
    view = client.get("/api/runs/0/circuits").json()
    assert view["set"] == "routed_units" and view["geomean_units"] == 3.0
    ok, cannot = view["tasks"]
    assert cannot["status"] == "cannot_do" and cannot["units"] == []
    assert [(u["layer"], u["unit"], u["page"]) for u in ok["units"]] == [
        (store.layer, 3, True), (store.layer, 5, True), (1 - store.layer, 7, False)]
    assert ok["nodes"]["total"] == 4  # residual channels are counted, not listed as units
    r = client.get("/api/runs/1/circuits")  # the dense run has no circuits
    assert r.status_code == 404 and "monoroute circuits" in r.json()["detail"]


def test_circuits_show_in_the_analysis_report_and_in_compare(analysed_runs, tmp_path, capsys):
    run = tmp_path / "routed"
    shutil.copytree(analysed_runs[0], run)
    write_fake_circuits(run, AnalysisStore(run).layer)
    page = (run / "analysis" / "report.html").read_text()
    assert "<h2>Circuits: the smallest node set" in page and "<h2>Unit dashboards</h2>" in page
    assert main(["compare", str(run), str(analysed_runs[1])]) == 0
    out = capsys.readouterr().out
    assert "geomean units" in out and "1 of 2" in out and "routed_units" in out  # both tables
    assert main(["compare", str(run), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["circuits"]
    assert rows[0]["units_per_task"] == {"quote": 3} and rows[0]["tasks_cannot_do"] == ["with_as"]


@pytest.mark.parametrize("text", ["\ud800", "ab\udfffcd"])
def test_a_lone_surrogate_in_a_prompt_is_a_400_with_one_line(client, text):
    for path, body in (("/api/runs/0/prompt", {"text": text}), ("/api/runs/0/intervene", {"text": text, "unit": 0})):
        r = client.post(path, content=json.dumps(body), headers={"content-type": "application/json"})
        assert r.status_code == 400, (path, r.status_code, r.text)
        detail = r.json()["detail"]
        assert "not valid Unicode" in detail and "\n" not in detail
    assert client.post("/api/runs/0/prompt", json={"text": "ab"}).status_code == 200  # still serving


def write_fake_facts(run_dir, layer: int) -> dict:
    """A facts/units.json as `monoroute facts eval` writes it: one erased fact with units at the analysed
    layer and another, one fact not erased, and a unit's people."""
    from monoroute.fileio import write_json_atomic

    rec = {"accuracy": 0.5, "prior_accuracy": 0.125, "untrained_accuracy": 0.05, "facts_recalled": 3.0,
           "bits": 12.0, "bits_above_prior": 9.0}
    floor = {"lost": {"train_other": 0.0}, "drop_other": 0.01}
    erased = {"person": 1, "attribute": "employer", "units": 2, "units_everywhere": 3, "lost": {"train_other": 1.0},
              "drop_other": 0.02, "random_k": [floor],
              "unit_ids": [[f"routed_units.L{layer}", 3], [f"routed_units.L{1 - layer}", 7]]}
    report = {"run": str(run_dir), "units": "routed_units", "params": 1000, "flops_per_token": 100,
              "recall": rec, "recall_heldout": dict(rec, accuracy=0.25), "bits_per_param": 0.012,
              "erase": {"median_units": 2.0, "erased_share": 0.5, "median_units_everywhere": 3.0, "n_facts": 2,
                        "lost": {"train_other": 1.0}, "lost_floor": {"train_other": 0.0},
                        "drop_other": 0.02, "drop_other_floor": 0.01,
                        "facts": [erased, {"person": 2, "attribute": "major", "units": None, "ranked": 0}]},
              "edit": None,
              "lookup": {"all_sites": {"dedicated_facts_share": 0.4, "dedicated_facts_share_floor": 0.05,
                                       "route_overlap": {"margin": 0.3, "same_fact_across_templates": 0.5,
                                                         "same_template_across_people": 0.2},
                                       "route_margin_floor": -0.1}},
              "lookup_untrained": {"all_sites": {"dedicated_facts_share": 0.0}},
              "selectivity": {f"routed_units.L{layer}": {"median_top_person_share": 0.7,
                                                         "unit_people": {"3": [["Ann Bo", 30, 32]]}},
                              "all_sites": {"dedicated_people_share": 0.25}},
              "selectivity_floor": {"of": "random_init", f"routed_units.L{layer}": {"median_top_person_share": 0.2},
                                    "all_sites": {"dedicated_people_share": 0.0}}}
    (run_dir / "facts").mkdir()
    write_json_atomic(run_dir / "facts" / "units.json", report)
    return report


def test_facts_view_compare_and_report_section(analysed_runs, tmp_path, capsys):
    from fastapi.testclient import TestClient

    from monoroute.facts.run import refresh_analysis_page

    run = tmp_path / "routed"
    shutil.copytree(analysed_runs[0], run)
    store = AnalysisStore(run).warm()
    write_fake_facts(run, store.layer)
    client = TestClient(create_app([store, AnalysisStore(analysed_runs[1]).warm()]))
    view = client.get("/api/runs/0/facts").json()
    first, second = view["facts"]
    assert [(u["layer"], u["unit"], u["page"]) for u in first["unit_list"]] == [(store.layer, 3, True),
                                                                              (1 - store.layer, 7, False)]
    assert second["units"] is None and second["unit_list"] == []
    assert first["lost"] == {"train_other": 1.0} and first["lost_floor"] == {"train_other": 0.0}  # beside its floor
    assert (first["drop_other"], first["drop_other_floor"]) == (0.02, 0.01)
    assert view["unit_people"] == {"3": [["Ann Bo", 30, 32]]} and view["rows"][0]["dedicated_people"] == 0.25
    row = view["rows"][0]  # each selectivity reading beside its untrained floor
    assert (row["top_person_share"], row["top_person_share_floor"], row["dedicated_people_floor"]) == (0.7, 0.2, 0.0)
    assert (row["recall"], row["recall_prior"], row["recall_untrained"]) == (0.5, 0.125, 0.05)
    assert (row["dedicated_facts"], row["dedicated_facts_floor"], row["dedicated_facts_untrained"]) == (0.4, 0.05, 0.0)
    assert (row["route_margin"], row["route_margin_floor"]) == (0.3, -0.1)
    assert (row["erase_lost_train_other"], row["erase_lost_train_other_floor"]) == (1.0, 0.0)
    r = client.get("/api/runs/1/facts")
    assert r.status_code == 404 and "monoroute facts eval" in r.json()["detail"]
    assert main(["compare", str(run)]) == 0
    out = capsys.readouterr().out
    assert "erase K" in out and "0.250" in out  # the facts table under the analysis table
    assert "(person-blind)" in out and "0.125" in out and "(random K)" in out
    assert "top-person share" in out and "0.700" in out and "0.200" in out
    refresh_analysis_page(run)
    assert "<h2>Facts (monoroute facts eval)</h2>" in (run / "analysis" / "report.html").read_text()


def test_intervene_with_a_long_prompt_and_max_new_tokens_equal_to_block_size_is_answered(stores, client):
    """Issue 32: a 100-character prompt with max_new_tokens = block_size (64) was a 500 ("sequence length
    100 exceeds block_size 64": the crop kept the whole prompt); now the prompt keeps its last token(s)."""
    block = stores[0].model.cfg.block_size
    assert block == 64
    unit = int(stores[0].table("routed_units").sort_values("n_firings").unit.iloc[-1])
    body = {"text": "x = 1\n" * 17, "set": "routed_units", "unit": unit, "kind": "ablate", "max_new_tokens": block}
    r = client.post("/api/runs/0/intervene", json=body)
    assert r.status_code == 200, r.text
    assert r.json()["truncated"] is True and len(r.json()["continuation_before"]) > 0


def test_only_the_bound_host_is_answered(stores):
    """Issue 32: any Host header got 200, so a page could read the API by DNS rebinding."""
    from fastapi.testclient import TestClient

    from monoroute.serve.app import allowed_hosts

    hosts = allowed_hosts("127.0.0.1", 8000)
    assert hosts == {"127.0.0.1:8000", "localhost:8000", "[::1]:8000"}
    assert allowed_hosts("::1", 80) == {"127.0.0.1:80", "localhost:80", "[::1]:80", "127.0.0.1", "localhost", "[::1]"}
    assert allowed_hosts("10.0.0.5", 8000, ["box.lan"]) == {"10.0.0.5:8000", "box.lan:8000"}
    client = TestClient(create_app(stores, hosts))
    for host in ("127.0.0.1:8000", "localhost:8000", "LOCALHOST:8000"):
        assert client.get("/api/runs", headers={"host": host}).status_code == 200
    for host in ("evil.example.com", "", "a" * 10_000, "127.0.0.1:8001", "127.0.0.1"):
        r = client.get("/api/runs", headers={"host": host})
        assert r.status_code == 400 and "Host" in r.json()["detail"], host
