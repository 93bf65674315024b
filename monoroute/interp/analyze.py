"""`monoroute analyze RUN`: are a trained model's units monosemantic, against which floor and which baselines?

    run dir ──load──> model ──capture──> sparse activations (every FFN layer)     ┐
    same config, untrained ──capture──> random-init floor                         ├─> metrics ─> report.json,
    (--sae / --transcoder) post-hoc baselines on the dense layer ──capture──>     ┘             CSVs, report.html
    validation documents ──labeller──> concept labels (P, C)

Work happens in RUN/.analysis-work/ (captures resume from there if interrupted) and the finished
result replaces RUN/analysis/ in one rename, so `analysis/` never holds a half-written analysis.
"""
from __future__ import annotations

import hashlib
import json
import math
import resource
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from monoroute.errors import MonorouteError
from monoroute.interp.capture import Capture, UnitSet, capture, model_unit_sets
from monoroute.interp.stream import SPLITS, Stream, build_stream, doc_token_rows
from monoroute.interp.types import floor_of, is_floor

WORK_DIR = ".analysis-work"
OUT_DIR = "analysis"
STORE_FORMAT = 2  # 2: + labels.safetensors and units/<set>.parquet, what `monoroute serve` reads
HEADLINE = ("l0", "live_slot_fraction", "dead_fraction", "cap_hit_fraction", "coverage", "coverage_in_sample",
            "coverage_at_m", "mean_purity", "mean_purity_null",
            "share_pure", "share_pure_null", "sparse_probe_f1", "sparse_probe_f1_top1", "explanation_f1")


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


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def median_tokens_per_s(run: Path) -> float | None:
    try:
        rates = [json.loads(line).get("tokens_per_s") for line in (run / "metrics.jsonl").read_text().splitlines()
                 if line.strip()]
    except (OSError, json.JSONDecodeError):
        return None
    rates = [r for r in rates if r]
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


def analyze(run_dir: str | Path, opts: AnalyzeOptions | None = None) -> dict:
    """Run the whole analysis of one run; returns report.json's content (also written to RUN/analysis/)."""
    from monoroute.data import load_tokenizer, prepare_data
    from monoroute.devices import resolve_device
    from monoroute.interp import labels as L
    from monoroute.models import GPT
    from monoroute.train.trainer import evaluate, load_run

    opts = opts or AnalyzeOptions()
    run = Path(run_dir)
    check_options(run, opts)
    start = time.perf_counter()
    device = resolve_device(opts.device)
    cfg, model = load_run(run, opts.device)  # a clear error when weights are missing or corrupt
    tokenizer = load_tokenizer(run / "tokenizer.json")
    n_layer = cfg.model.n_layer
    layer = n_layer // 2 if opts.layer is None else opts.layer
    if not 0 <= layer < n_layer:
        raise MonorouteError(f"--layer {layer} is out of range: the model has layers 0..{n_layer - 1}")
    kinds = cfg.model.ffn_kinds()
    if (opts.sae or opts.transcoder) and kinds[layer] != "dense":
        raise MonorouteError(f"--sae/--transcoder train on a dense FFN's activations, but layer {layer} of {run} is "
                             f"routed; run them on the dense run (or pick a dense --layer)")
    labeller = L.labeller_for(opts.data or cfg.data.source, opts.concepts)  # a bad concept file fails here
    source = opts.data or cfg.data.source
    split = opts.split or ("val" if opts.data is None else "all")
    stream = build_stream(tokenizer, source, opts.tokens, cfg.model.block_size,
                          cfg.data.val_fraction if opts.data is None else max(cfg.data.val_fraction, 0.05),
                          cfg.data.text_column, cfg.data.max_bytes if opts.data is None else None, split)
    keep = dense_cap(opts, cfg, len(stream.positions))
    timings: dict[str, float] = {}

    def lap(name: str, t0: float) -> None:
        timings[name] = round(time.perf_counter() - t0, 2)

    work = run / WORK_DIR
    work.mkdir(exist_ok=True)
    settings = json.dumps({"data": source, "split": split, "tokens": opts.tokens, "keep": keep, "seed": opts.seed,
                           "layer": layer, "all_layers": opts.all_layers}, sort_keys=True)
    fingerprint = hashlib.sha256((weights_fingerprint(model) + settings).encode()).hexdigest()[:16]
    block = cfg.model.block_size
    score_layers = list(range(n_layer)) if opts.all_layers else [layer]

    # --- capture: trained model, random-init floor ------------------------------------------
    t0 = time.perf_counter()
    trained_sets = model_unit_sets(model, keep=keep)
    capture(model, stream.positions, trained_sets, work / "capture", block, fingerprint,
            progress=opts.progress, device=device, desc="capture trained")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.train.seed)  # the run's own initialisation, before any step
        random_model = GPT(cfg.model).to(device).eval()
    random_sets = model_unit_sets(random_model, prefix="random_init", keep=keep)
    capture(random_model, stream.positions, random_sets, work / "capture-random", block, fingerprint,
            progress=opts.progress, device=device, desc="capture random init")
    lap("capture", t0)

    # --- model-level numbers -------------------------------------------------------------------
    t0 = time.perf_counter()
    store = prepare_data(cfg.data)
    val_loss = evaluate(model, store, cfg, device)
    flops = model.flops_per_token()
    model_info = {"val_loss": val_loss, "flops_per_token": flops["total"], "params": model.n_params(),
                  "active_params": model.n_active_params(), "tokens_per_s": median_tokens_per_s(run),
                  "ffn": cfg.model.ffn, "n_units": cfg.model.n_units if "routed" in kinds else None,
                  "k": cfg.model.k if "routed" in kinds else None, "d_ff": cfg.model.ffn_width,
                  "l1_coef": cfg.model.l1_coef if "routed" in kinds else None}
    lap("val_loss", t0)

    # --- baselines -------------------------------------------------------------------------------
    baselines_info: dict[str, dict] = {}
    baseline_sets: list[UnitSet] = []
    if opts.sae or opts.transcoder:
        from monoroute.interp import baselines as B

        n_latents = opts_n_latents(cfg)
        k_latents = cfg.model.k
        for kind in ("sae", "transcoder"):
            if not getattr(opts, kind):
                continue
            t0 = time.perf_counter()
            trainer = B.train_sae if kind == "sae" else B.train_transcoder
            tokens = opts.baseline_tokens or (B.SAE_TOKENS if kind == "sae" else B.TRANSCODER_TOKENS)
            base = trainer(model, store, layer, n_latents, k_latents, tokens=tokens, seed=opts.seed,
                           device=str(device), progress=opts.progress)
            base.save(work / kind)
            windows = torch.from_numpy(stream.positions.token_ids[: 64 * block].reshape(-1, block))
            info = B.explained_variance(base, model, windows)
            clean, spliced, zero = B.spliced_loss(model, base, store, cfg)
            info.update(clean_val_loss=clean, spliced_val_loss=spliced, zero_ablation_val_loss=zero,
                        loss_recovered=(zero - spliced) / (zero - clean) if zero != clean else None,
                        n_latents=n_latents, k=k_latents, train_tokens=tokens, train_seconds=round(time.perf_counter() - t0, 1))
            baselines_info[kind] = info
            baseline_sets.append(UnitSet(f"{kind}.L{layer}", kind, layer, n_latents, k_latents, base.hook,
                                         base.extractor()))
            lap(f"train_{kind}", t0)
            # its matched floor: the same architecture, width and seed, untrained, on the same positions
            init = (B.init_sae(model, store, layer, n_latents, k_latents, seed=opts.seed, device=str(device))
                    if kind == "sae" else B.init_transcoder(model, layer, n_latents, k_latents, opts.seed, str(device)))
            init_name = floor_of(kind)
            baseline_sets.append(UnitSet(f"{init_name}.L{layer}", init_name, layer, n_latents, k_latents, init.hook,
                                         init.extractor()))
        t0 = time.perf_counter()
        capture(model, stream.positions, baseline_sets, work / "capture-baselines", block, fingerprint,
                progress=opts.progress, device=device, desc="capture baselines")
        lap("capture_baselines", t0)

    # --- labels ------------------------------------------------------------------------------------
    t0 = time.perf_counter()
    labeller.fit(stream.texts)
    labels = label_stream(labeller, stream, tokenizer)
    lap("labels", t0)

    # --- metrics -------------------------------------------------------------------------------------
    from monoroute.interp import metrics as M

    t0 = time.perf_counter()
    captures = [Capture(work / "capture"), Capture(work / "capture-random")]
    if baseline_sets:
        captures.append(Capture(work / "capture-baselines"))
    per_layer: dict[str, dict] = {}
    unit_sets: dict[str, dict] = {}
    loaded = {}
    for cap in captures:
        for key in cap.keys:
            acts = cap.load(key)
            per_layer.setdefault(f"L{acts.layer}", {})[acts.name] = M.firing_stats(acts)
            if acts.layer in score_layers:
                scored = M.all_metrics(acts, labels, stream.positions, seed=opts.seed)
                scored.update(n_units=acts.n_units, k=acts.k)
                if acts.layer == layer:
                    unit_sets[acts.name] = scored
                    if not is_floor(acts.name):  # floors are only scored: nothing later reads their activations
                        loaded[acts.name] = acts
                else:
                    per_layer[f"L{acts.layer}"][acts.name] = dict(per_layer[f"L{acts.layer}"][acts.name],
                                                                  **{k: scored[k] for k in HEADLINE})
            else:
                del acts
    for kind, info in baselines_info.items():
        unit_sets[kind].update(info)
    for name, scored in unit_sets.items():
        if not is_floor(name):
            scored["floor"] = floor_of(name)
    lap("metrics", t0)

    # --- the browser's store: concept labels and one row per unit of each headline unit set ---------
    t0 = time.perf_counter()
    from monoroute.interp.dashboards import vocab_strings
    from monoroute.interp.store import save_labels
    from monoroute.interp.unit_table import build_unit_table, write_unit_table

    strings = vocab_strings(tokenizer, cfg.model.vocab_size)
    save_labels(labels, work / "labels.safetensors")
    for set_name, acts in loaded.items():
        if not is_floor(set_name):
            write_unit_table(build_unit_table(acts, labels, stream.positions, strings, seed=opts.seed),
                             work / "units" / f"{set_name}.parquet")
    lap("unit_tables", t0)

    # --- dashboards and interventions on the headline layer's trained units -------------------------
    t0 = time.perf_counter()
    from monoroute.interp.dashboards import unit_dashboard
    from monoroute.interp.interventions import specificity_table, unit_logit_effect

    trained_name = "routed_units" if kinds[layer] == "routed" else "dense_neurons"
    chosen = pick_concepts(unit_sets[trained_name], max(opts.dashboards, opts.interventions))
    dashboards = []
    for set_name in [trained_name] + list(baselines_info):
        acts = loaded[set_name]
        best = {c["concept"]: c["best_unit"] for c in unit_sets[set_name]["details"]["coverage"]["per_concept"]}
        for concept in chosen[: opts.dashboards]:
            unit = best.get(concept)
            if unit is None:
                continue
            dash = unit_dashboard(acts.matrix, unit, stream.positions, strings, labels, seed=opts.seed)
            dash.update(set=set_name, layer=layer, concept=concept)
            if set_name == trained_name:
                dash["logit_effect"] = unit_logit_effect(model, layer, unit, top=8, tokenizer=tokenizer)
            dash["explanation"] = M.explanation_scores(acts, stream.positions.token_ids, stream.positions.doc_ids,
                                                       units=[unit], seed=opts.seed)["per_unit"][0] \
                if acts.matrix[:, unit].nnz else None
            dashboards.append(dash)
    lap("dashboards", t0)

    t0 = time.perf_counter()
    best_trained = {c["concept"]: c["best_unit"] for c in unit_sets[trained_name]["details"]["coverage"]["per_concept"]}
    n_win = min(64, len(stream.positions) // block)
    windows = torch.from_numpy(stream.positions.token_ids[: n_win * block].reshape(n_win, block))
    concept_index = {name: i for i, name in enumerate(labels.names)}
    masks, units = {}, {}
    for concept in chosen[: opts.interventions]:
        mask = labels.matrix[: n_win * block, concept_index[concept]].reshape(n_win, block)
        masks[concept] = torch.from_numpy(mask[:, :-1].copy())
        units[concept] = [(layer, int(best_trained[concept]))]
    interventions = specificity_table(model, windows, masks, units, loaded[trained_name]) if masks else []
    lap("interventions", t0)

    report = {
        "store_format": STORE_FORMAT, "run": str(run), "data": source, "split": split,
        "n_positions": len(stream.positions), "n_documents": len(stream.docs), "dense_cap": keep,
        "layer": layer, "scored_layers": score_layers, "config": cfg.to_dict(), "model": model_info,
        "concepts": {"names": labels.names, "frequency": [round(float(f), 6) for f in labels.frequency()]},
        "unit_sets": unit_sets, "per_layer": per_layer, "interventions": interventions,
        "dashboards": dashboards, "timings_s": timings,
    }
    report["seconds"] = round(time.perf_counter() - start, 1)
    report["peak_rss_mb"] = round(peak_rss_mb(), 1)
    from monoroute.interp.report import write_outputs

    write_outputs(report, work)
    publish(run, work)
    return report


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
