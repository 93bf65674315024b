"""The run directory: who may write into it, and when a new run may start in it.

One training at a time. `RunLock` holds an exclusive `flock` on OUT/train.lock for the whole run and
writes its pid, host and start time into it. The kernel drops the lock when the process dies, even by
kill -9, so a lock file left by a dead process is stale by construction and the next run takes it
over; a live owner makes the second run stop with a message naming its pid. (On a filesystem
without flock, the pid in the file decides: a live pid on this host refuses, anything else is taken over.)

When a new (non-resume) run may use OUT:
- OUT is missing or empty;
- OUT holds only what a run writes (config.json, tokenizer.json, metrics.jsonl, tensorboard/, ...)
  and no checkpoint: a run that stopped before its first checkpoint has nothing to lose, so it is
  started again from scratch without --overwrite;
- --overwrite: the old run's files are deleted first (other files in OUT are left alone), so
  metrics.jsonl and tensorboard/ start empty.
Anything else is refused. The decision is taken again under the lock, just before writing.
"""
from __future__ import annotations

import errno
import json
import os
import shutil
import socket
import time
from pathlib import Path

from monoroute.errors import MonorouteError
from monoroute.train.checkpoint import (
    CHECKPOINT_FILES, CHECKPOINTS_DIR, CONFIG_FILE, POINTER_FILE, TOKENIZER_FILE, current_checkpoint,
)

try:
    import fcntl
except ImportError:  # not POSIX: fall back to the pid check
    fcntl = None

LOCK_FILE = "train.lock"
METRICS_FILE = "metrics.jsonl"


def read_metrics(run: str | Path) -> list[dict]:
    """OUT/metrics.jsonl as records, for every reader: a missing file is [], and a line that is not a
    JSON object (a torn last line after a kill, a stray edit) is skipped, never fatal."""
    path = Path(run) / METRICS_FILE
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return []
    records = []
    for line in lines:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records
TENSORBOARD_DIR = "tensorboard"
# "upcycle" and "teacher": `monoroute upcycle`'s stage-1 folder and converted Hugging Face teacher.
RUN_FILES = {CONFIG_FILE, TOKENIZER_FILE, METRICS_FILE, TENSORBOARD_DIR, CHECKPOINTS_DIR, POINTER_FILE, LOCK_FILE,
             *CHECKPOINT_FILES, "upcycle", "teacher"}


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except (OverflowError, ValueError):
        return False
    return True


def read_owner(text: str) -> dict:
    try:
        owner = json.loads(text)
        return owner if isinstance(owner, dict) else {}
    except json.JSONDecodeError:
        return {}


class RunLock:
    """Exclusive ownership of a run directory for one training process (see the module docstring)."""

    def __init__(self, out: Path) -> None:
        self.out = Path(out)
        self.path = self.out / LOCK_FILE
        self.fd: int | None = None
        self.took_over: dict | None = None  # the stale owner we replaced, if any

    def refuse(self, owner: dict) -> MonorouteError:
        who = f"pid {owner.get('pid', '?')}" + (f" on {owner['host']}" if owner.get("host") else "")
        since = f", since {owner['started']}" if owner.get("started") else ""
        return MonorouteError(
            f"run directory {self.out} is in use by another training ({who}{since}); wait for it to finish or stop "
            f"it, or pick another --out (if no such process exists, delete {self.path})"
        )

    def acquire(self) -> "RunLock":
        try:
            self.out.mkdir(parents=True, exist_ok=True)
            self._acquire()
        except OSError as exc:
            if self.fd is not None:
                self.release()
            raise MonorouteError(f"cannot write into run directory {self.out} ({exc.strerror or exc}); pick a "
                                 f"writable --out") from None
        return self

    def _acquire(self) -> None:
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                locked = self._flock(fd)
            except BaseException:
                os.close(fd)
                raise
            previous = read_owner(os.pread(fd, 1 << 16, 0).decode("utf-8", errors="replace"))
            if not locked:
                os.close(fd)
                raise self.refuse(previous)
            try:  # the previous owner may have unlinked the file between our open and our flock
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        self.fd = fd
        if previous.get("pid") and previous.get("pid") != os.getpid():
            self.took_over = previous
        owner = {"pid": os.getpid(), "host": socket.gethostname(),
                 "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(owner) + "\n").encode(), 0)
        os.fsync(fd)

    def _flock(self, fd: int) -> bool:
        """True if we now hold the lock, False if a live process does."""
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return True
            except BlockingIOError:
                return False
            except OSError as exc:
                if exc.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                    raise
        owner = read_owner(os.pread(fd, 1 << 16, 0).decode("utf-8", errors="replace"))
        pid = owner.get("pid")
        mine = pid == os.getpid() and owner.get("host") == socket.gethostname()
        alive_here = isinstance(pid, int) and owner.get("host") == socket.gethostname() and pid_alive(pid)
        return mine or not alive_here

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            if os.stat(self.path).st_ino == os.fstat(self.fd).st_ino:
                os.unlink(self.path)
        except OSError:
            pass
        os.close(self.fd)  # drops the flock
        self.fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def is_run_temporary(name: str) -> bool:
    """`.config.json.abc123.tmp` and the like: left by an atomic write that a kill interrupted."""
    return name.startswith(".") and name.endswith(".tmp") and any(name.startswith(f".{f}.") for f in RUN_FILES)


def foreign_entries(out: Path) -> list[str]:
    """What is in OUT that a run did not write."""
    return sorted(p.name for p in out.iterdir() if p.name not in RUN_FILES and not is_run_temporary(p.name))


def start_mode(out: Path, resume: bool, overwrite: bool) -> str:
    """How a run may start in OUT: "resume", "new" (empty or missing), "restart" (a run with no
    checkpoint: cleared silently) or "overwrite" (cleared because --overwrite). Raises otherwise."""
    out = Path(out)
    if resume:
        if not (out / CONFIG_FILE).is_file():
            raise MonorouteError(f"nothing to resume in {out}: no {CONFIG_FILE}; check the path or start a new run")
        if current_checkpoint(out) is None and (out / "upcycle").is_dir():
            raise MonorouteError(f"{out} is an upcycle that stopped in stage 1 (the layer-local fit); continue it with "
                                 f"`monoroute upcycle --resume {out}`")
        if current_checkpoint(out) is None:
            raise MonorouteError(
                f"nothing to resume in {out}: the run stopped before its first checkpoint ({POINTER_FILE} is "
                f"missing); start it again with the same --out (it has nothing to lose), or lower --ckpt-every"
            )
        return "resume"
    if not out.exists():
        return "new"
    if not out.is_dir():
        raise MonorouteError(f"--out {out} is a file, not a directory; pick another --out")
    entries = [p for p in out.iterdir() if p.name != LOCK_FILE]
    if not entries:
        return "new"
    if overwrite:
        return "overwrite"
    if not foreign_entries(out) and current_checkpoint(out) is None:
        return "restart"
    raise MonorouteError(f"output directory {out} is not empty; pick a new --out, --resume it, or pass --overwrite")


def clear_run(out: Path) -> None:
    """Delete a previous run's files from OUT (keeping the lock and anything the run did not write)."""
    first = [POINTER_FILE, "train_state.json"]  # the commit points go first: never a pointer to deleted files
    temporaries = sorted(p.name for p in Path(out).iterdir() if is_run_temporary(p.name))
    for name in first + sorted(RUN_FILES - {LOCK_FILE} - set(first)) + temporaries:
        path = Path(out) / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()
