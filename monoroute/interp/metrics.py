"""Monosemanticity metrics for any unit set: dense neurons, routed units, SAE / transcoder latents, random init.

Every function takes a `UnitActivations` (scipy CSR (P, N), only the stored entries) and never builds a
dense (P, N) matrix: counts of "unit fires ∧ concept holds" come from sparse products
`labels.T (C, P) @ binarised activations (P, N)`, done in chunks of concepts sized so that the (chunk, N)
result stays small (memory is O(nnz + N·chunk), fine at N = 1M). All results are plain JSON-able dicts.

Conventions shared by all metrics
- A unit *fires* at a position when its activation there is > 0, in every metric (firing statistics,
  purity, coverage, explanations, dashboards): negative activations of GELU / SiLU / identity units
  are never "on". Only the sparse probes read the signed values.
- A unit used as a *detector* at relative threshold t is "on" where activation > t · (its maximum
  activation); t = 0 is "fires". Comparisons are done in float32, the activations' own precision.
- Document splits hash the document id (with the seed), so they are reproducible and never cut a
  document; with a single document they fall back to contiguous position ranges.

What each headline number (see `all_metrics`) tells you, and its bias
- `l0`, `live_slot_fraction`, `dead_fraction`: how much of the layer is used (firing_stats).
- `coverage`: mean over concepts of the best single unit's F1 (Karvonen et al. 2024), the unit and
  threshold chosen on one half of the documents and scored on the other (`coverage_in_sample`: chosen
  and scored on all positions, which favours wide sets). Favours densely firing units on frequent
  concepts: read it with `details.coverage.by_frequency`.
- `coverage_at_m` (m = 5): the same with the OR of up to m units per concept, for concepts split over
  several narrow units; only its excess over the random-init floor is evidence.
- `mean_purity` vs `mean_purity_null`: precision of each unit's best concept, against the same units'
  firing sets placed at random positions. Only the excess over the null means anything: a unit firing
  20 times can look "pure" on a concept that holds at 90 % of positions by chance alone.
- `sparse_probe_f1` (top-5) / `sparse_probe_f1_top1`: held-out (by document) logistic probes on the
  k units chosen per concept (SAEBench-style k-sparse probing).
- `explanation_f1`: an n-gram explanation of each unit built on half of the documents, scored as a
  detector on the other half (an LLM-free stand-in for auto-interpretation scores).
"""
from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from monoroute.interp.types import ConceptLabels, Positions, UnitActivations

THRESHOLDS = tuple(round(0.1 * i, 1) for i in range(10))  # 0.0 .. 0.9
FREQUENCY_BINS = ((0.0, 0.001, "<0.1%"), (0.001, 0.01, "0.1-1%"), (0.01, 0.1, "1-10%"), (0.1, 1.0001, ">=10%"))
DENSITY_EDGES = np.linspace(-7.0, 0.0, 29)  # log10 firing rate, 0.25-wide bins
FLOPS_PER_CHUNK = 16_000_000  # co-occurrence products are chunked over concepts to about this many entries
MAX_LISTED = 20_000  # per-unit lists in the output are a seeded sample of at most this many units


# --- shared helpers -----------------------------------------------------------------------------
def _csr(acts: UnitActivations) -> sp.csr_matrix:
    """The activation matrix as canonical CSR (a copy only when it is not already)."""
    m = acts.matrix
    if not (sp.issparse(m) and m.format == "csr"):
        m = sp.csr_matrix(m)
    if not m.has_canonical_format:
        m = m.copy()
        m.sum_duplicates()
    return m


def positive_part(acts: UnitActivations) -> UnitActivations:
    """The same unit set with only its firing (> 0) entries: all that firing statistics, coverage,
    purity, explanations and unit tables read. For exactly captured dense neurons (every signed value,
    ~10 % of them positive once trained) it is a fraction of the matrix; a set that stores only
    firings (routed units, TopK latents) comes back as it is."""
    A = _csr(acts)
    keep = A.data > 0
    if keep.all():
        return acts
    cum = np.concatenate([[0], np.cumsum(keep, dtype=np.int64)])
    m = sp.csr_matrix((A.data[keep], A.indices[keep], cum[A.indptr]), shape=A.shape)
    m.has_sorted_indices = True
    return UnitActivations(acts.name, acts.layer, m, acts.k, meta=dict(acts.meta, positive_only=True))


def _check_labels(A: sp.csr_matrix, labels: ConceptLabels) -> np.ndarray:
    L = np.asarray(labels.matrix, dtype=bool)
    if L.shape[0] != A.shape[0]:
        raise ValueError(f"labels cover {L.shape[0]} positions, activations {A.shape[0]}")
    return L


def _labels_t(L: np.ndarray) -> sp.csr_matrix:
    """(C, P) float32 CSR of the labels (1 where a concept holds)."""
    return sp.csr_matrix(np.ascontiguousarray(L.T), dtype=np.float32)


def _col_max(A: sp.csr_matrix) -> np.ndarray:
    """(N,) float32 maximum positive activation of each unit (0 for units that never fire)."""
    out = np.zeros(A.shape[1], dtype=np.float32)
    if A.nnz:
        np.maximum.at(out, A.indices, A.data.astype(np.float32, copy=False))
    return out


def _binarise(A: sp.csr_matrix, colmax: np.ndarray, t: float) -> tuple[sp.csr_matrix, np.ndarray]:
    """(P, N) float32 CSR of ones where the unit is "on" at relative threshold t, and (N,) on-counts."""
    data = A.data.astype(np.float32, copy=False)
    mask = data > 0
    if t > 0:
        mask &= data > np.float32(t) * colmax[A.indices]
    cum = np.concatenate([[0], np.cumsum(mask, dtype=np.int64)])
    indptr = cum[A.indptr]
    indices = A.indices[mask]
    B = sp.csr_matrix((np.ones(len(indices), dtype=np.float32), indices, indptr), shape=A.shape)
    return B, np.bincount(indices, minlength=A.shape[1])


def _chunks(Lt: sp.csr_matrix, row_nnz: np.ndarray, concepts: np.ndarray, budget: int = FLOPS_PER_CHUNK):
    """Split `concepts` into runs whose product Lt[run] @ B costs (and outputs) at most ~budget entries."""
    cost = Lt[concepts] @ row_nnz.astype(np.float64) if len(concepts) else np.zeros(0)
    run, acc = [], 0.0
    for c, w in zip(concepts, cost):
        if run and acc + w > budget:
            yield np.asarray(run)
            run, acc = [], 0.0
        run.append(int(c))
        acc += w
    if run:
        yield np.asarray(run)


def _cooccurrence_rows(Lt: sp.csr_matrix, B: sp.csr_matrix, concepts: np.ndarray):
    """Yield (concept, units, counts): for each concept, the units that are on at least once where it
    holds and how often (a sparse row of labels.T @ B), computed chunk by chunk."""
    row_nnz = np.diff(B.indptr)
    for run in _chunks(Lt, row_nnz, concepts):
        R = (Lt[run] @ B).tocsr()
        for r, c in enumerate(run):
            s, e = R.indptr[r], R.indptr[r + 1]
            yield int(c), R.indices[s:e], R.data[s:e].astype(np.float64)


def _hash01(ids: np.ndarray, seed: int) -> np.ndarray:
    """A uniform number in [0, 1) per id (splitmix64 of id and seed), the same on every machine."""
    x = np.asarray(ids).astype(np.uint64) + np.uint64((seed * 0x632BE59BD9B4E019 + 0x9E3779B97F4A7C15) % 2**64)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    x = x ^ (x >> np.uint64(31))
    return (x >> np.uint64(11)).astype(np.float64) / float(2**53)


def doc_split(doc_ids: np.ndarray, frac: float, seed: int = 0) -> tuple[np.ndarray, str]:
    """(P,) bool, True for the first part (about `frac` of the documents, chosen by a hash of the
    document id), and "documents"; with fewer than two documents, or when the hash puts every document
    on one side, the first `frac` of the positions instead, and "positions"."""
    doc_ids = np.asarray(doc_ids)
    P = len(doc_ids)
    if P and len(np.unique(doc_ids)) >= 2:
        first = _hash01(doc_ids, seed) < frac
        if first.any() and not first.all():
            return first, "documents"
    first = np.zeros(P, dtype=bool)
    first[: int(round(frac * P))] = True
    return first, "positions"


def _f(x):
    """JSON-able float (None stays None)."""
    return None if x is None else float(x)


def _mean(xs) -> float | None:
    xs = [x for x in xs if x is not None]
    return float(np.mean(xs)) if xs else None


def _listed(n: int, seed: int, cap: int = MAX_LISTED) -> np.ndarray:
    """Indices 0..n-1 to list in per-unit outputs: all, or a sorted seeded sample of `cap`."""
    if n <= cap:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=cap, replace=False))


# --- 1. firing statistics -------------------------------------------------------------------------
def firing_stats(acts: UnitActivations, min_firings: int = 20) -> dict:
    """How much of the layer is used.

    - `l0`: mean number of firing units (activation > 0) per position (≤ k for routed / TopK sets);
      `l0_nonzero`: the same counting every nonzero value (GELU neurons are nonzero almost everywhere).
    - `live_slot_fraction` = l0 / k: the share of the k routing slots that carry a firing unit
      (None when k is None, e.g. dense neurons). Below 1 means selected units often output exactly 0.
    - `dead_fraction` / `n_dead`: units that fire at none of the P positions (a unit can look dead on
      a short stream and be merely rare: compare with P · typical firing rates).
    - `n_live`, `share_live_frequent`: live units, and the share of them firing at least `min_firings`
      times (the units purity is computed on).
    - `cap_hit_fraction`: for a dense set captured with a per-position cap, the share of positions
      where more units fired than the cap kept (L0, coverage and dead fraction are censored there);
      None for exact captures.
    - `density_histogram`: `edges` (log10 firing rate, fixed 0.25-wide bins from -7 to 0), `counts` of
      live units per bin (rates below 1e-7 go in the first bin), and `never` = units that never fire.
    - `firing_rate_quantiles`: 10/50/90 % quantiles of live units' firing rates.
    """
    A = _csr(acts)
    P, N = A.shape
    nz = A.data > 0
    per_unit = np.bincount(A.indices[nz], minlength=N)
    total = int(nz.sum())
    nonzero = int(np.count_nonzero(A.data))
    live = per_unit > 0
    n_live = int(live.sum())
    rates = per_unit[live] / max(P, 1)
    counts, _ = np.histogram(np.clip(np.log10(rates), DENSITY_EDGES[0], DENSITY_EDGES[-1]), bins=DENSITY_EDGES)
    l0 = total / P if P else 0.0
    k = acts.k
    return {
        "n_positions": int(P), "n_units": int(N), "k": None if k is None else int(k),
        "l0": _f(l0), "l0_nonzero": _f(nonzero / P) if P else 0.0, "live_slot_fraction": _f(l0 / k) if k else None,
        "cap_hit_fraction": _f(acts.meta.get("cap_hit_fraction")),
        "dead_fraction": _f((N - n_live) / N) if N else None, "n_live": n_live, "n_dead": int(N - n_live),
        "min_firings": int(min_firings),
        "share_live_frequent": _f((per_unit >= min_firings).sum() / n_live) if n_live else None,
        "firing_rate_quantiles": {q: _f(np.quantile(rates, float(q))) if n_live else None
                                  for q in ("0.1", "0.5", "0.9")},
        "density_histogram": {"edges": [float(e) for e in DENSITY_EDGES], "counts": counts.tolist(),
                              "never": int(N - n_live)},
    }


# --- 2. coverage ------------------------------------------------------------------------------------
COVERAGE_M = 5  # units OR-ed per concept for coverage@m
CANDIDATES = 16  # per concept: the best (unit, threshold) pairs on the selection half coverage@m draws from


def _best_units(A: sp.csr_matrix, L: np.ndarray, thresholds, candidates: int = 0, n_c: np.ndarray | None = None,
                rows: np.ndarray | None = None):
    """Per concept, the single best (unit, threshold) detector on these rows: on ⇔ activation > t · (the
    unit's maximum on these rows), F1 maximised over units and t (ties to the lower t, then the lower
    unit). Returns best_f1 (C,), best (C, 4) = (unit, precision, recall, t) (NaN where nothing fires),
    colmax (N,), and, when `candidates` > 0, per concept a list of up to that many (f1, unit, t),
    best first, one entry per unit (its best t). `rows`: indices of A's rows to use (L holds only
    those rows), without copying A. `n_c`: positives per concept when the rows are only a part of the
    positions that cannot miss a firing (a dashboard passes one unit's firing positions)."""
    C = L.shape[1]
    n_c = L.sum(0).astype(np.int64) if n_c is None else np.asarray(n_c, dtype=np.int64)
    todo = np.flatnonzero(n_c > 0)
    Lt = _labels_t(L)
    colmax = _col_max(A) if rows is None else _col_max(A[rows])
    best_f1 = np.zeros(C)
    best = np.full((C, 4), np.nan)
    pool: list[dict] = [{} for _ in range(C)]  # concept -> {unit: (f1, t)}
    for t in thresholds:
        B, n_on = _binarise(A, colmax, float(t))
        if rows is not None:  # binarised first: the ones are lighter than A's values to slice
            B = B[rows]
            n_on = np.bincount(B.indices, minlength=B.shape[1])
        for c, units, tp in _cooccurrence_rows(Lt, B, todo):
            if len(units) == 0:
                continue
            f1 = 2 * tp / (n_on[units] + n_c[c])
            j = int(np.argmax(f1))
            if f1[j] > best_f1[c] + 1e-12:
                u = units[j]
                best_f1[c] = f1[j]
                best[c] = (u, tp[j] / n_on[u], tp[j] / n_c[c], t)
            if candidates:
                top = np.argsort(-f1, kind="stable")[:candidates]
                have = pool[c]
                for i in top:
                    u = int(units[i])
                    if u not in have or f1[i] > have[u][0] + 1e-12:
                        have[u] = (float(f1[i]), float(t))
                if len(have) > candidates:
                    pool[c] = dict(sorted(have.items(), key=lambda kv: (-kv[1][0], kv[0]))[:candidates])
        del B
    ranked = [sorted(((f, u, t) for u, (f, t) in pool[c].items()), key=lambda x: (-x[0], x[1])) for c in range(C)]
    return best_f1, best, colmax, ranked


def _f1_of(on: np.ndarray, y: np.ndarray) -> tuple[float, float, float]:
    """F1, precision, recall of the boolean prediction `on` against `y`."""
    tp, n_on, n_y = float(np.sum(on & y)), float(on.sum()), float(y.sum())
    f1 = 2 * tp / (n_on + n_y) if n_on + n_y else 0.0
    return f1, (tp / n_on if n_on else 0.0), (tp / n_y if n_y else 0.0)


def _greedy_or(cols: list[np.ndarray], y: np.ndarray, m: int) -> list[int]:
    """Greedy forward selection of up to m of the boolean columns whose OR has the best F1 against y,
    stopping when no column raises it; ties go to the earlier column (the better single detector)."""
    chosen: list[int] = []
    cur = np.zeros(len(y), dtype=bool)
    f_cur = 0.0
    for _ in range(m):
        best_j, best_f = None, f_cur + 1e-12
        for j, col in enumerate(cols):
            if j in chosen:
                continue
            f = _f1_of(cur | col, y)[0]
            if f > best_f:
                best_j, best_f = j, f
        if best_j is None:
            break
        chosen.append(best_j)
        cur |= cols[best_j]
        f_cur = best_f
    return chosen


def _by_frequency(values: np.ndarray, freq: np.ndarray, concepts: np.ndarray) -> list[dict]:
    out = []
    for lo, hi, name in FREQUENCY_BINS:
        sel = [c for c in concepts if lo <= freq[c] < hi]
        out.append({"bin": name, "lo": lo, "hi": min(hi, 1.0), "n_concepts": len(sel),
                    "mean_f1": _f(np.mean(values[sel])) if sel else None})
    return out


def coverage(acts: UnitActivations, labels: ConceptLabels, doc_ids: np.ndarray | None = None,
             thresholds=THRESHOLDS, m: int = COVERAGE_M, seed: int = 0, candidates: int = CANDIDATES) -> dict:
    """Coverage (Karvonen et al. 2024): for each concept, the best single unit as a detector, chosen on
    one half of the documents and scored on the other.

    A unit u at threshold t predicts the concept where activation > t · max(u's activation), t ∈
    `thresholds`. The documents are split in halves by a hash of the doc id (`doc_split`, seeded; halves
    of the positions when there is one document): on the *selection* half the (unit, t) with the best F1
    is chosen, t relative to u's maximum there; on the *held-out* half that same detector is scored.
    Choosing among N units and scoring on the same positions rewards wide sets and rare concepts (the
    best of 16k noisy detectors looks good by chance), so the held-out F1 is the headline.
    - `coverage`: mean held-out F1 over concepts with positives in both halves (a chosen unit that
      never fires on the held-out half scores 0). 1 = every concept has a dedicated unit.
    - `coverage_in_sample`: the old reading, unit and t chosen and scored on all positions, mean over
      concepts that hold at least once (t relative to the maximum over all positions).
    - `coverage_at_m` (m = 5 by default): per concept, the OR of up to m detectors, chosen greedily on the
      selection half among its `candidates` best single (unit, t) pairs (each unit at its best t), scored
      on the held-out half. A concept split over several narrow units (feature splitting) scores low on
      single-unit coverage whatever the set's quality; this score sees it. Its random-init floor is high
      on byte-level concepts (random sparse units that respond to single bytes OR into good character
      detectors), so only its excess over that floor is evidence.
    - `by_frequency`, `by_frequency_in_sample`, `by_frequency_at_m`: the means per concept-frequency
      bin. Coverage favours dense units: a unit firing at 0.1 % of positions cannot reach F1 > 0.02 on a
      concept holding at 10 %; compare unit sets bin by bin, and against the random-init floor.
    - `per_concept`: rows {concept, frequency, n_positives, best_unit, threshold, f1 (held-out),
      precision, recall (held-out), f1_selection, best_unit_in_sample, threshold_in_sample,
      f1_in_sample, precision_in_sample, recall_in_sample, units_at_m, f1_at_m}; best_unit None and f1 0 when no unit fires on the concept
      in the selection half. A concept without positives in one half has f1 None (in-sample only).
    - `split` ("documents" / "positions"), `n_selection`, `n_heldout`, `n_concepts` (held-out),
      `n_concepts_in_sample`, `n_concepts_no_positives` / `concepts_no_positives`.
    """
    A = _csr(acts)
    L = _check_labels(A, labels)
    P, N = A.shape
    C = L.shape[1]
    doc_ids = np.zeros(P, dtype=np.int64) if doc_ids is None else np.asarray(doc_ids)
    if len(doc_ids) != P:
        raise ValueError(f"doc_ids cover {len(doc_ids)} positions, activations {P}")
    n_c = L.sum(0).astype(np.int64)
    freq = n_c / max(P, 1)
    # in-sample: the unit and threshold chosen and scored on every position
    ins_f1, ins_best, _, _ = _best_units(A, L, thresholds)
    # held-out: chosen on the selection half, scored on the other
    sel, split = doc_split(doc_ids, 0.5, seed)
    si, hi = np.flatnonzero(sel), np.flatnonzero(~sel)
    L_s, L_h = L[si], L[hi]
    sel_f1, sel_best, colmax_s, ranked = _best_units(A, L_s, thresholds, candidates if m > 1 else 0, rows=si)
    scored = np.flatnonzero((L_s.sum(0) > 0) & (L_h.sum(0) > 0))
    # every detector any concept needs, as boolean on-sets on both halves (one column slice each)
    pairs = {}
    for c in scored:
        if not np.isnan(sel_best[c, 0]):
            pairs[(int(sel_best[c, 0]), float(sel_best[c, 3]))] = None
        for _, u, t in ranked[c] if m > 1 else []:
            pairs[(u, t)] = None
    uniq = np.unique(np.asarray([u for u, _ in pairs], dtype=np.int64))
    cols = A[:, uniq].tocsc() if len(uniq) else None  # (P, units any detector needs): one column slice
    col_of = {int(u): j for j, u in enumerate(uniq)}
    rank = np.where(sel, np.cumsum(sel) - 1, np.cumsum(~sel) - 1)  # each position's index inside its half

    def detector(u: int, t: float) -> tuple[np.ndarray, np.ndarray]:
        """(on the selection half, on the held-out half) of unit u at relative threshold t."""
        j = col_of[u]
        pos, val = cols.indices[cols.indptr[j]:cols.indptr[j + 1]], cols.data[cols.indptr[j]:cols.indptr[j + 1]]
        on = pos[val.astype(np.float32, copy=False) > max(np.float32(t) * colmax_s[u], np.float32(0))]
        v_s, v_h = np.zeros(len(si), dtype=bool), np.zeros(len(hi), dtype=bool)
        v_s[rank[on[sel[on]]]] = True
        v_h[rank[on[~sel[on]]]] = True
        return v_s, v_h

    held = np.full(C, np.nan)
    at_m = np.full(C, np.nan)
    rows_out: dict[int, dict] = {}
    for c in scored:
        row = {"f1": 0.0, "precision": None, "recall": None, "f1_at_m": 0.0, "units_at_m": []}
        if not np.isnan(sel_best[c, 0]):
            f1, prec, rec = _f1_of(detector(int(sel_best[c, 0]), float(sel_best[c, 3]))[1], L_h[:, c])
            row.update(f1=f1, precision=prec, recall=rec)
            if m > 1:
                cand = [detector(u, t) for _, u, t in ranked[c]]
                chosen = _greedy_or([v_s for v_s, _ in cand], L_s[:, c], m)
                union = np.zeros(len(hi), dtype=bool)
                for i in chosen:
                    union |= cand[i][1]
                row.update(f1_at_m=_f1_of(union, L_h[:, c])[0], units_at_m=[int(ranked[c][i][1]) for i in chosen])
            else:
                row.update(f1_at_m=f1, units_at_m=[int(sel_best[c, 0])])
        held[c], at_m[c] = row["f1"], row["f1_at_m"]
        rows_out[int(c)] = row
    todo = np.flatnonzero(n_c > 0)
    rows = []
    for c in todo:
        found, found_in = not np.isnan(sel_best[c, 0]), ins_f1[c] > 0
        r = rows_out.get(int(c), {"f1": None, "precision": None, "recall": None, "f1_at_m": None, "units_at_m": []})
        rows.append({"concept": labels.names[c], "frequency": _f(freq[c]), "n_positives": int(n_c[c]),
                     "best_unit": int(sel_best[c, 0]) if found else None,
                     "threshold": float(sel_best[c, 3]) if found else None,
                     "f1": _f(r["f1"]), "precision": _f(r["precision"]), "recall": _f(r["recall"]),
                     "f1_selection": _f(sel_f1[c]),
                     "best_unit_in_sample": int(ins_best[c, 0]) if found_in else None,
                     "threshold_in_sample": float(ins_best[c, 3]) if found_in else None,
                     "f1_in_sample": _f(ins_f1[c]), "precision_in_sample": _f(ins_best[c, 1]) if found_in else None,
                     "recall_in_sample": _f(ins_best[c, 2]) if found_in else None, "units_at_m": r["units_at_m"], "f1_at_m": _f(r["f1_at_m"])})
    skipped = [labels.names[c] for c in np.flatnonzero(n_c == 0)]
    return {"coverage": _f(np.mean(held[scored])) if len(scored) else None,
            "coverage_in_sample": _f(np.mean(ins_f1[todo])) if len(todo) else None,
            "coverage_at_m": _f(np.mean(at_m[scored])) if len(scored) else None, "m": int(m),
            "n_concepts": int(len(scored)), "n_concepts_in_sample": int(len(todo)),
            "n_concepts_no_positives": len(skipped), "concepts_no_positives": skipped,
            "split": split, "n_selection": int(len(si)), "n_heldout": int(len(hi)),
            "thresholds": [float(t) for t in thresholds],
            "by_frequency": _by_frequency(held, freq, scored),
            "by_frequency_in_sample": _by_frequency(ins_f1, freq, todo),
            "by_frequency_at_m": _by_frequency(at_m, freq, scored), "per_concept": rows}


# --- 3. purity ----------------------------------------------------------------------------------------
def _best_concept(Lt: sp.csr_matrix, B: sp.csr_matrix, concepts: np.ndarray, N: int, n_on: np.ndarray | None = None,
                  n_c: np.ndarray | None = None):
    """(N,) max over concepts of co-firing counts and (N,) the argmax concept (-1 when none): purity's
    best concept. With `n_on` (N,) firings per unit and `n_c` (C,) positives per concept, also (N,) the
    best "fires ⇔ concept" F1 and (N,) its concept (-1 when none), from the same pass; else None, None."""
    best_tp = np.zeros(N)
    best_c = np.full(N, -1, dtype=np.int64)
    with_f1 = n_on is not None and n_c is not None
    best_f1 = np.zeros(N) if with_f1 else None
    f1_c = np.full(N, -1, dtype=np.int64) if with_f1 else None
    for c, units, tp in _cooccurrence_rows(Lt, B, concepts):
        better = tp > best_tp[units]
        best_tp[units[better]] = tp[better]
        best_c[units[better]] = c
        if with_f1:
            f1 = 2 * tp / (n_on[units] + n_c[c])
            better = f1 > best_f1[units] + 1e-12
            best_f1[units[better]] = f1[better]
            f1_c[units[better]] = c
    return best_tp, best_c, best_f1, f1_c


def purity(acts: UnitActivations, labels: ConceptLabels, min_firings: int = 20, seed: int = 0, n_null: int = 3,
           pure_at: float = 0.9) -> dict:
    """Purity: for each unit firing (activation > 0) at least `min_firings` times, the precision of its
    best concept, max_c P(concept c | unit fires), against a firing-rate-matched null.

    The null keeps every unit's number of firings and moves its firing positions to random positions
    (one random permutation of the P positions applied to all units, so concept co-occurrence is kept),
    `n_null` times. A rarely firing unit reaches high precision on a frequent concept by chance; the
    null measures exactly that chance for these units.
    - `mean_purity`, `share_pure` (share of scored units with purity ≥ `pure_at`);
    - `mean_purity_null`, `share_pure_null`: the same under the null (averaged over the permutations);
    - `excess_purity` = mean_purity − mean_purity_null, `excess_share_pure` likewise: what is real;
    - `mean_lift` / `mean_lift_null`: purity over the base rate of the best concept;
    - `share_significant`: share of scored units whose best-concept count has hypergeometric z > 5;
    - per-unit lists (`per_unit_unit`, `per_unit_n_firings`, `per_unit_purity`, `per_unit_purity_null`
      (first permutation), `per_unit_best_concept` (name), `per_unit_lift`, `per_unit_z`), for a seeded
      sample of at most 20000 scored units.
    """
    A = _csr(acts)
    L = _check_labels(A, labels)
    P, N = A.shape
    n_c = L.sum(0).astype(np.float64)
    concepts = np.flatnonzero(n_c > 0)
    Lt = _labels_t(L)
    B, n_on = _binarise(A, _col_max(A), 0.0)
    units = np.flatnonzero(n_on >= min_firings)
    out = {"min_firings": int(min_firings), "pure_at": pure_at, "n_null": int(n_null),
           "n_units_scored": int(len(units))}
    if len(units) == 0 or len(concepts) == 0:
        return dict(out, mean_purity=None, mean_purity_null=None, excess_purity=None, share_pure=None,
                    share_pure_null=None, excess_share_pure=None, mean_lift=None, mean_lift_null=None,
                    share_significant=None, per_unit_unit=[], per_unit_n_firings=[], per_unit_purity=[],
                    per_unit_purity_null=[], per_unit_best_concept=[], per_unit_lift=[], per_unit_z=[])
    n = n_on[units].astype(np.float64)
    tp, bc, _, _ = _best_concept(Lt, B, concepts, N)
    pur = tp[units] / n
    bc = bc[units]
    base = np.where(bc >= 0, n_c[np.maximum(bc, 0)] / P, np.nan)
    lift = pur / base
    var = n * base * (1 - base) * (P - n) / max(P - 1, 1)
    z = np.where(var > 0, (tp[units] - n * base) / np.sqrt(np.where(var > 0, var, 1)), 0.0)
    rng = np.random.default_rng(seed)
    null_means, null_shares, null_lifts, first_null = [], [], [], None
    for _ in range(max(n_null, 0)):
        Bp = B[rng.permutation(P)]
        tpn, bcn, _, _ = _best_concept(Lt, Bp, concepts, N)
        pn = tpn[units] / n
        null_means.append(pn.mean())
        null_shares.append((pn >= pure_at).mean())
        bn = bcn[units]
        null_lifts.append(np.nanmean(np.where(bn >= 0, pn / (n_c[np.maximum(bn, 0)] / P), np.nan)))
        if first_null is None:
            first_null = pn
        del Bp
    mean_null = float(np.mean(null_means)) if null_means else None
    share_null = float(np.mean(null_shares)) if null_shares else None
    show = _listed(len(units), seed)
    r4 = lambda a: [round(float(x), 4) if np.isfinite(x) else None for x in a]  # noqa: E731
    return dict(
        out, mean_purity=_f(pur.mean()), mean_purity_null=_f(mean_null),
        excess_purity=_f(pur.mean() - mean_null) if mean_null is not None else None,
        share_pure=_f((pur >= pure_at).mean()), share_pure_null=_f(share_null),
        excess_share_pure=_f((pur >= pure_at).mean() - share_null) if share_null is not None else None,
        mean_lift=_f(np.nanmean(lift)) if np.isfinite(lift).any() else None,
        mean_lift_null=_f(np.mean(null_lifts)) if null_lifts else None,
        share_significant=_f((z > 5).mean()),
        per_unit_unit=units[show].tolist(), per_unit_n_firings=n_on[units][show].tolist(),
        per_unit_purity=r4(pur[show]), per_unit_purity_null=r4(first_null[show]) if first_null is not None else [],
        per_unit_best_concept=[labels.names[c] if c >= 0 else None for c in bc[show]],
        per_unit_lift=r4(lift[show]), per_unit_z=r4(z[show]),
    )


# --- 4. k-sparse probing --------------------------------------------------------------------------------
def _top_units(score: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest scores, best first, ties to the lower index (deterministic)."""
    k = min(k, len(score))
    if k <= 0:
        return np.zeros(0, dtype=np.int64)
    part = np.argpartition(-score, k - 1)[:k]
    v = score[part].min()
    above = np.flatnonzero(score > v)
    equal = np.flatnonzero(score == v)[: k - len(above)]
    idx = np.concatenate([above, equal])
    return idx[np.lexsort((idx, -score[idx]))]


def _binary_scores(y: np.ndarray, pred: np.ndarray) -> dict:
    tp = float(np.sum(pred & y))
    fp = float(np.sum(pred & ~y))
    fn = float(np.sum(~pred & y))
    tn = float(len(y) - tp - fp - fn)
    tpr = tp / max(tp + fn, 1)
    tnr = tn / max(tn + fp, 1)
    return {"f1": _f(2 * tp / max(2 * tp + fp + fn, 1)), "accuracy": _f((tp + tn) / max(len(y), 1)),
            "balanced_accuracy": _f((tpr + tnr) / 2), "precision": _f(tp / max(tp + fp, 1)), "recall": _f(tpr)}


def sparse_probe(acts: UnitActivations, labels: ConceptLabels, doc_ids: np.ndarray, ks=(1, 5), seed: int = 0,
                 max_train: int = 50_000, min_positives: int = 10, train_frac: float = 0.7) -> dict:
    """k-sparse probing (SAEBench style): can k units, chosen per concept, linearly detect it on held-out
    documents?

    Positions are split by document (hash of the doc id, ~`train_frac` train); with one document, the
    first `train_frac` of the positions train. Concepts need ≥ `min_positives` positives and negatives
    in both splits. Per concept: units are ranked by |mean activation on positives − on negatives| over
    the train split (computed with one sparse product, zeros included); for each k in `ks` a
    LogisticRegression (class_weight="balanced", features scaled by their train std) is fit on the top-k
    columns of a train subsample (all positives up to `max_train`/2, negatives filling the rest: with
    balanced class weights the fit does not depend on the class ratio) and scored on every test position.
    - `sparse_probe_f1` / `sparse_probe_f1_top1`: mean test F1 (positive class) over scored concepts at
      k = 5 (the largest k when 5 is not in ks) and k = 1. F1 is the strictest of the three: chance F1 is
      about 2·frequency, chance balanced accuracy 0.5.
    - `by_k`: {k: {mean_f1, mean_accuracy, mean_balanced_accuracy, n_concepts}};
    - `per_concept`: rows {concept, frequency, n_train_positives, n_test_positives, k1: {units, f1,
      accuracy, balanced_accuracy, precision, recall}, k5: {...}};
    - `split` ("documents" / "positions"), `n_train`, `n_test`, `n_concepts_skipped`.
    """
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    import warnings

    A = _csr(acts)
    L = _check_labels(A, labels)
    P, N = A.shape
    ks = sorted({int(k) for k in ks if int(k) > 0})
    kmax = max(ks) if ks else 0
    train, split = doc_split(np.asarray(doc_ids), train_frac, seed)
    tr_idx, te_idx = np.flatnonzero(train), np.flatnonzero(~train)
    L_tr, L_te = L[tr_idx], L[te_idx]
    pos_tr, pos_te = L_tr.sum(0), L_te.sum(0)
    ok = ((pos_tr >= min_positives) & (pos_te >= min_positives) & (len(tr_idx) - pos_tr >= min_positives)
          & (len(te_idx) - pos_te >= min_positives))
    concepts = np.flatnonzero(ok)
    # train-row sums without copying A's rows: (C, P) labels that are zero off the train split, times A
    # (float32 products; they only rank units)
    L_train_only = np.zeros_like(L)
    L_train_only[tr_idx] = L_tr
    Lt_tr = _labels_t(L_train_only)
    del L_train_only
    sum_all = np.asarray(A.T @ train.astype(np.float32)).ravel().astype(np.float64)  # (N,) train-row sums
    tops = {}
    for c, units, sums in _cooccurrence_rows(Lt_tr, A, concepts):
        n_pos, n_neg = float(pos_tr[c]), float(len(tr_idx) - pos_tr[c])
        pos_sum = np.zeros(N)
        pos_sum[units] = sums
        score = np.abs(pos_sum / n_pos - (sum_all - pos_sum) / n_neg)
        tops[c] = _top_units(score, kmax)
    needed = np.unique(np.concatenate(list(tops.values()))) if tops else np.zeros(0, dtype=np.int64)
    cols = A[:, needed].tocsc()  # (P, the probed units): never (P, N)
    where = {int(u): j for j, u in enumerate(needed)}
    rows = []
    rng_master = np.random.default_rng(seed)
    seeds = rng_master.integers(0, 2**31, size=L.shape[1])
    for c in concepts:
        top = tops[c]
        X = cols[:, [where[int(u)] for u in top]].toarray().astype(np.float64)  # (P, kmax), signed values
        rng = np.random.default_rng(int(seeds[c]))
        y_tr = L_tr[:, c]
        pos_i, neg_i = np.flatnonzero(y_tr), np.flatnonzero(~y_tr)
        n_p = min(len(pos_i), max_train // 2)
        n_n = min(len(neg_i), max_train - n_p)
        sub = np.sort(np.concatenate([rng.choice(pos_i, n_p, replace=False), rng.choice(neg_i, n_n, replace=False)]))
        Xtr, ytr = X[tr_idx[sub]], y_tr[sub]
        Xte, yte = X[te_idx], L_te[:, c]
        row = {"concept": labels.names[c], "frequency": _f(L[:, c].mean()), "n_train_positives": int(pos_tr[c]),
               "n_test_positives": int(pos_te[c])}
        for k in ks:
            std = Xtr[:, :k].std(0)
            std[std == 0] = 1.0
            clf = LogisticRegression(class_weight="balanced", max_iter=300)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ConvergenceWarning)
                clf.fit(Xtr[:, :k] / std, ytr)
            pred = clf.predict(Xte[:, :k] / std).astype(bool)
            row[f"k{k}"] = dict(units=[int(u) for u in top[:k]], **_binary_scores(yte, pred))
        rows.append(row)
    by_k = {}
    for k in ks:
        got = [r[f"k{k}"] for r in rows]
        by_k[str(k)] = {"mean_f1": _f(_mean([g["f1"] for g in got])),
                        "mean_accuracy": _f(_mean([g["accuracy"] for g in got])),
                        "mean_balanced_accuracy": _f(_mean([g["balanced_accuracy"] for g in got])),
                        "n_concepts": len(got)}
    main = 5 if 5 in ks else (kmax if ks else None)
    return {"sparse_probe_f1": by_k[str(main)]["mean_f1"] if main else None,
            "sparse_probe_f1_top1": by_k["1"]["mean_f1"] if 1 in ks else None,
            "main_k": main, "ks": ks, "by_k": by_k, "split": split, "n_train": int(len(tr_idx)),
            "n_test": int(len(te_idx)), "max_train": int(max_train), "min_positives": int(min_positives),
            "n_concepts": len(rows), "n_concepts_skipped": int(L.shape[1] - len(rows)), "per_concept": rows}


# --- 5. n-gram explanations -------------------------------------------------------------------------------
def ngram_keys(token_ids: np.ndarray, doc_ids: np.ndarray, max_ngram: int = 3) -> np.ndarray:
    """(max_ngram, P) int64: row n-1 holds a key of the n-gram of tokens ending at each position, or -1
    where that n-gram would reach before the start of the position's document. Keys are exact
    ((n, ids) packed in 62 bits) when every token id < 2^20 and max_ngram ≤ 3, otherwise a 62-bit hash."""
    tok = np.asarray(token_ids).astype(np.int64)
    doc = np.asarray(doc_ids)
    P = len(tok)
    keys = np.full((max_ngram, P), -1, dtype=np.int64)
    same = np.zeros(P, dtype=bool)  # position p continues the document of p-1
    same[1:] = doc[1:] == doc[:-1]
    exact = max_ngram <= 3 and (P == 0 or (tok.min() >= 0 and tok.max() < 2**20))
    valid = np.ones(P, dtype=bool)  # the n-gram ending at p stays inside p's document
    acc = np.zeros(P, dtype=np.uint64)
    for n in range(1, max_ngram + 1):
        first = tok if n == 1 else np.zeros(P, dtype=np.int64)  # token at p - n + 1, the n-gram's first
        if n > 1:
            valid[: n - 1] = False
            if P >= n:
                valid[n - 1:] &= same[1: P - n + 2]  # p - n + 2 continues the document of p - n + 1
                first[n - 1:] = tok[: P - n + 1]
        if exact:
            acc = acc | (first.astype(np.uint64) << np.uint64(20 * (n - 1)))
            k = acc | (np.uint64(n) << np.uint64(60))
        else:
            acc = _mix(acc ^ (first.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15 * n % 2**64)))
            k = acc >> np.uint64(2)
        keys[n - 1] = np.where(valid, k.astype(np.int64), -1)
    return keys


def _mix(x: np.ndarray) -> np.ndarray:
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _count(sorted_keys: np.ndarray, keys: np.ndarray) -> np.ndarray:
    return np.searchsorted(sorted_keys, keys, side="right") - np.searchsorted(sorted_keys, keys, side="left")


def _union(chosen: list[int], grams: list[tuple], n_occ: np.ndarray, n_tp: np.ndarray) -> tuple[float, float]:
    """Size and true positives of the union of the chosen n-grams' occurrence sets. Two n-grams ending at
    the same position are suffixes of one another, so occurrence sets are either nested (a suffix's set
    contains the longer gram's) or disjoint: the union is the disjoint sum over chosen grams that have
    no chosen proper suffix."""
    n = tp = 0.0
    for i in chosen:
        g = grams[i]
        if any(len(grams[j]) < len(g) and g[len(g) - len(grams[j]):] == grams[j] for j in chosen):
            continue
        n += n_occ[i]
        tp += n_tp[i]
    return n, tp


def explanation_scores(acts: UnitActivations, token_ids: np.ndarray, doc_ids: np.ndarray, n_units: int = 500,
                       seed: int = 0, max_ngram: int = 3, top: int = 50, fire_threshold: float = 0.2,
                       max_terms: int = 5, min_cover: int = 2, units=None, min_firings: int = 20) -> dict:
    """LLM-free explanations: explain each unit by a few token n-grams on documents A, score on documents B.

    Documents are split in halves A / B by a hash of the doc id (positions halves with one document).
    A unit is "on" where activation > `fire_threshold` × (its max activation on A), on A and on B alike.
    Explanation (on A): candidates are the n-grams (n = 1..max_ngram, the tokens ending at the position,
    inside its document) at the unit's `top` strongest "on" positions that end at ≥ `min_cover` of them
    (≥ 1 when the unit has a single top example). Greedy forward selection adds, up to `max_terms`
    times, the candidate that most increases the explanation's F1 as a detector on A (predicted: some
    chosen n-gram ends at the position), stopping when F1 no longer rises; ties go to shorter n-grams.
    Choosing by F1 on A rather than by top-example coverage alone makes "3 7" beat "7" when the unit
    ignores 7s after other tokens. Score (on B): precision, recall and F1 of the same detector against
    the "on" positions of B.
    - `explanation_f1` (also `mean_f1`, `mean_precision`, `mean_recall`): means over scored units;
    - `per_unit`: one row per examined unit {unit, explanation (list of token-id lists), n_top, f1_train,
      precision, recall, f1, n_on_test, n_predicted_test[, note]}. Every examined unit is scored: a unit
      that does not fire on A gets the empty explanation, and one that does not fire above threshold on B
      scores 0 (its explanation can hit nothing), so a set is not flattered by dropping its hard units;
    - `n_scored` (= `n_examined`), `n_skipped_no_firing_a`, `n_skipped_no_firing_b`: how many of the
      scored units had no firing on A / none above threshold on B (they count as 0),
      `n_live`, `n_examined` (a seeded sample of `n_units` live units firing at least `min_firings`
      times, purity's minimum, unless `units` is given), `split`;
    - `min_firings`, `n_frequent` (live units firing at least that often) and `share_live_below_min`:
      a unit that fires 1-3 times cannot be explained or scored, so it is not sampled (a 16k-wide set
      would otherwise be pulled down by its rare units against 512 dense neurons); the share says how
      much of the live set that leaves out.
    """
    A = _csr(acts)
    P, N = A.shape
    token_ids = np.asarray(token_ids)
    if len(token_ids) != P or len(doc_ids) != P:
        raise ValueError(f"token_ids / doc_ids cover {len(token_ids)} / {len(doc_ids)} positions, activations {P}")
    in_a, split = doc_split(np.asarray(doc_ids), 0.5, seed)
    keys = ngram_keys(token_ids, doc_ids, max_ngram)
    sorted_keys = {}
    for name, side in (("a", in_a), ("b", ~in_a)):
        k = keys[:, side].ravel()
        sorted_keys[name] = np.sort(k[k >= 0])
    colmax = _col_max(A)
    live = np.flatnonzero(colmax > 0)
    n_on = np.bincount(A.indices[A.data > 0], minlength=N)
    frequent = live[n_on[live] >= min_firings]
    if units is not None:
        chosen_units = np.asarray(list(units), dtype=np.int64)
    elif len(frequent) > n_units:
        chosen_units = np.sort(np.random.default_rng(seed).choice(frequent, size=n_units, replace=False))
    else:
        chosen_units = frequent
    thr_rel = np.float32(fire_threshold)
    Acsc = A[:, chosen_units].tocsc()  # only the examined units' columns
    per_unit, skipped_a, skipped_b = [], 0, 0
    for j, u in enumerate(chosen_units):
        u = int(u)
        s, e = Acsc.indptr[j], Acsc.indptr[j + 1]
        pos, val = Acsc.indices[s:e], Acsc.data[s:e].astype(np.float32, copy=False)
        keep = val > 0
        pos, val = pos[keep], val[keep]
        side = in_a[pos]
        if not side.any():  # nothing to explain from: the empty explanation, which scores 0 on B
            skipped_a += 1
            per_unit.append({"unit": u, "explanation": [], "n_top": 0, "f1_train": 0.0, "precision": 0.0,
                             "recall": 0.0, "f1": 0.0, "n_on_test": int((val > 0).sum()), "n_predicted_test": 0,
                             "note": "no firing on A"})
            continue
        thr = thr_rel * val[side].max()
        on = val > thr
        on_a, on_b = pos[on & side], pos[on & ~side]
        va = val[on & side]
        top_pos = on_a[np.lexsort((on_a, -va))[:top]]
        tk = keys[:, top_pos]  # (max_ngram, n_top)
        flat = tk.ravel()
        good = flat >= 0
        cand, first, cover = np.unique(flat[good], return_index=True, return_counts=True)
        where = np.flatnonzero(good)[first]
        need = min(min_cover, len(top_pos))
        sel = cover >= need
        cand, where, cover = cand[sel], where[sel], cover[sel]
        grams = []
        for w in where:
            row, j = divmod(int(w), len(top_pos))  # row = n - 1
            p = int(top_pos[j])
            grams.append(tuple(int(t) for t in token_ids[p - row: p + 1]))
        on_keys_a = keys[:, on_a].ravel()
        on_keys_a = np.sort(on_keys_a[on_keys_a >= 0])
        n_occ_a = _count(sorted_keys["a"], cand).astype(np.float64)
        n_tp_a = _count(on_keys_a, cand).astype(np.float64)
        n_on_a = float(len(on_a))
        chosen: list[int] = []
        f1_a = 0.0
        for _ in range(max_terms):
            best = None
            for i in range(len(cand)):
                if i in chosen:
                    continue
                n_pred, tp = _union(chosen + [i], grams, n_occ_a, n_tp_a)
                f1 = 2 * tp / (n_pred + n_on_a)
                rank = (f1, -len(grams[i]), int(cover[i]), -int(cand[i]))
                if best is None or rank > best[0]:
                    best = (rank, i)
            if best is None or best[0][0] <= f1_a + 1e-12:
                break
            chosen.append(best[1])
            f1_a = best[0][0]
        on_keys_b = keys[:, on_b].ravel()
        on_keys_b = np.sort(on_keys_b[on_keys_b >= 0])
        ch = np.asarray(chosen, dtype=np.int64)
        n_occ_b = np.zeros(len(cand))
        n_tp_b = np.zeros(len(cand))
        if len(ch):
            n_occ_b[ch] = _count(sorted_keys["b"], cand[ch])
            n_tp_b[ch] = _count(on_keys_b, cand[ch])
        n_pred_b, tp_b = _union(chosen, grams, n_occ_b, n_tp_b)
        prec = tp_b / n_pred_b if n_pred_b else 0.0
        rec = tp_b / len(on_b) if len(on_b) else 0.0
        row = {"unit": u, "explanation": [list(grams[i]) for i in chosen], "n_top": int(len(top_pos)),
               "f1_train": _f(f1_a), "precision": _f(prec), "recall": _f(rec),
               "f1": _f(2 * tp_b / (n_pred_b + len(on_b)) if n_pred_b + len(on_b) else 0.0),
               "n_on_test": int(len(on_b)), "n_predicted_test": int(n_pred_b)}
        if len(on_b) == 0:  # the unit does not fire on B above threshold: nothing its explanation can hit
            skipped_b += 1
            row["note"] = "no firing above threshold on B"
        per_unit.append(row)
    scored = per_unit
    mf1 = _mean([r["f1"] for r in scored])
    return {"explanation_f1": _f(mf1), "mean_f1": _f(mf1),
            "mean_precision": _f(_mean([r["precision"] for r in scored])),
            "mean_recall": _f(_mean([r["recall"] for r in scored])), "n_scored": len(scored),
            "n_skipped_no_firing_a": skipped_a, "n_skipped_no_firing_b": skipped_b, "n_live": int(len(live)),
            "n_examined": int(len(chosen_units)), "min_firings": int(min_firings), "n_frequent": int(len(frequent)),
            "share_live_below_min": _f(1 - len(frequent) / len(live)) if len(live) else None,
            "split": split, "fire_threshold": fire_threshold, "top": top,
            "max_ngram": max_ngram, "max_terms": max_terms, "per_unit": per_unit}


# --- 6. everything ----------------------------------------------------------------------------------------
def all_metrics(acts: UnitActivations, labels: ConceptLabels, positions: Positions, seed: int = 0) -> dict:
    """All metrics with their defaults: the headline numbers at the top level (`l0`, `live_slot_fraction`,
    `dead_fraction`, `cap_hit_fraction`, `coverage` (held-out), `coverage_in_sample`, `coverage_at_m`, `mean_purity`, `mean_purity_null`, `share_pure`, `share_pure_null`,
    `sparse_probe_f1`, `sparse_probe_f1_top1`, `explanation_f1`; see the module docstring for how to read
    them) and the full dicts under `details` (`firing`, `coverage`, `purity`, `sparse_probe`,
    `explanation`)."""
    fs = firing_stats(acts)
    probe = sparse_probe(acts, labels, positions.doc_ids, seed=seed)  # the only reader of signed values
    fired = positive_part(acts)
    cov = coverage(fired, labels, positions.doc_ids, seed=seed)
    pur = purity(fired, labels, seed=seed)
    expl = explanation_scores(fired, positions.token_ids, positions.doc_ids, seed=seed)
    del fired
    return {
        "l0": fs["l0"], "live_slot_fraction": fs["live_slot_fraction"], "dead_fraction": fs["dead_fraction"],
        "coverage": cov["coverage"], "coverage_in_sample": cov["coverage_in_sample"],
        "coverage_at_m": cov["coverage_at_m"], "cap_hit_fraction": fs["cap_hit_fraction"],
        "mean_purity": pur["mean_purity"], "mean_purity_null": pur["mean_purity_null"],
        "share_pure": pur["share_pure"], "share_pure_null": pur["share_pure_null"],
        "sparse_probe_f1": probe["sparse_probe_f1"], "sparse_probe_f1_top1": probe["sparse_probe_f1_top1"],
        "explanation_f1": expl["explanation_f1"],
        # live units firing fewer times than explanations need (not sampled): read beside explanation_f1
        "explanation_share_live_below_min": expl["share_live_below_min"],
        "details": {"firing": fs, "coverage": cov, "purity": pur, "sparse_probe": probe, "explanation": expl},
    }
