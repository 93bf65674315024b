"""Activation capture to disk: sparse, streaming, resumable.

A model runs over the analysed token stream in non-overlapping windows of its context length; for
every *unit set* (a routed layer's units, a dense layer's neurons, an SAE's latents, ...) the
entries worth keeping are appended as COO triples (position, unit, value):

- routed units: the k selected slots that fired (value != 0), exactly as the layer computed them;
- anything dense (neurons, SAE / transcoder latents): the positive entries, at most `keep` per
  position (the largest), since a GELU neuron is almost never exactly zero.

Layout of a capture folder:
    index.json           settings, unit sets, one entry per complete shard (files, sha256, nnz)
    positions.safetensors  token_ids, doc_ids, window_pos: (P,) each, written before any shard
    shard-00000.safetensors  "<set>.pos" int64, "<set>.unit" int32, "<set>.value" float32 per set

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
FORMAT = 1

# An extractor turns the forward pass's cache into (indices, values), both (T, k'), for one unit set.
Extractor = Callable[[dict], tuple[Tensor, Tensor]]


@dataclass
class UnitSet:
    key: str  # unique within a capture, e.g. "routed_units.L2", "random_init.L2", "sae.L2"
    name: str  # "routed_units" | "dense_neurons" | "sae" | "transcoder" | "random_init"
    layer: int
    n_units: int
    k: int | None  # routing / TopK cap (None: dense neurons)
    hook: str  # the hook point whose activation the extractor reads
    extract: Extractor


def topk_positive(dense: Tensor, keep: int) -> tuple[Tensor, Tensor]:
    """(T, N) dense activations -> the `keep` largest per row as (indices, values), zeros for the
    non-positive ones (so they are not stored)."""
    keep = min(keep, dense.shape[-1])
    values, indices = dense.topk(keep, dim=-1)
    return indices, values.clamp(min=0)


def dense_extractor(hook: str, keep: int) -> Extractor:
    return lambda cache: topk_positive(cache[hook].flatten(0, -2).float(), keep)


def sparse_extractor(hook: str) -> Extractor:
    def extract(cache: dict) -> tuple[Tensor, Tensor]:
        acts: SparseActivations = cache[hook]
        k = acts.indices.shape[-1]
        return acts.indices.reshape(-1, k), acts.values.reshape(-1, k).float()

    return extract


def model_unit_sets(model, prefix: str | None = None, layers: list[int] | None = None, keep: int = 128) -> list[UnitSet]:
    """One unit set per FFN layer of a GPT: routed layers' units, dense layers' neurons.
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
        key = f"{prefix or name}.L{i}"
        sets.append(UnitSet(key, prefix or name, i, n, k, hook, extract))
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
        "unit_sets": {s.key: {"name": s.name, "layer": s.layer, "n_units": s.n_units, "k": s.k, "hook": s.hook}
                      for s in unit_sets},
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
            for start in range(shard_start, shard_end, batch_windows):
                stop = min(start + batch_windows, shard_end)
                with torch.no_grad():
                    _, cache = model.run_with_cache(ids[start:stop].to(device), names_filter=hooks)
                base = start * block_size
                for s in unit_sets:
                    idx, val = s.extract(cache)  # (T, k') each
                    keep = val != 0
                    rows = torch.arange(idx.shape[0]).unsqueeze(1).expand_as(idx)[keep.cpu()]
                    parts[s.key].append((rows.numpy() + base, idx[keep].cpu().numpy(), val[keep].cpu().numpy()))
                bar.update(stop - start)
            name = f"shard-{shard_start // shard_windows:05d}.safetensors"
            tensors, nnz = {}, {}
            for key, chunks in parts.items():
                tensors[f"{key}.pos"] = np.concatenate([c[0] for c in chunks]).astype(np.int64)
                tensors[f"{key}.unit"] = np.concatenate([c[1] for c in chunks]).astype(np.int32)
                tensors[f"{key}.value"] = np.concatenate([c[2] for c in chunks]).astype(np.float32)
                nnz[key] = int(len(tensors[f"{key}.pos"]))
            save_safetensors_atomic(folder / name, tensors)
            index["shards"].append({"file": name, "first_window": shard_start, "n_windows": shard_end - shard_start,
                                    "sha256": sha256(folder / name), "nnz": nnz})
            write_json_atomic(folder / INDEX, index)
    finally:
        bar.close()
        model.train(was_training)
    index["complete"] = True
    write_json_atomic(folder / INDEX, index)
    return folder


def read_index(folder: Path) -> dict | None:
    try:
        index = json.loads((folder / INDEX).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    return index if isinstance(index, dict) and index.get("format") == FORMAT else None


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
        index = read_index(self.folder)
        if index is None or not index.get("complete"):
            raise MonorouteError(f"{self.folder} holds no complete activation capture; run `monoroute analyze` again")
        self.index = index
        pos = load_file(str(self.folder / POSITIONS))
        self.positions = Positions(pos["token_ids"], pos["doc_ids"], pos["window_pos"])

    @property
    def keys(self) -> list[str]:
        return list(self.index["unit_sets"])

    def load(self, key: str) -> UnitActivations:
        """One unit set as a (P, N) CSR matrix, assembled shard by shard from its COO triples."""
        info = self.index["unit_sets"][key]
        rows, cols, vals = [], [], []
        for shard in self.index["shards"]:
            t = load_file(str(self.folder / shard["file"]))
            rows.append(t[f"{key}.pos"])
            cols.append(t[f"{key}.unit"])
            vals.append(t[f"{key}.value"])
        P, N = self.index["n_positions"], info["n_units"]
        matrix = sp.csr_matrix(
            (np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=(P, N), dtype=np.float32
        )
        matrix.sum_duplicates()  # a steering hook can list a unit twice on one position
        return UnitActivations(info["name"], info["layer"], matrix, info["k"], meta={"key": key})
