"""The tables and plots of docs/routing.md's issue-29 sections, from run directories grouped by row.

    python docs/router2_table.py ROOT [--step N] [--dense-ref ROW] [--plot docs/img/router2.png]

Every folder ROOT/<row>-i<init>-d<data> or ROOT/<row>-s<seed> is one seed of <row>. Per row: the seeds'
val loss at --step (default: each run's last evaluation) as mean, min-max and spread, and at the same
record the dead fraction, live-slot fraction, units proposed per batch, selection recall; FLOPs/token
from config.json, as a ratio to --dense-ref's (the row holding dense 4·d). --plot draws val loss vs
FLOPs/token, each row's seeds as a min-max bar around the mean, the dense rows joined by a line.
"""
from __future__ import annotations

import argparse
import json
import re
from collections import defaultdict
from pathlib import Path

SEED = re.compile(r"^(?P<row>.+?)-(?:i(?P<init>\d+)-d(?P<data>\d+)|s(?P<seed>\d+))$")


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


def at_step(run: Path, step: int | None) -> dict | None:
    evals = [r for r in records(run) if "val_loss" in r]
    if not evals:
        return None
    if step is None:
        return evals[-1]
    hit = [r for r in evals if r["step"] == step]
    return hit[0] if hit else None


def rows_of(root: Path, step: int | None) -> dict[str, list[dict]]:
    rows = defaultdict(list)
    for run in sorted(p for p in root.iterdir() if (p / "metrics.jsonl").is_file()):
        m = SEED.match(run.name)
        if not m:
            continue
        rec = at_step(run, step)
        if rec is None:
            continue
        flops = json.loads((run / "config.json").read_text())["flops_per_token"]["total"]
        seed = f"i{m['init']}/d{m['data']}" if m["init"] else f"s{m['seed']}"
        rows[m["row"]].append({**rec, "seed": seed, "flops": flops, "run": run.name})
    return rows


def fmt(v, digits=3, pct=False):
    if v is None:
        return "–"
    return f"{100 * v:.0f} %" if pct else f"{v:.{digits}f}"


def mean(xs):
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("root")
    p.add_argument("--step", type=int)
    p.add_argument("--dense-ref", help="the row of dense 4·d (FLOPs ratios are to it)")
    p.add_argument("--plot")
    args = p.parse_args()
    rows = rows_of(Path(args.root), args.step)
    ref = rows[args.dense_ref][0]["flops"] if args.dense_ref in rows else None
    print("| row | FLOPs/token vs dense 4·d | val loss per seed | mean | spread | dead | live-slot | proposed | recall |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, runs in rows.items():
        losses = [r["val_loss"] for r in runs]
        per_seed = ", ".join(f"{r['seed']} {r['val_loss']:.3f}" for r in runs)
        ratio = f"{runs[0]['flops'] / ref:.2f}×" if ref else f"{runs[0]['flops']:,}"
        print(f"| {name} | {ratio} | {per_seed} | {mean(losses):.3f} | {max(losses) - min(losses):.3f} | "
              f"{fmt(mean(r.get('dead_fraction') for r in runs), pct=True)} | "
              f"{fmt(mean(r.get('live_slot_fraction') for r in runs), 2)} | "
              f"{fmt(mean(r.get('proposed_share') for r in runs), 2)} | "
              f"{fmt(mean(r.get('selection_recall') for r in runs), 3)} |")
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7.5, 4.8))
        dense = sorted((runs[0]["flops"], mean([r["val_loss"] for r in runs])) for name, runs in rows.items()
                       if name.startswith("dense"))
        if dense:
            ax.plot([d[0] for d in dense], [d[1] for d in dense], "k--", lw=1, label="dense (d_ff varied)")
        for name, runs in rows.items():
            losses = [r["val_loss"] for r in runs]
            m = mean(losses)
            ax.errorbar(runs[0]["flops"], m, yerr=[[m - min(losses)], [max(losses) - m]], fmt="o", capsize=3)
            ax.annotate(f"{name} (n={len(runs)})", (runs[0]["flops"], m), fontsize=7, xytext=(4, 2),
                        textcoords="offset points")
        ax.set_xscale("log")
        ax.set_xlabel("forward FLOPs / token")
        ax.set_ylabel("val loss (seeds: mean, min-max)")
        ax.legend(fontsize=8)
        fig.tight_layout()
        Path(args.plot).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(args.plot, dpi=120)
        print(f"\nwrote {args.plot}")


if __name__ == "__main__":
    main()
