"""`monoroute analyze RUN`: are a trained model's units monosemantic, against which floor and which baselines?

    run dir ──load──> model ──capture──> sparse activations (every FFN layer)     ┐
    same config, untrained ──capture──> random-init floor                         ├─> metrics ─> report.json,
    (--sae / --transcoder) post-hoc baselines on the dense layer ──capture──>     ┘             CSVs, report.html
    validation documents ──labeller──> concept labels (P, C)

Work happens in RUN/.analysis-work/ (captures resume from there if interrupted) and the finished
result replaces RUN/analysis/ in one rename, so `analysis/` never holds a half-written analysis.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from monoroute.errors import MonorouteError
from monoroute.interp.capture import Capture, UnitSet, capture, model_unit_sets
from monoroute.interp.stream import SPLITS, Stream, build_stream, doc_token_rows
from monoroute.interp.types import floor_of, is_floor
from monoroute.tables import peak_rss_mb

WORK_DIR = ".analysis-work"
OUT_DIR = "analysis"
STORE_FORMAT = 2  # 2: + labels.safetensors and units/<set>.parquet, what `monoroute serve` reads
HEADLINE = ("l0", "live_slot_fraction", "dead_fraction", "cap_hit_fraction", "coverage", "coverage_in_sample",
            "coverage_at_m", "mean_purity", "mean_purity_null",
            "share_pure", "share_pure_null", "sparse_probe_f1", "sparse_probe_f1_top1", "explanation_f1",
            "explanation_share_live_below_min")


@dataclass
class AnalyzeOptions:
    data: str | None = None  # corpus spec; None: the run's own corpus
    split: str | None = None  # "train" | "val" | "all"; None: "all" for --data, "val" for the run's own corpus
    tokens: int = 200_000
    layer: int | None = None  # the layer scored in full (and where baselines train); None: n_layer // 2
    all_layers: bool = False  # score every FFN layer in full (firing statistics are always per layer)
    sae: bool = False
    transcoder: bool = False
    concepts: str | None = None  # YAML/TOML file of extra regex concepts
    keep: int | None = None  # cap dense sets at the top `keep` positive entries per position; None: exact
    dense_exact_max_entries: int = 250_000_000  # beyond positions × d_ff this many, dense sets are capped at 128
    seed: int = 0
    device: str = "cpu"
    progress: bool = True
    interventions: int = 6  # concepts whose best unit is ablated / clamped / steered
    dashboards: int = 8  # concepts whose best units get a dashboard
    baseline_tokens: int | None = None  # training tokens for the SAE / transcoder (None: their defaults)


def weights_fingerprint(model) -> str:
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def median_tokens_per_s(run: Path) -> float | None:
    """The median training tokens/s the run logged (bad or torn lines skipped, as every reader does)."""
    from monoroute.train.rundir import read_metrics

    rates = [r.get("tokens_per_s") for r in read_metrics(run)]
    rates = [r for r in rates if isinstance(r, (int, float)) and r]
    return statistics.median(rates) if rates else None


def check_options(run: Path, opts: AnalyzeOptions) -> None:
    if not run.is_dir():
        raise MonorouteError(f"run directory {run} does not exist; pass a folder written by `monoroute train`")
    if opts.tokens <= 0:
        raise MonorouteError(f"--tokens must be positive, got {opts.tokens}; e.g. --tokens 200000")
    if opts.keep is not None and opts.keep <= 0:
        raise MonorouteError(f"--keep must be positive, got {opts.keep}; e.g. --keep 128 (or leave it out: exact)")
    if opts.split is not None and opts.split not in SPLITS:
        raise MonorouteError(f"--split {opts.split!r} is not one of {', '.join(SPLITS)}")
    if opts.baseline_tokens is not None and opts.baseline_tokens <= 0:
        raise MonorouteError(f"--baseline-tokens must be positive, got {opts.baseline_tokens}")
    if opts.interventions < 0 or opts.dashboards < 0:
        raise MonorouteError("--interventions and --dashboards must be 0 or more")


@dataclass
class Job:
    """What every stage of one analysis reads: the run, its model and the analysed positions."""

    run: Path
    opts: AnalyzeOptions
    cfg: object  # RunConfig
    model: object  # GPT, eval mode
    tokenizer: object
    device: torch.device
    layer: int  # the headline layer, scored in full (and where baselines train)
    score_layers: list[int]
    source: str
    split: str
    stream: Stream
    keep: int | None  # the dense sets' per-position cap (None: exact)
    work: Path
    fingerprint: str
    labeller: object  # the concept labeller for this corpus (fitted in `job_labels`)
    timings: dict = field(default_factory=dict)

    @property
    def block(self) -> int:
        return self.cfg.model.block_size

    @property
    def trained_name(self) -> str:
        return "routed_units" if self.cfg.model.ffn_kinds()[self.layer] == "routed" else "dense_neurons"

    @contextlib.contextmanager
    def lap(self, name: str):
        t0 = time.perf_counter()
        yield
        self.timings[name] = round(time.perf_counter() - t0, 2)


def analyze(run_dir: str | Path, opts: AnalyzeOptions | None = None) -> dict:
    """Run the whole analysis of one run; returns report.json's content (also written to RUN/analysis/).

    Stages: prepare (load, check, the analysed stream) -> capture (trained model and its random init)
    -> model numbers -> baselines (trained and untrained SAE / transcoder, captured) -> labels ->
    scores -> the browser's store -> dashboards -> interventions -> report, published in one rename."""
    from monoroute.data import prepare_data

    start = time.perf_counter()
    job = prepare(run_dir, opts or AnalyzeOptions())
    with job.lap("capture"):
        capture_model(job)
    store = prepare_data(job.cfg.data)
    with job.lap("val_loss"):
        model_info = model_numbers(job, store)
    baselines_info = train_baselines(job, store)
    with job.lap("labels"):
        labels = job_labels(job)
    with job.lap("metrics"):
        unit_sets, per_layer, loaded = score(job, labels, baselines_info)
    from monoroute.interp.dashboards import vocab_strings

    strings = vocab_strings(job.tokenizer, job.cfg.model.vocab_size)
    with job.lap("unit_tables"):
        write_browser_store(job, labels, loaded, strings)
    chosen = pick_concepts(unit_sets[job.trained_name], max(job.opts.dashboards, job.opts.interventions))
    with job.lap("dashboards"):
        dashboards = make_dashboards(job, labels, unit_sets, loaded, strings, chosen, list(baselines_info))
    with job.lap("interventions"):
        interventions = run_interventions(job, labels, unit_sets, loaded, chosen)
    report = {
        "store_format": STORE_FORMAT, "run": str(job.run), "data": job.source, "split": job.split,
        "n_positions": len(job.stream.positions), "n_documents": len(job.stream.docs), "dense_cap": job.keep,
        "layer": job.layer, "scored_layers": job.score_layers, "config": job.cfg.to_dict(), "model": model_info,
        "concepts": {"names": labels.names, "frequency": [round(float(f), 6) for f in labels.frequency()]},
        "unit_sets": unit_sets, "per_layer": per_layer, "interventions": interventions,
        "dashboards": dashboards, "timings_s": job.timings,
    }
    report["seconds"] = round(time.perf_counter() - start, 1)
    report["peak_rss_mb"] = round(peak_rss_mb(), 1)
    from monoroute.interp.report import write_outputs

    write_outputs(report, job.work)
    publish(job.run, job.work)
    return report


def prepare(run_dir: str | Path, opts: AnalyzeOptions) -> Job:
    """Load and check the run (a clear error for missing or corrupt weights, a bad layer, baselines
    on a routed layer, a bad concept file) and build the analysed token stream."""
    from monoroute.data import load_tokenizer
    from monoroute.devices import resolve_device
    from monoroute.train.trainer import load_run

    run = Path(run_dir)
    check_options(run, opts)
    cfg, model = load_run(run, opts.device)
    tokenizer = load_tokenizer(run / "tokenizer.json")
    n_layer = cfg.model.n_layer
    layer = n_layer // 2 if opts.layer is None else opts.layer
    if not 0 <= layer < n_layer:
        raise MonorouteError(f"--layer {layer} is out of range: the model has layers 0..{n_layer - 1}")
    if (opts.sae or opts.transcoder) and cfg.model.ffn_kinds()[layer] != "dense":
        raise MonorouteError(f"--sae/--transcoder train on a dense FFN's activations, but layer {layer} of {run} is "
                             f"routed; run them on the dense run (or pick a dense --layer)")
    from monoroute.interp import labels as L

    labeller = L.labeller_for(opts.data or cfg.data.source, opts.concepts)  # a bad concept file fails here, before any work
    source = opts.data or cfg.data.source
    split = opts.split or ("val" if opts.data is None else "all")
    stream = build_stream(tokenizer, source, opts.tokens, cfg.model.block_size,
                          cfg.data.val_fraction if opts.data is None else max(cfg.data.val_fraction, 0.05),
                          cfg.data.text_column, cfg.data.max_bytes if opts.data is None else None, split)
    keep = dense_cap(opts, cfg, len(stream.positions))
    work = run / WORK_DIR
    from monoroute.fileio import check_writable

    check_writable(work, "the analysis")  # before any work: a read-only run fails here, in one line
    check_writable(run / OUT_DIR, "the analysis")
    settings = json.dumps({"data": source, "split": split, "tokens": opts.tokens, "keep": keep, "seed": opts.seed,
                           "layer": layer, "all_layers": opts.all_layers}, sort_keys=True)
    fingerprint = hashlib.sha256((weights_fingerprint(model) + settings).encode()).hexdigest()[:16]
    return Job(run, opts, cfg, model, tokenizer, resolve_device(opts.device), layer,
               list(range(n_layer)) if opts.all_layers else [layer], source, split, stream, keep, work, fingerprint,
               labeller)


def capture_model(job: Job) -> None:
    """Every FFN layer of the trained model, and of the same config at the run's own initialisation."""
    from monoroute.models import GPT

    capture(job.model, job.stream.positions, model_unit_sets(job.model, keep=job.keep), job.work / "capture",
            job.block, job.fingerprint, progress=job.opts.progress, device=job.device, desc="capture trained")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(job.cfg.train.seed)  # the run's own initialisation, before any step
        random_model = GPT(job.cfg.model).to(job.device).eval()
    capture(random_model, job.stream.positions, model_unit_sets(random_model, prefix="random_init", keep=job.keep),
            job.work / "capture-random", job.block, job.fingerprint, progress=job.opts.progress, device=job.device,
            desc="capture random init")


def model_numbers(job: Job, store) -> dict:
    from monoroute.train.trainer import evaluate

    cfg, model = job.cfg, job.model
    routed = "routed" in cfg.model.ffn_kinds()
    return {"val_loss": evaluate(model, store, cfg, job.device), "flops_per_token": model.flops_per_token()["total"],
            "params": model.n_params(), "active_params": model.n_active_params(),
            "tokens_per_s": median_tokens_per_s(job.run), "ffn": cfg.model.ffn,
            "n_units": cfg.model.n_units if routed else None, "k": cfg.model.k if routed else None,
            "d_ff": cfg.model.ffn_width, "l1_coef": cfg.model.l1_coef if routed else None}


def train_baselines(job: Job, store) -> dict[str, dict]:
    """--sae / --transcoder: train each, measure its reconstruction and spliced loss, and capture its
    latents beside those of its matched floor (the same architecture, width and seed, untrained).
    Returns {kind: numbers} (empty without baselines)."""
    opts = job.opts
    if not (opts.sae or opts.transcoder):
        return {}
    from monoroute.interp import baselines as B

    model, layer, device = job.model, job.layer, str(job.device)
    n_latents, k_latents = opts_n_latents(job.cfg), job.cfg.model.k
    infos: dict[str, dict] = {}
    sets: list[UnitSet] = []
    for kind in ("sae", "transcoder"):
        if not getattr(opts, kind):
            continue
        with job.lap(f"train_{kind}"):
            t0 = time.perf_counter()
            trainer = B.train_sae if kind == "sae" else B.train_transcoder
            tokens = opts.baseline_tokens or (B.SAE_TOKENS if kind == "sae" else B.TRANSCODER_TOKENS)
            base = trainer(model, store, layer, n_latents, k_latents, tokens=tokens, seed=opts.seed, device=device,
                           progress=opts.progress)
            base.save(job.work / kind)
            windows = torch.from_numpy(job.stream.positions.token_ids[: 64 * job.block].reshape(-1, job.block))
            info = B.explained_variance(base, model, windows)
            clean, spliced, zero = B.spliced_loss(model, base, store, job.cfg)
            info.update(clean_val_loss=clean, spliced_val_loss=spliced, zero_ablation_val_loss=zero,
                        loss_recovered=(zero - spliced) / (zero - clean) if zero != clean else None,
                        n_latents=n_latents, k=k_latents, train_tokens=tokens,
                        train_seconds=round(time.perf_counter() - t0, 1))
        infos[kind] = info
        sets.append(UnitSet(f"{kind}.L{layer}", kind, layer, n_latents, k_latents, base.hook, base.extractor()))
        init = (B.init_sae(model, store, layer, n_latents, k_latents, seed=opts.seed, device=device)
                if kind == "sae" else B.init_transcoder(model, layer, n_latents, k_latents, opts.seed, device))
        init_name = floor_of(kind)
        sets.append(UnitSet(f"{init_name}.L{layer}", init_name, layer, n_latents, k_latents, init.hook, init.extractor()))
    with job.lap("capture_baselines"):
        capture(model, job.stream.positions, sets, job.work / "capture-baselines", job.block, job.fingerprint,
                progress=opts.progress, device=job.device, desc="capture baselines")
    return infos


def job_labels(job: Job):
    job.labeller.fit(job.stream.texts)
    return label_stream(job.labeller, job.stream, job.tokenizer)


def score(job: Job, labels, baselines_info: dict[str, dict]):
    """Firing statistics of every captured set on every layer, all metrics on the scored layers.
    Returns (unit_sets of the headline layer, per_layer, the headline layer's non-floor activations)."""
    from monoroute.interp import metrics as M

    folders = ["capture", "capture-random"] + (["capture-baselines"] if baselines_info else [])
    per_layer: dict[str, dict] = {}
    unit_sets: dict[str, dict] = {}
    loaded = {}
    for folder in folders:
        cap = Capture(job.work / folder)
        for key in cap.keys:
            acts = cap.load(key)
            here = per_layer.setdefault(f"L{acts.layer}", {})
            here[acts.name] = M.firing_stats(acts)
            if acts.layer not in job.score_layers:
                continue
            scored = M.all_metrics(acts, labels, job.stream.positions, seed=job.opts.seed)
            scored.update(n_units=acts.n_units, k=acts.k)
            if acts.layer != job.layer:
                here[acts.name] = dict(here[acts.name], **{k: scored[k] for k in HEADLINE})
                continue
            unit_sets[acts.name] = scored
            if not is_floor(acts.name):  # floors are only scored: nothing later reads their activations
                loaded[acts.name] = acts
    for kind, info in baselines_info.items():
        unit_sets[kind].update(info)
    for name, scored in unit_sets.items():
        if not is_floor(name):
            scored["floor"] = floor_of(name)
    return unit_sets, per_layer, loaded


def write_browser_store(job: Job, labels, loaded: dict, strings: list[str]) -> None:
    """What `monoroute serve` reads: the concept labels and one row per unit of each headline set."""
    from monoroute.interp.store import save_labels
    from monoroute.interp.unit_table import build_unit_table, write_unit_table

    save_labels(labels, job.work / "labels.safetensors")
    for set_name, acts in loaded.items():
        write_unit_table(build_unit_table(acts, labels, job.stream.positions, strings, seed=job.opts.seed),
                         job.work / "units" / f"{set_name}.parquet")


def make_dashboards(job: Job, labels, unit_sets: dict, loaded: dict, strings: list[str], chosen: list[str],
                    baselines: list[str]) -> list[dict]:
    """Dashboards of the best unit of each chosen concept, in the model's own set and each baseline."""
    from monoroute.interp import metrics as M
    from monoroute.interp.dashboards import unit_dashboard
    from monoroute.interp.interventions import unit_logit_effect

    positions, seed = job.stream.positions, job.opts.seed
    dashboards = []
    for set_name in [job.trained_name] + baselines:
        acts = loaded[set_name]
        best = {c["concept"]: c["best_unit"] for c in unit_sets[set_name]["details"]["coverage"]["per_concept"]}
        for concept in chosen[: job.opts.dashboards]:
            unit = best.get(concept)
            if unit is None:
                continue
            dash = unit_dashboard(acts.matrix, unit, positions, strings, labels, seed=seed)
            dash.update(set=set_name, layer=job.layer, concept=concept)
            if set_name == job.trained_name:
                dash["logit_effect"] = unit_logit_effect(job.model, job.layer, unit, top=8, tokenizer=job.tokenizer)
            dash["explanation"] = M.explanation_scores(acts, positions.token_ids, positions.doc_ids, units=[unit],
                                                       seed=seed)["per_unit"][0] if acts.matrix[:, unit].nnz else None
            dashboards.append(dash)
    return dashboards


def run_interventions(job: Job, labels, unit_sets: dict, loaded: dict, chosen: list[str]) -> list[dict]:
    """Ablate / clamp / steer the best trained unit of each chosen concept: effect where the concept
    holds against elsewhere."""
    from monoroute.interp.interventions import specificity_table

    rows = unit_sets[job.trained_name]["details"]["coverage"]["per_concept"]
    best = {c["concept"]: c["best_unit"] for c in rows}
    block, positions = job.block, job.stream.positions
    n_win = min(64, len(positions) // block)
    windows = torch.from_numpy(positions.token_ids[: n_win * block].reshape(n_win, block))
    concept_index = {name: i for i, name in enumerate(labels.names)}
    masks, units = {}, {}
    for concept in chosen[: job.opts.interventions]:
        mask = labels.matrix[: n_win * block, concept_index[concept]].reshape(n_win, block)
        masks[concept] = torch.from_numpy(mask[:, :-1].copy())
        units[concept] = [(job.layer, int(best[concept]))]
    return specificity_table(job.model, windows, masks, units, loaded[job.trained_name]) if masks else []


def dense_cap(opts: AnalyzeOptions, cfg, n_positions: int) -> int | None:
    """The per-position cap for dense sets: the user's --keep, else None (exact) unless positions × d_ff
    exceeds opts.dense_exact_max_entries, where 128 is kept (its cap hits are then reported)."""
    if opts.keep is not None:
        return opts.keep
    dense = "dense" in cfg.model.ffn_kinds() or opts.sae or opts.transcoder
    return 128 if dense and n_positions * cfg.model.ffn_width > opts.dense_exact_max_entries else None


def opts_n_latents(cfg) -> int:
    """Post-hoc baselines get the routed model's width (the preset's n_units), so the comparison
    is at equal N and k."""
    return cfg.model.n_units


def label_stream(labeller, stream: Stream, tokenizer):
    """Concept labels for every position; separator tokens carry no concept."""
    from monoroute.interp import labels as L
    from monoroute.interp.types import ConceptLabels

    names = labeller.concept_names()
    matrix = np.zeros((len(stream.positions), len(names)), dtype=bool)
    for (first, n), body, text in zip(doc_token_rows(stream), stream.docs, stream.texts):
        if n <= 0:
            continue
        rows = L.label_tokens(labeller, text, L.token_bytes(tokenizer, body))  # (len(body), C)
        matrix[first:first + n] = rows[:n]
    return ConceptLabels(names, matrix)


def pick_concepts(scored: dict, n: int) -> list[str]:
    """Concepts to show: the best-covered ones among those neither very rare nor near-ubiquitous
    (0.2 %–25 % of tokens), so dashboards and interventions are about something a reader can check."""
    rows = scored["details"]["coverage"]["per_concept"]
    ok = [r for r in rows if 0.002 <= r["frequency"] <= 0.25 and r.get("best_unit") is not None]
    ok.sort(key=lambda r: -(r["f1"] or 0.0))
    return [r["concept"] for r in ok[:n]]


def publish(run: Path, work: Path) -> None:
    """Swap the finished work folder in as RUN/analysis in one rename (the old one is removed after)."""
    from monoroute.fileio import replace_dir

    replace_dir(work, run / OUT_DIR)


def summary(report: dict) -> dict:
    """The compact JSON `--json` prints: per unit set the headline numbers, plus the model's."""
    keep = HEADLINE + ("explained_variance", "spliced_val_loss", "clean_val_loss", "zero_ablation_val_loss",
                       "loss_recovered", "n_units", "k", "train_tokens", "floor")
    return {
        "run": report["run"], "layer": report["layer"], "n_positions": report["n_positions"],
        "split": report.get("split"), "dense_cap": report.get("dense_cap"),
        "model": report["model"],
        "unit_sets": {name: {k: v for k, v in s.items() if k in keep} for name, s in report["unit_sets"].items()},
        "seconds": report["seconds"], "peak_rss_mb": report["peak_rss_mb"],
    }


def finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)
