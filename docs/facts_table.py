"""The tables of docs/facts.md from `monoroute facts eval` reports.

    python docs/facts_table.py runs/f/dense-4d runs/f/dense-4d-s2 ...      # one row per (run, unit set)

Each run's RUN/facts/{units,sae,transcoder}.json (whichever exist), with its val loss from
metrics.jsonl. A markdown table on stdout.
"""
from __future__ import annotations

import sys
from pathlib import Path

from monoroute.facts.report import headline, load_facts
from monoroute.tables import fmt
from monoroute.train.rundir import read_metrics

COLUMNS = [("FLOPs/token", "flops_per_token"), ("recall", "recall"), ("held-out template", "recall_heldout"),
           ("bits", "bits"), ("erase: units (median)", "erase_median_units"), ("erased", "erased_share"),
           ("spec. other people", "erase_specificity_other"), ("spec. same person", "erase_specificity_same_person"),
           ("lost on paraphrase", "erase_lost_paraphrase"), ("lost held-out", "erase_lost_heldout"),
           ("edit ok", "edit_success"), ("edit spec.", "edit_specificity_other"),
           ("top-person share", "top_person_share"), ("(floor)", "top_person_share_floor"),
           ("dedicated people", "dedicated_people"), ("(floor)", "dedicated_people_floor"), ("eval s", "seconds")]


def val_loss(run: Path) -> float | None:
    losses = [r["val_loss"] for r in read_metrics(run) if "val_loss" in r]
    return losses[-1] if losses else None


def main(runs: list[str]) -> None:
    print("| run | units | val loss | " + " | ".join(h for h, _ in COLUMNS) + " |")
    print("| --- " * (len(COLUMNS) + 3) + "|")
    for run in runs:
        for rep in load_facts(run):
            h = headline(rep)
            cells = [fmt(h.get(k), 0 if k in ("flops_per_token", "bits", "seconds") else 3) for _, k in COLUMNS]
            print(f"| {Path(run).name} | {h['units']} | {fmt(val_loss(Path(run)), 3)} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main(sys.argv[1:])
