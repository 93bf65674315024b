"""The unit browser's web app: a JSON API over analysed runs and one static page that renders it.

    GET  /                                   the page (static/index.html; pages are #/ routes in app.js)
    GET  /static/{file}                      its JS and CSS, from the package (no CDN: works offline)
    GET  /api/runs                           runs, their unit sets and headline numbers
    GET  /api/overview                       every run side by side: per-layer firing, coverage per concept
    GET  /api/runs/{r}/sets/{s}/units        the unit list: sort, filter, search, paged
    GET  /api/runs/{r}/sets/{s}/units/{u}    one unit's dashboard, with links to other sets' units
    GET  /api/runs/{r}/circuits              `monoroute circuits` results: per task the circuit's units
    POST /api/runs/{r}/prompt                {text, set}: top firing units per token
    POST /api/runs/{r}/intervene             {text, set, unit, kind, alpha, max_new_tokens}

Security: runs are addressed by their index in the command line's list, never by a path, so a URL
cannot name a file; static files come from the package folder only (Starlette refuses paths that
leave it). No user code runs. Prompt length and generated tokens are capped (live.py). Bad
parameters get 4xx answers (400 / 404 / 422); an unexpected error gets a 500 answer and the server
keeps serving.
"""
from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np

from monoroute.errors import MonorouteError
from monoroute.fileio import json_safe
from monoroute.interp.store import per_concept_rows
from monoroute.interp.types import floor_of

FLOOR_SCORES = ("coverage", "coverage_at_m", "mean_purity", "sparse_probe_f1", "explanation_f1")

STATIC = Path(__file__).parent / "static"
SORTABLE = ("unit", "n_firings", "density", "max_act", "mean_act", "purity", "lift", "f1", "explanation_f1")
MAX_PER_PAGE = 200
SEARCH_COLUMNS = ("best_concept", "f1_concept", "top_tokens", "explanation")


class UnitIndex:
    """A unit table prepared for paging at N = 1M: cached sort orders (NaN last) and one lower-cased
    search string per unit in a pyarrow array (substring search runs in C++)."""

    def __init__(self, df) -> None:
        import pyarrow as pa

        self.df = df
        self.n = len(df)
        self._orders: dict[tuple[str, bool], np.ndarray] = {}
        hay = df[SEARCH_COLUMNS[0]].astype(str)
        for col in SEARCH_COLUMNS[1:]:
            hay = hay + "\x00" + df[col].astype(str)
        self.haystack = pa.array(hay.str.lower().tolist(), type=pa.large_string())
        self._lock = threading.Lock()

    def order(self, column: str, descending: bool) -> np.ndarray:
        key = (column, descending)
        with self._lock:
            if key not in self._orders:
                v = self.df[column].to_numpy(dtype=np.float64)
                v = np.where(np.isnan(v), -np.inf if descending else np.inf, v)
                idx = np.arange(self.n)
                self._orders[key] = np.lexsort((idx, -v if descending else v))  # ties: lower unit first
            return self._orders[key]

    def query(self, sort: str = "n_firings", descending: bool = True, q: str = "", concept: str = "",
              min_density: float | None = None, max_density: float | None = None, min_purity: float | None = None,
              live_only: bool = False, page: int = 0, per_page: int = 50) -> dict:
        import pyarrow.compute as pc

        df = self.df
        mask = np.ones(self.n, dtype=bool)
        if q:
            mask &= pc.match_substring(self.haystack, q.lower()).to_numpy(zero_copy_only=False)
        if concept:
            mask &= (df["best_concept"].to_numpy() == concept) | (df["f1_concept"].to_numpy() == concept)
        density = df["density"].to_numpy()
        if min_density is not None:
            mask &= density >= min_density
        if max_density is not None:
            mask &= density <= max_density
        if min_purity is not None:
            mask &= np.nan_to_num(df["purity"].to_numpy(), nan=-1.0) >= min_purity
        if live_only:
            mask &= df["n_firings"].to_numpy() > 0
        order = self.order(sort, descending)
        hits = order[mask[order]]
        rows = hits[page * per_page:(page + 1) * per_page]
        page_df = df.iloc[rows]
        records = [{k: _json(v) for k, v in zip(page_df.columns, r)} for r in page_df.itertuples(index=False)]
        return {"total": int(len(hits)), "n_units": self.n, "page": page, "per_page": per_page, "rows": records}


def _json(v):
    """A table cell for the API: JSON-safe, floats rounded to 6 digits (the page shows at most 5)."""
    v = json_safe(v)
    return round(v, 6) if isinstance(v, float) else v


def run_summary(i: int, store) -> dict:
    sets = []
    for name in store.set_names:
        s = store.report["unit_sets"][name]
        own_floor = store.report["unit_sets"].get(s.get("floor", floor_of(name)), {})
        sets.append({"name": name, "n_units": s.get("n_units"), "k": s.get("k"),
                     **{k: s.get(k) for k in ("l0", "live_slot_fraction", "dead_fraction", "coverage",
                                               "coverage_at_m", "mean_purity", "mean_purity_null", "sparse_probe_f1",
                                               "explanation_f1", "spliced_val_loss")},
                     "floor": {k: own_floor.get(k) for k in FLOOR_SCORES}})
    floor = store.report["unit_sets"].get("random_init", {})
    return {"id": i, "name": store.name, "path": str(store.run), "layer": store.layer, "own_set": store.own_set,
            "model": store.model_info, "sets": sets,
            "random_init": {k: floor.get(k) for k in ("coverage", "mean_purity", "sparse_probe_f1", "explanation_f1")},
            "n_positions": store.report.get("n_positions"), "data": store.report.get("data"),
            "block_size": store.report.get("config", {}).get("model", {}).get("block_size")}


def overview(stores: list) -> dict:
    runs = []
    concepts: dict[str, dict] = {}
    for i, store in enumerate(stores):
        layers = []
        for layer, sets in store.report.get("per_layer", {}).items():
            for name, fs in sets.items():
                layers.append({"layer": layer, "set": name, "l0": fs.get("l0"),
                               "live_slot_fraction": fs.get("live_slot_fraction"),
                               "dead_fraction": fs.get("dead_fraction"),
                               "histogram": fs.get("density_histogram")})
        runs.append(dict(run_summary(i, store), layers=layers))
        freq = dict(zip(store.report["concepts"]["names"], store.report["concepts"]["frequency"]))
        for name in store.set_names:
            for row in per_concept_rows(store.report["unit_sets"][name]):
                c = concepts.setdefault(row["concept"], {"concept": row["concept"], "frequency": freq.get(row["concept"]),
                                                          "cells": {}})
                c["cells"][f"{i}/{name}"] = {"unit": row.get("best_unit"), "f1": row.get("f1")}
    columns = [{"key": f"{i}/{name}", "run": i, "run_name": s.name, "set": name}
               for i, s in enumerate(stores) for name in s.set_names]
    return {"runs": runs, "columns": columns,
            "concepts": sorted(concepts.values(), key=lambda c: -(c["frequency"] or 0))}


def circuits_view(store) -> dict:
    """The task view: per task its losses, node counts and units by layer. Units of the analysed
    layer carry `page: true` (they have a unit page in this browser); others are listed only."""
    from fastapi import HTTPException

    from monoroute.circuits.report import load_circuits

    try:
        rep = load_circuits(store.run)
    except MonorouteError as exc:
        raise HTTPException(500, str(exc)) from None
    if rep is None:
        raise HTTPException(404, f"run {store.name} has no circuits; run `monoroute circuits {store.run}` first")
    tasks = []
    for t in rep["tasks"]:
        units = []
        for hook, ids in t.get("circuit", {}).items():
            if hook.endswith("mlp.hook_post"):
                layer = int(hook.split(".")[1])
                units += [{"layer": layer, "unit": u, "page": layer == store.layer} for u in ids]
        tasks.append({k: t.get(k) for k in ("task", "description", "status", "full_loss", "circuit_loss", "nodes",
                                            "live", "necessity_loss", "control_keep_loss", "control_ablate_loss",
                                            "units_median", "units_min", "units_max", "nodes_median", "nodes_min",
                                            "nodes_max", "unit_necessity_loss", "unit_control_loss", "seeds_passing")}
                     | {"units": units})
    return _json({"run": store.name, "layer": store.layer, "set": store.own_set, "val_loss": rep.get("val_loss"),
                  "target_loss": rep["target_loss"], "ablation": rep["ablation"], "geomean_units": rep["geomean_units"],
                  "geomean_nodes": rep["geomean_nodes"], "tasks": tasks})


def facts_view(store) -> dict:
    """The facts view (monoroute facts eval): headline numbers per unit set, each erased fact's units
    (units of the analysed layer carry `page: true`), and each unit's people at that layer."""
    from fastapi import HTTPException

    from monoroute.facts.report import facts_rows, load_facts

    try:
        reports = load_facts(store.run)
    except MonorouteError as exc:
        raise HTTPException(500, str(exc)) from None
    if not reports:
        raise HTTPException(404, f"run {store.name} has no facts report; run `monoroute facts eval {store.run}` first")
    own = reports[0]
    facts = []
    for row in (own.get("erase") or {}).get("facts", []):
        units = [{"site": label, "layer": int(label.rsplit(".L", 1)[1]), "unit": u,
                  "page": label.endswith(f".L{store.layer}") and label.startswith(own["units"])}
                 for label, u in row.get("unit_ids", [])]
        floor = (row.get("random_k") or [{}])[0]
        facts.append({k: row.get(k) for k in ("person", "attribute", "units", "units_everywhere", "drop_other",
                                              "lost")} | {"unit_list": units, "drop_other_floor": floor.get("drop_other"),
                                                          "lost_floor": floor.get("lost")})
    site = f"{own['units']}.L{store.layer}"
    people = ((own.get("selectivity") or {}).get(site) or {}).get("unit_people", {})
    return _json({"run": store.name, "layer": store.layer, "set": store.own_set, "rows": facts_rows(reports),
                  "facts": facts, "unit_people": people})


LOOPBACK_NAMES = ("127.0.0.1", "localhost", "[::1]")


def allowed_hosts(host: str, port: int, extra=()) -> set[str]:
    """The Host header values a server bound to host:port answers (lower case): the loopback names when
    it listens on loopback or on every interface, the bound name itself and any `extra` names, each
    with the port (and bare too when the port is 80, which browsers leave out). Anything else, a DNS
    rebinding page among it, is refused (`create_app`)."""
    names = {host.lower(), *(n.lower() for n in extra)}
    if host in ("127.0.0.1", "localhost", "::1", "0.0.0.0", "::"):
        names |= set(LOOPBACK_NAMES)
    names = {f"[{n}]" if ":" in n and not n.startswith("[") else n for n in names}
    return {f"{n}:{port}" for n in names} | (names if port == 80 else set())


def create_app(stores: list, hosts: set[str] | None = None):
    """The FastAPI app over already-loaded `AnalysisStore`s (their order gives the run ids). `hosts`:
    the Host header values to answer (`allowed_hosts`); any other gets 400, so a web page on another
    origin cannot reach the API by DNS rebinding. None answers any Host (in-process test clients)."""
    from fastapi import Body, FastAPI, HTTPException, Query, Request
    from fastapi.responses import FileResponse, JSONResponse
    from fastapi.staticfiles import StaticFiles

    from monoroute.serve import live

    app = FastAPI(title="monoroute unit browser", docs_url=None, redoc_url=None, openapi_url=None)
    app.mount("/static", StaticFiles(directory=str(STATIC)), name="static")
    # Built now, not on the first request: at N = 1M the search strings take about a second.
    indexes = {(i, s): UnitIndex(store.table(s)) for i, store in enumerate(stores) for s in store.set_names}
    model_locks = [threading.Lock() for _ in stores]

    def get_store(r: int):
        if not 0 <= r < len(stores):
            raise HTTPException(404, f"no run {r}; runs are 0..{len(stores) - 1}")
        return stores[r]

    def get_set(store, s: str) -> str:
        if s not in store.set_names:
            raise HTTPException(404, f"run {store.name} has no unit set {s!r}; it has {', '.join(store.set_names)}")
        return s

    def get_index(r: int, s: str) -> UnitIndex:
        get_set(get_store(r), s)
        return indexes[(r, s)]

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception):  # the server keeps serving; the page shows it
        return JSONResponse({"detail": f"internal error: {type(exc).__name__}: {exc}"}, status_code=500)

    @app.middleware("http")
    async def timing(request: Request, call_next):
        if hosts is not None and request.headers.get("host", "").lower() not in hosts:
            return JSONResponse({"detail": "this server answers only requests addressed to the address it is bound "
                                 "to (Host header not allowed); open it at the URL `monoroute serve` printed"},
                                status_code=400)
        t0 = time.perf_counter()
        response = await call_next(request)
        response.headers["Server-Timing"] = f"app;dur={1000 * (time.perf_counter() - t0):.1f}"
        response.headers["X-Content-Type-Options"] = "nosniff"
        return response

    @app.get("/")
    def index():
        return FileResponse(STATIC / "index.html")

    @app.get("/api/runs")
    def runs():
        return {"runs": [run_summary(i, s) for i, s in enumerate(stores)]}

    @app.get("/api/overview")
    def get_overview():
        return overview(stores)

    @app.get("/api/runs/{r}/sets/{s}/units")
    def units(r: int, s: str, sort: str = "n_firings", order: str = Query("desc", pattern="^(asc|desc)$"),
              q: str = Query("", max_length=200), concept: str = Query("", max_length=200),
              min_density: float | None = None, max_density: float | None = None,
              min_purity: float | None = None, live_only: bool = False,
              page: int = Query(0, ge=0, le=10_000_000), per_page: int = Query(50, ge=1, le=MAX_PER_PAGE)):
        if sort not in SORTABLE:
            raise HTTPException(400, f"cannot sort by {sort!r}; choose one of {', '.join(SORTABLE)}")
        return get_index(r, s).query(sort, order == "desc", q, concept, min_density, max_density, min_purity,
                                     live_only, page, per_page)

    @app.get("/api/runs/{r}/sets/{s}/units/{u}")
    def unit(r: int, s: str, u: int):
        store = get_store(r)
        get_set(store, s)
        try:
            store.check_unit(s, u)
        except IndexError as exc:
            raise HTTPException(404, f"{s}: {exc}") from None
        with model_locks[r]:
            dash = store.dashboard(s, u)
        links = []  # the same concepts' best units in every other unit set that is loaded
        for bc in dash["best_concepts"][:3]:
            for j, other in enumerate(stores):
                for name, best in other.best_unit_for(bc["concept"]).items():
                    if (j, name) != (r, s) or best["unit"] != u:
                        links.append({"concept": bc["concept"], "run": j, "run_name": other.name, "set": name,
                                      "layer": other.layer, **best})
        dash["links"] = links
        return dash

    @app.get("/api/runs/{r}/circuits")
    def circuits(r: int):
        return circuits_view(get_store(r))

    @app.get("/api/runs/{r}/facts")
    def facts(r: int):
        return facts_view(get_store(r))

    def prompt_args(body: dict, store) -> tuple[str, str]:
        text = body.get("text")
        s = body.get("set") or store.own_set
        if not isinstance(text, str):
            raise HTTPException(422, "body needs 'text' (a string)")
        if not isinstance(s, str):
            raise HTTPException(422, "'set' must be a string")
        return text, get_set(store, s)

    @app.post("/api/runs/{r}/prompt")
    def prompt(r: int, body: dict = Body(...)):
        store = get_store(r)
        text, s = prompt_args(body, store)
        try:
            with model_locks[r]:
                return live.token_units(store, text, s)
        except live.PromptError as exc:
            raise HTTPException(400, str(exc)) from None

    @app.post("/api/runs/{r}/intervene")
    def intervene(r: int, body: dict = Body(...)):
        store = get_store(r)
        text, s = prompt_args(body, store)
        unit, kind = body.get("unit"), body.get("kind", "ablate")
        alpha, n_new = body.get("alpha", 0.0), body.get("max_new_tokens", 24)
        if isinstance(unit, bool) or not isinstance(unit, int):
            raise HTTPException(422, "'unit' must be an integer")
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
            raise HTTPException(422, "'alpha' must be a number")
        if isinstance(n_new, bool) or not isinstance(n_new, int):
            raise HTTPException(422, "'max_new_tokens' must be an integer")
        if not isinstance(kind, str):
            raise HTTPException(422, "'kind' must be a string")
        try:
            with model_locks[r]:
                return live.intervene(store, text, s, unit, kind, float(alpha), n_new)
        except (live.PromptError, MonorouteError) as exc:
            raise HTTPException(400, str(exc)) from None

    return app

