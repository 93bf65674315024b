"""The two data types every interpretability module shares.

P positions (tokens of the analysed split, in stream order), N units of one unit set, C concepts.

- `UnitActivations`: one unit set's activations over the P positions as a scipy CSR matrix
  (P, N) float32 that holds only the stored entries (routed units: the selected slots that fired;
  dense neurons and SAE latents: the positive entries, capped at the top `keep` per position).
  Never a dense (P, N) array: at N = 16k and P = 200k that would be 13 GB.
- `ConceptLabels`: the ground-truth concepts as a dense boolean (P, C) matrix with names.
- `Positions`: what every position is: its token id, its document, its place in its window.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp


@dataclass
class UnitActivations:
    name: str  # unit-set name: "routed_units", "dense_neurons", "sae", "transcoder", ... (random_init: same names)
    layer: int  # block index
    matrix: sp.csr_matrix  # (P, N) float32, only stored entries
    k: int | None = None  # routing / TopK cap, None when there is none (dense neurons)
    meta: dict = field(default_factory=dict)

    @property
    def n_units(self) -> int:
        return self.matrix.shape[1]

    @property
    def n_positions(self) -> int:
        return self.matrix.shape[0]


@dataclass
class ConceptLabels:
    names: list[str]  # (C,)
    matrix: np.ndarray  # (P, C) bool

    def __post_init__(self) -> None:
        if self.matrix.ndim != 2 or self.matrix.shape[1] != len(self.names):
            raise ValueError(f"labels matrix {self.matrix.shape} does not match {len(self.names)} concept names")
        self.matrix = np.asarray(self.matrix, dtype=bool)

    def frequency(self) -> np.ndarray:
        """(C,) fraction of positions where each concept holds."""
        return self.matrix.mean(0) if len(self.matrix) else np.zeros(len(self.names))


@dataclass
class Positions:
    token_ids: np.ndarray  # (P,) int64
    doc_ids: np.ndarray  # (P,) int64: index of the document (in the analysed split) the token belongs to
    window_pos: np.ndarray  # (P,) int64: index of the token inside the model's context window

    def __len__(self) -> int:
        return len(self.token_ids)


# --- floors: every unit set is read against the same architecture at its initialisation ----------------
# The model's own units (dense neurons, routed units) against the untrained model ("random_init"); a
# post-hoc SAE / transcoder against the same SAE / transcoder, same width and seed, before training
# ("sae_init", "transcoder_init"), scored on the same positions.
POST_HOC = ("sae", "transcoder")


def floor_of(set_name: str) -> str:
    """The name of the unit set that is `set_name`'s random-init floor."""
    return f"{set_name}_init" if set_name in POST_HOC else "random_init"


def is_floor(set_name: str) -> bool:
    return set_name == "random_init" or set_name in {f"{k}_init" for k in POST_HOC}
