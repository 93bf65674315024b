"""`monoroute circuits RUN`: every task's smallest circuit, written to RUN/circuits/.

    load the run -> node groups + their means over training windows -> for each task:
    three splits of distinct prompts (learn / choose K / report) -> every node kept through the
    masks: above the target = the model cannot do it -> per search seed: learn masks, bisect K,
    whole-circuit and unit-level checks on the report split -> medians and spread over seeds
    -> circuits.json (everything), circuits.csv (one row per task), report.html
"""
from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from statistics import median
from pathlib import Path

import torch

from monoroute.circuits.nodes import compute_means, node_groups
from monoroute.circuits.report import OUT_DIR, _g
from monoroute.tables import aligned_lines
from monoroute.circuits.masks import CircuitMask
from monoroute.circuits.search import (CHANCE, SearchOptions, find_circuit, geomean, loss_with, make_batch, task_activity,
                                       task_loss, with_task_live)
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
    pairs: int = 48          # per task, in three splits of distinct prompts: learn masks / choose K / report
    search_seeds: int = 3    # mask searches per task (seeds seed .. seed + n - 1); the spread is reported
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
        if not 6 <= self.pairs <= MAX_PAIRS:
            raise MonorouteError(f"--pairs must be between 6 (three splits: learn the masks, choose K, report) and "
                                 f"{MAX_PAIRS:,} per task, got {self.pairs}")
        if not 1 <= self.search_seeds <= 100:
            raise MonorouteError(f"--search-seeds must be between 1 and 100, got {self.search_seeds}")
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
    run_dir = Path(run)
    if not (run_dir / "checkpoint.json").is_file() and run_dir.is_dir():
        raise MonorouteError(f"{run_dir} has no checkpoint (checkpoint.json missing); train it first "
                             f"(`monoroute train --out {run_dir}`) or point at a finished run")
    from monoroute.fileio import check_writable
    from monoroute.train.trainer import read_run_config

    tasks = select_tasks(opts.tasks, facts_world(read_run_config(run_dir)))  # a bad --tasks writes nothing
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
        row = task_circuits(model, tok, groups, task, search, opts)
        rows.append(row)
        if opts.progress:
            print(f"[{ti + 1}/{len(tasks)}] {progress_line(row)}", file=sys.stderr, flush=True)
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


def facts_world(cfg):
    """The run's facts world when it was trained on a facts corpus (its fact-recall tasks), else None."""
    from monoroute.data.facts import PREFIX, FactsSpec, FactsWorld

    return FactsWorld(FactsSpec.parse(cfg.data.source)) if cfg.data.source.startswith(PREFIX) else None


def task_circuits(model, tok, groups, task, search: SearchOptions, opts: CircuitOptions) -> dict:
    """One task: three disjoint splits, the all-kept check, `search_seeds` searches, their spread.

    status: "cannot_do" (with every node kept, through the mask machinery, the loss on the choose
    split is above the target: left out of the means), "ok" (at least one seed's circuit passes the
    unit-level checks; its numbers are the medians over passing seeds) or "fails_checks"."""
    learn, choose, report = (make_batch(split, tok) for split in
                             task.splits(opts.pairs, 3, seed=opts.seed, max_prompt_bytes=model.cfg.block_size - 1))
    with torch.no_grad():
        full, full_choose = task_loss(model, report).item(), task_loss(model, choose).item()
    active = task_activity(model, groups, [learn, choose, report])
    task_groups = with_task_live(groups, active)
    ones = [torch.ones(g.size) for g in task_groups]
    all_kept = loss_with(model, CircuitMask(model, task_groups), ones, choose)
    row = {"task": task.name, "description": task.description, "pairs_per_split": len(learn.label) // 2,
           "full_loss": full, "full_loss_choose": full_choose, "all_kept_loss_choose": all_kept,
           "units_live_on_task_only": sum(int((g.live & ~o.live).sum()) for g, o in zip(task_groups, groups))}
    if all_kept > opts.target_loss:
        row["status"] = "cannot_do"
        return row
    seeds = [find_circuit(model, task_groups, learn, choose, report, replace(search, seed=opts.seed + s), active, full)
             for s in range(opts.search_seeds)]
    passing = [r for r in seeds if r["passes"]]
    pool = passing or seeds
    rep = sorted(pool, key=lambda r: (r["nodes"]["units"], r["nodes"]["total"]))[(len(pool) - 1) // 2]
    row.update({k: v for k, v in rep.items() if k != "seed"})
    row["representative_seed"] = rep["seed"]
    row["status"] = "ok" if passing else "fails_checks"
    row["seeds_passing"] = len(passing)
    row["seeds"] = [{k: r[k] for k in ("seed", "reached", "circuit_loss", "circuit_loss_choose", "necessity_loss",
                                       "unit_necessity_loss", "unit_control_loss", "units_checked", "passes", "seconds")}
                    | {"units": r["nodes"]["units"], "nodes": r["nodes"]["total"]} for r in seeds]
    units = [r["nodes"]["units"] for r in pool]
    nodes = [r["nodes"]["total"] for r in pool]
    row["units_median"], row["units_min"], row["units_max"] = float(median(units)), min(units), max(units)
    row["nodes_median"], row["nodes_min"], row["nodes_max"] = float(median(nodes)), min(nodes), max(nodes)
    return row


def progress_line(row: dict) -> str:
    if row["status"] == "cannot_do":
        return (f"{row['task']}: every node kept {row['all_kept_loss_choose']:.3f} > target: the model cannot do it; "
                f"left out")
    return (f"{row['task']}: {row['status']}, units {row['units_median']:g} ({row['units_min']}-{row['units_max']} "
            f"over seeds), nodes {row['nodes_median']:g}, report loss {row['circuit_loss']:.3f}, necessity "
            f"{row['necessity_loss']:.3f}, unit necessity {_g3(row.get('unit_necessity_loss'))}, unit control "
            f"{_g3(row.get('unit_control_loss'))}, {row['seeds_passing']}/{len(row['seeds'])} seeds pass")


def _g3(v) -> str:
    return "n/a" if v is None else f"{v:.3f}"


def summarise(rows: list[dict], opts: CircuitOptions) -> dict:
    """Geometric means over the tasks whose circuits pass the checks ("ok"), each task at its median over
    passing seeds; the same over every task with a circuit, checks or not, for comparison."""
    ok = [r for r in rows if r["status"] == "ok"]
    found = [r for r in rows if r["status"] != "cannot_do"]

    def mean_of(key, among):
        vals = [r[key] for r in among if r.get(key) is not None]
        return sum(vals) / len(vals) if vals else None

    return {
        "target_loss": opts.target_loss, "ablation": opts.ablation, "search_seeds": opts.search_seeds,
        "tasks_done": len(ok), "tasks_cannot_do": [r["task"] for r in rows if r["status"] == "cannot_do"],
        "tasks_fail_checks": [r["task"] for r in rows if r["status"] == "fails_checks"],
        "geomean_units": geomean([r["units_median"] for r in ok]),
        "geomean_nodes": geomean([r["nodes_median"] for r in ok]),
        "geomean_units_unchecked": geomean([r["units_median"] for r in found]),
        "geomean_nodes_unchecked": geomean([r["nodes_median"] for r in found]),
        "tasks_without_units": [r["task"] for r in ok if r["units_median"] == 0],
        "mean_necessity_loss": mean_of("necessity_loss", ok),
        "mean_control_keep_loss": mean_of("control_keep_loss", ok),
        "mean_unit_necessity_loss": mean_of("unit_necessity_loss", found),
        "mean_unit_control_loss": mean_of("unit_control_loss", found),
        "mean_circuit_loss_report": mean_of("circuit_loss", found),
    }


CSV_COLUMNS = ["task", "status", "full_loss", "all_kept_loss_choose", "circuit_loss", "units", "residual", "attention",
               "total", "units_median", "units_min", "units_max", "nodes_median", "nodes_min", "nodes_max",
               "seeds_passing", "live_units", "live_total", "necessity_loss", "unit_necessity_loss",
               "unit_control_loss", "control_keep_loss", "control_ablate_loss", "seconds"]


def circuits_csv(report: dict) -> str:
    def f4(v) -> str:  # CSV: an empty cell for a missing number
        return fmt(v if v is None else float(v), 4, none="")

    rows = []
    for r in report["tasks"]:
        n, live = r.get("nodes", {}), r.get("live", {})
        rows.append([r["task"], r["status"], f4(r["full_loss"]), f4(r.get("all_kept_loss_choose")),
                     f4(r.get("circuit_loss")), n.get("units", ""), n.get("residual", ""), n.get("attention", ""),
                     n.get("total", ""), *(r.get(k, "") for k in ("units_median", "units_min", "units_max",
                                                                  "nodes_median", "nodes_min", "nodes_max",
                                                                  "seeds_passing")),
                     live.get("units", ""), live.get("total", ""), f4(r.get("necessity_loss")),
                     f4(r.get("unit_necessity_loss")), f4(r.get("unit_control_loss")), f4(r.get("control_keep_loss")),
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
    header = ["run", "task", "status", "full", "circuit", "units (min-max)", "nodes (min-max)", "necessity",
              "unit nec.", "unit ctrl", "seeds ok"]
    lines = []
    for rep in reports:
        for r in rep["tasks"]:
            if r["status"] == "cannot_do":
                lines.append([rep["run"], r["task"], "cannot do", f"{r['full_loss']:.3f}"] + [""] * 7)
                continue
            lines.append([rep["run"], r["task"], r["status"], f"{r['full_loss']:.3f}", f"{r['circuit_loss']:.3f}",
                          f"{r['units_median']:g} ({r['units_min']}-{r['units_max']})",
                          f"{r['nodes_median']:g} ({r['nodes_min']}-{r['nodes_max']})", f"{r['necessity_loss']:.3f}",
                          _g3(r.get("unit_necessity_loss")), _g3(r.get("unit_control_loss")),
                          f"{r['seeds_passing']}/{len(r['seeds'])}"])
        lines.append([rep["run"], f"geomean ({rep['tasks_done']} tasks)", "", "", "", _g(rep.get("geomean_units")),
                      _g(rep.get("geomean_nodes")), "", "", "", ""])
    out = aligned_lines(header, lines)
    out.append(f"(task losses in nats, binary over the two candidate bytes, on the report split (prompts that neither "
               f"learned the masks nor chose K); chance {CHANCE:.3f}. circuit: the smallest top-ranked node set reaching "
               "the target on the choose split with all other nodes ablated; units/nodes: median over search seeds "
               "(min-max); necessity: only the circuit ablated; unit nec.: only its units ablated (must rise half-way "
               "to chance); unit ctrl: its units swapped for task-active ones (must miss the target))")
    return "\n".join(out)


def add_parser(sub) -> None:
    p = sub.add_parser("circuits", help="the smallest set of units (and channels) that does each next-byte task "
                                        "(writes RUN/circuits/)")
    p.add_argument("run")
    p.add_argument("--tasks", help="comma-separated task names (default: all Python tasks, or for a run trained on a "
                                   "facts corpus its fact_* recall tasks; see monoroute.circuits.tasks)")
    p.add_argument("--target-loss", type=float, default=0.15, help="task loss a circuit must reach (nats; default 0.15)")
    p.add_argument("--ablation", choices=("mean", "zero"), default="mean",
                   help="what a pruned node becomes: its training-split mean (default) or 0")
    p.add_argument("--pairs", type=int, default=48, help="prompt pairs per task, split in three with no prompt shared: "
                                                        "learn the masks, choose K, report (default 48)")
    p.add_argument("--search-seeds", type=int, default=3, help="mask searches per task; medians and spread are "
                                                                "reported (default 3)")
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
                          search_seeds=args.search_seeds, steps=args.steps, lam=args.lam, lr=args.lr, mean_tokens=args.mean_tokens, seed=args.seed,
                          device=args.device, progress=not args.no_progress, out=args.out)
    report = circuits(args.run, opts)
    if args.json:
        keys = ["run", "val_loss", "target_loss", "ablation", "search_seeds", "tasks_done", "tasks_cannot_do",
                "tasks_fail_checks", "geomean_units", "geomean_nodes", "geomean_units_unchecked",
                "geomean_nodes_unchecked", "mean_necessity_loss", "mean_control_keep_loss", "mean_unit_necessity_loss",
                "mean_unit_control_loss", "seconds", "peak_rss_mb"]
        summary = {k: report[k] for k in keys}
        per_task = ("circuit_loss", "units_median", "units_min", "units_max", "nodes_median", "nodes_min", "nodes_max",
                    "necessity_loss", "unit_necessity_loss", "unit_control_loss", "control_keep_loss", "seeds_passing")
        summary["tasks"] = {r["task"]: {"status": r["status"], "full_loss": r["full_loss"],
                                        "all_kept_loss_choose": r["all_kept_loss_choose"],
                                        **{k: r[k] for k in per_task if k in r}}
                            for r in report["tasks"]}
        print(json.dumps(summary))
    else:
        print(table([report]))
        print(f"wrote {args.out or Path(args.run) / OUT_DIR}/ (circuits.json, circuits.csv, report.html; {report['seconds']} s, "
              f"peak RSS {report['peak_rss_mb']:.0f} MB)")
    return 0
