"""Explanation F1 before and after issue 24's minimum-firing rule, from one `analyze` pass.

    python docs/explanation_minimum.py RUN [analyze flags, e.g. --sae --transcoder]

Runs `monoroute analyze RUN` (its report is written as usual) and, for every unit set of the scored
layer, also scores explanations the old way: a sample of *all* live units (min_firings = 1), as the
code did before commit fd76bf5. Both use the same seed, activations and documents; only the units
sampled differ. Prints a markdown table: set, explanation F1 (every live unit), explanation F1
(units firing >= 20 times, today's), share of live units below 20 firings.
"""
from __future__ import annotations

import sys

from monoroute.cli import main as cli_main
from monoroute.interp import metrics as M


def main(argv: list[str]) -> None:
    today = M.explanation_scores
    before: dict[str, dict] = {}

    def both(acts, *args, **kwargs):  # all_metrics calls the module's name, so this sees every set
        out = today(acts, *args, **kwargs)
        if kwargs.get("units") is None:  # a set's sampled score, not a dashboard's chosen units
            before[f"{acts.name} L{acts.layer}"] = (today(acts, *args, **dict(kwargs, min_firings=1)), out)
        return out

    M.explanation_scores = both
    try:
        rc = cli_main(["analyze", *argv, "--no-progress"])
    finally:
        M.explanation_scores = today
    if rc:
        raise SystemExit(rc)
    print("| unit set | explanation F1, every live unit (before) | explanation F1, >= 20 firings (after) "
          "| share of live units below 20 |")
    print("| --- | --- | --- | --- |")
    for name, (old, new) in before.items():
        print(f"| {name} | {old['explanation_f1']:.3f} | {new['explanation_f1']:.3f} | "
              f"{new['share_live_below_min']:.3f} |")


if __name__ == "__main__":
    main(sys.argv[1:])
