"""Reading `facts eval` reports back: one row per (run, unit set) for `compare` and the browser."""
from __future__ import annotations

import html
import json
from pathlib import Path

from monoroute.errors import MonorouteError
from monoroute.tables import aligned_lines, fmt

OUT_DIR = "facts"
REPORTS = ("units", "sae", "transcoder")
# (column header, key of facts.run.headline); "(floor)" columns hold the reading before them taken on its floor
COLUMNS = [("units", "units"), ("recall", "recall"), ("(person-blind)", "recall_prior"),
           ("(untrained)", "recall_untrained"), ("held-out", "recall_heldout"), ("QA unseen", "recall_qa"),
           ("bits > prior", "bits_above_prior"),
           ("erase K", "erase_median_units"), ("K everywhere", "erase_median_units_everywhere"),
           ("lost other tmpl", "erase_lost_train_other"), ("(random K)", "erase_lost_train_other_floor"),
           ("lost held-out", "erase_lost_heldout"), ("(random K)", "erase_lost_heldout_floor"),
           ("drop other", "erase_drop_other"), ("(random K)", "erase_drop_other_floor"),
           ("edit ok", "edit_success"),
           ("dedicated facts", "dedicated_facts"), ("(perm.)", "dedicated_facts_floor"),
           ("(untrained)", "dedicated_facts_untrained"), ("... before the value", "dedicated_facts_prompt_end"),
           ("(perm.)", "dedicated_facts_prompt_end_floor"), ("route margin", "route_margin"), ("(perm.)", "route_margin_floor"),
           ("top-person share", "top_person_share"), ("(untrained)", "top_person_share_floor")]


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
    out.append("(facts eval, docs/facts.md: recall beside the person-blind prior (each attribute's most common "
               "value) and the untrained model; bits above the prior; erase: units ranked and K chosen on two "
               "training templates, lost (true value below chance) scored on the other templates and the held-out "
               "family, drop = mean fall in log p(true) of 50 other people's facts; (random K): K units active on "
               "the selection prompts; dedicated facts: a unit firing at the value-lookup positions of >= 3 of a "
               "fact's 4 renderings with precision >= 0.9; route margin: Jaccard of the lookup routes, same fact "
               "across templates minus same template across people; (perm.): fact labels shuffled)")
    return "\n".join(out)


def facts_section(reports: list[dict]) -> str:
    """The analysis page's facts section."""
    rows = facts_rows(reports)
    out = ["<h2>Facts (monoroute facts eval)</h2><table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h, _ in COLUMNS)
           + "</tr>"]
    for r in rows:
        out.append("<tr>" + "".join(f"<td>{html.escape(fmt(r.get(k)))}</td>" for _, k in COLUMNS) + "</tr>")
    out.append("</table><p class='muted'>Each reading beside its floor: recall beside the person-blind prior and "
               "the untrained model; erase (chosen on two templates, scored on the others) beside K random active "
               "units; dedication and route overlap beside fact labels shuffled (docs/facts.md).</p>")
    return "\n".join(out)


def headline(report: dict) -> dict:
    """The numbers a table shows, flat (reports of older versions: what they have)."""
    r, h, q, e, ed = (report.get(k) for k in ("recall", "recall_heldout", "recall_qa", "erase", "edit"))
    out = {"run": report["run"], "units": report["units"], "params": report["params"],
           "flops_per_token": report["flops_per_token"], "recall": r["accuracy"],
           "recall_prior": r.get("prior_accuracy"), "recall_untrained": r.get("untrained_accuracy"),
           "recall_heldout": h["accuracy"], "recall_qa": q["accuracy"] if q else None,
           "facts_recalled": round(r["facts_recalled"]), "bits": round(r["bits"]),
           "bits_above_prior": round(r["bits_above_prior"]) if "bits_above_prior" in r else None,
           "bits_per_param": report["bits_per_param"]}
    if e:
        out.update(erase_median_units=e["median_units"], erased_share=e["erased_share"], erase_n=e["n_facts"],
                   erase_median_units_everywhere=e.get("median_units_everywhere"),
                   erase_drop_other=e.get("drop_other"), erase_drop_other_floor=e.get("drop_other_floor"),
                   erase_drop_same_person=e.get("drop_same_person"),
                   erase_drop_same_person_floor=e.get("drop_same_person_floor"))
        for fam in ("train_other", "heldout", "qa"):
            if fam in e.get("lost", {}):
                out[f"erase_lost_{fam}"] = e["lost"][fam]
                out[f"erase_lost_{fam}_floor"] = e["lost_floor"].get(fam)
    if ed and ed.get("n_edits"):
        out.update(edit_success=ed["success"], edit_success_prompt=ed["success_prompt"],
                   edit_specificity_other=ed["specificity_other"], edit_n=ed["n_edits"])
    look, look0 = report.get("lookup"), report.get("lookup_untrained")
    if look:
        a = look["all_sites"]
        out.update(dedicated_facts=a["dedicated_facts_share"], dedicated_facts_floor=a["dedicated_facts_share_floor"],
                   dedicated_facts_prompt_end=a.get("dedicated_facts_share_prompt_end"),
                   dedicated_facts_prompt_end_floor=a.get("dedicated_facts_share_prompt_end_floor"),
                   dedicated_facts_untrained=look0["all_sites"]["dedicated_facts_share"] if look0 else None,
                   route_margin=a["route_overlap"]["margin"], route_margin_floor=a["route_margin_floor"],
                   route_same_fact=a["route_overlap"]["same_fact_across_templates"],
                   route_same_template=a["route_overlap"]["same_template_across_people"])
    for suffix, s in (("", report.get("selectivity")), ("_floor", report.get("selectivity_floor"))):
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


def prior_points(reports: list[dict]) -> list[tuple[int, float]]:
    """[(people, person-blind recall)] from reports that carry it (one per number of people; the world
    fixes it, so every run at one spec agrees)."""
    from monoroute.data.facts import FactsSpec

    out = {FactsSpec.parse(r["spec"]).people: r["recall"]["prior_accuracy"] for r in reports
           if r["recall"].get("prior_accuracy") is not None}
    return sorted(out.items())


def plot_capacity(curves: dict[str, list], path: str | Path, prior: list[tuple[int, float]] | None = None) -> None:
    """Recall and facts recalled against the number of people, one line per model family, beside the
    person-blind floor (each attribute's most common value)."""
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
    if prior:
        a.plot([p for p, _ in prior], [v for _, v in prior], "k:", lw=1.2, label="person-blind floor")
        b.plot([p for p, _ in prior], [v * p * 6 for p, v in prior], "k:", lw=1.2, label="person-blind floor")
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
