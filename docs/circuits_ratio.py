"""Issue 23's tables: dense / routed circuit sizes on the tasks every compared model can do.

    python docs/circuits_ratio.py NAME=RUN/circuits/circuits.json ... --pair DENSE_NAME:ROUTED_NAME ...

Per run: tasks doable / passing the unit checks, geometric means. Per pair: over the tasks both runs
pass (status ok), the geometric means of the per-task median units and nodes, and dense / routed;
the same over the tasks both can do, checks or not ("unchecked"). Per task: each run's median units
with the min-max over search seeds.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from monoroute.circuits.search import geomean  # the same geometric mean `monoroute circuits` reports


def f(x, d=3):
    return "–" if x is None else f"{x:.{d}f}"


def ratio(a, b):
    return None if a is None or b is None or b == 0 else a / b


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("runs", nargs="+", help="NAME=path/to/circuits.json")
    ap.add_argument("--pair", action="append", default=[], help="DENSE:ROUTED (names)")
    args = ap.parse_args()
    reps = {}
    for item in args.runs:
        name, _, path = item.partition("=")
        reps[name] = json.loads(Path(path).read_text())
    print("| run | val loss | doable (of %d) | pass unit checks | geomean units | geomean nodes | geomean units, unchecked "
          "| time (s) | peak RSS (MB) |" % len(next(iter(reps.values()))["tasks"]))
    print("| --- " * 9 + "|")
    for name, r in reps.items():
        doable = sum(t["status"] != "cannot_do" for t in r["tasks"])
        print(f"| {name} | {f(r.get('val_loss'))} | {doable} | {r['tasks_done']} | {f(r['geomean_units'], 1)} | "
              f"{f(r['geomean_nodes'], 1)} | {f(r['geomean_units_unchecked'], 1)} | {r['seconds']:.0f} | "
              f"{r['peak_rss_mb']:.0f} |")
    print()
    print("| dense : routed | tasks both pass | units dense / routed | nodes dense / routed | units ratio | nodes ratio "
          "| tasks both do | units ratio, unchecked | nodes ratio, unchecked |")
    print("| --- " * 9 + "|")
    for pair in args.pair:
        a, _, b = pair.partition(":")
        ta = {t["task"]: t for t in reps[a]["tasks"]}
        tb = {t["task"]: t for t in reps[b]["tasks"]}
        ok = [t for t in ta if ta[t]["status"] == "ok" and tb.get(t, {}).get("status") == "ok"]
        both = [t for t in ta if ta[t]["status"] != "cannot_do" and tb.get(t, {}).get("status", "cannot_do") != "cannot_do"]

        def gm(rows, tasks, key):
            return geomean([rows[t][key] for t in tasks]) if tasks else None

        ua, ub, na, nb = gm(ta, ok, "units_median"), gm(tb, ok, "units_median"), gm(ta, ok, "nodes_median"), gm(tb, ok, "nodes_median")
        print(f"| {a} : {b} | {len(ok)} | {f(ua, 1)} / {f(ub, 1)} | {f(na, 1)} / {f(nb, 1)} | {f(ratio(ua, ub), 2)} | "
              f"{f(ratio(na, nb), 2)} | {len(both)} | {f(ratio(gm(ta, both, 'units_median'), gm(tb, both, 'units_median')), 2)} | "
              f"{f(ratio(gm(ta, both, 'nodes_median'), gm(tb, both, 'nodes_median')), 2)} |")
    print()
    names = list(reps)
    print("| task | " + " | ".join(names) + " |")
    print("| --- " * (len(names) + 1) + "|")
    for task in [t["task"] for t in next(iter(reps.values()))["tasks"]]:
        cells = []
        for r in reps.values():
            t = next(x for x in r["tasks"] if x["task"] == task)
            if t["status"] == "cannot_do":
                cells.append(f"{t['all_kept_loss_choose']:.2f} (cannot)")
            else:
                mark = "" if t["status"] == "ok" else " ✗"
                cells.append(f"{t['units_median']:g} u ({t['units_min']}–{t['units_max']}), {t['nodes_median']:g} n{mark}")
        print(f"| {task} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
