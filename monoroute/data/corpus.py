"""Corpus sources and the deterministic train/validation split.

A source yields documents `(key, text)`. The key is the same on every machine (a path relative to
the source's root, or a document index) and alone decides the split (`split_of`), so a validation
document is never trained on, whatever the machine, the order, or the cap on bytes read.

Sources (the `source` string of DataConfig):
- "stdlib": the running interpreter's standard library, every `*.py` below
  `sysconfig.get_paths()["stdlib"]` except installed packages (site-/dist-packages), sorted.
  No download. One file is one document.
- a file, a directory (every non-hidden file below it, recursively) or a glob (`**` allowed):
  one file is one document, keyed by its path relative to the directory / the glob's fixed prefix
  (but see chunks below: one file, or fewer than FEW_FILES, are split into chunks).
- "facts:people=P,exposures=E,seed=S": the synthetic-knowledge corpus of facts.py, generated (no
  download); its source fixes each document's split (SplitKey).
- "hf:NAME[:CONFIG]": the "train" split of a Hugging Face dataset, streamed; one row of
  `text_column` is one document, keyed by its row index. NAME may be a hub id or a local folder of
  jsonl/parquet/csv files (the same `datasets.load_dataset` call reads both).
Files that are not UTF-8 text are skipped and blank documents dropped; when nothing is left, the
error says which files were skipped and why.

Text without document boundaries is split into chunks. A source that is a single file (a book with
one sentence per line, a log, a dumped CSV column), every file of a folder or glob with fewer than
FEW_FILES files, and any document longer than LONG_DOCUMENT_CHARS are cut into contiguous chunks
of about CHUNK_CHARS characters, each ending at a blank line or else a line break where there is
one (paragraphs stay whole when they are shorter than a chunk). A chunk's
key is a `ChunkKey` ("<doc>@<i>"), whose split is systematic: along each document exactly one chunk
in every 1/val_fraction is validation, at an offset hashed from the document key. So ≈ val_fraction
of the text is validation even for one short file, the same chunks on every machine, and no
validation text is trained on. Runs of consecutive chunks that fall in the same split are put back
together when the token cache is built (`merge_chunks`), so a separator marks only the places where
validation text was taken out.
"""
from __future__ import annotations

import codecs
import glob
import hashlib
import math
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


CHUNK_CHARS = 4096  # target size of one chunk of text that has no document boundaries
LONG_DOCUMENT_CHARS = 1 << 20  # documents longer than this are chunked in every source
FEW_FILES = 64  # a folder or glob with fewer files than this is chunked file by file
MERGED_CHARS = 8 << 20  # merge_chunks never builds a document longer than about this
READ_CHARS = 1 << 20  # a single-file source is read and chunked this many characters at a time


class ChunkKey(str):
    """The key "<doc>@<index>" of chunk `index` of document `doc`; split_of reads doc and index."""

    doc: str
    index: int

    def __new__(cls, doc: str, index: int) -> "ChunkKey":
        self = super().__new__(cls, f"{doc}@{index}")
        self.doc, self.index = doc, index
        return self


def unit_hash(key: str) -> float:
    """A stable number in [0, 1) from the first 8 bytes of sha1(key)."""
    return int.from_bytes(hashlib.sha1(key.encode("utf-8")).digest()[:8], "big") / 2**64


def split_of(key: str, val_fraction: float) -> str:
    """'val' for a stable pseudo-random `val_fraction` of keys (sha1 of the key), else 'train'.

    A ChunkKey is systematic instead: chunk i of a document is 'val' when the sequence
    phase + i * val_fraction crosses an integer between i and i + 1 (phase hashed from the
    document key), i.e. exactly one chunk in every 1/val_fraction."""
    fixed = getattr(key, "fixed_split", None)  # facts.SplitKey: the source decides
    if fixed is not None:
        return fixed
    if isinstance(key, ChunkKey):
        if val_fraction <= 0:
            return "train"
        phase = unit_hash(key.doc)
        crossed = math.floor(phase + (key.index + 1) * val_fraction) > math.floor(phase + key.index * val_fraction)
        return "val" if crossed else "train"
    return "val" if unit_hash(key) < val_fraction else "train"


def cut_point(text: str, start: int, size: int) -> int:
    """Where the chunk that begins at `start` ends: after the last blank line, else the last line
    break, in its second half; else after `size` characters."""
    end = start + size
    low = start + size // 2
    cut = text.rfind("\n\n", low, end)
    if cut >= 0:
        return cut + 2
    cut = text.rfind("\n", low, end)
    return cut + 1 if cut >= 0 else end


def chunk_blocks(blocks: Iterable[str], size: int = CHUNK_CHARS) -> Iterator[str]:
    """Contiguous chunks of about `size` characters that together are exactly the concatenated blocks."""
    buffer = ""
    for block in blocks:
        buffer += block
        start = 0
        while len(buffer) - start > 2 * size:
            cut = cut_point(buffer, start, size)
            yield buffer[start:cut]
            start = cut
        buffer = buffer[start:]
    start = 0
    while len(buffer) - start > size:
        cut = cut_point(buffer, start, size)
        yield buffer[start:cut]
        start = cut
    if start < len(buffer):
        yield buffer[start:]


def chunked(doc: str, blocks: Iterable[str]) -> Iterator[Document]:
    for index, chunk in enumerate(chunk_blocks(blocks)):
        if chunk.strip():
            yield ChunkKey(doc, index), chunk


def merge_chunks(docs: Iterable[Document], val_fraction: float) -> Iterator[Document]:
    """Put consecutive chunks of one document that fall in the same split back together."""
    run_key, run_texts, run_chars, last = None, [], 0, None
    for key, text in docs:
        if isinstance(key, ChunkKey) and isinstance(last, ChunkKey) and key.doc == last.doc \
                and key.index == last.index + 1 and run_chars < MERGED_CHARS \
                and split_of(key, val_fraction) == split_of(last, val_fraction):
            run_texts.append(text)
            run_chars += len(text)
        else:
            if run_key is not None:
                yield run_key, "".join(run_texts)
            run_key, run_texts, run_chars = key, [text], len(text)
        last = key
    if run_key is not None:
        yield run_key, "".join(run_texts)


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


def not_text_error(spec: str, path: Path, exc: UnicodeDecodeError | None, offset: int = 0) -> MonorouteError:
    where = f" (byte 0x{exc.object[exc.start]:02x} at offset {offset + exc.start} is not UTF-8)" if exc else ""
    return MonorouteError(
        f"data file {spec!r} is not UTF-8 text{where}: a binary file, or text in another encoding; convert it "
        f"(e.g. `iconv -f latin1 -t utf-8 {path.name} > {path.stem}.utf8.txt`) or point --data at a text file"
    )


def read_blocks(spec: str, path: Path) -> Iterator[str]:
    """A single file's text, READ_CHARS characters at a time (never the whole file in memory)."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="strict")
    offset = 0
    try:
        with open(path, "rb") as f:
            while True:
                raw = f.read(READ_CHARS)
                try:
                    text = decoder.decode(raw, final=not raw)
                except UnicodeDecodeError as exc:
                    raise not_text_error(spec, path, exc, offset) from None
                offset += len(raw)
                if "\x00" in text:
                    raise not_text_error(spec, path, None)
                if text:
                    yield text
                if not raw:
                    return
    except OSError as exc:
        raise MonorouteError(f"cannot read data file {spec!r} ({exc.strerror}); check its permissions") from None


def name_list(names: list[str], limit: int = 3) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def files_fingerprint(root: Path, files: list[Path]) -> str:
    """Hash of every file's key, size and mtime: an edited corpus gets a new cache entry."""
    h = hashlib.sha1()
    for path in files:
        st = path.stat()
        h.update(f"{path.relative_to(root).as_posix()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


class FileSource:
    """Local text files; keys are paths relative to `root`."""

    def __init__(self, spec: str, root: Path, files: list[Path], extra: dict | None = None,
                 chunk_all: bool | None = None) -> None:
        self.spec, self.root, self.files = spec, root, files
        self.single = len(files) == 1
        # Few files: chunk each of them, else the split could be empty (see the module docstring).
        self.chunk_all = len(files) < FEW_FILES if chunk_all is None else chunk_all
        self.extra = extra or {}
        self.not_text: list[str] = []  # filled while documents() runs, for the empty-corpus error
        self.blank: list[str] = []

    def describe(self) -> str:
        if self.single:
            return f"data file {str(self.files[0])!r}"
        return f"{self.spec!r} ({len(self.files)} files)"

    def fingerprint(self) -> dict:
        return {"spec": self.spec, "files": files_fingerprint(self.root, self.files), **self.extra}

    def documents(self) -> Iterator[Document]:
        self.not_text, self.blank = [], []
        for path in self.files:
            key = path.relative_to(self.root).as_posix()
            if self.single:  # streamed; not being text is an error, not a skipped file
                yield from chunked(key, read_blocks(str(path), path))
                continue
            text = read_text(path)
            if text is None or "\x00" in text:
                self.not_text.append(key)
            elif not text.strip():
                self.blank.append(key)
            elif self.chunk_all or len(text) > LONG_DOCUMENT_CHARS:
                yield from chunked(key, [text])
            else:
                yield key, text

    def empty_reason(self) -> str:
        """Why documents() gave no text, and what to do (for the empty-corpus error)."""
        if self.single:
            return f"{self.describe()} is empty or holds only whitespace; point --data at a file with text"
        parts = []
        if self.not_text:
            parts.append(f"{len(self.not_text)} not UTF-8 text ({name_list(self.not_text)})")
        if self.blank:
            parts.append(f"{len(self.blank)} empty or blank ({name_list(self.blank)})")
        what = "; ".join(parts) or "none readable"
        return (f"{self.spec!r} has no text: of its {len(self.files)} files, {what}; add UTF-8 text files "
                f"(.txt, .md, .py, ...) or point --data at a folder or glob that has them")


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
        self.rows = self.blank_rows = 0
        for index, row in enumerate(ds):
            if index == 0:
                self.check_column(row)
            self.rows += 1
            text = row[self.text_column]
            if not (isinstance(text, str) and text.strip()):
                self.blank_rows += 1
            elif len(text) > LONG_DOCUMENT_CHARS:
                yield from chunked(str(index), [text])
            else:
                yield str(index), text

    def check_column(self, row: dict) -> None:
        strings = sorted(name for name, value in row.items() if isinstance(value, str))
        if self.text_column not in row:
            raise MonorouteError(
                f"{self.describe()} has no text column {self.text_column!r}; available columns: "
                f"{', '.join(sorted(row))}; set text_column to one of them (--text-column "
                f"{strings[0] if strings else 'NAME'})"
            )
        value = row[self.text_column]
        if not isinstance(value, str):
            raise MonorouteError(
                f"column {self.text_column!r} of {self.describe()} holds {type(value).__name__}, not text; "
                f"set text_column to a text column ({', '.join(strings) or 'none found in the first row'})"
            )

    def empty_reason(self) -> str:
        rows = getattr(self, "rows", 0)
        if rows == 0:
            return f"{self.describe()} has no rows in its train split; check the dataset name and config"
        return (f"{self.describe()}: all {rows} rows of column {self.text_column!r} are empty or blank; "
                f"set text_column to the column that holds the text")


def stdlib_source() -> FileSource:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for folder, subfolders, names in os.walk(root):
        subfolders[:] = [d for d in subfolders if d not in INSTALLED_PACKAGE_DIRS]  # prune, never enter
        files.extend(Path(folder, n) for n in names if n.endswith(".py"))
    files.sort(key=lambda p: p.relative_to(root).as_posix())
    python = f"{platform.python_implementation()} {platform.python_version()}"
    return FileSource("stdlib", root, files, extra={"python": python}, chunk_all=False)


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
        if path.stat().st_size == 0:
            raise MonorouteError(f"data file {spec!r} is empty (0 bytes); point --data at a file with text")
        return FileSource(spec, path.parent, [path])
    if path.is_dir():
        files = [p for p in path.rglob("*") if p.is_file() and not is_hidden(p, path)]
        files.sort(key=lambda p: p.relative_to(path).as_posix())
        if not files:
            raise MonorouteError(f"data directory {spec!r} contains no files; point --data at a folder of text files")
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


Source = FileSource | HFSource  # and facts.FactsSource


def open_source(spec: str, text_column: str = "text", val_fraction: float = 0.05):
    """Parse a DataConfig.source string. Checks that local paths exist; loads nothing yet."""
    if spec == "stdlib":
        return stdlib_source()
    if spec.startswith("facts:"):
        from monoroute.data.facts import FactsSource

        return FactsSource(spec, val_fraction)
    if spec.startswith(HF_PREFIX):
        name, _, config = spec[len(HF_PREFIX) :].partition(":")
        if not name:
            raise MonorouteError(f"data source {spec!r} names no dataset; write hf:NAME or hf:NAME:CONFIG")
        return HFSource(name, config or None, text_column)
    return local_source(spec)
