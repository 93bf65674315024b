"""The sweep's record: one entry per run (settings, checkpoint, eval, analysis), the flat per-run
table derived from it, and its three renderings: sweep.json, sweep.csv and an aligned text table."""
from __future__ import annotations

import csv
import io
import math
from pathlib import Path

from monoroute.fileio import write_json_atomic, write_text_atomic
from monoroute.tables import aligned_lines
from monoroute.train.config import RunConfig

FORMAT = 1
JSON_FILE, CSV_FILE = "sweep.json", "sweep.csv"
UNIT_KEYS = ("coverage", "coverage_in_sample", "coverage_at_m", "mean_purity", "mean_purity_null", "sparse_probe_f1",
             "explanation_f1", "l0", "live_slot_fraction", "dead_fraction")
FLOOR_KEYS = ("coverage", "coverage_in_sample", "coverage_at_m", "mean_purity", "sparse_probe_f1", "explanation_f1")
SAE_KEYS = ("coverage", "mean_purity", "sparse_probe_f1", "explanation_f1", "l0", "spliced_val_loss",
            "clean_val_loss", "explained_variance", "loss_recovered")
COLUMNS = (
    ["run", "status", "ffn", "d_ff", "n_units", "k", "router", "router_heads", "coupling", "activation", "l1_coef",
     "sparse_rows", "table_lr_mult", "steps", "step",
     "val_loss", "flops_per_token", "params", "active_params", "tokens_per_s", "l0", "live_slot_fraction",
     "dead_fraction", "selection_recall", "selection_mass", "unit_set", "n_positions"]
    + [f"units_{key}" for key in ("l0", "dead_fraction")]
    + [c for key in FLOOR_KEYS for c in (key, f"{key}_random_init")] + ["mean_purity_null"]
    + [f"sae_{key}" for key in SAE_KEYS] + ["sae_coverage_sae_init"]
)


def key_settings(cfg: RunConfig) -> dict:
    """The settings that tell runs of a sweep apart (the full config is in OUT/NAME/config.json)."""
    m, t = cfg.model, cfg.train
    kinds = m.ffn_kinds()
    out = {"preset": cfg.preset, "ffn": m.ffn}
    if "dense" in kinds:
        out["d_ff"] = m.ffn_width
    if "routed" in kinds:
        out.update(n_units=m.n_units, k=m.k, router=m.router, router_heads=m.router_heads, coupling=m.layer_coupling,
                   activation=m.activation, l1_coef=m.l1_coef, aux_coef=m.aux_coef, sparse_grad=m.sparse_grad,
                   table_lr_mult=t.table_lr_mult)
    out.update(steps=t.steps, batch_size=t.batch_size, grad_accum=t.grad_accum, lr=t.lr, sparse_rows=t.sparse_rows,
               data=cfg.data.source, tokenizer=cfg.data.tokenizer)
    return out


def analysis_numbers(report: dict) -> dict:
    """From an analyze report: the trained units of the analysed layer (routed units or dense
    neurons), the same architecture at random init (the floor), and the SAE with its own floor (the
    untrained SAE) when there is one."""
    sets = report["unit_sets"]
    trained = "routed_units" if "routed_units" in sets else "dense_neurons"
    pick = lambda s, keys: {key: s.get(key) for key in keys}  # noqa: E731
    out = {"layer": report["layer"], "n_positions": report["n_positions"], "unit_set": trained,
           "units": pick(sets[trained], UNIT_KEYS), "random_init": pick(sets.get("random_init", {}), UNIT_KEYS),
           "seconds": report.get("seconds")}
    if "sae" in sets:
        out["sae"] = pick(sets["sae"], SAE_KEYS)
        out["sae"]["coverage_sae_init"] = sets.get("sae_init", {}).get("coverage")
    return out


def row(entry: dict) -> dict:
    """One flat table row per run (None where a number does not apply or is not there yet)."""
    cfg, ev, an = entry["config"], entry.get("eval") or {}, entry.get("analysis") or {}
    units, floor, sae = an.get("units", {}), an.get("random_init", {}), an.get("sae", {})
    r = {c: None for c in COLUMNS}
    r.update(run=entry["name"], status=entry["status"], ffn=cfg["ffn"], d_ff=cfg.get("d_ff"),
             n_units=cfg.get("n_units"), k=cfg.get("k"), router=cfg.get("router"),
             router_heads=cfg.get("router_heads"), coupling=cfg.get("coupling"), activation=cfg.get("activation"),
             l1_coef=cfg.get("l1_coef"), sparse_rows=cfg.get("sparse_rows"), table_lr_mult=cfg.get("table_lr_mult"), steps=cfg["steps"], unit_set=an.get("unit_set"),
             n_positions=an.get("n_positions"), units_l0=units.get("l0"),
             units_dead_fraction=units.get("dead_fraction"),
             mean_purity_null=units.get("mean_purity_null"))
    r.update({key: ev.get(key) for key in ("step", "val_loss", "flops_per_token", "params", "active_params",
                                           "tokens_per_s", "l0", "live_slot_fraction", "dead_fraction",
                                           "selection_recall", "selection_mass")})
    for key in FLOOR_KEYS:
        r[key], r[f"{key}_random_init"] = units.get(key), floor.get(key)
    r.update({f"sae_{key}": sae.get(key) for key in SAE_KEYS})
    r["sae_coverage_sae_init"] = sae.get("coverage_sae_init")
    return r


def document(spec, out: Path, entries: list[dict]) -> dict:
    return {"format": FORMAT, "spec": {"path": spec.path, **spec.raw, "analyze_tokens": spec.analyze_tokens},
            "out": str(out), "runs": entries, "rows": [row(e) for e in entries]}


def write_results(out: Path, doc: dict) -> None:
    """sweep.json and sweep.csv, each replaced atomically: a kill leaves the previous complete pair."""
    write_json_atomic(out / JSON_FILE, doc, durable=True)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(COLUMNS)
    for r in doc["rows"]:
        writer.writerow(["" if r[c] is None else r[c] for c in COLUMNS])
    write_text_atomic(out / CSV_FILE, buf.getvalue(), durable=True)


def _num(value, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int) or (isinstance(value, float) and abs(value) >= 1000):
        return f"{value:,.0f}"
    return f"{value:.{digits}f}"


def _with_floor(r: dict, key: str, floor_key: str) -> str:
    cell = _num(r.get(key))
    return cell if r.get(floor_key) is None else f"{cell} ({_num(r[floor_key])})"


def text_table(rows: list[dict]) -> str:
    """Aligned table; the SAE of a dense run gets its own line, at its spliced loss."""
    header = ["run", "ffn", "width", "val loss", "FLOPs/tok", "active", "tok/s", "L0", "live", "dead %", "recall",
              "coverage", "coverage@5", "purity", "purity null", "probe F1", "expl. F1"]
    lines = []
    for r in rows:
        width = f"N={r['n_units']} k={r['k']}" if r["n_units"] is not None else f"d_ff={r['d_ff']}"
        if r["status"] != "done":
            lines.append([r["run"], r["ffn"], width, r["status"]] + [""] * (len(header) - 4))
            continue
        dead = None if r["dead_fraction"] is None else 100 * r["dead_fraction"]
        lines.append([r["run"], r["ffn"], width, _num(r["val_loss"]), _num(r["flops_per_token"]),
                      _num(r["active_params"]), _num(r["tokens_per_s"], 0), _num(r["l0"], 2),
                      _num(r["live_slot_fraction"]), _num(dead, 1), _num(r["selection_recall"]),
                      _with_floor(r, "coverage", "coverage_random_init"),
                      _with_floor(r, "coverage_at_m", "coverage_at_m_random_init"),
                      _with_floor(r, "mean_purity", "mean_purity_random_init"), _num(r["mean_purity_null"]),
                      _with_floor(r, "sparse_probe_f1", "sparse_probe_f1_random_init"),
                      _with_floor(r, "explanation_f1", "explanation_f1_random_init")])
        if r["sae_coverage"] is not None:
            lines.append([f"  {r['run']} + SAE", "sae", "", _num(r["sae_spliced_val_loss"]), "", "", "",
                          _num(r["sae_l0"], 2), "", "", "", _with_floor(r, "sae_coverage", "sae_coverage_sae_init"), "",
                          _num(r["sae_mean_purity"]),
                          "", _num(r["sae_sparse_probe_f1"]), _num(r["sae_explanation_f1"])])
    out = aligned_lines(header, lines, strip=True)
    out.append("(in brackets: the same architecture at random init; coverage: held-out (unit chosen on half the "
               "documents, scored on the other); purity null: the same firing counts at "
               "random positions; SAE rows: val loss with the SAE spliced in)")
    return "\n".join(out)
