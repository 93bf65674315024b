"""`monoroute analyze RUN` and `monoroute compare RUN_A RUN_B ...`."""
from __future__ import annotations

import json
from pathlib import Path

from monoroute.errors import MonorouteError
from monoroute.tables import aligned_lines

# (column header, where in report.json: ("model", key) or (unit-set-key, metric))
COMPARE_MODEL = [("val loss", "val_loss"), ("FLOPs/token", "flops_per_token"), ("active params", "active_params"),
                 ("tokens/s", "tokens_per_s")]
COMPARE_UNITS = [("L0", "l0"), ("cap hit", "cap_hit_fraction"), ("live-slot", "live_slot_fraction"),
                 ("dead %", "dead_fraction"), ("coverage", "coverage"), ("in-sample", "coverage_in_sample"),
                 ("coverage@5", "coverage_at_m"), ("purity", "mean_purity"), ("purity null", "mean_purity_null"),
                 ("probe F1", "sparse_probe_f1"), ("expl. F1", "explanation_f1"),
                 ("expl. <20 fires", "explanation_share_live_below_min")]  # live units too rare to explain
FLOOR_KEYS = ("coverage", "coverage_in_sample", "coverage_at_m", "mean_purity", "sparse_probe_f1", "explanation_f1")


def add_parser(sub) -> None:
    p = sub.add_parser("analyze", help="score a run's units: coverage, purity, sparse probes, explanations, "
                                       "baselines, dashboards (writes RUN/analysis/)")
    p.add_argument("run")
    p.add_argument("--data", help="corpus spec to analyse (default: the run's own corpus)")
    p.add_argument("--split", choices=("train", "val", "all"),
                   help="which documents of the corpus (default: all of a --data corpus; val of the run's own)")
    p.add_argument("--tokens", type=int, default=200_000, help="positions to analyse (default 200000)")
    p.add_argument("--layer", type=int, help="layer scored in full and where baselines train (default n_layer // 2)")
    p.add_argument("--all-layers", action="store_true", help="score every FFN layer in full")
    p.add_argument("--sae", action="store_true", help="train a TopK SAE (sae-lens) on the dense layer's activations")
    p.add_argument("--transcoder", action="store_true", help="train a TopK transcoder on the dense layer post hoc")
    p.add_argument("--concepts", help="YAML/TOML file of extra regex concepts")
    p.add_argument("--keep", type=int, help="cap dense neurons at the top N positive values per position "
                                            "(default: exact, unless positions x d_ff > 250M)")
    p.add_argument("--interventions", type=int, default=6, help="concepts whose best unit is ablated/clamped/steered")
    p.add_argument("--dashboards", type=int, default=8, help="concepts whose best units get a dashboard")
    p.add_argument("--baseline-tokens", type=int, help="training tokens for --sae/--transcoder (default: their own)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", action="store_true", help="print the headline numbers as one JSON object")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_analyze)

    p = sub.add_parser("compare", help="side-by-side table of analysed runs")
    p.add_argument("runs", nargs="+")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_compare)


def cmd_analyze(args) -> int:
    from monoroute.interp.analyze import AnalyzeOptions, analyze, summary

    opts = AnalyzeOptions(data=args.data, split=args.split, tokens=args.tokens, layer=args.layer, all_layers=args.all_layers,
                          sae=args.sae, transcoder=args.transcoder, concepts=args.concepts, keep=args.keep,
                          seed=args.seed, device=args.device, progress=not args.no_progress,
                          interventions=args.interventions, dashboards=args.dashboards,
                          baseline_tokens=args.baseline_tokens)
    report = analyze(args.run, opts)
    if args.json:
        print(json.dumps(summary(report)))
    else:
        print(compare_table([report]))
        print(f"analysed {report['n_positions']:,} positions of {report['n_documents']:,} documents "
              f"({report['data']}, split {report['split']})")
        print(f"wrote {Path(args.run) / 'analysis'}/report.html ({report['seconds']} s, "
              f"peak RSS {report['peak_rss_mb']:.0f} MB)")
    return 0


def load_report(run: str) -> dict:
    path = Path(run) / "analysis" / "report.json"
    if not path.is_file():
        raise MonorouteError(f"{run} has no analysis ({path} missing); run `monoroute analyze {run}` first")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise MonorouteError(f"{path} is not valid JSON ({exc}); run `monoroute analyze {run}` again") from None


def compare_rows(reports: list[dict]) -> list[dict]:
    """One row per (run, unit set), each score beside its own set's random-init floor (`floor_set`:
    random_init for the model's units, sae_init / transcoder_init for the post-hoc baselines)."""
    from monoroute.interp.types import floor_of, is_floor

    rows = []
    for report in reports:
        for name, s in report["unit_sets"].items():
            if is_floor(name):
                continue
            floor_set = s.get("floor", floor_of(name))
            floor = report["unit_sets"].get(floor_set, {})
            row = {"run": report["run"], "unit_set": name, "layer": report["layer"], "floor_set": floor_set,
                   "n_positions": report.get("n_positions")}
            row.update({key: report["model"].get(key) for _, key in COMPARE_MODEL})
            row.update({key: s.get(key) for _, key in COMPARE_UNITS})
            row.update({f"{key}_random_init": floor.get(key) for key in FLOOR_KEYS})
            row["spliced_val_loss"] = s.get("spliced_val_loss")
            row["explained_variance"] = s.get("explained_variance")
            rows.append(row)
    return rows


def _cell(value, key: str) -> str:
    if value is None:
        return "–"
    if key == "dead_fraction":
        return f"{100 * value:.1f}"
    if key in ("flops_per_token", "active_params"):
        return f"{value:,.0f}"
    if key == "tokens_per_s":
        return f"{value:,.0f}"
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


def compare_table(reports: list[dict]) -> str:
    rows = compare_rows(reports)
    header = ["run", "unit set"] + [h for h, _ in COMPARE_MODEL] + [h for h, _ in COMPARE_UNITS] + ["spliced loss"]
    lines = []
    for row in rows:
        cells = [row["run"], row["unit_set"]] + [_cell(row[k], k) for _, k in COMPARE_MODEL]
        for _, key in COMPARE_UNITS:
            cell = _cell(row[key], key)
            if key in FLOOR_KEYS and row.get(f"{key}_random_init") is not None:
                cell += f" ({_cell(row[f'{key}_random_init'], key)})"
            cells.append(cell)
        cells.append(_cell(row["spliced_val_loss"], "spliced_val_loss"))
        lines.append(cells)
    out = aligned_lines(header, lines)
    out.append("(in brackets: the same architecture at its initialisation (the model's for its own units, the untrained "
               "SAE / transcoder for theirs); coverage: unit chosen on half the documents, scored on the other; "
               "in-sample: chosen and scored on all; coverage@5: OR of up to 5 units; purity null: the same units' "
               "firings moved to random positions; dead % over the analysed tokens; cap hit: share of positions "
               "a capped dense capture censored)")
    return "\n".join(out)


def cmd_compare(args) -> int:
    """Analyses side by side, then (for runs that have them) circuits: `monoroute circuits` results."""
    from monoroute.circuits.report import OUT_DIR, circuits_summary_rows, circuits_summary_table, load_circuits

    from monoroute.facts.report import facts_rows, facts_table, load_facts

    reports, circuits, facts = [], [], []
    for run in args.runs:
        has_circuits = (Path(run) / OUT_DIR / "circuits.json").is_file()
        if has_circuits:
            circuits.append(load_circuits(run))
        run_facts = load_facts(run)
        facts.extend(run_facts)
        if not (has_circuits or run_facts) or (Path(run) / "analysis" / "report.json").is_file():
            reports.append(load_report(run))  # a run with none of them gets load_report's error
    if args.json:
        print(json.dumps({"rows": compare_rows(reports), "circuits": circuits_summary_rows(circuits),
                          "facts": facts_rows(facts)}))
    else:
        if reports:
            print(compare_table(reports))
        if circuits:
            print(circuits_summary_table(circuits))
        if facts:
            print(facts_table(facts))
    return 0
