"""Checkpoints: weights in safetensors, everything else in JSON, nothing replaced before its successor is whole.

Run directory layout (see also rundir.py):

OUT/config.json             RunConfig + sizes and FLOPs (written once, before step 1)
OUT/tokenizer.json          the tokenizer the run was trained with
OUT/metrics.jsonl           one JSON object per logged step
OUT/tensorboard/            the same metrics for TensorBoard
OUT/train.lock              present while a training owns OUT: its pid (see rundir.py)
OUT/checkpoint.json         the pointer: step, tokens, the folder of the current checkpoint, and the size
                            and sha256 of every file in it
OUT/checkpoints/step-NNNNNN/model.safetensors        weights and buffers (routed firing statistics included)
                           /train_state.safetensors  optimizer tensors and RNG states
                           /train_state.json         step, tokens, the optimizer's non-tensor state

A save writes a fresh `checkpoints/.step-NNNNNN.*.tmp` folder, fsyncs every file, renames the folder
to `step-NNNNNN`, and only then replaces `checkpoint.json` (write to a temporary file, fsync, rename:
atomic). That rename is the commit point: a kill, an OOM or a full disk at any earlier moment leaves
the pointer on the previous checkpoint, whose files are untouched. The previous step folder is
deleted only after the switch. Loading verifies every file it reads against the pointer's sha256.
Weights that are not finite are never saved (`NonFiniteWeights`).

Runs written before the pointer existed (model.safetensors, train_state.* at the top of OUT) still load.
"""
from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import safetensors.torch as st
import torch
from safetensors import SafetensorError
from torch import nn

from monoroute.errors import MonorouteError
from monoroute.fileio import fsync_path, sha256, write_text_atomic

CONFIG_FILE = "config.json"
TOKENIZER_FILE = "tokenizer.json"
POINTER_FILE = "checkpoint.json"
CHECKPOINTS_DIR = "checkpoints"
MODEL_FILE = "model.safetensors"
STATE_TENSORS_FILE = "train_state.safetensors"
STATE_FILE = "train_state.json"
CHECKPOINT_FILES = (MODEL_FILE, STATE_TENSORS_FILE, STATE_FILE)
POINTER_FORMAT = 1
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def reached(stage: str, step: int) -> None:
    """Called at each stage of a save ("model_written", "files_written", "step_dir_complete",
    "pointer_switched"). Does nothing; fault-injection tests replace it to stall or fail there."""


# ---- files ------------------------------------------------------------------------------------


def write_text(path: Path, text: str) -> None:
    """Run files are written durably: fsynced before and after the rename."""
    write_text_atomic(path, text, durable=True)


def write_json(path: Path, obj) -> None:
    write_text(path, json.dumps(obj, indent=2) + "\n")


def read_json(path: Path, what: str) -> dict:
    if not path.is_file():
        raise MonorouteError(f"{what} {path} is missing; point at a run directory written by `monoroute train`")
    try:
        value = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        reason = exc.msg if isinstance(exc, json.JSONDecodeError) else "not UTF-8"
        raise MonorouteError(f"{what} {path} is corrupt ({reason}); restore it or start a new run") from None
    if not isinstance(value, dict):
        raise MonorouteError(f"{what} {path} is corrupt (not a JSON object); restore it or start a new run")
    return value


def is_disk_full(exc: BaseException) -> bool:
    """OSError(ENOSPC/EDQUOT), or safetensors' wrapping of it ("... (os error 28)")."""
    if isinstance(exc, OSError):
        return exc.errno in DISK_FULL
    text = str(exc)
    return "No space left" in text or "os error 28" in text or "Disk quota exceeded" in text


# ---- nested state <-> flat tensors -----------------------------------------------------------


def split_tensors(obj, tensors: dict, prefix: str = "t"):
    """Replace every tensor in a nested dict/list with a reference; collect the tensors."""
    if isinstance(obj, torch.Tensor):
        key = f"{prefix}{len(tensors)}"
        tensors[key] = obj.detach().cpu().contiguous()
        return {"__tensor__": key}
    if isinstance(obj, dict):
        return {"__dict__": [[split_tensors(k, tensors), split_tensors(v, tensors)] for k, v in obj.items()]}
    if isinstance(obj, (list, tuple)):
        return [split_tensors(v, tensors) for v in obj]
    return obj


def join_tensors(obj, tensors: dict):
    if isinstance(obj, dict) and "__tensor__" in obj:
        return tensors[obj["__tensor__"]]
    if isinstance(obj, dict) and "__dict__" in obj:
        return {join_tensors(k, tensors): join_tensors(v, tensors) for k, v in obj["__dict__"]}
    if isinstance(obj, list):
        return [join_tensors(v, tensors) for v in obj]
    return obj


def rng_state() -> dict:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def non_finite_tensors(named: dict[str, torch.Tensor]) -> list[str]:
    """Names of the floating-point tensors holding a NaN or an infinity."""
    return [name for name, t in named.items()
            if torch.is_floating_point(t) and not bool(torch.isfinite(t).all())]


class NonFiniteWeights(MonorouteError):
    """The weights or optimizer state to save hold NaN/inf: nothing was written."""


# ---- the pointer ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Checkpoint:
    """One complete checkpoint: its folder, step, tokens and each file's expected sha256."""

    folder: Path
    step: int
    tokens: int
    sha: dict[str, str]

    def verified(self, name: str) -> Path:
        """The path of one of its files after checking it against the recorded sha256."""
        path = self.folder / name
        expected = self.sha.get(name)
        if not path.is_file():
            raise MonorouteError(
                f"checkpoint file {path} is missing (the step-{self.step} checkpoint was deleted or moved); "
                f"restore it or start a new run"
            )
        if expected is not None and sha256(path) != expected:
            raise MonorouteError(
                f"checkpoint file {path} does not match its checksum in {POINTER_FILE} (torn write or corruption); "
                f"restore it from a backup or start a new run"
            )
        return path


def step_dir_name(step: int) -> str:
    return f"step-{step:06d}"


def current_checkpoint(out: Path) -> Checkpoint | None:
    """The checkpoint OUT's pointer names (or a pre-pointer run's top-level one); None if there is none."""
    out = Path(out)
    pointer = out / POINTER_FILE
    if pointer.is_file():
        p = read_json(pointer, "checkpoint pointer")
        try:
            ckpt = Checkpoint(out / p["path"], int(p["step"]), int(p["tokens"]), dict(p["sha256"]))
        except (KeyError, TypeError, ValueError):
            raise MonorouteError(f"checkpoint pointer {pointer} is corrupt (missing fields); restore it or start a "
                                 f"new run") from None
        # A pointer is written by this code as checkpoints/step-N; a hand-edited one must not lead out of the run.
        named = os.path.normpath(str(p["path"]))
        if os.path.isabs(named) or named == ".." or named.startswith(".." + os.sep):
            raise MonorouteError(f"checkpoint pointer {pointer} names {p['path']!r}, outside the run directory; "
                                 f"restore the pointer (it must name a folder inside {out}) or start a new run")
        return ckpt
    legacy = out / STATE_FILE
    if legacy.is_file():  # written before checkpoints had their own folders
        state = read_json(legacy, "checkpoint state")
        return Checkpoint(out, int(state.get("step", 0)), int(state.get("tokens", 0)), dict(state.get("sha256", {})))
    return None


def require_checkpoint(out: Path) -> Checkpoint:
    ckpt = current_checkpoint(out)
    if ckpt is None:
        raise MonorouteError(
            f"no checkpoint in {out}: {POINTER_FILE} is missing (the run stopped before its first checkpoint, or "
            f"this is not a run directory); start the run again with the same --out, or point at a finished run"
        )
    return ckpt


# ---- save -------------------------------------------------------------------------------------


def model_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    return dict(model.state_dict())


def save_checkpoint(out: Path, model: nn.Module, optimizer_state: dict, progress: dict) -> Checkpoint:
    """Write weights, optimizer state, RNG and progress (step, tokens, ...) as OUT's new current checkpoint.

    Raises NonFiniteWeights (nothing written) if a weight or optimizer tensor is NaN/inf, and a
    MonorouteError naming the intact previous checkpoint if the disk fills or a write fails."""
    out = Path(out)
    step = int(progress["step"])
    previous = current_checkpoint(out)
    tensors: dict = {}
    skeleton = split_tensors({"optimizer": optimizer_state, "rng": rng_state()}, tensors)
    bad = non_finite_tensors(model_tensors(model)) + non_finite_tensors(tensors)
    if bad:
        raise NonFiniteWeights(f"{len(bad)} tensors hold NaN/inf (e.g. {', '.join(bad[:3])})")
    root = out / CHECKPOINTS_DIR
    root.mkdir(parents=True, exist_ok=True)
    remove_partial_saves(root)
    need = sum(t.numel() * t.element_size() for t in model_tensors(model).values()) + sum(
        t.numel() * t.element_size() for t in tensors.values())
    free = shutil.disk_usage(root).free
    if free < need * 1.05 + (64 << 10):  # safetensors headers and JSON are small
        raise save_failed(out, step, previous, f"it needs about {need / 2**20:.1f} MiB, {free / 2**20:.1f} MiB free",
                          disk_full=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{step_dir_name(step)}.", suffix=".tmp", dir=root))
    final = root / step_dir_name(step)
    try:
        st.save_model(model, str(tmp / MODEL_FILE))
        reached("model_written", step)
        st.save_file(tensors, str(tmp / STATE_TENSORS_FILE))
        (tmp / STATE_FILE).write_text(json.dumps(dict(progress, state=skeleton)) + "\n", encoding="utf-8")
        for name in CHECKPOINT_FILES:
            fsync_path(tmp / name)
        fsync_path(tmp)
        sha = {name: sha256(tmp / name) for name in CHECKPOINT_FILES}
        reached("files_written", step)
        if previous is not None and final.resolve() == previous.folder.resolve():
            raise MonorouteError(f"refusing to overwrite the current checkpoint {final} with another save of step {step}")
        if final.exists():  # left by a run killed after this rename but before its pointer switch
            shutil.rmtree(final)
        os.rename(tmp, final)
        fsync_path(root)
        reached("step_dir_complete", step)
        pointer = {"format": POINTER_FORMAT, "step": step, "tokens": int(progress.get("tokens", 0)),
                   "path": f"{CHECKPOINTS_DIR}/{final.name}", "sha256": sha}
        write_json(out / POINTER_FILE, pointer)
        reached("pointer_switched", step)
    except (OSError, SafetensorError) as exc:
        if final.exists() and current_checkpoint(out) == previous:  # renamed, but the pointer never moved to it
            shutil.rmtree(final, ignore_errors=True)
        raise save_failed(out, step, previous, first_line(exc), disk_full=is_disk_full(exc)) from None
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    prune(out, keep=final)
    return Checkpoint(final, step, pointer["tokens"], sha)


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def describe(out: Path, ckpt: Checkpoint | None) -> str:
    if ckpt is None:
        return "there is no earlier checkpoint"
    return f"the step-{ckpt.step} checkpoint is intact (`monoroute eval {out}` and `monoroute train --resume {out}` use it)"


def save_failed(out: Path, step: int, previous: Checkpoint | None, reason: str, disk_full: bool) -> MonorouteError:
    then = f"`monoroute train --resume {out}`" if previous else "start the run again with the same --out"
    if disk_full:
        return MonorouteError(
            f"disk full while saving the step-{step} checkpoint in {out / CHECKPOINTS_DIR} ({reason}); nothing of it "
            f"was kept and {describe(out, previous)}. Free space on that disk, then {then}"
        )
    return MonorouteError(
        f"could not write the step-{step} checkpoint in {out / CHECKPOINTS_DIR} ({reason}); nothing of it was kept "
        f"and {describe(out, previous)}. Fix the cause, then {then}"
    )


def remove_partial_saves(root: Path) -> None:
    """Delete `.step-*.tmp` folders of saves that never finished (the caller holds the run's lock)."""
    for path in root.glob(".step-*.tmp"):
        shutil.rmtree(path, ignore_errors=True)


def prune(out: Path, keep: Path) -> None:
    """After a pointer switch: delete every other step folder and a pre-pointer run's top-level files."""
    root = out / CHECKPOINTS_DIR
    for path in root.iterdir():
        if path.is_dir() and path.name.startswith("step-") and path != keep:
            shutil.rmtree(path, ignore_errors=True)
    for name in CHECKPOINT_FILES:
        legacy = out / name
        if legacy.is_file():
            legacy.unlink()


# ---- load -------------------------------------------------------------------------------------


def load_weights(out: Path, model: nn.Module) -> Checkpoint:
    """Load the current checkpoint's weights into `model`, after checking the file's sha256."""
    out = Path(out)
    for attempt in range(3):  # a save may delete the folder between reading the pointer and opening it
        ckpt = require_checkpoint(out)
        try:
            path = ckpt.verified(MODEL_FILE)
            break
        except MonorouteError:
            if attempt == 2 or current_checkpoint(out) == ckpt:
                raise
    try:
        missing, unexpected = st.load_model(model, path, strict=False)
    except (SafetensorError, RuntimeError, OSError) as exc:
        raise MonorouteError(f"checkpoint {path} is corrupt ({first_line(exc)}); restore it or start a new run") from None
    if missing or unexpected:
        raise MonorouteError(f"checkpoint {path} does not match the model in {CONFIG_FILE} (missing "
                             f"{sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]}); restore it or start a new run")
    return ckpt


def load_checkpoint(out: Path, model: nn.Module) -> tuple[dict, dict]:
    """Restore model weights and RNG from OUT's current checkpoint; return (optimizer state, progress)."""
    out = Path(out)
    ckpt = require_checkpoint(out)
    for name in CHECKPOINT_FILES:
        ckpt.verified(name)
    load_weights(out, model)
    state = read_json(ckpt.folder / STATE_FILE, "checkpoint state")
    try:
        tensors = st.load_file(ckpt.folder / STATE_TENSORS_FILE)
    except (SafetensorError, OSError) as exc:
        raise MonorouteError(f"checkpoint {ckpt.folder / STATE_TENSORS_FILE} is corrupt ({first_line(exc)}); "
                             f"restore it or start a new run") from None
    restored = join_tensors(state.pop("state"), tensors)
    state.pop("sha256", None)
    set_rng_state(restored["rng"])
    return restored["optimizer"], state
