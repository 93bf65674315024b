"""Run configuration: model + data + training settings, presets, flag and file overrides.

A run is fully described by `RunConfig`, saved as OUT/config.json, so `--resume` and
`monoroute eval` rebuild the same model and data pipeline from it.
"""
from __future__ import annotations

import json
import math
import os
import tomllib
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import yaml

from monoroute.data import DataConfig
from monoroute.errors import MonorouteError
from monoroute.models.config import UPCYCLE_ROUTING, GPTConfig, check_keys


@dataclass
class TrainConfig:
    steps: int = 1000  # length of the LR schedule and the step the run trains to
    batch_size: int = 16
    grad_accum: int = 1
    lr: float = 3e-3
    min_lr: float = 3e-4
    warmup: int = 50
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    sparse_rows: bool = False  # lazy row-wise AdamW for the routed unit tables
    # Learning rate of the routed unit tables (w_in, b_in, w_out) relative to `lr`: each row is
    # selected for only a few tokens per step, so memory-layer work trains such tables faster.
    table_lr_mult: float = 1.0
    # The unit tables' own gradient clipping (their joint L2 norm; 0: clipped together with the rest by
    # grad_clip, as before). Memory layers clip their values apart from the trunk (Meta, 2024).
    table_grad_clip: float = 0.0
    # The product-key router's query, sub-keys and scale: learning rate relative to `lr`, and a linear
    # warmup of their own (steps, on top of `warmup`): cosine scores make the query's scale irrelevant,
    # so its effective step is lr / |W_q| and the references train it slowly (Meta's memory layers).
    router_lr_mult: float = 1.0
    router_warmup: int = 0
    parallel: str = "ddp"  # under torchrun: "ddp" (replicate) or "fsdp" (FSDP2, unit tables column-sharded)
    eval_every: int = 100
    eval_batches: int = 20
    log_every: int = 10
    # Early dynamics: up to this step, also log every 5 steps, with the routers' search diagnostics
    # (units proposed per batch, distinct sub-key rows per token, the query's shared component; 0: off).
    dense_log_until: int = 200
    ckpt_every: int = 200
    seed: int = 1337  # initialisation (and every other random choice but the data order)
    data_seed: int | None = None  # the order of training windows; None: `seed`
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: str = "auto"  # auto (bf16 autocast where supported) | float32 | bfloat16
    # Distillation (stage 2 of `monoroute upcycle`): loss = cross-entropy + kl_coef · T² · KL(teacher ‖ model)
    # at temperature T = kl_temperature, against the frozen run in `teacher` (a dense run directory), whose
    # current weights must still have `teacher_sha256` (so a resumed run cannot silently change teacher).
    teacher: str | None = None
    teacher_sha256: str | None = None
    kl_coef: float = 0.0
    kl_temperature: float = 1.0
    # Dense-to-sparse schedules (routed models trained from scratch):
    # dense_fraction F: train a dense model (d_ff wide) for the first F·steps steps, then upcycle it in place:
    # fit_steps batches of layer-local fitting (train/layerwise.py, counted as training steps and tokens),
    # then routed for the rest. Total steps and tokens equal a plain run's.
    dense_fraction: float = 0.0
    fit_steps: int = 50
    fit_lr: float = 2e-3
    fit_init: str = "random"  # layerwise.INITS
    # k schedule: start every routed layer at k_start and shrink k geometrically to the model's k over the
    # first k_decay of the steps (None: a fixed k).
    k_start: int | None = None
    k_decay: float = 0.5

    POSITIVE = ("steps", "batch_size", "grad_accum", "eval_every", "eval_batches", "log_every", "ckpt_every",
                "fit_steps")

    def check(self) -> "TrainConfig":
        """One clear error for a value that would crash or silently misbehave later (a zero step
        interval, an empty batch, a negative or non-finite learning rate, ...)."""
        for name in self.POSITIVE:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise MonorouteError(f"{name} (--{name.replace('_', '-')}) must be a whole number >= 1, got {value!r}")
        if isinstance(self.warmup, bool) or not isinstance(self.warmup, int) or self.warmup < 0:
            raise MonorouteError(f"warmup (--warmup) must be a whole number >= 0, got {self.warmup!r}")
        for name in ("seed", "data_seed"):
            value = getattr(self, name)
            if name == "data_seed" and value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2 ** 63:
                raise MonorouteError(f"{name} (--{name.replace('_', '-')}) must be a whole number from 0 to 2**63 - 1, "
                                     f"got {value!r}")
        if isinstance(self.dense_log_until, bool) or not isinstance(self.dense_log_until, int) or \
                self.dense_log_until < 0:
            raise MonorouteError(f"dense_log_until must be a whole number of steps >= 0, got {self.dense_log_until!r}")
        if isinstance(self.router_warmup, bool) or not isinstance(self.router_warmup, int) or self.router_warmup < 0:
            raise MonorouteError(f"router_warmup must be a whole number of steps >= 0, got {self.router_warmup!r}")
        for name, low, strict in (("lr", 0.0, True), ("min_lr", 0.0, False), ("weight_decay", 0.0, False),
                                  ("grad_clip", 0.0, False), ("table_lr_mult", 0.0, True),
                                  ("table_grad_clip", 0.0, False), ("router_lr_mult", 0.0, True)):
            value = getattr(self, name)
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and (
                value > low if strict else value >= low)
            if not ok:
                raise MonorouteError(f"{name} (--{name.replace('_', '-')}) must be a finite number "
                                     f"{'>' if strict else '>='} {low:g}, got {value!r}")
        for name, low in (("kl_coef", 0.0), ("kl_temperature", 1e-9), ("fit_lr", 1e-12)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < low:
                raise MonorouteError(f"{name} (--{name.replace('_', '-')}) must be a finite number >= {low:g}, "
                                     f"got {value!r}")
        if self.min_lr > self.lr:
            raise MonorouteError(f"min_lr (--min-lr {self.min_lr:g}) is above lr (--lr {self.lr:g}); the schedule decays "
                                 f"from lr to min_lr: lower --min-lr")
        if self.warmup > self.steps:
            raise MonorouteError(f"warmup (--warmup {self.warmup}) is longer than the run (--steps {self.steps}): the "
                                 f"learning rate would never reach lr; lower --warmup or raise --steps")
        if self.kl_coef > 0 and not self.teacher:
            raise MonorouteError("kl_coef > 0 needs a teacher run (teacher=DIR); `monoroute upcycle` sets both")
        if isinstance(self.dense_fraction, bool) or not isinstance(self.dense_fraction, (int, float)) or \
                not 0 <= self.dense_fraction < 1:
            raise MonorouteError(f"dense_fraction must be in [0, 1), got {self.dense_fraction!r}; e.g. 0.5")
        from monoroute.train.layerwise import INITS

        if self.fit_init not in INITS:
            raise MonorouteError(f"unknown fit_init {self.fit_init!r}; choose one of {', '.join(INITS)}")
        if self.dense_fraction > 0 and switch_step(self) + self.fit_steps >= self.steps:
            raise MonorouteError(f"dense_fraction={self.dense_fraction} with fit_steps={self.fit_steps} leaves no "
                                 f"routed steps of {self.steps}; lower dense_fraction or fit_steps")
        if self.k_start is not None and (isinstance(self.k_start, bool) or not isinstance(self.k_start, int)
                                         or self.k_start < 1):
            raise MonorouteError(f"k_start must be a whole number >= 1 (or unset), got {self.k_start!r}")
        if isinstance(self.k_decay, bool) or not isinstance(self.k_decay, (int, float)) or not 0 < self.k_decay <= 1:
            raise MonorouteError(f"k_decay must be in (0, 1], got {self.k_decay!r}; e.g. 0.5")
        if self.k_start is not None and self.dense_fraction > 0:
            # The k schedule counts from step 0 while the dense phase runs, the in-place fit uses the final
            # k and the routed phase would then start at a larger k (or, with dense_fraction >= k_decay,
            # the schedule would do nothing): no defined meaning, so refused.
            raise MonorouteError("k_start (the k schedule) and dense_fraction cannot be combined: the schedule would "
                                 "run during the dense phase; use one of them")
        for name in ("beta1", "beta2"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
                raise MonorouteError(f"{name} must be in [0, 1), got {value!r}")
        return self


def data_seed(tc: TrainConfig) -> int:
    """The seed of the training windows' order: `data_seed`, or `seed` when unset."""
    return tc.seed if tc.data_seed is None else tc.data_seed


def switch_step(tc: TrainConfig) -> int | None:
    """The step at which a dense_fraction run stops training dense (None: no dense phase)."""
    return None if tc.dense_fraction <= 0 else max(1, round(tc.dense_fraction * tc.steps))


def k_at(step: int, tc: TrainConfig, k: int, multiple: int = 1) -> int:
    """The k schedule: k_start at step 0, geometric decay to k at k_decay·steps, k after (rounded to `multiple`)."""
    if tc.k_start is None or tc.k_start == k:
        return k
    end = max(1, round(tc.k_decay * tc.steps))
    if step >= end:
        return k
    value = tc.k_start * (k / tc.k_start) ** (step / end)
    return max(multiple, int(round(value / multiple)) * multiple)


@dataclass
class RunConfig:
    preset: str = "tiny"
    out: str = "runs/tiny"
    model: GPTConfig = field(default_factory=GPTConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "RunConfig":
        check_keys(cls, values, "run config")
        return cls(
            preset=values.get("preset", "custom"),
            out=values.get("out", ""),
            model=GPTConfig.from_dict(values.get("model", {})),
            data=DataConfig(**check_keys(DataConfig, values.get("data", {}), "data config")),
            train=TrainConfig(**check_keys(TrainConfig, values.get("train", {}), "train config")),
        )


SECTIONS = {"model": GPTConfig, "data": DataConfig, "train": TrainConfig}
ALIASES = {"data": ("data", "source")}  # --data PATH sets data.source

PRESETS: dict[str, dict] = {
    # CI: seconds. Product-key routing over 256 units.
    "tiny": {
        "model": dict(n_layer=2, n_head=2, d_model=32, block_size=64, ffn="routed", n_units=256, k=8, dead_window=20_000),
        "train": dict(steps=30, batch_size=8, warmup=5, eval_every=10, eval_batches=2, log_every=5, ckpt_every=10),
    },
    # A few minutes on 2 CPU cores: routed N=16384, k=32 (compare with --ffn dense: d_ff 512).
    # dense_beside=48: a slim dense FFN beside each routed layer (the hybrid of UltraMemV2 / memory layers),
    # 0.74x dense 4d's FLOPs/token with the re-ranking router; the best design of issue 29's sweep
    # (docs/routing.md). It applies to routed layers only: --ffn dense trains plain dense 4d.
    "cpu-small": {
        "model": dict(n_layer=4, n_head=4, d_model=128, block_size=128, ffn="routed", n_units=16384, k=32, d_ff=512,
                      dense_beside=48),
        "train": dict(steps=600, batch_size=16, warmup=30, eval_every=100, eval_batches=20, log_every=10, ckpt_every=200),
    },
    # The cpu-small model trained on ~3.5x the tokens (2100 steps, same batch): with N=16384 and k=32 each
    # unit table row is updated only a few times per step, so 600 steps may stop before the units settle.
    # About 3.5x cpu-small's time (~9 min routed on 2 cores).
    "cpu-long": {
        "model": dict(n_layer=4, n_head=4, d_model=128, block_size=128, ffn="routed", n_units=16384, k=32, d_ff=512, dense_beside=48),
        "train": dict(steps=2100, batch_size=16, warmup=100, eval_every=300, eval_batches=20, log_every=10,
                      ckpt_every=300),
    },
    # The synthetic-knowledge corpus (data/facts.py, docs/facts.md): d 64, 2 layers, the binding corpus
    # (scheme 1) with 25 people seen ~700 times each in 8.2M tokens, sized by measurement so that dense 4·d
    # recalls them all (1.00; 0.70 at 50 people, 0.22 at 100). Routed N=16384, k=32 (re-rank default: 0.92x
    # the FLOPs of dense d_ff 256); ~4.5 min dense, ~27 min routed on one core. The capacity curve varies
    # people (and exposures, at equal tokens).
    "facts": {
        "model": dict(n_layer=2, n_head=2, d_model=64, block_size=128, ffn="routed", n_units=16384, k=32, d_ff=256),
        "data": dict(source="facts:people=25,exposures=700,scheme=1"),
        "train": dict(steps=2000, batch_size=32, warmup=30, eval_every=500, eval_batches=20, log_every=10,
                      ckpt_every=1000),
    },
    # GPT-2 small shape for GPUs. 32761 = 181^2 is the perfect square nearest 32768 (product keys need one).
    "gpt2-small": {
        "model": dict(n_layer=12, n_head=12, d_model=768, block_size=1024, ffn="routed", n_units=32761, k=32, d_ff=3072,
                      dead_window=10_000_000),
        "data": dict(tokenizer="bpe", bpe_vocab_size=16384),
        "train": dict(steps=20000, batch_size=32, grad_accum=4, lr=6e-4, min_lr=6e-5, warmup=1000,
                      eval_every=500, eval_batches=50, log_every=20, ckpt_every=1000),
    },
}


def field_owner(key: str) -> tuple[str, str]:
    """Which section a flat key ("n_units", "steps", "data") belongs to, and its field name there."""
    if key in ALIASES:
        return ALIASES[key]
    for section, cls in SECTIONS.items():
        if key in {f.name for f in fields(cls)}:
            return section, key
    valid = sorted({f.name for cls in SECTIONS.values() for f in fields(cls)} | set(ALIASES) | {"out", "preset"})
    raise MonorouteError(f"unknown config key {key!r}; valid keys: {', '.join(valid)}")


def build_run_config(preset: str = "tiny", overrides: dict | None = None) -> RunConfig:
    """A preset with flat (`n_units`) or nested (`{"model": {...}}`) overrides applied."""
    if preset not in PRESETS:
        raise MonorouteError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    base = PRESETS[preset]
    sections = {name: dict(base.get(name, {})) for name in SECTIONS}
    top = {"preset": preset, "out": f"runs/{preset}"}
    given = set()
    for key, value in flatten_overrides(overrides or {}):
        if key in top:
            top[key] = value
            continue
        section, name = field_owner(key)
        sections[section][name] = value
        given.add(name)
    cfg = RunConfig(
        preset=top["preset"],
        out=top["out"],
        model=GPTConfig.from_dict(sections["model"]).validate(),
        data=DataConfig(**sections["data"]),
        train=TrainConfig(**sections["train"]),
    )
    preset_train = base.get("train", {})
    fit_schedule(cfg.train, given, preset_train.get("lr", TrainConfig.lr), preset_train.get("min_lr", TrainConfig.min_lr))
    if not given & {"sparse_rows", "sparse_grad"} and row_sparse_by_default(cfg):
        cfg.model.sparse_grad = cfg.train.sparse_rows = True
    if cfg.train.dense_fraction > 0:
        # The in-place upcycle is `upcycle`'s fit inside one run: the design it was measured with, unless set.
        for key, value in {**UPCYCLE_ROUTING, "out_bias": True}.items():  # out_bias: the dense output mean
            if key not in given:
                setattr(cfg.model, key, value)
    return cfg


def fit_schedule(tc: TrainConfig, given: set, default_lr: float, default_min_lr: float) -> None:
    """A default schedule fitted to what was asked: its warmup never longer than a shorter run, its
    min_lr kept at the default ratio below a lower lr. Values given explicitly are left for
    TrainConfig.check, which refuses a contradiction (min_lr above lr, warmup longer than the run)."""
    if "warmup" not in given and tc.warmup > tc.steps:
        tc.warmup = tc.steps
    if "min_lr" not in given and tc.min_lr > tc.lr:
        tc.min_lr = tc.lr * default_min_lr / default_lr


def row_sparse_by_default(cfg: RunConfig) -> bool:
    """Row-sparse gradients + lazy AdamW for the unit tables unless asked otherwise, where measured
    better: routed layers, trained on the CPU, in one process (DDP cannot all-reduce sparse gradients
    and FSDP shards the tables by column, which the row-sparse optimizer does not support). Both frontier sweeps have it 0.03 nats better at equal
    tokens (cpu-small 2.045 vs 2.075, cpu-long 1.596 vs 1.630) and `bench train` not slower; on GPUs
    it is unmeasured, so dense AdamW stays the default there. The resolved value is saved in config.json."""
    from monoroute.devices import device_kind

    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1  # under torchrun: DDP cannot reduce sparse gradients
    return ("routed" in cfg.model.ffn_kinds() and device_kind(cfg.train.device) == "cpu" and not distributed
            and cfg.train.parallel != "fsdp")


def flatten_overrides(overrides: dict) -> list[tuple[str, object]]:
    flat = []
    for key, value in overrides.items():
        if key in SECTIONS and isinstance(value, dict):
            cls = SECTIONS[key]
            check_keys(cls, value, f"{key} config")
            flat.extend(value.items())
        else:
            flat.append((key, value))
    return flat


class DuplicateKey(ValueError):
    def __init__(self, key, line: int | None = None) -> None:
        at = f" (line {line})" if line else ""
        super().__init__(f"key {key!r} appears twice in one mapping{at}; keep one (names must be unique)")


class UniqueKeyLoader(yaml.SafeLoader):
    """safe_load that refuses a key given twice in one mapping: plain YAML keeps the last one, so a
    repeated key (or run name) would silently drop the first."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, (str, int, float, bool)) and key in seen:
                raise DuplicateKey(key, key_node.start_mark.line + 1)
            seen.add(key)
        return super().construct_mapping(node, deep)


def unique_pairs(pairs: list) -> dict:
    """json.loads object_pairs_hook: the same refusal for JSON files."""
    out = {}
    for key, value in pairs:
        if key in out:
            raise DuplicateKey(key)
        out[key] = value
    return out


def load_config_file(path: str, what: str = "config file") -> dict:
    """Overrides from a YAML (.yaml/.yml), TOML (.toml) or JSON file: flat keys or model/data/train sections.
    `what` names the file in errors ("config file", "sweep spec")."""
    file = Path(path)
    if not file.is_file():
        raise MonorouteError(f"{what} {path} not found; pass an existing .yaml, .toml or .json file")
    try:
        text = file.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise MonorouteError(f"{what} {path} is not a UTF-8 text file (byte {exc.object[exc.start:exc.start + 1].hex()} "
                             f"at offset {exc.start}); pass a .yaml, .toml or .json file") from None
    try:
        if file.suffix in (".yaml", ".yml"):
            values = yaml.load(text, Loader=UniqueKeyLoader) or {}
        elif file.suffix == ".toml":
            values = tomllib.loads(text)  # TOML itself forbids repeated keys
        elif file.suffix == ".json":
            values = json.loads(text, object_pairs_hook=unique_pairs)
        else:
            raise MonorouteError(f"{what} {path} must end in .yaml, .yml, .toml or .json")
    except DuplicateKey as exc:
        raise MonorouteError(f"{what} {path}: {exc}") from None
    except (ValueError, yaml.YAMLError) as exc:  # TOMLDecodeError and JSONDecodeError are ValueErrors
        raise MonorouteError(f"{what} {path} does not parse: {str(exc).splitlines()[0]}") from None
    if not isinstance(values, dict):
        raise MonorouteError(f"{what} {path} must hold a mapping of keys to values")
    return values


def with_train_overrides(cfg: RunConfig, overrides: dict) -> RunConfig:
    """On resume only training-loop settings may change; shape or data changes would break the run."""
    train = {}
    for key, value in flatten_overrides(overrides):
        section, name = field_owner(key)
        if section != "train" or name == "parallel":
            raise MonorouteError(
                f"cannot change {key!r} when resuming (it changes the model or data); start a new run instead"
            )
        train[name] = value
    return replace(cfg, train=replace(cfg.train, **train))
