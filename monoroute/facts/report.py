"""Reading `facts eval` reports back: one row per (run, unit set) for `compare` and the browser."""
from __future__ import annotations

import html
import json
from pathlib import Path

from monoroute.errors import MonorouteError
from monoroute.tables import aligned_lines, fmt

OUT_DIR = "facts"
REPORTS = ("units", "sae", "transcoder")
# (column header, key of facts.run.headline)
COLUMNS = [("units", "units"), ("recall", "recall"), ("held-out", "recall_heldout"), ("bits", "bits"),
           ("erase units (median)", "erase_median_units"), ("erased", "erased_share"),
           ("erase spec.", "erase_specificity_other"), ("edit ok", "edit_success"),
           ("edit spec.", "edit_specificity_other"), ("top-person share", "top_person_share"),
           ("(floor)", "top_person_share_floor"), ("dedicated", "dedicated_people"), ("(floor)", "dedicated_people_floor")]


def load_facts(run: str | Path) -> list[dict]:
    """The run's facts reports (its own units first, then SAE / transcoder); [] when it has none."""
    out = []
    for name in REPORTS:
        path = Path(run) / OUT_DIR / f"{name}.json"
        if path.is_file():
            try:
                out.append(json.loads(path.read_text(encoding="utf-8")))
            except json.JSONDecodeError as exc:
                raise MonorouteError(f"{path} is not valid JSON ({exc}); run `monoroute facts eval {run}` "
                                     f"again") from None
    return out


def facts_rows(reports: list[dict]) -> list[dict]:
    return [headline(r) for r in reports]


def facts_table(reports: list[dict]) -> str:
    rows = facts_rows(reports)
    header = ["run"] + [h for h, _ in COLUMNS]
    lines = [[r["run"]] + [fmt(r.get(k)) for _, k in COLUMNS] for r in rows]
    out = aligned_lines(header, lines)
    out.append("(facts eval: multiple-choice recall on a training template and the held-out one; bits stored; "
               "erase: attribution-ranked units zeroed until the fact is lost, specificity = other people's facts "
               "kept; edit: output rows of the erase set rewritten, success on prompt and paraphrase; top-person share: "
               "median over units firing >= 20 times of the share of their firings on their top person (mean over "
               "layers); dedicated: share of people with a unit of precision >= 0.9, recall >= 0.5; (floor): the same "
               "units untrained)")
    return "\n".join(out)


def facts_section(reports: list[dict]) -> str:
    """The analysis page's facts section."""
    rows = facts_rows(reports)
    out = ["<h2>Facts (monoroute facts eval)</h2><table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h, _ in COLUMNS)
           + "</tr>"]
    for r in rows:
        out.append("<tr>" + "".join(f"<td>{html.escape(fmt(r.get(k)))}</td>" for _, k in COLUMNS) + "</tr>")
    out.append("</table><p class='muted'>Recall: multiple choice among the attribute's values; erase: attribution-"
               "ranked units zeroed until the fact is lost; specificity: other people's facts kept.</p>")
    return "\n".join(out)


def headline(report: dict) -> dict:
    """The numbers a table shows, flat."""
    r, h, e, ed, sel = (report.get(k) for k in ("recall", "recall_heldout", "erase", "edit", "selectivity"))
    out = {"run": report["run"], "units": report["units"], "params": report["params"],
           "flops_per_token": report["flops_per_token"], "recall": r["accuracy"], "recall_heldout": h["accuracy"],
           "facts_recalled": round(r["facts_recalled"]), "bits": round(r["bits"]),
           "bits_per_param": report["bits_per_param"]}
    if e:
        out.update(erase_median_units=e["median_units"], erased_share=e["erased_share"],
                   erase_specificity_other=e["specificity_other"],
                   erase_specificity_same_person=e["specificity_same_person"], erase_n=e["n_facts"],
                   erase_lost_paraphrase=e.get("lost_paraphrase"), erase_lost_heldout=e.get("lost_heldout"))
    if ed and ed.get("n_edits"):
        out.update(edit_success=ed["success"], edit_success_prompt=ed["success_prompt"],
                   edit_specificity_other=ed["specificity_other"],
                   edit_specificity_same_person=ed["specificity_same_person"], edit_n=ed["n_edits"])
    for suffix, s in (("", sel), ("_floor", report.get("selectivity_floor"))):
        if s:  # top_person_share: the mean over sites of each site's median top-person share
            shares = {k: v["median_top_person_share"] for k, v in s.items() if k not in ("all_sites", "of")}
            known = [v for v in shares.values() if v is not None]
            out.update({f"dedicated_people{suffix}": s["all_sites"]["dedicated_people_share"],
                        f"median_top_person_share{suffix}": shares,
                        f"top_person_share{suffix}": sum(known) / len(known) if known else None})
    out["seconds"] = report.get("seconds")
    out["peak_rss_mb"] = report.get("peak_rss_mb")
    return out


def capacity_points(reports: list[dict], label_of) -> dict[str, list[tuple]]:
    """label -> sorted [(people, mean recall, mean facts recalled, min recall, max recall)] from facts
    reports (one per run); runs of one label at the same number of people (seeds) are averaged."""
    from monoroute.data.facts import FactsSpec

    groups: dict[tuple[str, int], list[dict]] = {}
    for rep in reports:
        groups.setdefault((label_of(rep), FactsSpec.parse(rep["spec"]).people), []).append(rep["recall"])
    curves: dict[str, list] = {}
    for (label, people), recs in groups.items():
        acc = [r["accuracy"] for r in recs]
        curves.setdefault(label, []).append((people, sum(acc) / len(acc),
                                             sum(r["facts_recalled"] for r in recs) / len(recs), min(acc), max(acc)))
    return {k: sorted(v) for k, v in curves.items()}


def plot_capacity(curves: dict[str, list], path: str | Path) -> None:
    """Recall and facts recalled against the number of people, one line per model family."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for label, pts in curves.items():
        people = [p[0] for p in pts]
        spread = [[p[1] - p[3] for p in pts], [p[4] - p[1] for p in pts]]  # min-max over seeds
        a.errorbar(people, [p[1] for p in pts], yerr=spread, fmt="o-", capsize=3, label=label)
        b.plot(people, [p[2] for p in pts], "o-", label=label)
    a.axhline(0.5, color="#999", lw=0.8, ls="--")
    ticks = sorted({p[0] for pts in curves.values() for p in pts})
    for ax, what in ((a, "recall (mean; bars: min-max over seeds)"), (b, "facts recalled (of people x 6)")):
        ax.set_xscale("log")
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.minorticks_off()
        ax.set_xlabel("people (equal training tokens: 8.2M)")
        ax.set_ylabel(what)
        ax.grid(alpha=0.3)
    a.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
