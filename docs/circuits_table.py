"""The tables of docs/circuits.md from RUN/circuits/circuits.json files (written by `monoroute circuits`).

    python docs/circuits_table.py runs [circuits]   # the folder holding the runs named below; the
                                                    # subfolder of each run to read (default circuits)

Per run: val loss, tasks it can do at its target, geometric means of units and nodes kept.
Per matched pair (dense vs routed at about the same val loss): the geometric means over the tasks
*both* can do, and their ratio dense / routed (Gao et al. 2025 report ~16x for weight sparsity).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from monoroute.circuits.search import geomean  # the same geometric mean `monoroute circuits` reports

RUNS = ["std-dense", "std-dense-s1", "dense-512-400", "dense-512-400-s1", "dense-512-250", "dense-512-250-s1",
        "std-routed", "std-routed-s1", "std-up", "std-up-s1", "std-tc", "std-tc-s1"]
# (dense run, routed run, why they are matched)
PAIRS = [("dense-512-400", "std-routed-s1", "native routed ~ dense 400 steps (2.01-2.06)"),
         ("dense-512-400-s1", "std-routed-s1", ""),
         ("dense-512-250", "std-routed", "native routed ~ dense 250 steps (2.18-2.26)"),
         ("dense-512-250-s1", "std-routed", ""),
         ("dense-512-400", "std-routed", "native routed, the other bracket"),
         ("std-dense", "std-up", "upcycled k 32 from this dense run (1.93 vs 1.85)"),
         ("std-dense-s1", "std-up-s1", ""),
         ("dense-512-400", "std-up", "upcycled vs the weaker dense bracket (1.93 vs 2.06)"),
         ("std-dense", "std-tc", "transcoders spliced into every layer of this dense run"),
         ("std-dense-s1", "std-tc-s1", "")]


def f(x, d=3):
    return "–" if x is None else f"{x:.{d}f}"


def main(root: str, sub: str = "circuits") -> None:
    reps = {}
    for name in RUNS:
        p = Path(root) / name / sub / "circuits.json"
        if p.is_file():
            reps[name] = json.loads(p.read_text())
    tasks = [t["task"] for t in next(iter(reps.values()))["tasks"]]
    print("| run | val loss | tasks done (of %d) | geomean units | geomean nodes | mean necessity | mean control (kept) | time (s) | peak RSS (MB) |" % len(tasks))
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, r in reps.items():
        print(f"| {name} | {f(r['val_loss'])} | {r['tasks_done']} | {f(r['geomean_units'], 1)} | {f(r['geomean_nodes'], 1)} "
              f"| {f(r['mean_necessity_loss'])} | {f(r['mean_control_keep_loss'])} | {r['seconds']:.0f} | {r['peak_rss_mb']:.0f} |")
    print()
    print("Full-model task loss (nats, held-out pairs; chance 0.693; bold: at or under the target):\n")
    print("| task | " + " | ".join(reps) + " |")
    print("| --- |" + " --- |" * len(reps))
    for t in tasks:
        cells = []
        for r in reps.values():
            row = next(x for x in r["tasks"] if x["task"] == t)
            s = f(row["full_loss"], 2)
            cells.append(f"**{s}** ({row['nodes']['units']} u)" if row["status"] == "ok" else s)
        print(f"| {t} | " + " | ".join(cells) + " |")
    print()
    print("Matched pairs, over the tasks both can do:\n")
    print("| dense run (val) | routed run (val) | common tasks | dense geomean units | routed geomean units | ratio dense / routed (units) | ratio (all nodes) | note |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for d, rt, note in PAIRS:
        if d not in reps or rt not in reps:
            continue
        ok = lambda r: {x["task"]: x for x in r["tasks"] if x["status"] == "ok"}  # noqa: E731
        dd, rr = ok(reps[d]), ok(reps[rt])
        common = sorted(set(dd) & set(rr))
        if not common:
            print(f"| {d} ({f(reps[d]['val_loss'])}) | {rt} ({f(reps[rt]['val_loss'])}) | none | – | – | – | – | {note} |")
            continue
        gd, gr = geomean([dd[t]["nodes"]["units"] for t in common]), geomean([rr[t]["nodes"]["units"] for t in common])
        nd, nr = geomean([dd[t]["nodes"]["total"] for t in common]), geomean([rr[t]["nodes"]["total"] for t in common])
        print(f"| {d} ({f(reps[d]['val_loss'])}) | {rt} ({f(reps[rt]['val_loss'])}) | {', '.join(common)} | {gd:.1f} | {gr:.1f} "
              f"| {gd / gr:.2f}× | {nd / nr:.2f}× | {note} |")


if __name__ == "__main__":
    main(*(sys.argv[1:] or ["runs"]))
