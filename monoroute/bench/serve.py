"""`monoroute bench serve`: how fast the unit browser answers, measured over real HTTP (and, where
Chromium is installed, in the browser: from navigation to the page's content being on screen).

Two parts, each timed `repeats` times (median and max reported):
- a synthetic analysis store with N units (default 1M; P positions, k firings per position, random
  concepts), written in the same format `monoroute analyze` writes: the unit list's first open
  (loading the table and building its index), then its pages sorted, filtered and searched;
- real analysed runs given on the command line (e.g. a cpu-small run): unit pages of random firing
  units, the live prompt's firing units, and an ablation with a 24-token continuation.
Targets (issue 10): unit page < 300 ms, live prompt < 1 s, unit list at N = 1M < 1 s.
"""
from __future__ import annotations

import http.client
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

PROMPT = ("import os\n\n\ndef read_config(path, default=None):\n    \"\"\"Read a JSON config file.\"\"\"\n"
          "    if not os.path.exists(path):\n        return default\n    with open(path) as f:\n        return ")


def synthetic_store(folder: Path, n_units: int, n_positions: int, k: int, n_concepts: int = 40, seed: int = 0) -> Path:
    """A run folder holding only an analysis (no model): what the unit list needs at scale."""
    import scipy.sparse as sp

    from monoroute.fileio import save_safetensors_atomic, write_json_atomic
    from monoroute.interp.capture import FORMAT as CAPTURE_FORMAT
    from monoroute.interp.store import save_labels
    from monoroute.interp.types import ConceptLabels, Positions, UnitActivations
    from monoroute.interp.unit_table import build_unit_table, write_unit_table

    rng = np.random.default_rng(seed)
    P, N = n_positions, n_units
    # Zipf-like unit popularity, as trained routers have: a few units fire often, most rarely.
    weights = 1.0 / np.arange(1, N + 1) ** 0.8
    weights /= weights.sum()
    units = rng.choice(N, size=(P, k), p=weights)
    vals = rng.exponential(1.0, size=(P, k)).astype(np.float32)
    A = sp.csr_matrix((vals.ravel(), (np.repeat(np.arange(P), k), units.ravel())), shape=(P, N))
    A.sum_duplicates()
    token_ids = rng.integers(0, 256, P)
    positions = Positions(token_ids, np.arange(P) // 512, np.arange(P) % 128)
    labels = ConceptLabels([f"concept:{i:02d}" for i in range(n_concepts)], rng.random((P, n_concepts)) < 0.05)
    strings = [chr(i) if 32 <= i < 127 else f"<x{i:02X}>" for i in range(256)]
    cols = build_unit_table(UnitActivations("routed_units", 0, A, k=k), labels, positions, strings, explain=False)
    cols["explanation"] = [t.replace(" · ", " | ") for t in cols["top_tokens"]]  # searchable text of real length
    out = folder / "analysis"
    write_unit_table(cols, out / "units" / "routed_units.parquet")
    save_labels(labels, out / "labels.safetensors")
    cap = out / "capture"
    cap.mkdir(parents=True)
    coo = A.tocoo()
    save_safetensors_atomic(cap / "positions.safetensors", {"token_ids": token_ids.astype(np.int64),
                                                           "doc_ids": positions.doc_ids.astype(np.int64),
                                                           "window_pos": positions.window_pos.astype(np.int64)})
    key = "routed_units.L0"
    save_safetensors_atomic(cap / "shard-00000.safetensors", {f"{key}.pos": coo.row.astype(np.int64),
                                                             f"{key}.unit": coo.col.astype(np.int32),
                                                             f"{key}.value": coo.data.astype(np.float32)})
    from monoroute.fileio import sha256

    write_json_atomic(cap / "index.json", {
        "format": CAPTURE_FORMAT, "fingerprint": "synthetic", "n_positions": P, "block_size": 128, "shard_windows": P // 128,
        "unit_sets": {key: {"name": "routed_units", "layer": 0, "n_units": N, "k": k, "hook": "blocks.0.mlp.hook_post"}},
        "shards": [{"file": "shard-00000.safetensors", "first_window": 0, "n_windows": P // 128,
                    "sha256": sha256(cap / "shard-00000.safetensors"), "nnz": {key: int(A.nnz)}}], "complete": True})
    write_json_atomic(out / "report.json", {
        "store_format": 2, "run": str(folder), "data": "synthetic", "n_positions": P, "layer": 0, "scored_layers": [0],
        "config": {"model": {"block_size": 128}}, "model": {"ffn": "routed", "n_units": N, "k": k},
        "concepts": {"names": labels.names, "frequency": labels.frequency().round(6).tolist()},
        "unit_sets": {"routed_units": {"n_units": N, "k": k}}, "per_layer": {}})
    return folder


def _get(url: str, path: str, body: dict | None = None) -> tuple[float, int, bytes]:
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=120)
    t0 = time.perf_counter()
    if body is None:
        conn.request("GET", path)
    else:
        conn.request("POST", path, body=json.dumps(body), headers={"Content-Type": "application/json"})
    r = conn.getresponse()
    data = r.read()
    dt = time.perf_counter() - t0
    conn.close()
    if r.status != 200:
        raise RuntimeError(f"{path}: HTTP {r.status}: {data[:200]!r}")
    return dt * 1000, r.status, data


def _stats(ms: list[float]) -> dict:
    return {"median_ms": round(statistics.median(ms), 1), "max_ms": round(max(ms), 1), "n": len(ms)}


def _page_ms(driver, url: str, css: str) -> float:
    """Milliseconds from a fresh page load of `url` (HTML, JS, /api/runs, the view's API call) until
    `css` is in the DOM, i.e. app.js has rendered the view."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get("about:blank")
    t0 = time.perf_counter()
    driver.get(url)
    WebDriverWait(driver, 60, poll_frequency=0.005).until(EC.presence_of_element_located((By.CSS_SELECTOR, css)))
    return (time.perf_counter() - t0) * 1000


HASH_NAV = """
const [hash, css, done] = arguments;
document.getElementById("main").innerHTML = "";
const t0 = performance.now();
location.hash = hash;
(function poll() {
  if (document.querySelector(css)) done(performance.now() - t0); else requestAnimationFrame(poll);
})();
"""


def _click_ms(driver, url: str, hash_: str, css: str) -> float:
    """Milliseconds from following an in-page link (a #/ route change, as a click does) until app.js has
    rendered `css`, measured inside the page with performance.now()."""
    if not driver.current_url.startswith(url):
        _page_ms(driver, url + "/#/", "#overview")
    driver.set_script_timeout(60)
    return float(driver.execute_async_script(HASH_NAV, hash_, css))


def run_serve_bench(runs: list[str], n_units: int = 1_000_000, n_positions: int = 100_000, k: int = 32,
                    repeats: int = 5, browser: str = "auto", log=print) -> dict:
    from monoroute.interp.store import AnalysisStore
    from monoroute.serve.app import create_app
    from monoroute.serve.cli import BackgroundServer

    result: dict = {"n_units": n_units, "n_positions": n_positions, "k": k, "repeats": repeats, "list": {}, "runs": []}
    from monoroute.serve.browser import headless_chromium

    driver = headless_chromium() if browser != "off" else None
    if browser == "on" and driver is None:
        raise RuntimeError("--browser on, but chromium / chromedriver are not installed")
    result["browser"] = driver is not None
    tmp = Path(tempfile.mkdtemp(prefix="monoroute-bench-serve-"))
    try:
        log(f"bench serve: building a synthetic store with N={n_units:,} units, P={n_positions:,} positions ...")
        t0 = time.perf_counter()
        synthetic_store(tmp / "synthetic", n_units, n_positions, k)
        result["build_s"] = round(time.perf_counter() - t0, 1)
        t0 = time.perf_counter()
        store = AnalysisStore(tmp / "synthetic")
        store.table("routed_units")
        result["load_table_s"] = round(time.perf_counter() - t0, 2)
        t0 = time.perf_counter()
        app = create_app([store])  # builds the unit index (sort orders lazily, search strings now)
        result["build_index_s"] = round(time.perf_counter() - t0, 2)
        with BackgroundServer(app) as url:
            base = "/api/runs/0/sets/routed_units/units"
            result["list"]["first_open"] = _stats([_get(url, base)[0]])  # the first sort order is computed here
            cases = {"open (by firings)": "", "sort by density": "?sort=density&order=desc",
                     "sort by purity asc": "?sort=purity&order=asc", "search 'concept:07'": "?q=concept%3A07",
                     "filter density ≥ 1e-4, page 50": "?min_density=0.0001&page=50",
                     "search + sort": "?q=e&sort=max_act"}
            for name, query in cases.items():
                _get(url, base + query)  # sort orders are cached once per column; time the steady state
                result["list"][name] = _stats([_get(url, base + query)[0] for _ in range(repeats)])
            if driver is not None:
                result["list"]["browser: unit list, page load"] = _stats(
                    [_page_ms(driver, f"{url}/#/units/0/routed_units?x={i}", "#unit-table tbody tr") for i in range(repeats)])
                result["list"]["browser: unit list, link click"] = _stats(
                    [_click_ms(driver, url, f"#/units/0/routed_units?sort=density&page={i}", "#unit-table tbody tr")
                     for i in range(repeats)])
        for run in runs:
            log(f"bench serve: {run} ...")
            store = AnalysisStore(run).warm()
            _ = store.model
            row: dict = {"run": str(run), "set": store.own_set, "n_units": store.activations(store.own_set).shape[1]}

            def live_units(set_name: str) -> np.ndarray:
                df = store.table(set_name)
                live = df.unit[df.n_firings > 0].to_numpy()
                return np.random.default_rng(0).choice(live, size=min(len(live), 4 * repeats), replace=False)

            pick = live_units(store.own_set)
            with BackgroundServer(create_app([store])) as url:
                s = store.own_set
                _get(url, f"/api/runs/0/sets/{s}/units/{int(pick[0])}")
                row["unit page (API)"] = _stats([_get(url, f"/api/runs/0/sets/{s}/units/{int(u)}")[0] for u in pick])
                for other in store.set_names[1:]:  # post-hoc latents of the same layer
                    row[f"unit page (API), {other}"] = _stats(
                        [_get(url, f"/api/runs/0/sets/{other}/units/{int(u)}")[0] for u in live_units(other)])
                row["prompt: firing units"] = _stats([_get(url, "/api/runs/0/prompt", {"text": PROMPT, "set": s})[0]
                                                      for _ in range(repeats)])
                def ablate(text: str, u) -> float:
                    return _get(url, "/api/runs/0/intervene", {"text": text, "set": s, "unit": int(u), "kind": "ablate",
                                                               "max_new_tokens": 24})[0]

                # a new prompt pays for the clean pass too; further units on the same prompt reuse it
                row["prompt: ablate + 24 tokens, new prompt"] = _stats(
                    [ablate(f"# {i}\n" + PROMPT, u) for i, u in enumerate(pick[:repeats])])
                row["prompt: ablate + 24 tokens, next unit"] = _stats([ablate(PROMPT, u) for u in pick[:repeats]][1:] or [0.0])
                row["prompt_tokens"] = len(store.tokenizer.encode(PROMPT))
                if driver is not None:
                    row["browser: unit page, page load"] = _stats(
                        [_page_ms(driver, f"{url}/#/unit/0/{s}/{int(u)}", "#top-contexts .ctx") for u in pick[:repeats]])
                    row["browser: unit page, link click"] = _stats(
                        [_click_ms(driver, url, f"#/unit/0/{s}/{int(u)}", "#top-contexts .ctx") for u in pick[repeats:2 * repeats]])
            result["runs"].append(row)
    finally:
        if driver is not None:
            driver.quit()
        shutil.rmtree(tmp, ignore_errors=True)
    return result


def format_table(result: dict) -> str:
    lines = [f"unit list, synthetic store: N={result['n_units']:,} units, P={result['n_positions']:,} positions, "
             f"k={result['k']} (built in {result.get('build_s')} s; at server start: table loaded in "
             f"{result.get('load_table_s')} s, index built in {result.get('build_index_s')} s)", f"  {'request':34s} {'median ms':>10s} {'max ms':>9s}"]
    for name, s in result["list"].items():
        lines.append(f"  {name:34s} {s['median_ms']:10.1f} {s['max_ms']:9.1f}")
    for row in result["runs"]:
        lines.append(f"{row['run']} ({row['set']}, N={row['n_units']:,}; prompt {row.get('prompt_tokens')} tokens)")
        for name, s in row.items():
            if isinstance(s, dict):
                lines.append(f"  {name:34s} {s['median_ms']:10.1f} {s['max_ms']:9.1f}")
    lines.append("targets: unit page < 300 ms, live prompt < 1000 ms, unit list at N = 1M < 1000 ms"
                 + ("" if result["browser"] else "; no Chromium here, so no in-browser times"))
    return "\n".join(lines)
