"""Corpus sources and the deterministic train/validation split.

A source yields documents `(key, text)`. The key is the same on every machine (a path relative to
the source's root, or a document index) and alone decides the split (`split_of`), so a validation
document is never trained on, whatever the machine, the order, or the cap on bytes read.

Sources (the `source` string of DataConfig):
- "stdlib": the running interpreter's standard library, every `*.py` below
  `sysconfig.get_paths()["stdlib"]` except installed packages (site-/dist-packages), sorted.
  No download. One file is one document.
- a file, a directory (every non-hidden file below it, recursively) or a glob (`**` allowed):
  one file is one document, keyed by its path relative to the directory / the glob's fixed prefix.
  A source of a single file is split into blank-line-separated paragraphs instead, so it still
  has a validation split.
- "hf:NAME[:CONFIG]": the "train" split of a Hugging Face dataset, streamed; one row of
  `text_column` is one document, keyed by its row index. NAME may be a hub id or a local folder of
  jsonl/parquet/csv files (the same `datasets.load_dataset` call reads both).
Files that cannot be read or decoded as UTF-8 are skipped; blank documents are dropped.
"""
from __future__ import annotations

import glob
import hashlib
import os
import platform
import sysconfig
from pathlib import Path
from typing import Iterable, Iterator

from monoroute.errors import MonorouteError

Document = tuple[str, str]  # (key, text)
SPLITS = ("train", "val")
HF_PREFIX = "hf:"
INSTALLED_PACKAGE_DIRS = {"site-packages", "dist-packages"}


def split_of(key: str, val_fraction: float) -> str:
    """'val' for a stable pseudo-random `val_fraction` of keys (sha1 of the key), else 'train'."""
    h = int.from_bytes(hashlib.sha1(key.encode("utf-8")).digest()[:8], "big")
    return "val" if h < val_fraction * 2**64 else "train"


def cap_bytes(docs: Iterable[Document], max_bytes: int | None, val_fraction: float) -> Iterator[Document]:
    """The documents in order, with each split capped at its share of `max_bytes` UTF-8 bytes
    (validation: round(max_bytes * val_fraction), train: the rest); a split's last document is
    cut short. Per-split caps give even a tiny capped corpus a validation split: on the stdlib the
    first validation file comes after ~800 KB of training files."""
    if max_bytes is None:
        yield from docs
        return
    left = {"val": round(max_bytes * val_fraction)}
    left["train"] = max_bytes - left["val"]
    for key, text in docs:
        split = split_of(key, val_fraction)
        if left[split] == 0:
            if not any(left.values()):
                return
            continue
        raw = text.encode("utf-8")
        if len(raw) > left[split]:
            text = raw[: left[split]].decode("utf-8", errors="ignore")
        left[split] -= min(len(raw), left[split])
        yield key, text


def read_text(path: Path) -> str | None:
    """The file as UTF-8 text, or None when it cannot be read or is not UTF-8 (e.g. binary)."""
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None


def files_fingerprint(root: Path, files: list[Path]) -> str:
    """Hash of every file's key, size and mtime: an edited corpus gets a new cache entry."""
    h = hashlib.sha1()
    for path in files:
        st = path.stat()
        h.update(f"{path.relative_to(root).as_posix()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


class FileSource:
    """Local text files; keys are paths relative to `root`."""

    def __init__(self, spec: str, root: Path, files: list[Path], extra: dict | None = None) -> None:
        self.spec, self.root, self.files = spec, root, files
        self.paragraphs = len(files) == 1  # see the module docstring
        self.extra = extra or {}

    def describe(self) -> str:
        return f"{self.spec!r} ({len(self.files)} files)"

    def fingerprint(self) -> dict:
        return {"spec": self.spec, "files": files_fingerprint(self.root, self.files), **self.extra}

    def documents(self) -> Iterator[Document]:
        for path in self.files:
            text = read_text(path)
            if text is None:
                continue
            key = path.relative_to(self.root).as_posix()
            if not self.paragraphs:
                if text.strip():
                    yield key, text
                continue
            for i, paragraph in enumerate(text.split("\n\n")):
                if paragraph.strip():
                    yield f"{key}#{i}", paragraph


class HFSource:
    """The "train" split of a Hugging Face dataset, streamed row by row."""

    def __init__(self, name: str, config: str | None, text_column: str) -> None:
        self.name, self.config, self.text_column = name, config, text_column
        self.spec = HF_PREFIX + name + (f":{config}" if config else "")

    def describe(self) -> str:
        return f"Hugging Face dataset {self.name!r}" + (f" (config {self.config!r})" if self.config else "")

    def fingerprint(self) -> dict:
        fp = {"hf": self.name, "config": self.config, "text_column": self.text_column}
        local = Path(self.name)
        if local.is_dir():  # a local dataset folder: notice edits, as for local text files
            fp["files"] = files_fingerprint(local, sorted(p for p in local.rglob("*") if p.is_file()))
        return fp

    def load(self):
        import datasets

        try:
            return datasets.load_dataset(self.name, self.config, split="train", streaming=True)
        except Exception as e:  # hub, network and file errors share no narrower base class
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise MonorouteError(f"cannot load {self.describe()}: {reason}") from e

    def documents(self) -> Iterator[Document]:
        ds = self.load()
        for index, row in enumerate(ds):
            if index == 0 and self.text_column not in row:
                raise MonorouteError(
                    f"{self.describe()} has no text column {self.text_column!r}; available columns: "
                    f"{', '.join(sorted(row))}; set text_column to one of them"
                )
            text = row[self.text_column]
            if isinstance(text, str) and text.strip():
                yield str(index), text


def stdlib_source() -> FileSource:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for folder, subfolders, names in os.walk(root):
        subfolders[:] = [d for d in subfolders if d not in INSTALLED_PACKAGE_DIRS]  # prune, never enter
        files.extend(Path(folder, n) for n in names if n.endswith(".py"))
    files.sort(key=lambda p: p.relative_to(root).as_posix())
    python = f"{platform.python_implementation()} {platform.python_version()}"
    return FileSource("stdlib", root, files, extra={"python": python})


def glob_root(pattern: str) -> Path:
    """The leading folders of a glob that contain no wildcard: keys are relative to it."""
    fixed = []
    for part in Path(pattern).parts:
        if glob.has_magic(part):
            break
        fixed.append(part)
    return Path(*fixed) if fixed else Path(".")


def is_hidden(path: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def local_source(spec: str) -> FileSource:
    path = Path(os.path.expanduser(spec))
    if path.is_file():
        return FileSource(spec, path.parent, [path])
    if path.is_dir():
        files = [p for p in path.rglob("*") if p.is_file() and not is_hidden(p, path)]
        files.sort(key=lambda p: p.relative_to(path).as_posix())
        if not files:
            raise MonorouteError(f"data directory {spec!r} contains no files; point source at a folder of text files")
        return FileSource(spec, path, files)
    if glob.has_magic(spec):
        pattern = os.path.expanduser(spec)
        files = sorted(Path(p) for p in glob.glob(pattern, recursive=True) if Path(p).is_file())
        if not files:
            raise MonorouteError(f"data glob {spec!r} matches no files; check the pattern (use ** for subfolders)")
        root = glob_root(pattern)
        return FileSource(spec, root, files)
    raise MonorouteError(
        f"data source {spec!r} does not exist; use 'stdlib', an existing file, directory or glob, or 'hf:NAME[:CONFIG]'"
    )


Source = FileSource | HFSource


def open_source(spec: str, text_column: str = "text") -> Source:
    """Parse a DataConfig.source string. Checks that local paths exist; loads nothing yet."""
    if spec == "stdlib":
        return stdlib_source()
    if spec.startswith(HF_PREFIX):
        name, _, config = spec[len(HF_PREFIX) :].partition(":")
        if not name:
            raise MonorouteError(f"data source {spec!r} names no dataset; write hf:NAME or hf:NAME:CONFIG")
        return HFSource(name, config or None, text_column)
    return local_source(spec)
