"""`monoroute toy {tms,abs,recovery}`: run one experiment, write OUT/results.json and PNGs, print a table."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from monoroute.errors import MonorouteError
from monoroute.toy import abs_task, plots, recovery, tms

EXPERIMENTS = {
    # name: (module, run function, plot function, help)
    "tms": (tms, tms.run_tms, plots.plot_tms, "Toy Models of Superposition: geometry against sparsity"),
    "abs": (abs_task, abs_task.run_abs, plots.plot_abs, "y=|x|: dense vs routed vs L1 unit monosemanticity"),
    "recovery": (recovery, recovery.run_recovery, plots.plot_recovery, "feature recovery: sae-lens SAEs vs RoutedFFN"),
}

# --tiny (hidden, for tests): shapes small enough that a whole command runs in seconds.
TINY = {
    "tms": dict(
        small=tms.TMSSweep(8, 3, 0.7, [1.0, 0.1]), large=tms.TMSSweep(24, 4, 1.0, [1.0, 0.3]), steps=40, batch=64
    ),
    "abs": dict(n_features=12, d_hidden=4, n_units=16, densities=[0.3, 0.1], headline_density=0.1, unit_sweep=[25],
                steps=30, batch=64, eval_batch=256),
    "recovery": dict(d=16, n_features=24, mean_active=2.0, dict_size=36, k=4, steps=30, batch=64, eval_batch=256),
}


def build_config(args: argparse.Namespace):
    module = EXPERIMENTS[args.experiment][0]
    overrides = dict(seed=args.seed, device=args.device)
    if args.tiny:
        return module.quick_config(**TINY[args.experiment], **overrides)
    if args.quick:
        return module.quick_config(**overrides)
    config_class = {"tms": tms.TMSConfig, "abs": abs_task.AbsConfig, "recovery": recovery.RecoveryConfig}
    return config_class[args.experiment](**overrides)


def prepare_out(out: Path, force: bool) -> Path:
    if out.exists() and not out.is_dir():
        raise MonorouteError(f"--out {out} is a file; pass a directory path")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise MonorouteError(f"--out {out} is not empty; choose a new directory or pass --force to overwrite")
    out.mkdir(parents=True, exist_ok=True)
    return out


def handler(args: argparse.Namespace) -> int:
    if args.threads < 1:
        raise MonorouteError(f"--threads must be at least 1, got {args.threads}")
    _, run, plot, _ = EXPERIMENTS[args.experiment]
    out = prepare_out(Path(args.out or f"runs/toy_{args.experiment}"), args.force)
    config = build_config(args)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        results = run(config)
    finally:
        torch.set_num_threads(threads)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    figures = plot(results, out)
    table = EXPERIMENTS[args.experiment][0].table(results)
    if args.json:
        # Exactly one JSON object on stdout; the human-readable table goes to stderr.
        print(table, file=sys.stderr)
        print(json.dumps(results["models"] if "models" in results else results))
    else:
        print(table)
        print(f"wrote {out / 'results.json'} and {', '.join(str(p) for p in figures)}")
    return 0


def add_parser(subparsers) -> None:
    toy = subparsers.add_parser("toy", help="toy models with known features: superposition, monosemanticity, recovery")
    experiments = toy.add_subparsers(dest="experiment", required=True, metavar="{tms,abs,recovery}")
    for name, (_, _, _, help_text) in EXPERIMENTS.items():
        p = experiments.add_parser(name, help=help_text, description=help_text)
        p.add_argument("--quick", action="store_true", help="a small sweep (≤ 2 minutes on 2 CPU cores)")
        p.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)
        p.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--out", help=f"output directory (default: runs/toy_{name})")
        p.add_argument("--force", action="store_true", help="write into a non-empty --out")
        p.add_argument("--json", action="store_true", help="print the per-model results as one JSON object on stdout")
        p.add_argument("--threads", type=int, default=1,
                       help="CPU threads (default 1: these models are too small to gain from more)")
        p.set_defaults(func=handler)


def main(argv: list[str] | None = None) -> int:
    """`monoroute toy ...` through the top-level CLI (same parsing and error handling)."""
    from monoroute.cli import main as cli_main

    return cli_main(["toy", *(sys.argv[1:] if argv is None else argv)])
