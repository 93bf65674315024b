"""Token storage: one memmap per split plus meta.json, cached so runs and epochs never re-tokenise.

Layout of one cache entry, `<cache>/tokens/<key>/`:
    train.bin, val.bin   flat token ids, uint16 (vocab <= 65535) or uint32, documents each followed
                         by the tokenizer's separator, in corpus order
    tokenizer.json       the tokenizer that produced them (BPE is trained here, on the train split)
    meta.json            source, tokenizer kind, vocab_size, dtype, n_tokens and n_documents per split,
                         and the size and sha256 of each .bin file
`key` hashes (source fingerprint, tokenizer spec, val_fraction, max_bytes). An entry is built in a
temporary folder (`.<key>.tmp-<pid>-*`), fsynced and renamed into place, so a crash or a concurrent
build never leaves half a cache; temporary folders of builds whose process died are removed by the
next build. Opening an entry checks every .bin file's size and sha256 against meta.json: a truncated
or corrupted file is rebuilt (with a warning), never read. A full disk during a build is one clear
error, and nothing is left in the cache.

Batches: `batch()` samples B random windows of T+1 tokens from the train split; the windows are a
pure function of (seed, step, rank), so a resumed run replays its data exactly and DDP ranks differ.
`eval_batches()` walks the validation split in consecutive non-overlapping windows.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import tempfile
import time
import warnings
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch
from torch import Tensor

from monoroute.data.corpus import SPLITS, Document, Source, cap_bytes, merge_chunks, split_of
from monoroute.data.tokenizers import BPETokenizer, ByteTokenizer, Tokenizer, tokenizer_from_json
from monoroute.errors import MonorouteError
from monoroute.fileio import sha256

FORMAT_VERSION = 3  # bump whenever what a key maps to changes (2: per-split max_bytes caps, 3: chunks, sha256)
FLUSH_CHARS = 8 << 20  # encode and write a split's pending documents every ~8 MB of text
DTYPES = ("uint16", "uint32")


class CacheCorrupt(Exception):
    """A cache entry that cannot be used as is; prepare rebuilds it."""


def default_cache_root(cache_dir: str | None) -> Path:
    root = cache_dir or os.environ.get("MONOROUTE_CACHE") or "~/.cache/monoroute"
    return Path(os.path.expanduser(root))


def cache_key(source_fingerprint: dict, tokenizer_spec: dict, val_fraction: float, max_bytes: int | None) -> str:
    blob = json.dumps(
        {"format": FORMAT_VERSION, "source": source_fingerprint, "tokenizer": tokenizer_spec,
         "val_fraction": val_fraction, "max_bytes": max_bytes},
        sort_keys=True,
    )
    return hashlib.sha1(blob.encode()).hexdigest()[:20]


def dtype_for(vocab_size: int) -> str:
    return "uint16" if vocab_size <= 65535 else "uint32"


def window_seed(seed: int, step: int, rank: int) -> int:
    """A 64-bit seed that depends on nothing but (seed, step, rank), identical on every machine."""
    digest = hashlib.sha1(f"monoroute-batch:{seed}:{step}:{rank}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


class TokenStore:
    """Read-only view of one cache entry: the token memmaps, their tokenizer and meta."""

    def __init__(self, path: Path, meta: dict, tokenizer: Tokenizer, reused: bool) -> None:
        self.path, self.meta, self.tokenizer = path, meta, tokenizer
        self.vocab_size = tokenizer.vocab_size
        self.reused = reused  # True when this prepare found the entry already built
        self._tokens = {split: self._map(split) for split in SPLITS}

    @classmethod
    def open(cls, path: Path, key: str, reused: bool = True) -> "TokenStore":
        """Open an entry after checking it is complete and consistent; CacheCorrupt if not."""
        try:
            meta = json.loads((path / "meta.json").read_text())
            tokenizer = tokenizer_from_json((path / "tokenizer.json").read_text())
            check_entry(path, meta, tokenizer, key)
        except CacheCorrupt:
            raise
        except Exception as e:  # missing file or key, bad JSON, bad tokenizer: all mean "rebuild"
            raise CacheCorrupt(f"{type(e).__name__}: {e}") from e
        return cls(path, meta, tokenizer, reused)

    def _map(self, split: str) -> np.ndarray:
        n = self.meta["n_tokens"][split]
        if n == 0:  # np.memmap refuses empty files
            return np.zeros(0, dtype=self.meta["dtype"])
        return np.memmap(self.path / f"{split}.bin", dtype=self.meta["dtype"], mode="r", shape=(n,))

    def n_tokens(self, split: str) -> int:
        return int(self.meta["n_tokens"][split])

    def tokens(self, split: str) -> np.ndarray:
        """(n_tokens,) the split's ids, memory-mapped: slicing reads only what it touches."""
        if split not in SPLITS:
            raise MonorouteError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
        return self._tokens[split]

    def _checked(self, split: str, block_size: int) -> np.ndarray:
        data = self.tokens(split)
        if block_size < 1:
            raise MonorouteError(f"block_size must be >= 1, got {block_size}")
        if len(data) < block_size + 1:
            raise MonorouteError(f"the {split} split has {len(data)} tokens, fewer than block_size+1="
                                 f"{block_size + 1}; {self._too_small_fix(split)}")
        return data

    def _too_small_fix(self, split: str) -> str:
        """The fixes that can work for a split that is too small, given how the corpus was split."""
        docs = self.meta.get("n_documents", {})
        total = sum(docs.values()) if docs else 0
        fixes = ["lower block_size (--block-size)"]
        if self.meta.get("max_bytes") is not None:
            fixes.append("raise max_bytes (--max-bytes)")
        if split == "val":
            if docs.get("val", 0) == 0 and 0 < total < 20:
                fixes.append(f"add documents: none of the corpus's {total} documents fell in validation (whole "
                             f"files are split, not parts of them); or concatenate the files into one file, which "
                             f"is split into ~4 KB chunks")
            else:
                fixes.append("raise val_fraction (--set val_fraction=0.1)")
        fixes.append("or use a larger corpus")
        return ", ".join(fixes)

    @staticmethod
    def _windows(data: np.ndarray, starts: np.ndarray, block_size: int) -> tuple[Tensor, Tensor]:
        idx = starts[:, None] + np.arange(block_size + 1)  # (B, T+1)
        w = torch.from_numpy(data[idx].astype(np.int64))  # (B, T+1): reads only these pages
        return w[:, :-1].contiguous(), w[:, 1:].contiguous()  # x, y: (B, T), y is x shifted by one

    def batch(
        self, step: int, batch_size: int, block_size: int, seed: int, rank: int = 0, world: int = 1,
        split: str = "train",
    ) -> tuple[Tensor, Tensor]:
        """(x, y) int64 (B, T): B uniformly random windows, a pure function of (seed, step, rank)."""
        if not 0 <= rank < world:
            raise MonorouteError(f"rank must be in [0, world={world}), got {rank}")
        data = self._checked(split, block_size)
        g = torch.Generator().manual_seed(window_seed(seed, step, rank))
        starts = torch.randint(0, len(data) - block_size, (batch_size,), generator=g)  # (B,)
        return self._windows(data, starts.numpy(), block_size)

    def eval_batches(
        self, batch_size: int, block_size: int, max_batches: int | None = None, split: str = "val"
    ) -> Iterator[tuple[Tensor, Tensor]]:
        """(x, y) int64 batches of consecutive non-overlapping windows from the split's start, the
        same on every call; at most `max_batches` batches (None: the whole split). The last batch
        may hold fewer than `batch_size` windows."""
        data = self._checked(split, block_size)  # checked now, not at the first next()
        n_windows = (len(data) - 1) // block_size
        if max_batches is not None:
            n_windows = min(n_windows, max_batches * batch_size)

        def generate() -> Iterator[tuple[Tensor, Tensor]]:
            for first in range(0, n_windows, batch_size):
                starts = np.arange(first, min(first + batch_size, n_windows)) * block_size  # (B,)
                yield self._windows(data, starts, block_size)

        return generate()


def check_entry(path: Path, meta: dict, tokenizer: Tokenizer, key: str) -> None:
    """CacheCorrupt unless meta.json, tokenizer.json and the .bin files' sizes and sha256 all agree."""
    if meta["format"] != FORMAT_VERSION or meta["key"] != key:
        raise CacheCorrupt(f"meta.json is for format {meta['format']} key {meta['key']}")
    if meta["vocab_size"] != tokenizer.vocab_size or meta["dtype"] != dtype_for(tokenizer.vocab_size):
        raise CacheCorrupt("meta.json vocab_size/dtype do not match tokenizer.json")
    itemsize = np.dtype(meta["dtype"]).itemsize
    for split in SPLITS:
        expected = meta["n_tokens"][split] * itemsize
        actual = (path / f"{split}.bin").stat().st_size
        if actual != expected or meta["files"][f"{split}.bin"]["bytes"] != expected:
            raise CacheCorrupt(f"{split}.bin has {actual} bytes, meta.json says {expected}")
        if sha256(path / f"{split}.bin") != meta["files"][f"{split}.bin"]["sha256"]:
            raise CacheCorrupt(f"{split}.bin does not match its sha256 in meta.json (corrupted on disk)")


def train_tokenizer(spec: dict, train_texts: Iterable[str]) -> Tokenizer:
    if spec["kind"] == "byte":
        return ByteTokenizer()
    if spec["kind"] == "file":
        from monoroute.data.tokenizers import load_tokenizer

        return load_tokenizer(spec["path"])
    return BPETokenizer.train(train_texts, spec["vocab_size"])


def write_splits(docs: Iterable[Document], tokenizer: Tokenizer, folder: Path, dtype: str,
                 val_fraction: float) -> dict:
    """Encode every document into its split's .bin file, in order, in chunks of ~FLUSH_CHARS."""
    n_tokens = {s: 0 for s in SPLITS}
    n_documents = {s: 0 for s in SPLITS}
    pending: dict[str, list[str]] = {s: [] for s in SPLITS}
    pending_chars = {s: 0 for s in SPLITS}
    files = {s: open(folder / f"{s}.bin", "wb") for s in SPLITS}
    digests = {s: hashlib.sha256() for s in SPLITS}

    def flush(split: str) -> None:
        if pending[split]:
            ids = tokenizer.encode_documents(pending[split])
            data = ids.astype(dtype).tobytes()
            files[split].write(data)
            digests[split].update(data)
            n_tokens[split] += len(ids)
            pending[split], pending_chars[split] = [], 0

    try:
        for key, text in docs:
            split = split_of(key, val_fraction)
            pending[split].append(text)
            pending_chars[split] += len(text)
            n_documents[split] += 1
            if pending_chars[split] >= FLUSH_CHARS:
                flush(split)
        for split in SPLITS:
            flush(split)
            files[split].flush()
            os.fsync(files[split].fileno())
    finally:
        for f in files.values():
            f.close()
    itemsize = np.dtype(dtype).itemsize
    return {"n_tokens": n_tokens, "n_documents": n_documents,
            "files": {f"{s}.bin": {"bytes": n_tokens[s] * itemsize, "sha256": digests[s].hexdigest()} for s in SPLITS}}


def build(folder: Path, source: Source, tokenizer_spec: dict, val_fraction: float, max_bytes: int | None,
          key: str) -> None:
    """Fill `folder` with a complete cache entry. Two passes over the source for BPE (train, encode)."""
    start = time.perf_counter()

    def documents() -> Iterator[Document]:
        return merge_chunks(cap_bytes(source.documents(), max_bytes, val_fraction), val_fraction)

    train_docs = all_docs = 0

    def train_texts() -> Iterator[str]:
        nonlocal train_docs, all_docs
        for key_, text in documents():
            all_docs += 1
            if split_of(key_, val_fraction) == "train":
                train_docs += 1
                yield text

    tokenizer = train_tokenizer(tokenizer_spec, train_texts())
    if tokenizer_spec["kind"] == "bpe" and train_docs == 0:
        raise empty_corpus(source, all_docs > 0)
    dtype = dtype_for(tokenizer.vocab_size)
    counts = write_splits(documents(), tokenizer, folder, dtype, val_fraction)
    if counts["n_documents"]["train"] == 0:
        raise empty_corpus(source, counts["n_documents"]["val"] > 0)
    write_synced(folder / "tokenizer.json", tokenizer.to_json())
    meta = {
        "format": FORMAT_VERSION, "key": key, "source": source.spec,
        "source_fingerprint": source.fingerprint(), "tokenizer": tokenizer.kind,
        "tokenizer_spec": tokenizer_spec, "vocab_size": tokenizer.vocab_size, "dtype": dtype,
        "val_fraction": val_fraction, "max_bytes": max_bytes, **counts,
        "build_seconds": round(time.perf_counter() - start, 3),
    }
    write_synced(folder / "meta.json", json.dumps(meta, indent=2))


def write_synced(path: Path, text: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def empty_corpus(source: Source, any_documents: bool) -> MonorouteError:
    """The cause (nothing readable, or everything fell in validation) and the fix that works."""
    if not any_documents:
        return MonorouteError(f"empty corpus: {source.empty_reason()}")
    return MonorouteError(
        f"empty corpus: every document of {source.describe()} fell in the validation split (whole files are "
        f"split, not parts of them); lower val_fraction, add files, or concatenate them into one file, which is "
        f"split into ~4 KB chunks"
    )


def disk_full(what: str, where: Path, exc: OSError) -> MonorouteError:
    return MonorouteError(
        f"disk full while {what} in {where} ({exc.strerror}); nothing was left in the cache. Free space there, or "
        f"point the cache at a larger disk (cache_dir, or $MONOROUTE_CACHE)"
    )


def remove_dead_builds(parent: Path) -> None:
    """Delete the temporary folders of builds whose process is gone (killed mid-build)."""
    for tmp in parent.glob(".*.tmp-*"):
        try:
            pid = int(tmp.name.rsplit(".tmp-", 1)[1].split("-", 1)[0])
        except (IndexError, ValueError):
            continue
        if pid == os.getpid() or pid_alive(pid):
            continue
        shutil.rmtree(tmp, ignore_errors=True)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return True
    return True


def open_or_build(source: Source, tokenizer_spec: dict, val_fraction: float, max_bytes: int | None,
                  cache_root: Path) -> TokenStore:
    """The cached entry for these settings, built first if missing or corrupt."""
    key = cache_key(source.fingerprint(), tokenizer_spec, val_fraction, max_bytes)
    parent = cache_root / "tokens"
    final = parent / key
    if final.exists():
        try:
            return TokenStore.open(final, key)
        except CacheCorrupt as e:
            warnings.warn(f"token cache {final} is unusable ({e}); rebuilding it")
            try:
                shutil.rmtree(final)
            except OSError as err:
                raise MonorouteError(
                    f"token cache {final} is corrupt ({e}) and cannot be removed ({err.strerror}); delete that folder"
                ) from err
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise MonorouteError(
            f"cannot create the token cache folder {parent} ({e.strerror}); set cache_dir or $MONOROUTE_CACHE"
        ) from e
    remove_dead_builds(parent)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{key}.tmp-{os.getpid()}-", dir=parent))  # unique per build
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise disk_full("building the token cache", parent, e) from None
        raise
    try:
        build(tmp, source, tokenizer_spec, val_fraction, max_bytes, key)
        try:
            os.rename(tmp, final)
        except OSError:
            if not final.exists():
                raise
            # Another process finished the same entry first: keep theirs (it is identical in content).
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise disk_full("building the token cache", parent, e) from None
        raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return TokenStore.open(final, key, reused=False)
