"""The circuits section of the HTML reports (RUN/circuits/report.html, and RUN/analysis/report.html
when the run has both), self-contained like the analysis report."""
from __future__ import annotations

import html

from monoroute.circuits.search import CHANCE

CSS = ("body{font-family:system-ui,sans-serif;margin:2em;max-width:1200px}table{border-collapse:collapse;margin:1em 0}"
       "td,th{border:1px solid #ccc;padding:3px 7px;text-align:right}td:first-child,th:first-child{text-align:left}"
       ".muted{color:#666}code{font-size:90%}")


def _f(v, digits: int = 3) -> str:
    return "–" if v is None else f"{v:.{digits}f}"


def circuits_section(report: dict) -> str:
    """An <h2> section: one row per task, the geometric means, and each circuit's units."""
    head = ("<tr><th>task</th><th>full loss</th><th>circuit loss</th><th>units</th><th>residual</th><th>attention</th>"
            "<th>all nodes</th><th>of live</th><th>necessity</th><th>control (kept alone)</th><th>control (ablated)</th></tr>")
    rows = [f"<table>{head}"]
    units_lists = []
    for r in report["tasks"]:
        name = html.escape(r["task"])
        if r["status"] != "ok":
            rows.append(f"<tr><td>{name}</td><td>{_f(r['full_loss'])}</td><td colspan=9 class=muted>above the target: "
                        f"the model cannot do this task; left out of the means</td></tr>")
            continue
        n, live = r["nodes"], r["live"]
        rows.append(f"<tr><td title='{html.escape(r['description'])}'>{name}</td><td>{_f(r['full_loss'])}</td>"
                    f"<td>{_f(r['circuit_loss'])}</td><td>{n['units']}</td><td>{n['residual']}</td><td>{n['attention']}</td>"
                    f"<td>{n['total']}</td><td>{live['total']:,}</td><td>{_f(r['necessity_loss'])}</td>"
                    f"<td>{_f(r['control_keep_loss'])}</td><td>{_f(r['control_ablate_loss'])}</td></tr>")
        units = [(hook, ids) for hook, ids in r["circuit"].items() if hook.endswith("mlp.hook_post")]
        if units:
            units_lists.append(f"<li><b>{name}</b>: " + "; ".join(
                f"layer {hook.split('.')[1]}: " + ", ".join(str(u) for u in ids) for hook, ids in units) + "</li>")
    rows.append(f"<tr><td><b>geometric mean</b> ({report['tasks_done']} tasks)</td><td></td><td></td>"
                f"<td><b>{_f(report['geomean_units'], 1)}</b></td><td></td><td></td><td><b>{_f(report['geomean_nodes'], 1)}"
                f"</b></td><td colspan=4></td></tr></table>")
    return "\n".join([
        "<h2>Circuits: the smallest node set that does each task</h2>",
        f"<p>Target task loss {report['target_loss']} nats (binary over the two candidate bytes; chance {CHANCE:.3f}); "
        f"pruned nodes {report['ablation']}-ablated. Val loss of the run {_f(report.get('val_loss'), 4)}. "
        f"Took {report['seconds']} s, peak RSS {report['peak_rss_mb']:.0f} MB.</p>",
        *rows,
        "<p class=muted>How to read: a circuit is the smallest set of top-ranked nodes (after learning one mask per "
        "node) whose task loss on held-out prompt pairs reaches the target with every other node ablated. Necessity "
        "ablates only the circuit (near chance means the model has no second route); the control is a random set of "
        "the same size at each hook point. Geometric means count a circuit without units as one unit.</p>",
        "<h3>Circuit units (open them in the unit browser: <code>monoroute serve RUN</code>, task view)</h3>",
        "<ul>" + "".join(units_lists) + "</ul>",
    ])


def render_html(report: dict) -> str:
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>monoroute circuits</title><style>{CSS}</style>"
            f"</head><body><h1>monoroute circuits: {html.escape(report['run'])}</h1>{circuits_section(report)}"
            f"</body></html>")
