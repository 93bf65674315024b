"""A sweep spec: one base config and named runs of overrides, every run's config built (and so
checked) before anything trains.

    preset: cpu-small                 # required: the base preset
    set: {steps: 600, data: stdlib}   # optional: base overrides, flat keys exactly as `--set` takes them
    analyze_tokens: 200000            # optional: positions `analyze` scores (--analyze-tokens wins)
    analyze_options: {dashboards: 8}  # optional: interventions, dashboards, baseline_tokens (as `analyze` takes them)
    runs:                             # a mapping name -> overrides, or a list of mappings with `name:`
      dense-256: {ffn: dense, d_ff: 256}
      dense-512: {ffn: dense, d_ff: 512, sae: true}   # sae: also train the post-hoc SAE in analyze
      routed:                          # nothing (or {}): the base config as it is
      routed-l1: {l1_coef: 0.001}
      routed-fast: {k: 16, analyze: false}            # analyze: false: train and evaluate only

Per run, besides config keys: `analyze` (default true), `sae` (default false; needs a dense FFN at
the analysed layer, n_layer // 2) and `preset` (a different base preset for this run).
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from monoroute.errors import MonorouteError
from monoroute.train.config import RunConfig, build_run_config, flatten_overrides, load_config_file

SPEC_KEYS = ("preset", "set", "runs", "analyze_tokens", "analyze_options")
# `analyze` settings a spec may change; the rest keep analyze's defaults so every run is scored alike.
# interventions / dashboards only shape report.html (0 skips them), baseline_tokens sizes the SAE.
ANALYZE_OPTIONS = {"interventions": 0, "dashboards": 0, "baseline_tokens": 1}  # name -> smallest value
RUN_FLAGS = ("analyze", "sae", "preset")  # per-run settings that are not config keys
DEFAULT_ANALYZE_TOKENS = 100_000
# A run's name is its folder in the sweep directory: portable characters only, and none of the
# sweep's own output names (compared case-insensitively, for case-insensitive filesystems).
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
RESERVED = ("sweep.json", "sweep.csv", "sweep.lock", "loss_vs_flops.png", "coverage_vs_loss.png")


@dataclass
class SweepRun:
    name: str
    preset: str
    overrides: dict  # flat key -> value: the base `set:` with the run's own on top (what the spec sets)
    config: RunConfig  # out = DIR/NAME
    analyze: bool = True
    sae: bool = False


@dataclass
class SweepSpec:
    path: str
    preset: str
    base: dict  # flat `set:` overrides
    runs: list[SweepRun]
    analyze_tokens: int
    analyze_options: dict  # AnalyzeOptions fields from ANALYZE_OPTIONS
    raw: dict  # the spec as written, recorded in sweep.json

    def run(self, name: str) -> SweepRun:
        return next(r for r in self.runs if r.name == name)


def load_spec(path: str | Path, out: str | Path, analyze_tokens: int | None = None) -> SweepSpec:
    """Parse and check a spec file; each run's config points at OUT/NAME. Raises MonorouteError
    (one line naming the spec, the run and the fix) on any problem; writes nothing."""
    raw = load_config_file(str(path), what="sweep spec")
    return build_spec(raw, str(path), Path(out), analyze_tokens)


def build_spec(raw: dict, path: str, out: Path, analyze_tokens: int | None = None) -> SweepSpec:
    where = f"sweep spec {path}"
    try:  # the spec is copied into sweep.json after every run: a date or other non-JSON value must fail now
        json.dumps(raw)
    except (TypeError, ValueError) as exc:
        raise MonorouteError(f"{where}: holds a value JSON cannot store ({exc}); use numbers, strings, true/false, "
                             f"lists and mappings") from None
    unknown = sorted(set(raw) - set(SPEC_KEYS))
    if unknown:
        raise MonorouteError(f"{where}: unknown top-level key(s) {', '.join(map(str, unknown))}; valid: "
                             f"{', '.join(SPEC_KEYS)} (config keys go under set: or under a run)")
    preset = raw.get("preset")
    if not isinstance(preset, str):
        raise MonorouteError(f"{where}: needs a base preset, e.g. `preset: cpu-small`")
    base = raw.get("set") or {}
    if not isinstance(base, dict):
        raise MonorouteError(f"{where}: set: must be a mapping of config keys to values, got {type(base).__name__}")
    base = flat(base, f"{where}: set:")
    for key in ("out", "preset"):
        if key in base:
            raise MonorouteError(f"{where}: set: may not hold {key!r} ("
                                 + ("each run goes to DIR/NAME; pass --out DIR" if key == "out"
                                    else "give the base preset at the top level") + ")")
    tokens = analyze_tokens if analyze_tokens is not None else raw.get("analyze_tokens", DEFAULT_ANALYZE_TOKENS)
    if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 1:
        raise MonorouteError(f"{where}: analyze_tokens (--analyze-tokens) must be a whole number >= 1, got {tokens!r}")
    options = raw.get("analyze_options") or {}
    if not isinstance(options, dict):
        raise MonorouteError(f"{where}: analyze_options: must be a mapping, e.g. `analyze_options: {{dashboards: 0}}`")
    for key, value in options.items():
        if key not in ANALYZE_OPTIONS:
            raise MonorouteError(f"{where}: unknown analyze_options key {key!r}; valid: {', '.join(ANALYZE_OPTIONS)}")
        if isinstance(value, bool) or not isinstance(value, int) or value < ANALYZE_OPTIONS[key]:
            raise MonorouteError(f"{where}: analyze_options {key} must be a whole number >= {ANALYZE_OPTIONS[key]}, "
                                 f"got {value!r}")
    runs = [build_run(name, body, preset, base, out, where) for name, body in named_runs(raw.get("runs"), where)]
    return SweepSpec(path, preset, base, runs, tokens, dict(options), raw)


def named_runs(runs, where: str) -> list[tuple[str, dict]]:
    """(name, overrides) in spec order, from `runs:` as a mapping or as a list of mappings with `name:`."""
    if isinstance(runs, dict):
        pairs = [(name, {} if body is None else body) for name, body in runs.items()]
        for name, body in pairs:
            if isinstance(body, dict) and "name" in body:
                raise MonorouteError(f"{where}: run {name!r}: `name:` is given by the mapping key; remove it")
    elif isinstance(runs, list):
        pairs = []
        for i, body in enumerate(runs):
            if not isinstance(body, dict) or not isinstance(body.get("name"), str):
                raise MonorouteError(f"{where}: runs entry {i + 1} must be a mapping with a name, e.g. "
                                     f"`- {{name: dense-256, ffn: dense, d_ff: 256}}`, got {body!r}")
            body = dict(body)
            pairs.append((body.pop("name"), body))
    elif runs is None:
        pairs = []
    else:
        raise MonorouteError(f"{where}: runs: must be a mapping of run names to overrides (or a list of them), "
                             f"got {type(runs).__name__}")
    if not pairs:
        raise MonorouteError(f"{where}: no runs; add at least one under runs:, e.g. `runs: {{dense: {{ffn: dense}}}}`")
    seen: dict[str, str] = {}
    for name, body in pairs:
        if not isinstance(name, str) or not NAME.fullmatch(name) or name.lower() in RESERVED:
            raise MonorouteError(f"{where}: run name {name!r} cannot be a folder name; use letters, digits, '.', "
                                 f"'_' and '-' (at most 64, not starting with a symbol, not one of "
                                 f"{', '.join(RESERVED)})")
        if name.lower() in seen:
            raise MonorouteError(f"{where}: run name {name!r} is used twice (as {seen[name.lower()]!r} before); "
                                 f"give each run its own name")
        seen[name.lower()] = name
        if not isinstance(body, dict):
            raise MonorouteError(f"{where}: run {name!r} must be a mapping of config keys to values (e.g. "
                                 f"`{name}: {{ffn: dense, d_ff: 256}}`), got {type(body).__name__} {body!r}")
    return pairs


def build_run(name: str, body: dict, preset: str, base: dict, out: Path, where: str) -> SweepRun:
    here = f"{where}: run {name!r}"
    body = dict(body)
    flags = {key: body.pop(key) for key in RUN_FLAGS if key in body}
    for key in ("analyze", "sae"):
        if key in flags and not isinstance(flags[key], bool):
            raise MonorouteError(f"{here}: {key} must be true or false, got {flags[key]!r}")
    run_preset = flags.get("preset", preset)
    overrides = dict(base)
    overrides.update(flat(body, here))
    if "out" in overrides:
        raise MonorouteError(f"{here}: may not set 'out' (the run goes to {out / name}); pass --out DIR for the sweep")
    try:
        config = build_run_config(run_preset, {**overrides, "out": str(out / name)})
        config.train.check()
        config.data.check()
        kinds = config.model.ffn_kinds()
    except MonorouteError as exc:
        raise MonorouteError(f"{here}: {exc}") from None
    except TypeError as exc:  # a section given a value of the wrong shape
        raise MonorouteError(f"{here}: {exc}") from None
    analyze, sae = flags.get("analyze", True), flags.get("sae", False)
    if sae and not analyze:
        raise MonorouteError(f"{here}: sae: true trains the SAE inside analyze; drop analyze: false or sae: true")
    layer = config.model.n_layer // 2
    if sae and kinds[layer] != "dense":
        raise MonorouteError(f"{here}: sae: true needs a dense FFN at the analysed layer {layer}, but it is routed; "
                             f"put sae: true on a dense run (ffn: dense)")
    return SweepRun(name, run_preset, overrides, config, analyze, sae)


def flat(values: dict, where: str) -> dict:
    """Flat key -> value, with model/data/train sections unpacked (as `train --config` accepts them)."""
    try:
        pairs = flatten_overrides(values)
    except MonorouteError as exc:
        raise MonorouteError(f"{where}: {exc}") from None
    out = {}
    for key, value in pairs:
        if not isinstance(key, str):
            raise MonorouteError(f"{where}: config keys must be names, got {key!r}")
        out[key] = value
    return out
