"""Per-unit dashboards (as in sae_vis / Neuronpedia), as plain JSON-able dicts.

For one unit: its top-activating contexts with the unit's activation on every token of the
context, samples from activation quantiles (so the reader sees what the unit does at 20 % of its
maximum, not only at its peak), the firing density and a histogram of its nonzero activations,
its best concepts with F1 (the same detector rule as coverage: on ⇔ activation > t·max), and,
added by the caller, its direct effect on output logits and its explanation with its score.
"""
from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from monoroute.interp.types import ConceptLabels, Positions

def vocab_strings(tokenizer, vocab_size: int) -> list[str]:
    """A readable string for every token id: whitespace made visible, undecodable bytes as <xNN>."""
    out = []
    for i in range(vocab_size):
        if tokenizer.kind == "byte":
            text = chr(i) if 32 <= i < 127 or i in (9, 10) else f"<x{i:02X}>"
        else:
            text = tokenizer.decode([i])
        out.append(text.replace("\n", "↵").replace("\t", "⇥"))
    return out


def unit_column(matrix: sp.spmatrix, unit: int) -> np.ndarray:
    """(P,) dense activations of one unit (a single column is cheap; never the whole matrix)."""
    return np.asarray(matrix[:, unit].toarray()).ravel()


def context(col: np.ndarray, positions: Positions, strings: list[str], p: int, before: int, after: int) -> dict:
    """Tokens around position p inside its own context window, with the unit's activation on each."""
    window_start = p - int(positions.window_pos[p])
    lo = max(window_start, p - before)
    hi = min(len(col), p + after + 1, window_start + int(positions.window_pos.max()) + 1)
    ids = positions.token_ids[lo:hi]
    return {
        "position": int(p),
        "focus": int(p - lo),
        "tokens": [strings[int(t)] for t in ids],
        "acts": [round(float(a), 4) for a in col[lo:hi]],
    }


def best_concepts(matrix: sp.spmatrix, unit: int, labels: ConceptLabels, top: int = 5,
                  counts: np.ndarray | None = None) -> list[dict]:
    """The concepts this unit detects best: coverage's own in-sample detector search
    (`metrics._best_units`: on ⇔ activation > t·max, F1 maximised over t ∈ metrics.THRESHOLDS, ties to
    the lower t, then the lower concept) run on this one column, so a dashboard and the coverage table
    never disagree (tested against metrics.coverage). Only the unit's firing positions are read (the
    others cannot be "on"): fast enough for a unit page. `counts`: (C,) positions per concept,
    labels.matrix.sum(0), when the caller has them already."""
    from monoroute.interp.metrics import THRESHOLDS, _best_units

    col = sp.csc_matrix(matrix[:, [unit]])  # (P, 1): indices are the positions
    pos, val = col.indices, col.data.astype(np.float32)
    fired = val > 0
    if not fired.any():
        return []
    pos, val = pos[fired], val[fired]
    n_c = labels.matrix.sum(0) if counts is None else counts
    sub = sp.csr_matrix((val, (np.arange(len(pos)), np.zeros(len(pos), dtype=np.int64))), shape=(len(pos), 1))
    f1, best, _, _ = _best_units(sub, labels.matrix[pos], THRESHOLDS, n_c=n_c)
    order = sorted(np.flatnonzero(f1 > 0), key=lambda c: (-f1[c], c))[:top]
    return [{"concept": labels.names[c], "f1": round(float(f1[c]), 4), "precision": round(float(best[c, 1]), 4),
             "recall": round(float(best[c, 2]), 4), "threshold": float(best[c, 3])} for c in order]


def unit_dashboard(matrix: sp.spmatrix, unit: int, positions: Positions, strings: list[str],
                   labels: ConceptLabels | None = None, n_top: int = 8, n_quantiles: int = 4, per_quantile: int = 2,
                   before: int = 24, after: int = 6, seed: int = 0) -> dict:
    col = unit_column(matrix, unit)
    fired = np.flatnonzero(col > 0)
    dash = {"unit": int(unit), "n_firings": int(len(fired)), "density": len(fired) / max(len(col), 1),
            "max": float(col.max()) if len(col) else 0.0, "top": [], "quantiles": [], "histogram": None,
            "best_concepts": []}
    if len(fired) == 0:
        return dash
    top = fired[np.argsort(-col[fired], kind="stable")[:n_top]]
    dash["top"] = [context(col, positions, strings, int(p), before, after) for p in top]
    # Quantile bands of the firing values (sae_vis "interval" samples), seeded.
    rng = np.random.default_rng(seed + unit)
    edges = np.quantile(col[fired], np.linspace(0, 1, n_quantiles + 1))
    for lo, hi in zip(edges[:-1], edges[1:]):
        band = fired[(col[fired] >= lo) & (col[fired] <= hi)]
        pick = rng.choice(band, size=min(per_quantile, len(band)), replace=False) if len(band) else []
        dash["quantiles"].append({"range": [float(lo), float(hi)],
                                  "examples": [context(col, positions, strings, int(p), before, after) for p in pick]})
    counts, bin_edges = np.histogram(col[fired], bins=20)
    dash["histogram"] = {"counts": counts.tolist(), "edges": [float(e) for e in bin_edges]}
    if labels is not None:
        dash["best_concepts"] = best_concepts(matrix, unit, labels)
    return dash
