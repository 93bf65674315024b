"""The training loop behind `monoroute train`, and loading a finished run (`load`, `load_run`).

AdamW with linear warmup and cosine decay, gradient clipping and accumulation, bf16 autocast on
devices that support it, periodic validation, metrics to OUT/metrics.jsonl and TensorBoard,
crash-safe checkpoints (checkpoint.py), one training per run directory (rundir.py), exact resume
on CPU, and data parallelism under torchrun (DDP, FSDP2).

What happens when things go wrong: every setting and both data splits are checked before anything is
written into OUT; a non-finite loss, gradient norm or weight stops the run without saving it and
names the last good checkpoint; a full disk or failed write during a save leaves the previous
checkpoint in place; a second training on the same OUT is refused while the first one runs.
"""
from __future__ import annotations

import contextlib
import json
import math
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import NamedTuple

import torch
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions, get_model_state_dict, get_optimizer_state_dict, set_optimizer_state_dict,
)
from torch.nn.parallel import DistributedDataParallel
from torch.profiler import record_function
from tqdm import tqdm

from monoroute.data import load_tokenizer, prepare_data
from monoroute.data.tokenizers import Tokenizer
from monoroute.devices import device_kind, resolve_device
from monoroute.errors import MonorouteError
from monoroute.layers import RoutedFFN
from monoroute.layers.recall import model_selection_recall
from monoroute.models import GPT
from monoroute.train import distributed as D
from monoroute.train.checkpoint import (
    CONFIG_FILE, TOKENIZER_FILE, Checkpoint, NonFiniteWeights, current_checkpoint, is_disk_full, load_checkpoint,
    load_weights, read_json, save_checkpoint, write_json, write_text,
)
from monoroute.train.config import RunConfig, TrainConfig, data_seed, k_at, switch_step
from monoroute.train.distill import (dense_version, distill_kl, routed_from_dense, routed_layer_fitter,
                                     teacher_weights_sha256)
from monoroute.train.rundir import METRICS_FILE, RunLock, clear_run, start_mode
from monoroute.train.fsdp import shard_model
from monoroute.train.optim import build_optimizer_for, clip_grads, group_lr

__all__ = ["LoadedRun", "evaluate", "evaluate_with_stats", "load", "load_run", "recall_on_val", "train",
           "METRICS_FILE"]


def autocast_for(device: torch.device, dtype: str):
    """bf16 autocast where the device supports it (CUDA with bf16), else full precision."""
    if dtype not in ("auto", "float32", "bfloat16"):
        raise MonorouteError(f"unknown dtype {dtype!r}; use auto, float32 or bfloat16")
    wants_bf16 = dtype == "bfloat16" or (
        dtype == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported()
    )
    if not wants_bf16:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def lr_at(step: int, tc: TrainConfig) -> float:
    """Linear warmup to lr, then cosine decay to min_lr at the last step."""
    if step < tc.warmup:
        return tc.lr * (step + 1) / tc.warmup
    progress = (step - tc.warmup) / max(1, tc.steps - tc.warmup)
    return tc.min_lr + 0.5 * (tc.lr - tc.min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))


class RoutedStats:
    """How many of each routed layer's k selected units fired (h != 0), summed over the tokens seen
    since the last reset: l0 = fired / tokens, live_slot_fraction = l0 / k."""

    def __init__(self, model: GPT) -> None:
        self.layers = [(name, m) for name, m in model.named_modules() if isinstance(m, RoutedFFN)]
        self.reset()

    def reset(self) -> None:
        self.fired: list = [0] * len(self.layers)
        self.tokens = 0

    def update(self) -> None:
        """Count the last forward pass's activations (call after every forward to be counted)."""
        for i, (_, layer) in enumerate(self.layers):
            acts = layer.last_activations
            if acts is not None:
                self.fired[i] = self.fired[i] + (acts.values != 0).sum()  # stays on the device: no sync
        if self.layers and self.layers[0][1].last_activations is not None:
            values = self.layers[0][1].last_activations.values
            self.tokens += values.numel() // max(1, values.shape[-1])

    def summary(self, info: D.DistInfo | None = None) -> dict:
        """{"routed": {name: {"l0", "live_slot_fraction"}}, "l0": mean, "live_slot_fraction": mean}, or {}."""
        if not self.layers:
            return {}
        counts = [float(f) for f in self.fired] + [float(self.tokens)]
        if info is not None:
            counts = D.sum_across_ranks(counts, info)
        tokens = counts[-1]
        if tokens == 0:
            return {}
        routed = {}
        for (name, layer), fired in zip(self.layers, counts[:-1]):
            l0 = fired / tokens
            routed[name] = {"l0": l0, "live_slot_fraction": l0 / layer.k}
        n = len(routed)
        return {"routed": routed, "l0": sum(r["l0"] for r in routed.values()) / n,
                "live_slot_fraction": sum(r["live_slot_fraction"] for r in routed.values()) / n}


@torch.no_grad()
def evaluate_with_stats(model: GPT, store, cfg: RunConfig, device: torch.device) -> tuple[float, dict]:
    """Mean validation cross-entropy over the same deterministic windows every time, and for routed
    models the L0 statistics of those windows (RoutedStats.summary; {} for dense models)."""
    was_training = model.training
    model.eval()
    stats = RoutedStats(model)
    losses = []
    try:
        for x, y in store.eval_batches(cfg.train.batch_size, cfg.model.block_size, cfg.train.eval_batches):
            with autocast_for(device, cfg.train.dtype):
                losses.append(model(x.to(device), y.to(device))[1].item())
            stats.update()
    finally:
        model.train(was_training)
    if not losses:
        raise MonorouteError("the validation split yields no batch; lower block_size or use a larger corpus")
    return sum(losses) / len(losses), stats.summary()


def recall_on_val(model: GPT, store, cfg: RunConfig, device: torch.device, max_tokens: int = 512) -> dict:
    """Selection recall of every routed layer (layers/recall.py) on the first `max_tokens` positions
    of the first validation batch: {"recall", "mass", "layers": {...}}, or {} for a dense model."""
    if not model.routed_layers():
        return {}
    windows = max(1, -(-max_tokens // cfg.model.block_size))
    x, _ = next(iter(store.eval_batches(windows, cfg.model.block_size, 1)))
    with autocast_for(device, cfg.train.dtype):
        return model_selection_recall(model, x.to(device), max_tokens)


def evaluate(model: GPT, store, cfg: RunConfig, device: torch.device) -> float:
    """Mean validation cross-entropy over the same deterministic windows every time."""
    return evaluate_with_stats(model, store, cfg, device)[0]


def flat_scalars(record: dict, prefix: str = ""):
    """(name, number) pairs of a nested record: {"routed": {"blocks.0.mlp": {"l0": 3}}} -> routed/blocks.0.mlp/l0."""
    for key, value in record.items():
        if isinstance(value, dict):
            yield from flat_scalars(value, f"{prefix}{key}/")
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            yield prefix + key, value


class MetricsLog:
    """One JSON object per logged step in OUT/metrics.jsonl, mirrored to TensorBoard (main rank only).

    On resume, records after the checkpoint's step (logged by the run that stopped) and a torn last
    line (a kill mid-append) are dropped, so the file holds each step once."""

    def __init__(self, out: Path, enabled: bool, resume_step: int | None) -> None:
        self.enabled = enabled
        self.path = out / METRICS_FILE
        self.writer = None
        if not enabled:
            return
        if resume_step is not None and self.path.exists():
            kept = []
            for line in self.path.read_text(errors="replace").splitlines():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= resume_step:
                    kept.append(line)
            write_text(self.path, "".join(line + "\n" for line in kept))
        from torch.utils.tensorboard import SummaryWriter

        # purge_step: TensorBoard drops events logged after the checkpoint by the run that stopped.
        self.writer = SummaryWriter(str(out / "tensorboard"),
                                    purge_step=None if resume_step is None else resume_step + 1)

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        for key, value in flat_scalars(record):
            if key != "step":
                self.writer.add_scalar(key, value, record["step"])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def run_info(model: GPT) -> dict:
    return {
        "params": model.n_params(),
        "active_params": model.n_active_params(),
        "flops_per_token": model.flops_per_token(),
    }


def read_run_config(out: str | Path) -> RunConfig:
    saved = read_json(Path(out) / CONFIG_FILE, "run config")
    if not isinstance(saved.get("run"), dict):
        raise MonorouteError(f"run config {Path(out) / CONFIG_FILE} is corrupt (no \"run\" section); restore it or "
                             f"start a new run")
    run = dict(saved["run"])
    if isinstance(run.get("model"), dict):  # keys added after a run was saved mean what the code did then
        run["model"] = {**LEGACY_MODEL_DEFAULTS, **run["model"]}
    return RunConfig.from_dict(run)


# Model settings introduced after runs were already being saved, with the behaviour those runs were
# trained with (not today's defaults): an old run must load as the model it was. `coupling` changes
# what the model computes, and `defaults_version` 1 keeps a saved "auto" coupling and unset d_key meaning
# what they meant then (preact, full-width keys; today: re-ranking, d/2 keys); `dead_grace` only
# affects training and a missing key cannot say which behaviour a run had, so it is not filled.
LEGACY_MODEL_DEFAULTS = {"coupling": "none", "router_detach": False, "query_norm": "none", "revival_target": "score",
                         "aux_units": 256, "unit_init": "gpt", "dense_beside": 0, "defaults_version": 1}


def model_config_at(cfg: RunConfig, step: int):
    """The architecture a run has at `step`: a dense_fraction run is dense up to its switch step
    (its checkpoint there is the dense model) and routed from switch + fit_steps on; any other run
    is `cfg.model` throughout."""
    switch = switch_step(cfg.train)
    return dense_version(cfg.model) if switch is not None and step <= switch else cfg.model


def load_run(out: str | Path, device: str = "cpu") -> tuple[RunConfig, GPT]:
    """Rebuild a saved run's config and model (weights and firing statistics) for eval/sampling.

    Reads the checkpoint that OUT/checkpoint.json names, after checking its sha256: a corrupt or
    torn file is a clear error, never silently loaded."""
    cfg, model, _ = _load_model(out, device)
    return cfg, model


def _load_model(out: str | Path, device: str) -> tuple[RunConfig, GPT, Checkpoint]:
    out = Path(out)
    if not out.is_dir():
        raise MonorouteError(f"run directory {out} is missing; point at a run directory written by `monoroute train`")
    cfg = read_run_config(out)
    target = resolve_device(device)
    ckpt = current_checkpoint(out)
    model = GPT(model_config_at(cfg, ckpt.step if ckpt is not None else cfg.train.steps))
    ckpt = load_weights(out, model)
    return cfg, model.to(target).eval(), ckpt


def load_teacher(path: str, expected_sha256: str | None, device) -> torch.nn.Module:
    """The frozen teacher GPT of a distillation run, after checking it is the teacher the run started with."""
    if not Path(path).is_dir():
        raise MonorouteError(f"teacher run {path} is missing; restore it (the distillation needs it) or start a new "
                             f"run without kl_coef")
    actual = teacher_weights_sha256(path)
    if expected_sha256 is not None and actual != expected_sha256:
        raise MonorouteError(f"teacher run {path} has changed since this run started (weights sha256 {actual[:12]}, "
                             f"expected {expected_sha256[:12]}); restore that teacher or start a new run")
    _, teacher = load_run(path, str(device))
    teacher.requires_grad_(False)
    return teacher.eval()


class LoadedRun(NamedTuple):
    """A trained run, ready to use: `model` (GPT, eval mode, on the device), its `tokenizer`,
    `config` (RunConfig), `run_dir` and the `step` of the checkpoint that was loaded."""

    model: GPT
    tokenizer: Tokenizer
    config: RunConfig
    run_dir: Path
    step: int


def load(run: str | Path, device: str = "cpu") -> LoadedRun:
    """Load a run directory written by `monoroute train` (its current, checksum-verified checkpoint)."""
    cfg, model, ckpt = _load_model(run, device)
    tokenizer = load_tokenizer(Path(run) / TOKENIZER_FILE)
    return LoadedRun(model, tokenizer, cfg, Path(run), ckpt.step)


def train(cfg: RunConfig, resume: bool = False, until: int | None = None, overwrite: bool = False,
          show_progress: bool = True) -> dict:
    """Train (or resume) the run described by `cfg`; returns a summary of the last step."""
    tc = cfg.train
    info = D.init_distributed(device_kind(tc.device))
    try:
        summary = _train(cfg, info, resume, until, overwrite, show_progress)
        D.finish(info)
        return summary
    finally:
        D.shutdown(info)


def check_splits(store, cfg: RunConfig) -> None:
    """Both splits hold at least one window, so step 1 and the first evaluation cannot fail on data."""
    store.batch(0, 1, cfg.model.block_size, data_seed(cfg.train))
    store.eval_batches(1, cfg.model.block_size, 1)


def memory_estimate(cfg: RunConfig) -> dict:
    """A lower-bound estimate of one training process's memory, before anything is allocated: the
    model's float32 weights, gradients and AdamW moments (16 bytes a parameter, the model sized on the
    meta device), and one micro-batch's activations with their gradients (the residual stream, attention
    scores, FFN activations and logits of every position, float32)."""
    m, tc = cfg.model, cfg.train
    with torch.device("meta"):
        params = GPT(m).n_params()
    tokens = tc.batch_size * m.block_size
    per_layer = 12 * m.d_model + m.n_head * m.block_size + max(
        (m.ffn_width if kind == "dense" else 4 * m.k + (m.router_candidates or 0)) for kind in m.ffn_kinds())
    activations = 2 * 4 * tokens * (m.n_layer * per_layer + 2 * m.vocab_size)
    return {"state": 16 * params, "activations": activations, "total": 16 * params + activations}


def check_memory(cfg: RunConfig, device: torch.device) -> None:
    """Refuse, with the estimate, a run that cannot fit in the device's available memory."""
    from monoroute.devices import available_memory

    need, have = memory_estimate(cfg), available_memory(device)
    if have is not None and need["total"] > have:
        gb = lambda b: f"{b / 2 ** 30:,.1f} GB"  # noqa: E731
        raise MonorouteError(f"this run needs at least {gb(need['total'])} of memory (weights, gradients and optimizer "
                             f"state {gb(need['state'])}, one batch's activations {gb(need['activations'])}), more "
                             f"than the {gb(have)} available on {device}; lower --batch-size, --block-size, --d-model, "
                             f"--n-units or --n-layer")


def check_settings(cfg: RunConfig, device: torch.device, until: int | None, world: int = 1) -> None:
    tc = cfg.train
    tc.check()
    autocast_for(device, tc.dtype)
    check_memory(cfg, device)
    if until is not None and (isinstance(until, bool) or not isinstance(until, int) or until < 1):
        raise MonorouteError(f"--until must be a step >= 1, got {until!r}")
    if cfg.model.sparse_grad and not tc.sparse_rows:
        raise MonorouteError("sparse_grad=true needs the row-sparse optimizer: set sparse_rows=true (or use --sparse-rows)")
    if tc.parallel not in ("ddp", "fsdp"):
        raise MonorouteError(f"unknown parallel {tc.parallel!r}; use ddp or fsdp")
    if cfg.model.sparse_grad and world > 1:
        raise MonorouteError("sparse_grad=true (row-sparse gradients) does not run under torchrun: DDP cannot "
                             "all-reduce sparse gradients; pass --set sparse_grad=false --set sparse_rows=false")
    kinds = cfg.model.ffn_kinds()
    if tc.dense_fraction > 0:
        if "routed" not in kinds:
            raise MonorouteError("dense_fraction needs routed layers to switch to (ffn=routed); a dense model is "
                                 "dense throughout")
        if world > 1:
            raise MonorouteError("dense_fraction does not run under torchrun yet (the in-place fit runs on one "
                                 "process); train on one device")
    if tc.k_start is not None:
        if "routed" not in kinds:
            raise MonorouteError("k_start (the k schedule) needs routed layers (ffn=routed)")
        if not cfg.model.k <= tc.k_start <= cfg.model.n_units:
            raise MonorouteError(f"k_start must be between k={cfg.model.k} and n_units={cfg.model.n_units}, got "
                                 f"{tc.k_start}; e.g. k_start={min(8 * cfg.model.k, cfg.model.n_units)}")
        pools = cfg.model.router_pools if cfg.model.router == "multi_pool" else 1
        if tc.k_start % pools:
            raise MonorouteError(f"k_start={tc.k_start} must be a multiple of router_pools={pools}")
    if tc.parallel == "fsdp" and tc.sparse_rows:
        raise MonorouteError("parallel=fsdp works with plain AdamW only (FSDP2 reduce-scatters dense gradients); "
                             "drop sparse_rows or use parallel=ddp")


def _train(cfg: RunConfig, info: D.DistInfo, resume: bool, until: int | None, overwrite: bool, show_progress: bool) -> dict:
    tc, out = cfg.train, Path(cfg.out)
    device = resolve_device(tc.device, info.local_rank)
    # Everything that can refuse the run happens before anything is written into OUT.
    check_settings(cfg, device, until, info.world)
    if info.is_main:
        start_mode(out, resume, overwrite)  # fail fast; decided again under the lock below
        store = prepare_data(cfg.data)  # builds the token cache once, outside OUT
    D.barrier(info)
    if not info.is_main:
        store = prepare_data(cfg.data)  # reuses rank 0's cache
    if resume and store.vocab_size != cfg.model.vocab_size:
        raise MonorouteError(
            f"vocab mismatch on resume: the run was trained with vocab {cfg.model.vocab_size}, the data now gives "
            f"{store.vocab_size}; restore the run's tokenizer/data or start a new run"
        )
    cfg = replace(cfg, model=replace(cfg.model, vocab_size=store.vocab_size))
    check_splits(store, cfg)
    torch.manual_seed(tc.seed)
    final = GPT(cfg.model) if switch_step(tc) is not None else None  # raises the layer's own errors (k, n_units, ...)
    ckpt = current_checkpoint(out) if resume else None
    model = GPT(model_config_at(cfg, ckpt.step if ckpt is not None else 0)).to(device)
    lock = RunLock(out) if info.is_main else None
    created = not out.exists()
    try:
        if lock is not None:
            lock.acquire()
            mode = start_mode(out, resume, overwrite)  # now that no other training can write here
            if lock.took_over:
                print(f"monoroute: took over the lock of pid {lock.took_over.get('pid')}, which is no longer "
                      f"running", file=sys.stderr)
            if mode in ("restart", "overwrite"):
                if mode == "restart":
                    print(f"monoroute: {out} holds a run that stopped before its first checkpoint; starting it again",
                          file=sys.stderr)
                clear_run(out)
            if not resume:
                write_json(out / CONFIG_FILE, {"run": cfg.to_dict(), **run_info(final or model)})
                write_text(out / TOKENIZER_FILE, store.tokenizer.to_json())
        D.barrier(info)
        return _train_locked(cfg, info, resume, until, show_progress, device, store, model)
    except OSError as exc:
        if not is_disk_full(exc):
            raise
        ckpt = current_checkpoint(out) if out.is_dir() else None
        kept = f"the step-{ckpt.step} checkpoint is intact" if ckpt else "no checkpoint had been written"
        raise MonorouteError(f"disk full while writing {exc.filename or out} ({exc.strerror}); {kept}. Free space, "
                             f"then {'`monoroute train --resume ' + str(out) + '`' if ckpt else 'start the run again'}"
                             ) from None
    finally:
        if lock is not None:
            lock.release()
            if created and out.is_dir() and not any(out.iterdir()):
                out.rmdir()  # refused before writing anything: leave no empty folder behind


def _train_locked(cfg, info, resume, until, show_progress, device, store, model) -> dict:
    tc, out = cfg.train, Path(cfg.out)
    fsdp = info.world > 1 and tc.parallel == "fsdp"
    progress, optimizer_state = {"step": 0, "tokens": 0}, None
    if resume:  # every rank reads the full checkpoint, before any sharding
        optimizer_state, progress = load_checkpoint(out, model)
    if info.is_main:
        print(f"monoroute: {cfg.preset} {model.cfg.ffn} params={model.n_params():,} "
              f"active={model.n_active_params():,} flops/token={model.flops_per_token()['total']:,} device={device}")
    net = parallelize(model, info, fsdp)
    # Built after sharding: under FSDP2 the optimizer must hold the sharded (DTensor) parameters.
    optimizer = build_optimizer_for(model, tc)
    if optimizer_state is not None:
        load_optimizer_state(model, optimizer, optimizer_state, fsdp)
    metrics = MetricsLog(out, info.is_main, progress["step"] if resume else None)
    teacher = load_teacher(tc.teacher, tc.teacher_sha256, device) if tc.teacher and tc.kl_coef > 0 else None
    stop = min(tc.steps, until) if until is not None else tc.steps
    switch = switch_step(tc)
    summary = None
    try:
        if switch is not None and progress["step"] <= switch:  # the dense phase of a dense_fraction run
            summary = _loop(cfg, info, model, net, optimizer, store, device, metrics, progress, min(stop, switch),
                            show_progress, fsdp, teacher)
            progress = {"step": summary["step"], "tokens": summary["tokens"]}
            if stop > switch:
                model, progress, fit = upcycle_in_place(cfg, model, store, device, show_progress,
                                                        {"step": switch, "tokens": summary["tokens"]})
                metrics.log({**progress, "upcycle_fvu": fit.get("fvu")})
                net = parallelize(model, info, fsdp)
                optimizer = build_optimizer_for(model, tc)
                save_checkpoint(out, model, optimizer.state_dict(), progress)
        if summary is None or progress["step"] < stop:
            summary = _loop(cfg, info, model, net, optimizer, store, device, metrics, progress, stop, show_progress,
                            fsdp, teacher)
    finally:
        metrics.close()
    # Under FSDP2 there is one logical copy of the weights, so there is nothing to compare.
    summary.update(ranks_in_sync=None if fsdp else D.ranks_in_sync(model, info), rank=info.rank)
    return summary


def parallelize(model: GPT, info: D.DistInfo, fsdp: bool) -> torch.nn.Module:
    """The module to run forward on: the model itself, DDP around it, or the model sharded in place."""
    if fsdp:
        return shard_model(model)
    # broadcast_buffers=False: the only buffers that change are the routed layers' firing statistics,
    # which FiringSync merges across ranks; DDP's default would overwrite them with rank 0's each forward.
    # (Any future buffer that must match across ranks, e.g. BatchNorm running stats, needs the same care.)
    return DistributedDataParallel(model, broadcast_buffers=False) if info.world > 1 else model


FULL_STATE = StateDictOptions(full_state_dict=True, cpu_offload=True)


def checkpoint_payload(cfg: RunConfig, model: GPT, optimizer, fsdp: bool) -> tuple[GPT | None, dict]:
    """The unsharded model to save and the optimizer state. Collective under FSDP2 (every rank calls);
    the full tensors then live on rank 0 only, which loads them into a plain replica to save."""
    if not fsdp:
        return model, optimizer.state_dict()
    model_state = get_model_state_dict(model, options=FULL_STATE)
    optimizer_state = get_optimizer_state_dict(model, optimizer, options=FULL_STATE)
    if not model_state:  # not rank 0
        return None, optimizer_state
    replica = GPT(cfg.model)
    replica.load_state_dict(model_state)
    return replica, optimizer_state


def load_optimizer_state(model: GPT, optimizer, state: dict, fsdp: bool) -> None:
    if fsdp:  # saved as a full, name-keyed state dict; every rank takes its own shard of it
        set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))
    else:
        optimizer.load_state_dict(state)


def stopped(out: Path, what: str, step: int, last_saved: int | None) -> MonorouteError:
    """The error for a run stopped by a non-finite value: what was (not) saved and how to go on."""
    if last_saved is None:
        return MonorouteError(
            f"{what} at step {step}; stopped without saving anything (no checkpoint had been written yet). Lower "
            f"--lr or raise --warmup and start again with the same --out"
        )
    return MonorouteError(
        f"{what} at step {step}; stopped, and nothing after step {last_saved} was saved. Last good checkpoint: "
        f"{out} (step {last_saved}); `monoroute eval {out}` reads it. Lower --lr or raise --warmup, then "
        f"`monoroute train --resume {out} --lr LOWER` continues from step {last_saved} (or start again)"
    )


def upcycle_in_place(cfg: RunConfig, dense: GPT, store, device, show_progress: bool, progress: dict
                     ) -> tuple[GPT, dict, dict]:
    """The switch of a dense_fraction run: a routed model with the dense model's non-FFN weights,
    its routed layers fitted layer-locally to the dense FFNs on the next fit_steps batches of the
    training stream (counted as steps and tokens). Returns it and the progress after the fit."""
    from monoroute.train.layerwise import fit_layers

    tc = cfg.train
    routed = routed_from_dense(dense, cfg.model)
    fitter = routed_layer_fitter(dense, routed)
    windows = tc.batch_size * tc.grad_accum
    start = progress["step"]
    batch_at = lambda s: store.batch(start + s, windows, cfg.model.block_size, data_seed(tc), split="train")[0]  # noqa: E731
    fit = fit_layers(fitter, dense, batch_at, tc.fit_steps, tc.fit_lr, init=tc.fit_init, seed=tc.seed,
               progress=show_progress, desc=f"upcycle in place at step {start}")
    fitter.fold()
    for layer in routed.routed_layers():  # firing statistics restart with the routed phase
        layer.train()
    tokens = progress["tokens"] + tc.fit_steps * windows * cfg.model.block_size
    return routed.to(device), {"step": start + tc.fit_steps, "tokens": tokens}, fit


def set_k_schedule(model: GPT, step: int, tc: TrainConfig) -> None:
    for layer in model.routed_layers():
        pools = getattr(layer.router, "pools", 1)
        k = k_at(step, tc, model.cfg.k, pools)
        if k != layer.k:
            layer.set_k(k)


def will_log(step: int, stop: int, tc: TrainConfig) -> bool:
    """Whether the record of `step` (1-based, after its update) is written: every log_every and
    eval_every step, the last one, and every 5th step up to dense_log_until (early dynamics)."""
    return (step % tc.log_every == 0 or step % tc.eval_every == 0 or step == stop
            or (step <= tc.dense_log_until and step % 5 == 0))


def request_diagnostics(model: GPT) -> None:
    """Ask every routed layer's router (those that keep diagnostics) to record its next forward's search."""
    for layer in model.routed_layers():
        if hasattr(layer.router, "diagnose"):
            layer.router.diagnose = True
            layer.router.diagnostics = None


def collect_diagnostics(model: GPT) -> dict:
    """The routers' last recorded search diagnostics: {"diagnostics": {layer: {...}}, and each reading's
    mean over layers at the top level}, or {} when no router keeps them (routing.search_diagnostics)."""
    per_layer = {}
    for name, module in model.named_modules():
        if isinstance(module, RoutedFFN) and getattr(module.router, "diagnostics", None):
            per_layer[name] = dict(module.router.diagnostics)
            module.router.diagnostics = None
    if not per_layer:
        return {}
    keys = sorted({key for values in per_layer.values() for key in values})
    means = {key: sum(v[key] for v in per_layer.values() if key in v) / sum(key in v for v in per_layer.values())
             for key in keys}
    return {"diagnostics": per_layer, **means}


SCOPE_STEP, SCOPE_DATA, SCOPE_FORWARD, SCOPE_BACKWARD = ("monoroute::step", "monoroute::data", "monoroute::forward",
                                                     "monoroute::backward")
SCOPE_STATS, SCOPE_OPTIMIZER, SCOPE_LOGGING = "monoroute::stats", "monoroute::optimizer", "monoroute::logging"


def _loop(cfg, info, model, net, optimizer, store, device, metrics, progress, stop, show_progress, fsdp,
          teacher=None) -> dict:
    tc, out = cfg.train, Path(cfg.out)
    tokens_per_step = tc.batch_size * cfg.model.block_size * tc.grad_accum * info.world
    step, tokens = progress["step"], progress["tokens"]
    last_saved = step if step > 0 else None
    summary: dict = {"step": step, "tokens": tokens}
    bar = tqdm(total=stop, initial=step, disable=not (show_progress and info.is_main), unit="step", dynamic_ncols=True)
    window_start, window_tokens = time.perf_counter(), 0
    routed = RoutedStats(model)
    firing = D.FiringSync(model.routed_layers(), info)  # FSDP2 leaves buffers per rank too
    net.train()
    while step < stop:
        if tc.k_start is not None:
            set_k_schedule(model, step, tc)
        lr = lr_at(step, tc)
        for group in optimizer.param_groups:
            group["lr"] = group_lr(lr, group, step)
        loss_sum = aux_sum = kl_sum = 0.0
        logs = will_log(step + 1, stop, tc)
        step_scope = record_function(SCOPE_STEP)  # named scopes: `monoroute bench train --profile` splits by them
        step_scope.__enter__()
        for micro in range(tc.grad_accum):
            if logs and micro == tc.grad_accum - 1:
                request_diagnostics(model)
            with record_function(SCOPE_DATA):
                x, y = store.batch(step * tc.grad_accum + micro, tc.batch_size, cfg.model.block_size, data_seed(tc),
                                   info.rank, info.world)
                x, y = x.to(device), y.to(device)
            # DDP skips the all-reduce on all but the last micro-batch; FSDP2 reduce-scatters every one.
            sync = micro == tc.grad_accum - 1 or info.world == 1 or fsdp
            with (contextlib.nullcontext() if sync else net.no_sync()), autocast_for(device, tc.dtype):
                with record_function(SCOPE_FORWARD):
                    logits, loss = net(x, y)
                    aux = model.aux_loss()
                    total = loss + aux
                    if teacher is not None:
                        with torch.no_grad():
                            teacher_logits = teacher(x)[0]
                        kl = distill_kl(logits, teacher_logits, tc.kl_temperature)
                        total = total + tc.kl_coef * kl
                        kl_sum += kl.item()
                with record_function(SCOPE_BACKWARD):
                    (total / tc.grad_accum).backward()
            with record_function(SCOPE_STATS):
                routed.update()
                loss_sum += loss.item()
                aux_sum += aux.item()
        train_loss = loss_sum / tc.grad_accum
        if D.any_across_ranks(not math.isfinite(train_loss), info):
            what = f"training loss became {train_loss}" if not math.isfinite(train_loss) else \
                "training loss became non-finite on another rank"
            raise stopped(out, what, step + 1, last_saved)
        with record_function(SCOPE_OPTIMIZER):
            grad_norm, table_norm = clip_grads(model, tc.grad_clip, tc.table_grad_clip)
        if tc.grad_clip > 0 and D.any_across_ranks(not math.isfinite(grad_norm), info):
            raise stopped(out, f"gradient norm became {grad_norm}", step + 1, last_saved)
        if table_norm is not None and D.any_across_ranks(not math.isfinite(table_norm), info):
            raise stopped(out, f"the unit tables' gradient norm became {table_norm}", step + 1, last_saved)
        with record_function(SCOPE_OPTIMIZER):
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        with record_function(SCOPE_STATS):
            firing()
        step_scope.__exit__(None, None, None)
        step += 1
        tokens += tokens_per_step
        window_tokens += tokens_per_step
        bar.update(1)
        is_last = step == stop
        if logs:
            log_scope = record_function(SCOPE_LOGGING)
            log_scope.__enter__()
            elapsed = time.perf_counter() - window_start
            record = {"step": step, "tokens": tokens, "train_loss": D.mean_across_ranks(train_loss, info),
                      "aux_loss": aux_sum / tc.grad_accum, "lr": lr, "grad_norm": grad_norm,
                      "tokens_per_s": window_tokens / max(elapsed, 1e-9)}
            if teacher is not None:
                record["kl"] = kl_sum / tc.grad_accum
            if tc.k_start is not None and model.routed_layers():
                record["k"] = model.routed_layers()[0].k
            if model.routed_layers():
                record["dead_fraction"] = model.dead_fraction()
                record.update(routed.summary(info))  # over this log window's training tokens
                record.update(collect_diagnostics(model))  # this step's last micro-batch, this rank
            routed.reset()
            if step % tc.eval_every == 0 or is_last:
                record["val_loss"] = evaluate(model, store, cfg, device)
                # Low rate: at evaluations only. Not under FSDP2: each rank holds a column shard of the
                # unit tables, and the exact top-k needs whole rows (`monoroute eval` reads the saved,
                # unsharded weights).
                recall = {} if fsdp else recall_on_val(model, store, cfg, device)
                if recall:
                    record["selection_recall"], record["selection_mass"] = recall["recall"], recall["mass"]
            metrics.log(record)
            summary = record
            postfix = {"loss": f"{train_loss:.3f}", "tok_s": f"{record['tokens_per_s']:.0f}"}
            if "live_slot_fraction" in record:
                postfix["live"] = f"{record['live_slot_fraction']:.3f}"
            bar.set_postfix(postfix)
            log_scope.__exit__(None, None, None)
            window_start, window_tokens = time.perf_counter(), 0
        if step % tc.ckpt_every == 0 or is_last:
            to_save, optimizer_state = checkpoint_payload(cfg, model, optimizer, fsdp)
            failure: MonorouteError | None = None
            if info.is_main:
                try:
                    save_checkpoint(out, to_save, optimizer_state, {"step": step, "tokens": tokens})
                except NonFiniteWeights as exc:
                    failure = stopped(out, f"the weights became non-finite ({exc})", step, last_saved)
                except MonorouteError as exc:
                    failure = exc
            if D.any_across_ranks(failure is not None, info):
                raise failure or MonorouteError("rank 0 could not save the checkpoint; see its error")
            last_saved = step
            D.barrier(info)
    bar.close()
    return summary
