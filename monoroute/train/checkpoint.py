"""Checkpoints: weights in safetensors, everything else in JSON, every file written atomically.

OUT/config.json             RunConfig + sizes and FLOPs (written once at the start)
OUT/model.safetensors       model weights and buffers (routed firing statistics included)
OUT/train_state.safetensors optimizer tensors and RNG states
OUT/train_state.json        step, tokens, the optimizer's non-tensor state, and a sha256 of both
                            .safetensors files. Written last: it is the commit point, so a crash
                            mid-save is detected on load instead of resuming from a mix.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, load_model, save_file, save_model
from torch import nn

from monoroute.errors import MonorouteError

CONFIG_FILE = "config.json"
MODEL_FILE = "model.safetensors"
STATE_TENSORS_FILE = "train_state.safetensors"
STATE_FILE = "train_state.json"
TOKENIZER_FILE = "tokenizer.json"


def atomic_write(path: Path, write) -> None:
    """Call write(tmp_path), then rename over `path`: readers see the old file or the new one."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def write_json(path: Path, obj) -> None:
    write_text(path, json.dumps(obj, indent=2) + "\n")


def read_json(path: Path, what: str) -> dict:
    if not path.is_file():
        raise MonorouteError(f"{what} {path} is missing; point at a run directory written by `monoroute train`")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise MonorouteError(f"{what} {path} is corrupt ({exc.msg}); restore it or start a new run") from None


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


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


def save_checkpoint(out: Path, model: nn.Module, optimizer_state: dict, progress: dict) -> None:
    """Write weights, optimizer state, RNG and progress (step, tokens, ...) into run directory `out`."""
    tensors: dict = {}
    skeleton = split_tensors({"optimizer": optimizer_state, "rng": rng_state()}, tensors)
    atomic_write(out / MODEL_FILE, lambda tmp: save_model(model, tmp))
    atomic_write(out / STATE_TENSORS_FILE, lambda tmp: save_file(tensors, tmp))
    state = dict(progress, state=skeleton)
    state["sha256"] = {name: sha256(out / name) for name in (MODEL_FILE, STATE_TENSORS_FILE)}
    write_json(out / STATE_FILE, state)


def load_weights(out: Path, model: nn.Module) -> None:
    path = out / MODEL_FILE
    if not path.is_file():
        raise MonorouteError(f"checkpoint {path} is missing; point at a run directory written by `monoroute train`")
    try:
        missing, unexpected = load_model(model, path, strict=False)
    except (SafetensorError, RuntimeError, OSError) as exc:
        raise MonorouteError(f"checkpoint {path} is corrupt ({str(exc).splitlines()[0]}); restore it or start a new run") from None
    if missing or unexpected:
        raise MonorouteError(f"checkpoint {path} does not match the model in config.json "
                             f"(missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]}); restore it or start a new run")


def load_checkpoint(out: Path, model: nn.Module) -> tuple[dict, dict]:
    """Restore model weights and RNG from `out`; return (optimizer state dict, progress dict)."""
    state = read_json(out / STATE_FILE, "checkpoint state")
    for name, digest in state.get("sha256", {}).items():
        if not (out / name).is_file() or sha256(out / name) != digest:
            raise MonorouteError(
                f"checkpoint file {out / name} is missing or does not match {STATE_FILE} (interrupted save or "
                f"corruption); restore it or start a new run"
            )
    load_weights(out, model)
    try:
        tensors = load_file(out / STATE_TENSORS_FILE)
    except (SafetensorError, OSError) as exc:
        raise MonorouteError(f"checkpoint {out / STATE_TENSORS_FILE} is corrupt ({exc}); restore it or start a new run") from None
    restored = join_tensors(state.pop("state"), tensors)
    set_rng_state(restored["rng"])
    return restored["optimizer"], state
