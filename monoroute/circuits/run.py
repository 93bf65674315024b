"""`monoroute circuits RUN`: every task's smallest circuit, written to RUN/circuits/.

    load the run -> node groups + their means over training windows -> for each task:
    pairs (train / held-out) -> full-model loss -> (if <= target) learn masks, bisect, checks
    -> circuits.json (everything), circuits.csv (one row per task), report.html
"""
from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from monoroute.circuits.nodes import compute_means, node_groups
from monoroute.circuits.report import OUT_DIR, _g
from monoroute.tables import aligned_lines
from monoroute.circuits.search import CHANCE, SearchOptions, find_circuit, geomean, make_batch, task_loss
from monoroute.circuits.tasks import select_tasks
from monoroute.errors import MonorouteError
from monoroute.fileio import write_text_atomic
from monoroute.tables import csv_text, fmt, peak_rss_mb



# Upper bounds that keep one task's work finite (a typo such as --pairs 1e9 ran until killed).
MAX_PAIRS, MAX_STEPS, MAX_MEAN_TOKENS = 4096, 100_000, 10_000_000


@dataclass
class CircuitOptions:
    tasks: list[str] = field(default_factory=list)  # empty: all
    target_loss: float = 0.15
    pairs: int = 32          # per task; half learn the masks, half choose and check the circuit
    ablation: str = "mean"   # or "zero"
    mean_tokens: int = 65_536
    steps: int = 100
    lam: float = 1e-3
    lr: float = 0.1
    seed: int = 0
    device: str = "cpu"
    progress: bool = True
    out: str | None = None   # default RUN/circuits

    def check(self) -> None:
        if not 0 < self.target_loss < CHANCE:
            raise MonorouteError(f"--target-loss must be in (0, {CHANCE:.3f}) nats (ln 2 is chance); "
                                 f"got {self.target_loss}")
        if self.ablation not in ("mean", "zero"):
            raise MonorouteError(f"--ablation must be mean or zero, got {self.ablation!r}")
        if not 4 <= self.pairs <= MAX_PAIRS:
            raise MonorouteError(f"--pairs must be between 4 (half learn the masks, half check them) and {MAX_PAIRS:,} "
                                 f"per task, got {self.pairs}")
        for name, top in (("steps", MAX_STEPS), ("mean_tokens", MAX_MEAN_TOKENS)):
            if not 1 <= getattr(self, name) <= top:
                raise MonorouteError(f"--{name.replace('_', '-')} must be between 1 and {top:,}, got {getattr(self, name)}")
        for name, value in (("lr", self.lr), ("lam", self.lam)):
            if not (math.isfinite(value) and (value > 0 if name == "lr" else value >= 0)):
                raise MonorouteError(f"--{name} must be a finite number {'> 0' if name == 'lr' else '>= 0'}, got {value}")


def run_val_loss(run_dir: Path) -> float | None:
    """The last validation loss the run recorded (metrics.jsonl), for matched-loss comparisons."""
    from monoroute.train.rundir import read_metrics

    losses = [r["val_loss"] for r in read_metrics(run_dir) if "val_loss" in r]
    return losses[-1] if losses else None


def training_windows(store, n_tokens: int, block_size: int, seed: int) -> torch.Tensor:
    """(B, block_size) random windows of the training split, B = ceil(n_tokens / block_size)."""
    n = max(1, math.ceil(n_tokens / block_size))
    rows, step = [], 0
    while sum(len(r) for r in rows) < n:
        x, _ = store.batch(step, min(32, n), block_size, seed, split="train")
        rows.append(x)
        step += 1
    return torch.cat(rows)[:n]


def circuits(run: str | Path, opts: CircuitOptions | None = None) -> dict:
    """Run the search on every selected task of `run`; writes RUN/circuits/ and returns the report."""
    from monoroute.data import prepare_data
    from monoroute.train.trainer import load

    opts = opts or CircuitOptions()
    opts.check()
    tasks = select_tasks(opts.tasks)
    run_dir = Path(run)
    if not (run_dir / "checkpoint.json").is_file() and run_dir.is_dir():
        raise MonorouteError(f"{run_dir} has no checkpoint (checkpoint.json missing); train it first "
                             f"(`monoroute train --out {run_dir}`) or point at a finished run")
    from monoroute.fileio import check_writable

    check_writable(Path(opts.out) if opts.out else run_dir / OUT_DIR, "the circuits")  # before any work
    t0 = time.perf_counter()
    loaded = load(run_dir, opts.device)
    model, tok = loaded.model, loaded.tokenizer
    if getattr(tok, "kind", None) != "byte":
        raise MonorouteError(f"{run_dir} uses a {getattr(tok, 'kind', '?')} tokenizer; the circuit tasks are "
                             f"next-byte tasks and need a byte-level run (--tokenizer byte)")
    torch.manual_seed(opts.seed)
    groups = node_groups(model)
    store = prepare_data(loaded.config.data)
    windows = training_windows(store, opts.mean_tokens, model.cfg.block_size, opts.seed)
    compute_means(model, groups, windows, ablation=opts.ablation)
    t_means = time.perf_counter() - t0
    search = SearchOptions(steps=opts.steps, lam=opts.lam, lr=opts.lr, target_loss=opts.target_loss, seed=opts.seed)
    rows = []
    for ti, task in enumerate(tasks):
        pairs = task.pairs(opts.pairs, seed=opts.seed, max_prompt_bytes=model.cfg.block_size - 1)
        half = len(pairs) // 2
        train, test = make_batch(pairs[:half], tok), make_batch(pairs[half:], tok)
        with torch.no_grad():
            full = task_loss(model, test).item()
            full_train = task_loss(model, train).item()
        row = {"task": task.name, "description": task.description, "pairs_train": half, "pairs_test": len(pairs) - half,
               "full_loss": full, "full_loss_train": full_train}
        if full > opts.target_loss:
            row["status"] = "cannot_do"
        else:
            row.update(find_circuit(model, groups, train, test, search))
            row["status"] = "ok"
        rows.append(row)
        if opts.progress:
            n = row.get("nodes", {})
            print(f"[{ti + 1}/{len(tasks)}] {task.name}: full {full:.3f}"
                  + (f", circuit {n['total']} nodes ({n['units']} units) loss {row['circuit_loss']:.3f}, "
                     f"necessity {row['necessity_loss']:.3f}, control {row['control_keep_loss']:.3f} "
                     f"({row['seconds']} s)" if n else " > target: the model cannot do it; left out"),
                  file=sys.stderr, flush=True)
    report = summarise(rows, opts)
    report.update({
        "run": str(run_dir), "step": loaded.step, "val_loss": run_val_loss(run_dir), "ffn": model.cfg.ffn_kinds(),
        "n_layer": model.cfg.n_layer, "d_model": model.cfg.d_model,
        "options": {k: v for k, v in asdict(opts).items() if k not in ("progress", "device", "out")},
        "groups": [{"hook": g.hook, "kind": g.kind, "layer": g.layer, "size": g.size, "live": int(g.live.sum())}
                   for g in groups],
        "seconds_means": round(t_means, 1), "seconds": round(time.perf_counter() - t0, 1),
        "peak_rss_mb": peak_rss_mb(),
        "tasks": rows,
    })
    write_outputs(Path(opts.out) if opts.out else run_dir / OUT_DIR, report, update_analysis=not opts.out)
    return report


def summarise(rows: list[dict], opts: CircuitOptions) -> dict:
    ok = [r for r in rows if r["status"] == "ok"]
    return {
        "target_loss": opts.target_loss, "ablation": opts.ablation,
        "tasks_done": len(ok), "tasks_cannot_do": [r["task"] for r in rows if r["status"] == "cannot_do"],
        "geomean_units": geomean([r["nodes"]["units"] for r in ok]),
        "geomean_nodes": geomean([r["nodes"]["total"] for r in ok]),
        "mean_necessity_loss": sum(r["necessity_loss"] for r in ok) / len(ok) if ok else None,
        "mean_control_keep_loss": sum(r["control_keep_loss"] for r in ok) / len(ok) if ok else None,
    }


CSV_COLUMNS = ["task", "status", "full_loss", "circuit_loss", "units", "residual", "attention", "total",
               "live_units", "live_total", "necessity_loss", "control_keep_loss", "control_ablate_loss", "seconds"]


def circuits_csv(report: dict) -> str:
    def f4(v) -> str:  # CSV: an empty cell for a missing number
        return fmt(v if v is None else float(v), 4, none="")

    rows = []
    for r in report["tasks"]:
        n, live = r.get("nodes", {}), r.get("live", {})
        rows.append([r["task"], r["status"], f4(r["full_loss"]), f4(r.get("circuit_loss")), n.get("units", ""),
                     n.get("residual", ""), n.get("attention", ""), n.get("total", ""), live.get("units", ""),
                     live.get("total", ""), f4(r.get("necessity_loss")), f4(r.get("control_keep_loss")),
                     f4(r.get("control_ablate_loss")), r.get("seconds", "")])
    return csv_text(CSV_COLUMNS, rows)


def write_outputs(out: Path, report: dict, update_analysis: bool = True) -> None:
    from monoroute.circuits.report import render_html

    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "circuits.json", json.dumps(report, indent=1))
    write_text_atomic(out / "circuits.csv", circuits_csv(report))
    write_text_atomic(out / "report.html", render_html(report))
    analysis = out.parent / "analysis" / "report.json"
    if update_analysis and analysis.is_file():  # the analysis page gets the circuits section too
        from monoroute.interp.report import build_html, run_facts

        try:
            write_text_atomic(analysis.parent / "report.html",
                              build_html(json.loads(analysis.read_text("utf-8")), report, run_facts(out.parent)))
        except (json.JSONDecodeError, KeyError):
            pass  # an old or broken analysis: its own page stays as it was; circuits/report.html has the results


def table(reports: list[dict]) -> str:
    """One line per (run, task) plus each run's geometric means: the text `circuits` and `compare` print."""
    header = ["run", "task", "full", "circuit", "units", "resid", "attn", "total", "necessity", "control"]
    lines = []
    for rep in reports:
        for r in rep["tasks"]:
            n = r.get("nodes")
            if n is None:
                lines.append([rep["run"], r["task"], f"{r['full_loss']:.3f}", "cannot do"] + [""] * 6)
                continue
            lines.append([rep["run"], r["task"], f"{r['full_loss']:.3f}", f"{r['circuit_loss']:.3f}", str(n["units"]),
                          str(n["residual"]), str(n["attention"]), str(n["total"]), f"{r['necessity_loss']:.3f}",
                          f"{r['control_keep_loss']:.3f}"])
        gu, gn = rep.get("geomean_units"), rep.get("geomean_nodes")
        lines.append([rep["run"], f"geomean ({rep['tasks_done']} tasks)", "", "", _g(gu), "", "", _g(gn), "", ""])
    out = aligned_lines(header, lines)
    out.append(f"(task losses in nats, binary over the two candidate bytes, on the held-out pairs; chance {CHANCE:.3f}. "
               "circuit: the smallest top-ranked node set reaching the target with all other nodes ablated; "
               "necessity: only the circuit ablated; control: a random set of the same size per hook point, kept alone)")
    return "\n".join(out)


def add_parser(sub) -> None:
    p = sub.add_parser("circuits", help="the smallest set of units (and channels) that does each next-byte task "
                                        "(writes RUN/circuits/)")
    p.add_argument("run")
    p.add_argument("--tasks", help="comma-separated task names (default: all; see monoroute.circuits.tasks.TASKS)")
    p.add_argument("--target-loss", type=float, default=0.15, help="task loss a circuit must reach (nats; default 0.15)")
    p.add_argument("--ablation", choices=("mean", "zero"), default="mean",
                   help="what a pruned node becomes: its training-split mean (default) or 0")
    p.add_argument("--pairs", type=int, default=32, help="prompt pairs per task, half to learn, half to check (default 32)")
    p.add_argument("--steps", type=int, default=100, help="mask-learning steps per task (default 100)")
    p.add_argument("--lam", type=float, default=1e-3, help="initial penalty per kept node, then steered toward the target (default 1e-3)")
    p.add_argument("--lr", type=float, default=0.1, help="AdamW learning rate of the mask logits (default 0.1)")
    p.add_argument("--mean-tokens", type=int, default=65_536, help="training-split tokens for the ablation means")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", help="folder for the results (default RUN/circuits; another keeps several targets apart)")
    p.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_circuits)


def cmd_circuits(args) -> int:
    names = [t.strip() for t in args.tasks.split(",") if t.strip()] if args.tasks else []
    opts = CircuitOptions(tasks=names, target_loss=args.target_loss, ablation=args.ablation, pairs=args.pairs,
                          steps=args.steps, lam=args.lam, lr=args.lr, mean_tokens=args.mean_tokens, seed=args.seed,
                          device=args.device, progress=not args.no_progress, out=args.out)
    report = circuits(args.run, opts)
    if args.json:
        keys = ["run", "val_loss", "target_loss", "ablation", "tasks_done", "tasks_cannot_do", "geomean_units",
                "geomean_nodes", "mean_necessity_loss", "mean_control_keep_loss", "seconds", "peak_rss_mb"]
        summary = {k: report[k] for k in keys}
        summary["tasks"] = {r["task"]: {"status": r["status"], "full_loss": r["full_loss"],
                                        **({"circuit_loss": r["circuit_loss"], **r["nodes"],
                                            "necessity_loss": r["necessity_loss"],
                                            "control_keep_loss": r["control_keep_loss"]} if r["status"] == "ok" else {})}
                            for r in report["tasks"]}
        print(json.dumps(summary))
    else:
        print(table([report]))
        print(f"wrote {args.out or Path(args.run) / OUT_DIR}/ (circuits.json, circuits.csv, report.html; {report['seconds']} s, "
              f"peak RSS {report['peak_rss_mb']:.0f} MB)")
    return 0
