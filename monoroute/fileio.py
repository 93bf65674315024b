"""Small file primitives every part of monoroute shares: a streamed sha256, and atomic writes
(write a temporary file beside the target, then rename over it, so a reader sees the old file or
the new one, never half of one)."""
from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Callable


def sha256(path: str | Path) -> str:
    """Hex sha256 of a file, read in 4 MiB chunks (constant memory for multi-GB tables)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def fsync_path(path: Path) -> None:
    """Flush a file's or a folder's entry to disk (a no-op where the OS cannot open folders)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: Path, write: Callable[[str], None], durable: bool = True) -> None:
    """Call write(tmp_path), then rename over `path`. With `durable`, fsync the file before the
    rename and the folder after it, so the rename survives a power cut too. The temporary file is
    removed if `write` fails (a full disk leaves nothing behind)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        # mkstemp makes the file 0600; the result gets the mode a plain open() would give it
        # (0666 less the umask), so reports and run files stay readable as before.
        os.chmod(tmp, 0o666 & ~_umask())
        write(tmp)
        if durable:
            fsync_path(Path(tmp))
        os.replace(tmp, path)
        if durable:
            fsync_path(path.parent)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_text_atomic(path: Path, text: str, durable: bool = False) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"), durable)


def write_json_atomic(path: Path, obj, durable: bool = False) -> None:
    write_text_atomic(path, json.dumps(obj, indent=1), durable)


def save_safetensors_atomic(path: Path, tensors: dict, durable: bool = False) -> None:
    """Tensors (torch) or arrays (numpy), as safetensors."""
    import numpy as np

    if tensors and all(isinstance(v, np.ndarray) for v in tensors.values()):
        from safetensors.numpy import save_file
    else:
        from safetensors.torch import save_file
    atomic_write(path, lambda tmp: save_file(tensors, tmp), durable)


def json_safe(obj):
    """A JSON-safe copy: numpy scalars and arrays to Python values, NaN / inf to None (JSON has neither)."""
    import numpy as np

    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return json_safe(obj.tolist())
    if isinstance(obj, np.bool_):
        return bool(obj)
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(obj) else None
    return obj


def replace_dir(src: Path, dst: Path) -> None:
    """Put the finished folder `src` in place of `dst` (which may be missing) by renames on one file
    system: the old `dst` is moved aside first and deleted only after the swap, and it is put back if
    the swap fails, so `dst` is always either the old folder or the new one."""
    import shutil

    old = dst.parent / f".{dst.name}.old-{os.getpid()}"
    try:
        if dst.exists():
            os.replace(dst, old)
        os.replace(src, dst)
    except BaseException:
        if old.exists() and not dst.exists():
            os.replace(old, dst)
        raise
    fsync_path(dst.parent)
    shutil.rmtree(old, ignore_errors=True)


def check_writable(folder: Path, what: str) -> None:
    """Fail before any work when `folder` (made if missing) cannot take a new file: one MonorouteError
    naming it, instead of an OSError after minutes of computation."""
    from monoroute.errors import MonorouteError

    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-check.", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise MonorouteError(f"cannot write {what} to {folder} ({exc.strerror or type(exc).__name__}); make it "
                             f"writable or choose another place") from None
