"""`monoroute sweep SPEC [--out DIR] [--json] [--analyze-tokens N] [--dry-run]`."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from monoroute.errors import MonorouteError


def add_parser(sub) -> None:
    p = sub.add_parser("sweep", help="train, evaluate and analyse the runs of a spec file; table, CSV and plots "
                                     "(resumable: run it again to continue)")
    p.add_argument("spec", help="YAML/TOML/JSON spec: preset, set, runs (see sweeps/*.yaml)")
    p.add_argument("--out", metavar="DIR", help="sweep directory; each run goes to DIR/NAME (default: runs/ and the "
                                                "spec's file name without its extension)")
    p.add_argument("--analyze-tokens", type=int, metavar="N", help="positions each analysis scores (default: the spec's "
                                                      "analyze_tokens, else 100000)")
    p.add_argument("--dry-run", action="store_true", help="check the spec and print what each run would do; "
                                                          "train nothing")
    p.add_argument("--json", action="store_true", help="print the per-run table as one JSON object")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_sweep)


def default_out(spec: str) -> Path:
    return Path("runs") / Path(spec).stem


def cmd_sweep(args) -> int:
    from monoroute.sweep.execute import run_sweep
    from monoroute.sweep.plan import check_runs, plan
    from monoroute.sweep.results import text_table
    from monoroute.sweep.spec import load_spec

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise MonorouteError("monoroute sweep runs in one process; start it without torchrun (or train each run "
                             "with `torchrun ... monoroute train`)")
    out = Path(args.out) if args.out else default_out(args.spec)
    spec = load_spec(args.spec, out, args.analyze_tokens)
    planned = plan(spec, check_runs(spec))  # every run checked, every run directory inspected
    if args.dry_run:
        print(json.dumps(dry_run_json(spec, planned, out)) if args.json else dry_run_text(spec, planned, out))
        return 0
    doc = run_sweep(spec, planned, out, progress=not args.no_progress)
    if args.json:
        print(json.dumps({"out": str(out), "rows": doc["rows"]}))
    else:
        print(text_table(doc["rows"]))
        print(f"wrote {out}/sweep.json, sweep.csv, loss_vs_flops.png, coverage_vs_loss.png", file=sys.stderr)
    return 0


def describe_action(p) -> str:
    return {"train": "train", "resume": f"resume from step {p.step}", "skip": "done (skip)"}[p.action]


def dry_run_json(spec, planned, out: Path) -> dict:
    from monoroute.sweep.results import key_settings

    return {"out": str(out), "analyze_tokens": spec.analyze_tokens,
            "runs": [{"name": p.run.name, "action": p.action, "step": p.step, "analyze": p.run.analyze,
                      "sae": p.run.sae, "overrides": p.run.overrides, "config": key_settings(p.config), **p.sizes}
                     for p in planned]}


MODEL_KEYS = ("ffn", "d_ff", "n_units", "k", "router", "router_heads", "coupling", "activation", "l1_coef", "sparse_grad",
              "sparse_rows", "table_lr_mult")


def dry_run_text(spec, planned, out: Path) -> str:
    """A header with what all runs share, then one aligned line per run: what it would do, its
    resolved FFN settings plus any other key it sets itself, its size, and whether it is analysed."""
    from monoroute.sweep.results import key_settings

    first = key_settings(planned[0].config)
    shared = " ".join(f"{k}={v}" for k, v in {**spec.base, **{k: first[k] for k in ("steps", "batch_size", "lr",
                                                                                    "data", "tokenizer")}}.items())
    lines = [f"sweep {spec.path} -> {out}: {len(planned)} runs, preset {spec.preset}, analysis on "
             f"{spec.analyze_tokens} tokens", f"  base: {shared}"]
    table = []
    for p in planned:
        settings = key_settings(p.config)
        own = {k: v for k, v in p.run.overrides.items() if k not in spec.base or spec.base[k] != v}
        routed = "n_units" in settings  # sparse_rows only matters for routed unit tables
        shown = {**{k: settings[k] for k in MODEL_KEYS if k in settings and (routed or k != "sparse_rows")}, **own}
        if p.run.preset != spec.preset:
            shown["preset"] = p.run.preset
        analysis = ("analyse + SAE" if p.run.sae else "analyse") if p.run.analyze else "no analysis"
        table.append([p.run.name, describe_action(p), " ".join(f"{k}={v}" for k, v in shown.items()),
                      f"{p.sizes['active_params']:,} active / {p.sizes['params']:,} params",
                      f"{p.sizes['flops_per_token']:,} FLOPs/tok", analysis])
    widths = [max(len(line[i]) for line in table) for i in range(len(table[0]))]
    lines += ["  " + "  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in table]
    return "\n".join(lines)
