"""Device choice shared by training, evaluation and the toy lab."""
from __future__ import annotations

import torch

from monoroute.errors import MonorouteError


def device_kind(name: str) -> str:
    """"cuda" or "cpu": what a --device name trains on (no check that CUDA is there; see resolve_device)."""
    return "cuda" if name.startswith("cuda") or (name == "auto" and torch.cuda.is_available()) else "cpu"


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """"auto" (CUDA if visible, else CPU), "cpu", "cuda" or "cuda:N"; a clear error otherwise."""
    if name == "auto":
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise MonorouteError(f"device {name!r} asked for but CUDA is not available; use --device cpu")
    try:
        return torch.device(name)
    except RuntimeError:
        raise MonorouteError(f"unknown device {name!r}; use --device cpu, --device cuda[:N] or --device auto") from None


def available_memory(device: torch.device) -> int | None:
    """Bytes a new allocation may use on `device`: the GPU's free memory, or the CPU's MemAvailable
    (/proc/meminfo); None where it cannot be read."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None

