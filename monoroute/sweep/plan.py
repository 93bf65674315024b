"""What the sweep will do with each run, decided before anything trains.

Every run is checked the way `monoroute train` would check it at its own start (training settings,
device, data, model construction), so a typo in the last run cannot fail an hour into the sweep.
Then each run directory OUT/NAME is compared with the spec:

    missing / empty / no checkpoint yet        -> "train"  (from scratch)
    same config, checkpoint below the steps    -> "resume" (`monoroute train --resume` semantics)
    same config, checkpoint at the steps       -> "skip"   (evaluation and analysis reused when current)
    different config, or not a monoroute run   -> refused: never mix two configs under one name
"""
from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

from monoroute.errors import MonorouteError
from monoroute.sweep.spec import SweepRun, SweepSpec
from monoroute.train.checkpoint import CONFIG_FILE, current_checkpoint
from monoroute.train.config import RunConfig
from monoroute.train.rundir import LOCK_FILE, start_mode


@dataclass
class Planned:
    run: SweepRun
    config: RunConfig  # what trains: the spec's config with the data's vocabulary (the saved one on resume)
    action: str  # "train" | "resume" | "skip"
    step: int  # the run directory's checkpoint step now (0: none)
    sizes: dict  # params, active_params, flops_per_token of the model the config builds


def check_runs(spec: SweepSpec) -> dict[str, tuple[RunConfig, dict]]:
    """name -> (config with the data's vocab size, model sizes). Prepares each distinct corpus once
    (the token cache training reuses) and builds each model once, on the CPU, to surface its errors."""
    import torch

    from monoroute.data import prepare_data
    from monoroute.devices import resolve_device
    from monoroute.models import GPT
    from monoroute.train.trainer import check_settings, check_splits

    stores: dict[str, object] = {}
    sizes: dict[str, dict] = {}
    checked = {}
    for run in spec.runs:
        cfg = run.config
        try:
            check_settings(cfg, resolve_device(cfg.train.device), None)
            key = json.dumps(cfg.to_dict()["data"], sort_keys=True)
            if key not in stores:
                stores[key] = prepare_data(cfg.data)
            store = stores[key]
            cfg = replace(cfg, model=replace(cfg.model, vocab_size=store.vocab_size))
            check_splits(store, cfg)
            if run.analyze and spec.analyze_tokens < cfg.model.block_size:
                raise MonorouteError(f"analyze_tokens {spec.analyze_tokens} is less than one context window "
                                     f"({cfg.model.block_size}); raise --analyze-tokens")
            model_key = json.dumps(cfg.to_dict()["model"], sort_keys=True)
            if model_key not in sizes:
                with torch.random.fork_rng(devices=[]):  # building must not move the caller's RNG
                    model = GPT(cfg.model)
                sizes[model_key] = {"params": model.n_params(), "active_params": model.n_active_params(),
                                    "flops_per_token": model.flops_per_token()["total"]}
                del model
        except MonorouteError as exc:
            raise MonorouteError(f"sweep spec {spec.path}: run {run.name!r}: {exc}") from None
        checked[run.name] = (cfg, sizes[model_key])
    return checked


def config_differences(saved: RunConfig, wanted: RunConfig) -> list[str]:
    """'d_ff is 64 there, 32 in the spec' for every field that differs (the label `preset` and `out` aside)."""
    diffs = []
    a, b = saved.to_dict(), wanted.to_dict()
    for section in ("model", "data", "train"):
        for key in sorted(set(a[section]) | set(b[section])):
            if a[section].get(key) != b[section].get(key):
                diffs.append(f"{key} is {a[section].get(key)!r} there, {b[section].get(key)!r} in the spec")
    return diffs


def inspect_run_dir(run: SweepRun, cfg: RunConfig) -> tuple[str, int, RunConfig]:
    """(action, checkpoint step, config to train) for OUT/NAME, or a refusal."""
    from monoroute.train.trainer import read_run_config

    out = Path(cfg.out)
    here = f"run {run.name!r}: {out}"
    fix = f"delete or move {out}, or give the run another name in the spec"
    if not out.exists():
        return "train", 0, cfg
    if not out.is_dir():
        raise MonorouteError(f"{here} is a file, not a run directory; {fix}")
    if not [p for p in out.iterdir() if p.name != LOCK_FILE]:
        return "train", 0, cfg
    if not (out / CONFIG_FILE).is_file():
        try:
            start_mode(out, resume=False, overwrite=False)  # only a run's own files, none of them a checkpoint
        except MonorouteError:
            raise MonorouteError(f"{here} is not empty and holds no monoroute run ({CONFIG_FILE} is missing); "
                                 f"{fix}") from None
        return "train", 0, cfg
    try:
        saved = read_run_config(out)
    except MonorouteError as exc:
        raise MonorouteError(f"{here}: {exc}") from None
    diffs = config_differences(saved, cfg)
    if diffs:
        more = f" (and {len(diffs) - 3} more)" if len(diffs) > 3 else ""
        raise MonorouteError(f"{here} holds a run with a different config ({'; '.join(diffs[:3])}{more}); "
                             f"a sweep never mixes two configs under one name: {fix}")
    ckpt = current_checkpoint(out)
    if ckpt is None:
        try:
            start_mode(out, resume=False, overwrite=False)  # stopped before its first checkpoint: restartable
        except MonorouteError:
            raise MonorouteError(f"{here} has no checkpoint but holds files a run did not write; {fix}") from None
        return "train", 0, cfg
    saved = replace(saved, out=str(out))  # exactly what `monoroute train --resume OUT` trains
    if ckpt.step == cfg.train.steps:
        return "skip", ckpt.step, saved
    if ckpt.step < cfg.train.steps:
        return "resume", ckpt.step, saved
    raise MonorouteError(f"{here} holds a checkpoint at step {ckpt.step}, past the spec's {cfg.train.steps} steps; "
                         f"{fix}")


def plan(spec: SweepSpec, checked: dict[str, tuple[RunConfig, dict]]) -> list[Planned]:
    planned = []
    for run in spec.runs:
        cfg, sizes = checked[run.name]
        action, step, train_cfg = inspect_run_dir(run, cfg)
        planned.append(Planned(run, train_cfg, action, step, sizes))
    return planned
