"""Read access to what `monoroute analyze RUN` wrote: the store the unit browser and exports read.

    RUN/analysis/
        report.json                     headline numbers, per-concept coverage, per-layer firing stats
        labels.safetensors              concept labels (P, C), bit-packed; names in report.json
        units/<set>.parquet             one row per unit (see unit_table.py)
        capture/, capture-baselines/    sparse activations (see capture.py)
        sae/, transcoder/               post-hoc baselines (see baselines.py)

`AnalysisStore(run)` checks all of it up front (one clear error line when something is missing,
from an older analysis, or corrupt) and loads the heavy parts lazily, once: the activation
matrices as CSC (one unit's column is then a slice, which is what makes a unit page fast), the
model and the baselines.
"""
from __future__ import annotations

import json
import threading
from functools import cached_property
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from monoroute.errors import MonorouteError
from monoroute.fileio import json_safe
from monoroute.interp.types import ConceptLabels, Positions, is_floor

LABELS_FILE = "labels.safetensors"
UNITS_DIR = "units"
MIN_STORE_FORMAT = 2
BASELINE_SETS = ("sae", "transcoder")


def per_concept_rows(unit_set: dict) -> list[dict]:
    """A unit set's coverage rows from report.json ({concept, best_unit, f1, ...}); [] when absent."""
    return unit_set.get("details", {}).get("coverage", {}).get("per_concept", [])


def save_labels(labels: ConceptLabels, path: str | Path) -> None:
    from monoroute.fileio import save_safetensors_atomic

    packed = np.packbits(np.asarray(labels.matrix, dtype=bool), axis=1)  # (P, ceil(C / 8)) uint8
    save_safetensors_atomic(Path(path), {"packed": packed,
                                         "shape": np.asarray(labels.matrix.shape, dtype=np.int64)})


def load_labels(path: str | Path, names: list[str]) -> ConceptLabels:
    from safetensors.numpy import load_file

    t = load_file(str(path))
    P, C = (int(x) for x in t["shape"])
    if C != len(names):
        raise ValueError(f"{path} has {C} concepts, report.json names {len(names)}")
    return ConceptLabels(list(names), np.unpackbits(t["packed"], axis=1, count=C).astype(bool).reshape(P, C))


class AnalysisStore:
    """One analysed run. `set_names`: the headline layer's unit sets (the model's own units first,
    then post-hoc baselines), each with a unit table, activations and dashboards."""

    def __init__(self, run_dir: str | Path, device: str = "cpu") -> None:
        self.run = Path(run_dir)
        self.device = device
        self.folder = self.run / "analysis"
        again = f"run `monoroute analyze {self.run}` again"
        if not self.run.is_dir():
            raise MonorouteError(f"run directory {self.run} does not exist; pass a folder written by `monoroute train`")
        path = self.folder / "report.json"
        if not path.is_file():
            raise MonorouteError(f"{self.run} has no analysis ({path} missing); run `monoroute analyze {self.run}` "
                                 f"first (or pass --analyze)")
        try:
            self.report = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise MonorouteError(f"{path} is corrupt ({type(exc).__name__}); {again}") from None
        if not isinstance(self.report, dict) or self.report.get("store_format", 1) < MIN_STORE_FORMAT:
            raise MonorouteError(f"{self.folder} was written by an older `monoroute analyze` without unit tables; "
                                 f"{again}")
        try:
            self.layer = int(self.report["layer"])
            sets = [s for s in self.report["unit_sets"] if not is_floor(s)]
            self.concept_names = list(self.report["concepts"]["names"])
        except (KeyError, TypeError, ValueError) as exc:
            raise MonorouteError(f"{path} lacks {exc}; {again}") from None
        own = [s for s in sets if s not in BASELINE_SETS]
        self.set_names = own + [s for s in sets if s in BASELINE_SETS]
        self.own_set = own[0] if own else None
        for name in self.set_names:
            if not (self.folder / UNITS_DIR / f"{name}.parquet").is_file():
                raise MonorouteError(f"{self.folder / UNITS_DIR / (name + '.parquet')} is missing; {again}")
        for sub in ["capture"] + (["capture-baselines"] if len(own) < len(self.set_names) else []):
            if not (self.folder / sub / "index.json").is_file():
                raise MonorouteError(f"{self.folder / sub} holds no activation capture; {again}")
        if not (self.folder / LABELS_FILE).is_file():
            raise MonorouteError(f"{self.folder / LABELS_FILE} is missing; {again}")
        self._lock = threading.Lock()
        self._tables: dict = {}
        self._acts: dict = {}

    # --- what every page needs -----------------------------------------------------------------
    @property
    def name(self) -> str:
        return self.run.name

    @property
    def model_info(self) -> dict:
        return self.report.get("model", {})

    def set_info(self, set_name: str) -> dict:
        self._check_set(set_name)
        return self.report["unit_sets"][set_name]

    def _check_set(self, set_name: str) -> None:
        if set_name not in self.set_names:
            raise KeyError(set_name)

    def _load(self, what: str, fn):
        try:
            return fn()
        except MonorouteError:
            raise
        except Exception as exc:  # a torn or foreign file: say which, never a traceback
            raise MonorouteError(f"{self.folder} has a corrupt {what} ({type(exc).__name__}: {exc}); "
                                 f"run `monoroute analyze {self.run}` again") from None

    def table(self, set_name: str):
        """The unit table of one set as a pandas DataFrame (unit_table.py's columns)."""
        from monoroute.interp.unit_table import read_unit_table

        self._check_set(set_name)
        with self._lock:
            if set_name not in self._tables:
                df = self._load(f"unit table for {set_name}",
                                lambda: read_unit_table(self.folder / UNITS_DIR / f"{set_name}.parquet"))
                n = self.report["unit_sets"][set_name].get("n_units")
                if n is not None and len(df) != n:
                    raise MonorouteError(f"{self.folder / UNITS_DIR / (set_name + '.parquet')} has {len(df)} rows for "
                                         f"{n} units; run `monoroute analyze {self.run}` again")
                self._tables[set_name] = df
            return self._tables[set_name]

    def _capture_for(self, set_name: str):
        from monoroute.interp.capture import Capture

        sub = "capture-baselines" if set_name in BASELINE_SETS else "capture"
        return Capture(self.folder / sub), f"{set_name}.L{self.layer}"

    def activations(self, set_name: str) -> sp.csc_matrix:
        """(P, N) CSC activations of one set (columns are units)."""
        self._check_set(set_name)
        with self._lock:
            if set_name not in self._acts:
                def load():
                    cap, key = self._capture_for(set_name)
                    return cap.load(key).matrix.tocsc()
                self._acts[set_name] = self._load(f"activation capture for {set_name}", load)
            return self._acts[set_name]

    @cached_property
    def positions(self) -> Positions:
        from monoroute.interp.capture import Capture

        return self._load("capture", lambda: Capture(self.folder / "capture").positions)

    @cached_property
    def labels(self) -> ConceptLabels:
        return self._load("label file", lambda: load_labels(self.folder / LABELS_FILE, self.concept_names))

    @cached_property
    def concept_counts(self) -> np.ndarray:
        """(C,) positions where each concept holds, shared by every unit page's best-concept search."""
        return self.labels.matrix.sum(0)

    @cached_property
    def loaded_run(self):
        from monoroute.train.trainer import load

        return load(self.run, self.device)

    @property
    def model(self):
        return self.loaded_run.model

    @property
    def tokenizer(self):
        return self.loaded_run.tokenizer

    @cached_property
    def strings(self) -> list[str]:
        from monoroute.interp.dashboards import vocab_strings

        return vocab_strings(self.tokenizer, self.model.cfg.vocab_size)

    def baseline(self, set_name: str):
        """The trained SAE / transcoder behind a baseline set."""
        from monoroute.interp.baselines import load_baseline

        return self._baselines.setdefault(set_name, load_baseline(self.folder / set_name, self.device)) \
            if set_name in BASELINE_SETS else None

    @cached_property
    def _baselines(self) -> dict:
        return {}

    def warm(self) -> "AnalysisStore":
        """Load everything a page needs now, so the first request is as fast as the rest (and a corrupt
        file fails at startup, not on a click)."""
        for name in self.set_names:
            self.table(name)
            self.activations(name)
            if name in BASELINE_SETS:
                self.baseline(name)
        _ = self.positions, self.labels, self.concept_counts, self.strings
        return self

    # --- per unit ----------------------------------------------------------------------------------
    def check_unit(self, set_name: str, unit: int) -> None:
        self._check_set(set_name)
        n = self.activations(set_name).shape[1]
        if not 0 <= unit < n:
            raise IndexError(f"unit {unit} out of range 0..{n - 1}")

    def direction(self, set_name: str, unit: int):
        """(d_model,) what one unit of activation adds to the residual stream after this layer."""
        from monoroute.interp.interventions import unit_direction

        if set_name == self.own_set:
            return unit_direction(self.model, self.layer, unit)
        base = self.baseline(set_name)
        if set_name == "sae":  # decodes into the MLP's hidden layer (hook_post); the MLP's down maps it out
            return (self.model.blocks[self.layer].mlp.down.weight @ base.W_dec[unit]).detach()
        return base.ffn.w_out[unit].detach()  # transcoder: decodes straight into the MLP output

    def dashboard(self, set_name: str, unit: int) -> dict:
        """unit_dashboard's dict for one unit, plus logit_effect, explanation {text, f1} and the table row."""
        from monoroute.interp.dashboards import best_concepts, unit_dashboard
        from monoroute.interp.interventions import direction_logit_effect

        self.check_unit(set_name, unit)
        A = self.activations(set_name)
        dash = unit_dashboard(A, unit, self.positions, self.strings, None)
        dash["best_concepts"] = best_concepts(A, unit, self.labels, counts=self.concept_counts)
        row = self.table(set_name).iloc[unit]
        dash["row"] = json_safe(row.to_dict())
        f1 = row["explanation_f1"]
        dash["explanation"] = {"text": row["explanation"], "f1": None if np.isnan(f1) else float(f1)} \
            if row["explanation"] else None
        dash["logit_effect"] = direction_logit_effect(self.model, self.direction(set_name, unit), top=10,
                                                      tokenizer=self.strings)
        dash.update(set=set_name, layer=self.layer, run=self.name)
        return dash

    def best_unit_for(self, concept: str) -> dict[str, dict]:
        """Per unit set: the unit with the best F1 on `concept` (coverage's per-concept winner)."""
        out = {}
        for name in self.set_names:
            for row in per_concept_rows(self.report["unit_sets"][name]):
                if row["concept"] == concept and row.get("best_unit") is not None:
                    out[name] = {"unit": int(row["best_unit"]), "f1": row["f1"]}
        return out
