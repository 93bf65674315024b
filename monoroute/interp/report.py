"""What `monoroute analyze` writes: report.json, CSV tables and one self-contained report.html.

The HTML embeds its plots as base64 PNGs and its styles inline, so it opens offline, attached to an
e-mail, years later. Every score is printed beside the random-init floor of the same architecture.
"""
from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path

import numpy as np

from monoroute.fileio import write_text_atomic
from monoroute.interp.types import floor_of, is_floor
from monoroute.tables import csv_text, fmt  # noqa: F401  (fmt: used below and by interp/cli)

SET_ORDER = ("dense_neurons", "routed_units", "sae", "transcoder", "random_init", "sae_init", "transcoder_init")
COLORS = {"dense_neurons": "#1f77b4", "routed_units": "#d62728", "sae": "#2ca02c", "transcoder": "#9467bd",
          "random_init": "#7f7f7f", "sae_init": "#98df8a", "transcoder_init": "#c5b0d5"}


def ordered(sets: dict) -> list[str]:
    return [s for s in SET_ORDER if s in sets] + [s for s in sets if s not in SET_ORDER]


def write_csv(path: Path, header: list[str], rows: list[list]) -> None:
    write_text_atomic(path, csv_text(header, rows))


# --- plots --------------------------------------------------------------------------------------
def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def plot_density(report: dict) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stats = report["per_layer"][f"L{report['layer']}"]
    fig, ax = plt.subplots(figsize=(6.5, 3.2))
    for name in ordered(stats):
        hist = stats[name]["density_histogram"]
        edges, counts = np.asarray(hist["edges"]), np.asarray(hist["counts"], dtype=float)
        total = max(counts.sum() + hist.get("never", 0), 1)
        ax.step(edges[:-1], counts / total, where="post", label=name, color=COLORS.get(name))
    ax.set_xlabel("log10 firing rate of a unit")
    ax.set_ylabel("fraction of units")
    ax.set_title(f"firing density, layer {report['layer']} (never-firing units not shown)")
    ax.legend(fontsize=8)
    return _png(fig)


def plot_coverage(report: dict) -> str:
    import matplotlib.pyplot as plt

    sets = report["unit_sets"]
    names = report["concepts"]["names"]
    freq = np.asarray(report["concepts"]["frequency"])
    order = [i for i in np.argsort(-freq) if freq[i] > 0]
    fig, ax = plt.subplots(figsize=(max(6.5, 0.07 * len(order)), 3.4))
    for name in ordered(sets):
        f1 = {r["concept"]: r["f1"] for r in sets[name]["details"]["coverage"]["per_concept"]}
        ax.plot(range(len(order)), [f1.get(names[i], np.nan) for i in order], ".", label=name,
                color=COLORS.get(name), alpha=0.8)
    ax.set_xlabel("concepts, most frequent first")
    ax.set_ylabel("best single-unit F1")
    ax.set_ylim(0, 1.02)
    ax.set_title("coverage per concept")
    ax.legend(fontsize=8, ncol=3)
    return _png(fig)


def plot_purity(report: dict) -> str:
    import matplotlib.pyplot as plt

    sets = report["unit_sets"]
    fig, ax = plt.subplots(figsize=(6.5, 3.2))
    bins = np.linspace(0, 1, 21)
    for name in ordered(sets):
        per_unit = sets[name]["details"]["purity"]
        real, null = per_unit.get("per_unit_purity") or [], per_unit.get("per_unit_purity_null") or []
        if len(real):
            ax.hist(real, bins=bins, histtype="step", density=True, label=name, color=COLORS.get(name))
        if len(null) and not is_floor(name):
            ax.hist(null, bins=bins, histtype="step", density=True, linestyle=":", color=COLORS.get(name),
                    label=f"{name} (shuffled null)")
    ax.set_xlabel("precision of the unit's best concept")
    ax.set_ylabel("density of units")
    ax.set_title("purity (units firing ≥ 20 times) vs firing-rate-matched null")
    ax.legend(fontsize=7)
    return _png(fig)


def plot_frontier(points: list[dict]) -> str:
    """Each point: {label, val_loss, coverage, floor}: capability against monosemanticity."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.6))
    for p in points:
        ax.plot(p["val_loss"], p["coverage"], "o", color=COLORS.get(p.get("set"), "k"))
        ax.annotate(p["label"], (p["val_loss"], p["coverage"]), fontsize=7, xytext=(4, 2), textcoords="offset points")
        if p.get("floor") is not None:
            ax.plot(p["val_loss"], p["floor"], "x", color="#7f7f7f")
    ax.set_xlabel("validation loss (nats/token), lower is better")
    ax.set_ylabel("coverage (mean best-unit F1)")
    ax.set_title("frontier point (x: random-init floor)")
    return _png(fig)


# --- HTML -------------------------------------------------------------------------------------------
from monoroute.tables import html_page  # noqa: E402  (one stylesheet for every page)


def shade(tokens: list[str], acts: list[float], peak: float, focus: int) -> str:
    out = []
    for i, (tok, a) in enumerate(zip(tokens, acts)):
        alpha = 0 if peak <= 0 else max(0.0, min(1.0, a / peak))
        cls = ' class="focus"' if i == focus else ""
        out.append(f'<span{cls} style="background:rgba(214,39,40,{alpha:.2f})" title="{a:.3f}">{html.escape(tok)}</span>')
    return "".join(out)


def dashboard_html(d: dict) -> str:
    # "concept": the concept this unit is coverage's best unit for; a unit picked otherwise has none.
    best_for = f' <span class="muted">(best unit for {html.escape(d["concept"])})</span>' if d.get("concept") else ""
    parts = [f'<div class="dash"><h3>{html.escape(d["set"])} · layer {d["layer"]} · unit {d["unit"]}{best_for}</h3>',
             f'<p class="muted">fires on {d["n_firings"]} positions (density {d["density"]:.4%}), max {d["max"]:.3f}</p>']
    if d.get("best_concepts"):
        parts.append("<p>best concepts: " + ", ".join(
            f'{html.escape(c["concept"])} F1 {c["f1"]:.2f} (P {c["precision"]:.2f}, R {c["recall"]:.2f})'
            for c in d["best_concepts"]) + "</p>")
    exp = d.get("explanation")
    if exp:
        parts.append(f'<p>explanation: {html.escape(str(exp.get("explanation_text", exp.get("explanation"))))} — '
                     f'held-out precision {fmt(exp.get("precision"), 2)}, recall {fmt(exp.get("recall"), 2)}, '
                     f'F1 {fmt(exp.get("f1"), 2)}</p>')
    eff = d.get("logit_effect")
    if eff:
        parts.append("<p>boosts: " + " ".join(f"<code>{html.escape(repr(t))}</code>" for t in eff.get("boosted_text", []))
                     + "<br>suppresses: " + " ".join(f"<code>{html.escape(repr(t))}</code>"
                                                     for t in eff.get("suppressed_text", [])) + "</p>")
    parts.append("<b>top activations</b>")
    for c in d["top"]:
        parts.append(f'<div class="ctx">{shade(c["tokens"], c["acts"], d["max"], c["focus"])}</div>')
    for q in d["quantiles"]:
        lo, hi = q["range"]
        parts.append(f'<div class="muted">activation {lo:.3f} – {hi:.3f}</div>')
        for c in q["examples"]:
            parts.append(f'<div class="ctx">{shade(c["tokens"], c["acts"], d["max"], c["focus"])}</div>')
    parts.append("</div>")
    return "\n".join(parts)


def summary_table(report: dict) -> str:
    sets = report["unit_sets"]
    cols = [("l0", "L0"), ("cap_hit_fraction", "cap hit"), ("live_slot_fraction", "live-slot frac."),
            ("dead_fraction", "dead"), ("coverage", "coverage (held-out)"), ("coverage_in_sample", "coverage (in-sample)"),
            ("coverage_at_m", "coverage@5"), ("mean_purity", "mean purity"), ("mean_purity_null", "purity null"),
            ("share_pure", "share ≥ 0.9"), ("sparse_probe_f1", "probe F1 (top-5)"),
            ("sparse_probe_f1_top1", "probe F1 (top-1)"), ("explanation_f1", "explanation F1"),
            ("explanation_share_live_below_min", "live units < 20 firings (not explained)"),
            ("explained_variance", "EV"), ("spliced_val_loss", "spliced val loss")]
    rows = ["<table><tr><th>unit set</th>" + "".join(f"<th>{c[1]}</th>" for c in cols) + "</tr>"]
    for name in ordered(sets):
        cells = []
        floor = {} if is_floor(name) else sets.get(sets[name].get("floor", floor_of(name)), {})
        for key, _ in cols:
            value = sets[name].get(key)
            cell = fmt(value)
            if key in floor and value is not None and key not in ("mean_purity_null",):
                cell += f' <span class="floor">({fmt(floor[key])})</span>'
            cells.append(f"<td>{cell}</td>")
        rows.append(f"<tr><td>{name}</td>{''.join(cells)}</tr>")
    rows.append("</table>")
    return "\n".join(rows)


def interventions_table(rows: list[dict]) -> str:
    if not rows:
        return "<p>no interventions</p>"
    keys = [k for k in rows[0] if not isinstance(rows[0][k], (list, dict))]
    out = ["<table><tr>" + "".join(f"<th>{html.escape(k)}</th>" for k in keys) + "</tr>"]
    for r in rows:
        out.append("<tr>" + "".join(f"<td>{html.escape(fmt(r.get(k)))}</td>" for k in keys) + "</tr>")
    out.append("</table>")
    return "\n".join(out)


def build_html(report: dict, circuits: dict | None = None, facts: list[dict] | None = None) -> str:
    """The analysis page; with `circuits` (RUN/circuits/circuits.json) also its circuits section, with
    `facts` (RUN/facts/*.json) its facts section."""
    m = report["model"]
    floor = report["unit_sets"].get("random_init", {})
    trained = next((report["unit_sets"][s] for s in ("routed_units", "dense_neurons") if s in report["unit_sets"]), {})
    frontier = plot_frontier([{"label": report["model"]["ffn"], "val_loss": m["val_loss"],
                               "coverage": trained.get("coverage", 0.0), "floor": floor.get("coverage"),
                               "set": "routed_units" if "routed_units" in report["unit_sets"] else "dense_neurons"}])
    img = lambda b64: f'<img src="data:image/png;base64,{b64}">'  # noqa: E731
    per_layer = ["<table><tr><th>layer</th><th>unit set</th><th>L0</th><th>live-slot frac.</th><th>dead</th></tr>"]
    for lname, sets in report["per_layer"].items():
        for name in ordered(sets):
            s = sets[name]
            per_layer.append(f"<tr><td>{lname}</td><td>{name}</td><td>{fmt(s.get('l0'))}</td>"
                             f"<td>{fmt(s.get('live_slot_fraction'))}</td><td>{fmt(s.get('dead_fraction'))}</td></tr>")
    per_layer.append("</table>")
    body = [
        f"<h1>monoroute analysis: {html.escape(report['run'])}</h1>",
        f"<p>{report['n_positions']:,} positions from {report['n_documents']} documents of "
        f"<code>{html.escape(report['data'])}</code>; layer {report['layer']} scored in full. "
        f"Val loss {m['val_loss']:.4f}, FLOPs/token {m['flops_per_token']:,}, active params {m['active_params']:,}, "
        f"tokens/s {fmt(m['tokens_per_s'], 0)}. Took {report['seconds']} s, peak RSS {report['peak_rss_mb']:.0f} MB.</p>",
        "<h2>Scores (grey: the same architecture at random init)</h2>", summary_table(report),
        "<p class='muted'>How to read: coverage is the mean over concepts of the best single unit's F1 (it favours "
        "densely firing units on frequent concepts; see the per-concept plot). Purity is the precision of a unit's "
        "best concept, for units firing ≥ 20 times; compare it with the shuffled-position null, not with 1. "
        "Sparse-probe F1 is a held-out logistic probe on the k units chosen per concept. Explanation F1 scores "
        "an n-gram explanation of each unit on held-out documents.</p>",
        "<h2>Per layer</h2>", "\n".join(per_layer),
        "<h2>Plots</h2>", img(plot_density(report)), img(plot_coverage(report)), img(plot_purity(report)), img(frontier),
        "<h2>Interventions (specificity = loss change where the concept holds ÷ elsewhere)</h2>",
        interventions_table(report["interventions"]),
        "<h2>Unit dashboards</h2>", *[dashboard_html(d) for d in report["dashboards"]],
    ]
    if circuits is not None:
        from monoroute.circuits.report import circuits_section

        body.append(circuits_section(circuits))
    if facts:
        from monoroute.facts.report import facts_section

        body.append(facts_section(facts))
    return html_page("monoroute analysis", "".join(body))


# unit_sets.csv: one row per unit set, these report keys as columns (header = key)
UNIT_SET_COLUMNS = ("n_units", "k", "l0", "live_slot_fraction", "dead_fraction", "coverage", "mean_purity",
                    "mean_purity_null", "share_pure", "share_pure_null", "sparse_probe_f1", "sparse_probe_f1_top1",
                    "explanation_f1", "explanation_share_live_below_min", "explained_variance", "spliced_val_loss")


def write_outputs(report: dict, folder: Path) -> None:
    folder = Path(folder)
    write_text_atomic(folder / "report.json", json.dumps(report, indent=1, default=float))
    sets = report["unit_sets"]
    names = ordered(sets)
    write_csv(folder / "unit_sets.csv", ["unit_set", *UNIT_SET_COLUMNS],
              [[n] + [sets[n].get(k) for k in UNIT_SET_COLUMNS] for n in names])
    freq = dict(zip(report["concepts"]["names"], report["concepts"]["frequency"]))
    cov = {n: {r["concept"]: r for r in sets[n]["details"]["coverage"]["per_concept"]} for n in names}
    write_csv(folder / "coverage_per_concept.csv",
              ["concept", "frequency"] + [f"{n}_{c}" for n in names for c in ("f1", "unit", "threshold")],
              [[c, freq[c]] + [v for n in names for v in (cov[n].get(c, {}).get("f1"), cov[n].get(c, {}).get("best_unit"),
                                                          cov[n].get(c, {}).get("threshold"))]
               for c in report["concepts"]["names"]])
    layer_rows = [[lname, n, s.get("l0"), s.get("live_slot_fraction"), s.get("dead_fraction")]
                  for lname, per in report["per_layer"].items() for n, s in per.items()]
    write_csv(folder / "per_layer.csv", ["layer", "unit_set", "l0", "live_slot_fraction", "dead_fraction"], layer_rows)
    if report["interventions"]:
        keys = [k for k in report["interventions"][0] if not isinstance(report["interventions"][0][k], (list, dict))]
        write_csv(folder / "interventions.csv", keys, [[r.get(k) for k in keys] for r in report["interventions"]])
    write_text_atomic(folder / "report.html", build_html(report, run_circuits(folder.parent), run_facts(folder.parent)))


def run_facts(run_dir: Path) -> list[dict] | None:
    """The run's facts reports (for the report's facts section), or None."""
    from monoroute.errors import MonorouteError
    from monoroute.facts.report import load_facts

    try:
        return load_facts(run_dir) or None
    except MonorouteError:
        return None


def run_circuits(run_dir: Path) -> dict | None:
    """The run's circuits (for the report's circuits section), or None when it has none or they do not load."""
    from monoroute.circuits.report import load_circuits
    from monoroute.errors import MonorouteError

    try:
        return load_circuits(run_dir)
    except MonorouteError:
        return None
