"""monoroute: transformers with massively wide, extremely sparse routed FFN layers."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from monoroute.errors import MonorouteError
from monoroute.hooks import HookPoint, SparseActivations
from monoroute.layers import RoutedFFN
from monoroute.models import GPT, GPTConfig

if TYPE_CHECKING:
    from monoroute.train.trainer import LoadedRun

__all__ = ["GPT", "GPTConfig", "HookPoint", "MonorouteError", "RoutedFFN", "SparseActivations", "load"]
__version__ = "0.1.0"


def load(run: str | Path, device: str = "cpu") -> "LoadedRun":
    """Load a run directory written by `monoroute train`.

    Returns a `LoadedRun` named tuple: `.model` (GPT in eval mode on `device`), `.tokenizer`,
    `.config` (RunConfig), `.run_dir` (Path) and `.step` (the checkpoint's step). The checkpoint is
    the one OUT/checkpoint.json names, checked against its sha256; a missing or corrupt run raises
    MonorouteError with one line naming the problem.

        run = monoroute.load("runs/tiny")
        ids = torch.tensor([run.tokenizer.encode("def ")])
        logits, _ = run.model(ids)
    """
    from monoroute.train.trainer import load as load_run_dir

    return load_run_dir(run, device)
