"""One row per unit of a unit set: what the unit browser lists, sorts, filters and searches.

`analyze` writes RUN/analysis/units/<set>.parquet for each unit set of the headline layer (the
model's own units and any post-hoc baseline); `monoroute serve` and `monoroute export` read it.
Everything is computed from the sparse (P, N) activations in vectorised passes (no Python loop
over units except the n-gram explanations, ~0.5 ms per unit), so a table for N = 1M is cheap.

Columns (N rows, unit order):
    unit            int32    the unit's index in its set
    n_firings       int32    positions where activation > 0
    density         float32  n_firings / P
    max_act         float32  largest activation (0 when it never fires)
    mean_act        float32  mean activation where it fires (0 when it never fires)
    purity          float32  P(best concept | unit fires): the precision of `best_concept`; NaN below
                             `min_firings` firings (too few to say; see metrics.purity)
    best_concept    str      the concept that holds most often where the unit fires ("" if none)
    lift            float32  purity / base rate of best_concept (NaN as purity)
    f1_concept      str      the concept the unit detects best as "fires ⇔ concept" (F1 at threshold 0)
    f1              float32  that F1 (0 when it never fires)
    top_tokens      str      up to 5 tokens with the largest summed activation, joined by " · "
    explanation     str      the n-gram explanation (metrics.explanation_scores), grams joined by " | ";
                             "" when none was found
    explanation_f1  float32  its held-out F1; NaN when not scored
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import scipy.sparse as sp

from monoroute.interp import metrics as M
from monoroute.interp.types import ConceptLabels, Positions, UnitActivations

COLUMNS = ("unit", "n_firings", "density", "max_act", "mean_act", "purity", "best_concept", "lift", "f1_concept",
           "f1", "top_tokens", "explanation", "explanation_f1")
TOP_TOKENS = 5
TOKEN_SEP = " · "
GRAM_SEP = " | "


def top_tokens(A: sp.csc_matrix, token_ids: np.ndarray, strings: list[str], top: int = TOP_TOKENS) -> list[str]:
    """(N,) strings: per unit, the `top` token types with the largest summed activation where it fires."""
    N = A.shape[1]
    counts = np.diff(A.indptr)
    unit = np.repeat(np.arange(N, dtype=np.int64), counts)
    value = A.data.astype(np.float64)
    keep = value > 0
    unit, value = unit[keep], value[keep]
    tok = token_ids[A.indices[keep]].astype(np.int64)
    key = unit * (int(token_ids.max(initial=0)) + 1) + tok
    uniq, inverse = np.unique(key, return_inverse=True)
    sums = np.bincount(inverse, weights=value)
    V = int(token_ids.max(initial=0)) + 1
    u_of, t_of = uniq // V, uniq % V
    order = np.lexsort((t_of, -sums, u_of))  # by unit, then largest sum, then token id
    u_sorted = u_of[order]
    starts = np.searchsorted(u_sorted, np.arange(N))
    rank = np.arange(len(order)) - starts[u_sorted]
    out = [[] for _ in range(N)]
    for i in np.flatnonzero(rank < top):
        out[int(u_sorted[i])].append(strings[int(t_of[order[i]])])
    return [TOKEN_SEP.join(x) for x in out]


def concept_columns(A: sp.csr_matrix, labels: ConceptLabels, min_firings: int = 20) -> dict[str, np.ndarray]:
    """purity / best_concept / lift (metrics.purity's definition, for every unit) and the best
    "fires ⇔ concept" F1, from one pass over the concept × unit co-firing counts."""
    P, N = A.shape
    L = np.asarray(labels.matrix, dtype=bool)
    n_c = L.sum(0).astype(np.float64)
    concepts = np.flatnonzero(n_c > 0)
    Lt = M._labels_t(L)
    B, n_on = M._binarise(A, M._col_max(A), 0.0)
    best_tp, best_c, best_f1, f1_c = M._best_concept(Lt, B, concepts, N, n_on, n_c)
    enough = n_on >= min_firings
    with np.errstate(divide="ignore", invalid="ignore"):
        purity = np.where(enough, best_tp / np.maximum(n_on, 1), np.nan)
        base = np.where(best_c >= 0, n_c[np.maximum(best_c, 0)] / max(P, 1), np.nan)
        lift = np.where(enough, purity / base, np.nan)
    names = np.asarray(list(labels.names) + [""], dtype=object)
    return {"purity": purity.astype(np.float32), "best_concept": names[best_c],
            "lift": lift.astype(np.float32), "f1_concept": names[f1_c], "f1": best_f1.astype(np.float32)}


def explanation_columns(acts: UnitActivations, positions: Positions, strings: list[str], live: np.ndarray,
                        seed: int = 0) -> tuple[list[str], np.ndarray]:
    """(N,) explanation strings and (N,) held-out F1 (NaN where not scored), for the `live` units."""
    N = acts.n_units
    text = [""] * N
    f1 = np.full(N, np.nan, dtype=np.float32)
    if len(live) == 0:
        return text, f1
    res = M.explanation_scores(acts, positions.token_ids, positions.doc_ids, units=live, seed=seed)
    for row in res["per_unit"]:
        if row.get("explanation"):
            text[row["unit"]] = GRAM_SEP.join("".join(strings[t] for t in gram) for gram in row["explanation"])
        if row.get("f1") is not None:
            f1[row["unit"]] = row["f1"]
    return text, f1


def build_unit_table(acts: UnitActivations, labels: ConceptLabels, positions: Positions, strings: list[str],
                     seed: int = 0, explain: bool = True) -> dict[str, np.ndarray | list]:
    """All columns of the unit table (see the module docstring) as equal-length arrays / lists. Every
    column is about firing (> 0), so only the positive entries are read (a fraction of a dense set)."""
    acts = M.positive_part(acts)
    A = M._csr(acts)
    P, N = A.shape
    C = A.tocsc()
    fires = C.data > 0
    counts = np.diff(C.indptr)
    unit_of = np.repeat(np.arange(N), counts)
    n_firings = np.bincount(unit_of[fires], minlength=N)
    sums = np.bincount(unit_of[fires], weights=C.data[fires].astype(np.float64), minlength=N)
    max_act = M._col_max(A)
    cols: dict = {"unit": np.arange(N, dtype=np.int32), "n_firings": n_firings.astype(np.int32),
                  "density": (n_firings / max(P, 1)).astype(np.float32), "max_act": max_act.astype(np.float32),
                  "mean_act": (sums / np.maximum(n_firings, 1)).astype(np.float32)}
    cols.update(concept_columns(A, labels))
    cols["top_tokens"] = top_tokens(C, positions.token_ids, strings)
    live = np.flatnonzero(n_firings > 0)
    cols["explanation"], cols["explanation_f1"] = explanation_columns(acts, positions, strings, live if explain
                                                                      else np.zeros(0, dtype=np.int64), seed)
    return cols


def write_unit_table(cols: dict, path: str | Path) -> Path:
    """Parquet via pyarrow, written to a temp name and renamed (a reader never sees half a table)."""
    import os

    import pyarrow as pa
    import pyarrow.parquet as pq

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.table({name: (pa.array(list(cols[name]), type=pa.string()) if name in
                             ("best_concept", "f1_concept", "top_tokens", "explanation")
                             else pa.array(np.asarray(cols[name]))) for name in COLUMNS})
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    pq.write_table(table, tmp)
    os.replace(tmp, path)
    return path


def read_unit_table(path: str | Path):
    """The table as a pandas DataFrame (columns as in the module docstring)."""
    import pyarrow.parquet as pq

    table = pq.read_table(str(path))
    missing = [c for c in COLUMNS if c not in table.column_names]
    if missing:
        raise ValueError(f"{path} lacks columns {missing}")
    return table.to_pandas()
