"""The tables of docs/facts.md from `monoroute facts eval` reports, each reading beside its floor.

    python docs/facts_table.py "dense 4·d=runs/f2/d4-p25,runs/f2/d4-p25-s2" "routed=runs/f2/r-p25,..." \
        [--report units|transcoder|sae] [--dense-flops 294912]

One row per arm; where an arm has several runs (seeds) each cell shows every run's value, "a / b".
Three markdown tables on stdout: recall, erase, where facts live.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from monoroute.facts.report import headline
from monoroute.tables import fmt
from monoroute.train.rundir import read_metrics

RECALL = [("val loss", "val_loss", 3), ("FLOPs vs dense 4·d", "flops_ratio", 2), ("recall", "recall", 3),
          ("person-blind", "recall_prior", 3), ("untrained", "recall_untrained", 3),
          ("held-out template", "recall_heldout", 3), ("QA, unseen half", "recall_qa", 3),
          ("bits above prior", "bits_above_prior", 0)]
ERASE = [("facts", "erase_n", 0), ("erased", "erased_share", 2), ("K (2 templates)", "erase_median_units", 1),
         ("K everywhere", "erase_median_units_everywhere", 1),
         ("lost, other templates", "erase_lost_train_other", 2), ("(random K)", "erase_lost_train_other_floor", 2),
         ("lost, held-out", "erase_lost_heldout", 2), ("(random K)", "erase_lost_heldout_floor", 2),
         ("lost, QA", "erase_lost_qa", 2), ("(random K)", "erase_lost_qa_floor", 2),
         ("drop, other people", "erase_drop_other", 3), ("(random K)", "erase_drop_other_floor", 3),
         ("drop, same person", "erase_drop_same_person", 3), ("(random K)", "erase_drop_same_person_floor", 3),
         ("edit ok", "edit_success", 2)]
WHERE = [("dedicated facts", "dedicated_facts", 3), ("(perm.)", "dedicated_facts_floor", 3),
         ("(untrained)", "dedicated_facts_untrained", 3), ("... before the value", "dedicated_facts_prompt_end", 3),
         ("(perm.)", "dedicated_facts_prompt_end_floor", 3), ("route: same fact", "route_same_fact", 3),
         ("same template", "route_same_template", 3), ("margin", "route_margin", 3),
         ("(perm.)", "route_margin_floor", 3), ("top-person share", "top_person_share", 3),
         ("(untrained)", "top_person_share_floor", 3), ("eval s", "seconds", 0), ("peak MB", "peak_rss_mb", 0)]


def row_of(run: Path, report: str, dense_flops: float | None) -> dict:
    rep = json.loads((run / "facts" / f"{report}.json").read_text())
    h = headline(rep)
    losses = [r["val_loss"] for r in read_metrics(run) if "val_loss" in r]
    h["val_loss"] = losses[-1] if losses and report == "units" else None
    h["flops_ratio"] = h["flops_per_token"] / dense_flops if dense_flops else None
    return h


def table(arms: list[tuple[str, list[dict]]], columns) -> str:
    out = ["| arm | " + " | ".join(h for h, _, _ in columns) + " |", "| --- " * (len(columns) + 1) + "|"]
    for name, rows in arms:
        cells = [" / ".join(fmt(r.get(k), d) for r in rows) for _, k, d in columns]
        out.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("arms", nargs="+", help="NAME=RUN[,RUN...]")
    p.add_argument("--report", default="units")
    p.add_argument("--dense-flops", type=float, default=294912.0)
    args = p.parse_args(argv)
    arms = []
    for item in args.arms:
        name, _, runs = item.partition("=")
        report = args.report
        if ":" in name:  # "NAME:transcoder=RUN" reads that report
            name, report = name.split(":", 1)
        arms.append((name, [row_of(Path(r), report, args.dense_flops) for r in runs.split(",")]))
    for title, cols in (("Recall", RECALL), ("Erase", ERASE), ("Where facts live", WHERE)):
        print(f"#### {title}\n\n{table(arms, cols)}\n")


if __name__ == "__main__":
    main()
