"""The plots of docs/routing.md from run directories: val loss vs FLOPs/token (with the dense line)
and selection recall vs val loss.

    python docs/routing_plots.py RUN [RUN ...] [--dense NAME=FLOPS:LOSS ...] [--point NAME=FLOPS:LOSS ...] --out docs/img/routing

Each RUN's last metrics.jsonl record with a val loss gives the point (and its recall), config.json
its FLOPs/token; --dense adds earlier measured dense points (not in a run directory here) to the line.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def last_eval(run: Path) -> dict:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [r for r in records if "val_loss" in r][-1]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("runs", nargs="+")
    parser.add_argument("--dense", action="append", default=[], help="NAME=FLOPS:LOSS, a measured dense point")
    parser.add_argument("--point", action="append", default=[], help="NAME=FLOPS:LOSS, another measured point")
    parser.add_argument("--out", default="docs/img/routing")
    args = parser.parse_args()
    points = []
    for run in map(Path, args.runs):
        record = last_eval(run)
        flops = json.loads((run / "config.json").read_text())["flops_per_token"]["total"]
        points.append((run.name, flops, record["val_loss"], record.get("selection_recall"), record["step"]))
    dense = sorted((float(v.split(":")[0]), float(v.split(":")[1]), n) for n, v in (d.split("=") for d in args.dense))
    for name, value in (p.split("=") for p in args.point):
        flops, loss = value.split(":")
        points.append((name, float(flops), float(loss), None, 600))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    if dense:
        ax.plot([d[0] for d in dense], [d[1] for d in dense], "k--o", label="dense (d_ff varied)")
    for name, flops, loss, _, step in points:
        ax.scatter(flops, loss)
        ax.annotate(name + ("" if step == 600 else f" (step {step})"), (flops, loss), fontsize=7)
    ax.set_xscale("log")
    ax.set_xlabel("forward FLOPs / token")
    ax.set_ylabel("val loss (stdlib, cpu-small, 1.23M tokens)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(f"{out}-loss-vs-flops.png", dpi=120)

    fig, ax = plt.subplots(figsize=(6, 4.5))
    for name, _, loss, recall, step in points:
        if recall is not None:
            ax.scatter(recall, loss)
            ax.annotate(name + ("" if step == 600 else f" (step {step})"), (recall, loss), fontsize=7)
    ax.set_xlabel("selection recall (share of the exact top-k selected)")
    ax.set_ylabel("val loss")
    fig.tight_layout()
    fig.savefig(f"{out}-recall-vs-loss.png", dpi=120)
    print(f"wrote {out}-loss-vs-flops.png and {out}-recall-vs-loss.png")


if __name__ == "__main__":
    main()
