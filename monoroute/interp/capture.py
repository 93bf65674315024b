"""Activation capture to disk: sparse, streaming, resumable.

A model runs over the analysed token stream in non-overlapping windows of its context length; for
every *unit set* (a routed layer's units, a dense layer's neurons, an SAE's latents, ...) the
entries worth keeping are appended as COO triples (position, unit, value):

- routed units and SAE / transcoder latents: the selected slots with a nonzero value, exactly as
  the layer computed them (at most k per position);
- dense neurons: every signed value, exactly, as a dense float16 (positions, d_ff) block per shard
  (d_ff 512 × 200k positions is 205 MB), since a GELU neuron is almost never exactly zero and the
  probes read negative values too. Only where a caller asks for a cap (`keep`, for very wide dense
  sets) are the `keep` largest positive entries per position kept instead; the share of positions
  that had more positive entries than the cap is then recorded (`cap_hit_fraction`), because L0,
  coverage and the dead fraction of a capped set are censored.

Layout of a capture folder:
    index.json           settings, unit sets, one entry per complete shard (files, sha256, nnz)
    positions.safetensors  token_ids, doc_ids, window_pos: (P,) each, written before any shard
    shard-00000.safetensors  per sparse set "<set>.pos" int64, "<set>.unit" int32, "<set>.value"
                           float32; per dense set "<set>.dense" float16 (positions, N) (float32 where
                           a value is beyond float16's range)

Memory does not grow with the corpus: one shard (`shard_windows` windows) is held at a time.
index.json is rewritten atomically after each shard, so a capture killed at any point resumes at
the first shard it does not list (a shard file whose sha256 does not match is redone).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import scipy.sparse as sp
import torch
from safetensors.numpy import load_file
from torch import Tensor

from monoroute.errors import MonorouteError
from monoroute.fileio import save_safetensors_atomic, sha256, write_json_atomic
from monoroute.hooks import SparseActivations
from monoroute.interp.types import Positions, UnitActivations

INDEX = "index.json"
POSITIONS = "positions.safetensors"
FORMAT = 2  # 2: dense sets stored exactly; cap hits per shard
FLOAT16_MAX = 65504.0

# An extractor turns the forward pass's cache into (indices, values), both (T, k'), for one unit set;
# for a dense set (UnitSet.dense) into (None, values (T, N)); a capped extractor adds a third item, the
# number of positions whose positive entries exceeded the cap.
Extractor = Callable[[dict], tuple]


@dataclass
class UnitSet:
    key: str  # unique within a capture, e.g. "routed_units.L2", "random_init.L2", "sae.L2"
    name: str  # "routed_units" | "dense_neurons" | "sae" | "transcoder" | "random_init"
    layer: int
    n_units: int
    k: int | None  # routing / TopK cap (None: dense neurons)
    hook: str  # the hook point whose activation the extractor reads
    extract: Extractor
    dense: bool = False  # stored exactly as a (positions, N) block instead of COO triples
    cap: int | None = None  # capped dense set: the `cap` largest positive entries per position are kept


def topk_positive(dense: Tensor, keep: int) -> tuple[Tensor, Tensor, int]:
    """(T, N) dense activations -> the `keep` largest per row as (indices, values), zeros for the
    non-positive ones (so they are not stored), and how many rows had more than `keep` positive
    entries (the positions the cap censored)."""
    hits = int(((dense > 0).sum(-1) > keep).sum())
    keep = min(keep, dense.shape[-1])
    values, indices = dense.topk(keep, dim=-1)
    return indices, values.clamp(min=0), hits


def dense_extractor(hook: str, keep: int | None = None) -> Extractor:
    """Every value of a dense hook (keep None: `capture` stores the (T, N) block), or the capped top-`keep`."""
    if keep is None:
        return lambda cache: (None, cache[hook].flatten(0, -2).float())
    return lambda cache: topk_positive(cache[hook].flatten(0, -2).float(), keep)


def sparse_extractor(hook: str) -> Extractor:
    def extract(cache: dict) -> tuple[Tensor, Tensor]:
        acts: SparseActivations = cache[hook]
        k = acts.indices.shape[-1]
        return acts.indices.reshape(-1, k), acts.values.reshape(-1, k).float()

    return extract


def model_unit_sets(model, prefix: str | None = None, layers: list[int] | None = None,
                    keep: int | None = None) -> list[UnitSet]:
    """One unit set per FFN layer of a GPT: routed layers' units, dense layers' neurons (exact when
    `keep` is None, else capped at the `keep` largest positive entries per position).
    `prefix` replaces the set name (e.g. "random_init" for the untrained copy)."""
    from monoroute.layers import RoutedFFN

    sets = []
    for i, block in enumerate(model.blocks):
        if layers is not None and i not in layers:
            continue
        hook = f"blocks.{i}.mlp.hook_post"
        if isinstance(block.mlp, RoutedFFN):
            name, n, k, extract = "routed_units", block.mlp.n_units, block.mlp.k, sparse_extractor(hook)
        else:
            name, n, k, extract = "dense_neurons", block.mlp.down.in_features, None, dense_extractor(hook, keep)
        dense = name == "dense_neurons" and keep is None
        cap = keep if name == "dense_neurons" else None
        key = f"{prefix or name}.L{i}"
        sets.append(UnitSet(key, prefix or name, i, n, k, hook, extract, dense=dense, cap=cap))
    return sets


def capture(
    model,
    positions: Positions,
    unit_sets: list[UnitSet],
    folder: str | Path,
    block_size: int,
    fingerprint: str,
    batch_windows: int = 16,
    shard_windows: int = 64,
    progress: bool = True,
    device: torch.device | str = "cpu",
    desc: str = "capture",
) -> Path:
    """Run `model` over `positions.token_ids` (P = a multiple of block_size) and write the unit sets'
    activations to `folder`; resume there if a capture with the same `fingerprint` was cut off."""
    from tqdm import tqdm

    folder = Path(folder)
    P = len(positions)
    if P == 0 or P % block_size:
        raise ValueError(f"capture needs a positive multiple of block_size={block_size} positions, got {P}")
    n_windows = P // block_size
    settings = {
        "format": FORMAT, "fingerprint": fingerprint, "n_positions": P, "block_size": block_size,
        "shard_windows": shard_windows,
        "unit_sets": {s.key: {"name": s.name, "layer": s.layer, "n_units": s.n_units, "k": s.k, "hook": s.hook,
                              "dense": s.dense, "cap": s.cap} for s in unit_sets},
    }
    index = read_index(folder)
    if index is None or {k: index.get(k) for k in settings} != settings:
        folder.mkdir(parents=True, exist_ok=True)
        for stale in folder.glob("shard-*.safetensors"):
            stale.unlink()
        save_safetensors_atomic(folder / POSITIONS, {"token_ids": positions.token_ids.astype(np.int64),
                                         "doc_ids": positions.doc_ids.astype(np.int64),
                                         "window_pos": positions.window_pos.astype(np.int64)})
        index = dict(settings, shards=[], complete=False)
        write_json_atomic(folder / INDEX, index)
    done = valid_shards(folder, index)
    index["shards"] = done
    hooks = sorted({s.hook for s in unit_sets})
    ids = torch.from_numpy(positions.token_ids.reshape(n_windows, block_size).astype(np.int64))
    first_window = done[-1]["first_window"] + done[-1]["n_windows"] if done else 0
    was_training = model.training
    model.eval()
    bar = tqdm(total=n_windows, initial=first_window, desc=desc, unit="win", disable=not progress, leave=False)
    try:
        for shard_start in range(first_window, n_windows, shard_windows):
            shard_end = min(shard_start + shard_windows, n_windows)
            parts: dict[str, list] = {s.key: [] for s in unit_sets}
            hits = {s.key: 0 for s in unit_sets if s.cap is not None}
            for start in range(shard_start, shard_end, batch_windows):
                stop = min(start + batch_windows, shard_end)
                with torch.no_grad():
                    _, cache = model.run_with_cache(ids[start:stop].to(device), names_filter=hooks)
                base = start * block_size
                for s in unit_sets:
                    out = s.extract(cache)
                    idx, val = out[0], out[1]  # (T, k') each; dense: None, (T, N)
                    if s.key in hits:
                        hits[s.key] += int(out[2])
                    if s.dense:
                        parts[s.key].append(val.cpu().numpy())
                        continue
                    keep = val != 0
                    rows = torch.arange(idx.shape[0]).unsqueeze(1).expand_as(idx)[keep.cpu()]
                    parts[s.key].append((rows.numpy() + base, idx[keep].cpu().numpy(), val[keep].cpu().numpy()))
                bar.update(stop - start)
            name = f"shard-{shard_start // shard_windows:05d}.safetensors"
            tensors, nnz = {}, {}
            for s in unit_sets:
                chunks, key = parts[s.key], s.key
                if s.dense:
                    block = np.concatenate(chunks).astype(np.float32)
                    small = not len(block) or float(np.abs(block).max()) <= FLOAT16_MAX
                    tensors[f"{key}.dense"] = block.astype(np.float16) if small else block
                    nnz[key] = int(np.count_nonzero(tensors[f"{key}.dense"]))
                    continue
                tensors[f"{key}.pos"] = np.concatenate([c[0] for c in chunks]).astype(np.int64)
                tensors[f"{key}.unit"] = np.concatenate([c[1] for c in chunks]).astype(np.int32)
                tensors[f"{key}.value"] = np.concatenate([c[2] for c in chunks]).astype(np.float32)
                nnz[key] = int(len(tensors[f"{key}.pos"]))
            save_safetensors_atomic(folder / name, tensors)
            index["shards"].append({"file": name, "first_window": shard_start, "n_windows": shard_end - shard_start,
                                    "sha256": sha256(folder / name), "nnz": nnz, "cap_hits": hits})
            write_json_atomic(folder / INDEX, index)
    finally:
        bar.close()
        model.train(was_training)
    index["complete"] = True
    write_json_atomic(folder / INDEX, index)
    return folder


READABLE_FORMATS = (1, FORMAT)  # format 1 (every set as COO triples) still reads; a capture resumes only at FORMAT


def read_index(folder: Path, formats: tuple[int, ...] = (FORMAT,)) -> dict | None:
    try:
        index = json.loads((folder / INDEX).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    return index if isinstance(index, dict) and index.get("format") in formats else None


def valid_shards(folder: Path, index: dict) -> list[dict]:
    """The listed shards, in order, up to the first that is missing or does not match its sha256."""
    good, expected = [], 0
    for shard in index.get("shards", []):
        path = folder / shard["file"]
        if shard["first_window"] != expected or not path.is_file() or sha256(path) != shard["sha256"]:
            break
        good.append(shard)
        expected += shard["n_windows"]
    return good


class Capture:
    """Read access to a complete capture folder."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        index = read_index(self.folder, READABLE_FORMATS)
        if index is None or not index.get("complete"):
            raise MonorouteError(f"{self.folder} holds no complete activation capture; run `monoroute analyze` again")
        self.index = index
        pos = load_file(str(self.folder / POSITIONS))
        self.positions = Positions(pos["token_ids"], pos["doc_ids"], pos["window_pos"])

    def _load_dense(self, key: str, P: int, N: int) -> sp.csr_matrix:
        """A dense set's (P, N) CSR of its nonzero values, filled shard by shard into arrays sized from
        the index's nnz counts (peak memory: the result plus one shard's block)."""
        total = sum(int(shard["nnz"][key]) for shard in self.index["shards"])
        data = np.empty(total, dtype=np.float32)
        indices = np.empty(total, dtype=np.int32)
        indptr = np.zeros(P + 1, dtype=np.int64)
        row = at = 0
        for shard in self.index["shards"]:
            block = load_file(str(self.folder / shard["file"]))[f"{key}.dense"]  # (positions, N)
            r, c = np.nonzero(block)  # row-major: sorted by row, then column (canonical CSR order)
            n = len(r)
            data[at:at + n] = block[r, c]
            indices[at:at + n] = c
            indptr[row + 1: row + len(block) + 1] = at + np.cumsum(np.bincount(r, minlength=len(block)))
            row += len(block)
            at += n
            del block, r, c
        matrix = sp.csr_matrix((data, indices, indptr), shape=(P, N))
        matrix.has_sorted_indices = True
        matrix.has_canonical_format = True
        return matrix

    @property
    def keys(self) -> list[str]:
        return list(self.index["unit_sets"])

    def load(self, key: str) -> UnitActivations:
        """One unit set as a (P, N) CSR matrix of its nonzero entries, assembled shard by shard (from
        COO triples, or from a dense set's blocks). `meta["cap_hit_fraction"]`: for a capped dense
        set, the share of positions that had more positive entries than the cap (None otherwise)."""
        info = self.index["unit_sets"][key]
        P, N = self.index["n_positions"], info["n_units"]
        if info.get("dense"):
            matrix = self._load_dense(key, P, N)
        else:
            rows, cols, vals = [], [], []
            for shard in self.index["shards"]:
                t = load_file(str(self.folder / shard["file"]))
                rows.append(t[f"{key}.pos"])
                cols.append(t[f"{key}.unit"])
                vals.append(t[f"{key}.value"])
            matrix = sp.csr_matrix(
                (np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=(P, N), dtype=np.float32
            )
            matrix.sum_duplicates()  # a steering hook can list a unit twice on one position
        cap = info.get("cap")
        hit = sum(shard.get("cap_hits", {}).get(key, 0) for shard in self.index["shards"]) / max(P, 1) if cap else None
        return UnitActivations(info["name"], info["layer"], matrix, info["k"],
                               meta={"key": key, "dense": bool(info.get("dense")), "cap": cap, "cap_hit_fraction": hit})
