"""The circuits section of the HTML reports (RUN/circuits/report.html, and RUN/analysis/report.html
when the run has both), self-contained like the analysis report."""
from __future__ import annotations

import html
import json
from pathlib import Path

from monoroute.circuits.search import CHANCE
from monoroute.errors import MonorouteError
from monoroute.tables import aligned_lines, fmt, html_page

OUT_DIR = "circuits"  # RUN/circuits/: circuits.json, circuits.csv, report.html



def _f(v, digits: int = 3) -> str:
    return fmt(v if v is None else float(v), digits)


def circuits_section(report: dict) -> str:
    """An <h2> section: one row per task, the geometric means, and each circuit's units."""
    head = ("<tr><th>task</th><th>status</th><th>full loss</th><th>circuit loss</th><th>units (min-max)</th>"
            "<th>residual</th><th>attention</th><th>all nodes (min-max)</th><th>of live</th><th>necessity</th>"
            "<th>unit necessity</th><th>unit control</th><th>control (kept alone)</th><th>seeds passing</th></tr>")
    rows = [f"<table>{head}"]
    units_lists = []
    for r in report["tasks"]:
        name = html.escape(r["task"])
        if r["status"] == "cannot_do":
            rows.append(f"<tr><td>{name}</td><td>cannot do</td><td>{_f(r['full_loss'])}</td><td colspan=11 class=muted>"
                        f"every node kept: {_f(r.get('all_kept_loss_choose'))}, above the target: the model cannot do "
                        f"this task; left out of the means</td></tr>")
            continue
        n, live = r["nodes"], r["live"]
        rows.append(f"<tr><td title='{html.escape(r['description'])}'>{name}</td><td>{html.escape(r['status'])}</td>"
                    f"<td>{_f(r['full_loss'])}</td><td>{_f(r['circuit_loss'])}</td>"
                    f"<td>{r['units_median']:g} ({r['units_min']}-{r['units_max']})</td><td>{n['residual']}</td>"
                    f"<td>{n['attention']}</td><td>{r['nodes_median']:g} ({r['nodes_min']}-{r['nodes_max']})</td>"
                    f"<td>{live['total']:,}</td><td>{_f(r['necessity_loss'])}</td><td>{_f(r.get('unit_necessity_loss'))}"
                    f"</td><td>{_f(r.get('unit_control_loss'))}</td><td>{_f(r['control_keep_loss'])}</td>"
                    f"<td>{r['seeds_passing']}/{len(r['seeds'])}</td></tr>")
        units = [(hook, ids) for hook, ids in r["circuit"].items() if hook.endswith("mlp.hook_post")]
        if units:
            units_lists.append(f"<li><b>{name}</b>: " + "; ".join(
                f"layer {hook.split('.')[1]}: " + ", ".join(str(u) for u in ids) for hook, ids in units) + "</li>")
    rows.append(f"<tr><td><b>geometric mean</b> ({report['tasks_done']} tasks passing)</td><td colspan=3></td>"
                f"<td><b>{_f(report['geomean_units'], 1)}</b></td><td></td><td></td><td><b>{_f(report['geomean_nodes'], 1)}"
                f"</b></td><td colspan=6></td></tr></table>")
    return "\n".join([
        "<h2>Circuits: the smallest node set that does each task</h2>",
        f"<p>Target task loss {report['target_loss']} nats (binary over the two candidate bytes; chance {CHANCE:.3f}); "
        f"pruned nodes {report['ablation']}-ablated; {report.get('search_seeds', 1)} search seeds per task. Val loss of "
        f"the run {_f(report.get('val_loss'), 4)}. Took {report['seconds']} s, peak RSS {report['peak_rss_mb']:.0f} MB.</p>",
        *rows,
        "<p class=muted>How to read: masks are learned on one split of prompt pairs, the circuit size K is chosen on a "
        "second (the smallest set of top-ranked nodes reaching the target with every other node ablated), and every loss "
        "shown is on a third. Necessity ablates only the circuit; unit necessity ablates only its units (every other node "
        "kept) and must rise half-way to chance; unit control swaps its units for as many units active on the task's "
        "prompts and must miss the target. A task counts (status ok) when a seed's circuit passes both unit checks; its "
        "sizes are medians over passing seeds. Geometric means count a circuit without units as one unit.</p>",
        "<h3>Circuit units (open them in the unit browser: <code>monoroute serve RUN</code>, task view)</h3>",
        "<ul>" + "".join(units_lists) + "</ul>",
    ])


def render_html(report: dict) -> str:
    return html_page("monoroute circuits",
                     f"<h1>monoroute circuits: {html.escape(report['run'])}</h1>{circuits_section(report)}")


def load_circuits(run: str | Path) -> dict | None:
    """RUN/circuits/circuits.json, or None when the run has none."""
    path = Path(run) / OUT_DIR / "circuits.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise MonorouteError(f"{path} is not valid JSON ({exc}); run `monoroute circuits {run}` again") from None


def circuits_summary_rows(reports: list[dict]) -> list[dict]:
    """One row per run: what `compare` shows (its --json "circuits")."""
    keys = ("run", "val_loss", "target_loss", "ablation", "search_seeds", "tasks_done", "geomean_units", "geomean_nodes",
            "geomean_units_unchecked", "mean_necessity_loss", "mean_control_keep_loss", "mean_unit_necessity_loss",
            "mean_unit_control_loss")
    return [{k: rep.get(k) for k in keys}
            | {"tasks_cannot_do": [r["task"] for r in rep["tasks"] if r["status"] != "ok"],
               "units_per_task": {r["task"]: r["units_median"] for r in rep["tasks"] if r["status"] == "ok"},
               "nodes_per_task": {r["task"]: r["nodes_median"] for r in rep["tasks"] if r["status"] == "ok"}}
            for rep in reports]


def circuits_summary_table(reports: list[dict]) -> str:
    header = ["run", "val loss", "target", "tasks done", "geomean units", "geomean nodes", "necessity", "control"]
    f3 = lambda v: "–" if v is None else f"{v:.3f}"  # noqa: E731
    lines = [[r["run"], f3(r["val_loss"]), str(r["target_loss"]),
              f"{r['tasks_done']} of {r['tasks_done'] + len(r['tasks_cannot_do'])}", _g(r["geomean_units"]),
              _g(r["geomean_nodes"]), f3(r["mean_necessity_loss"]), f3(r["mean_control_keep_loss"])]
             for r in circuits_summary_rows(reports)]
    out = ["circuits (monoroute circuits): geometric means over the tasks each run can do at its target; "
           "necessity / control: mean task loss with only the circuit ablated / a random same-size set kept (chance 0.693)",
           *aligned_lines(header, lines)]
    return "\n".join(out)


def _g(v) -> str:
    return fmt(v if v is None else float(v), 1)
