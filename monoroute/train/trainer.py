"""The training loop behind `monoroute train`.

AdamW with linear warmup and cosine decay, gradient clipping and accumulation, bf16 autocast on
devices that support it, periodic validation, metrics to OUT/metrics.jsonl and TensorBoard,
atomic checkpoints, exact resume on CPU, and data parallelism under torchrun (DDP).
"""
from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import replace
from pathlib import Path

import torch
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions, get_model_state_dict, get_optimizer_state_dict, set_optimizer_state_dict,
)
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from monoroute.data import prepare_data
from monoroute.devices import resolve_device
from monoroute.errors import MonorouteError
from monoroute.models import GPT
from monoroute.train import distributed as D
from monoroute.train.checkpoint import (
    CONFIG_FILE, STATE_FILE, TOKENIZER_FILE, load_checkpoint, load_weights, read_json, save_checkpoint, write_json,
    write_text,
)
from monoroute.train.config import RunConfig, TrainConfig
from monoroute.train.fsdp import shard_model
from monoroute.train.optim import build_optimizer, clip_grad_norm_

METRICS_FILE = "metrics.jsonl"


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


@torch.no_grad()
def evaluate(model: GPT, store, cfg: RunConfig, device: torch.device) -> float:
    """Mean validation cross-entropy over the same deterministic windows every time."""
    was_training = model.training
    model.eval()
    losses = []
    for x, y in store.eval_batches(cfg.train.batch_size, cfg.model.block_size, cfg.train.eval_batches):
        with autocast_for(device, cfg.train.dtype):
            losses.append(model(x.to(device), y.to(device))[1].item())
    model.train(was_training)
    if not losses:
        raise MonorouteError("the validation split yields no batch; lower block_size or use a larger corpus")
    return sum(losses) / len(losses)


class MetricsLog:
    """One JSON object per logged step in OUT/metrics.jsonl, mirrored to TensorBoard (main rank only)."""

    def __init__(self, out: Path, enabled: bool, resume_step: int | None) -> None:
        self.enabled = enabled
        self.path = out / METRICS_FILE
        self.writer = None
        if not enabled:
            return
        if resume_step is not None and self.path.exists():  # drop steps logged after the checkpoint
            kept = [line for line in self.path.read_text().splitlines() if json.loads(line)["step"] <= resume_step]
            self.path.write_text("".join(line + "\n" for line in kept))
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(out / "tensorboard"))

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)):
                self.writer.add_scalar(key, value, record["step"])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def check_out_dir(out: Path, resume: bool, overwrite: bool) -> None:
    if resume:
        if not (out / STATE_FILE).is_file():
            raise MonorouteError(f"nothing to resume in {out}: no {STATE_FILE}; check the path or start a new run")
    elif out.exists() and any(out.iterdir()) and not overwrite:
        raise MonorouteError(f"output directory {out} is not empty; pick a new --out, --resume it, or pass --overwrite")


def run_info(model: GPT) -> dict:
    return {
        "params": model.n_params(),
        "active_params": model.n_active_params(),
        "flops_per_token": model.flops_per_token(),
    }


def load_run(out: str | Path, device: str = "cpu") -> tuple[RunConfig, GPT]:
    """Rebuild a saved run's config and model (weights and firing statistics) for eval/sampling."""
    out = Path(out)
    saved = read_json(out / CONFIG_FILE, "run config")
    cfg = RunConfig.from_dict(saved["run"])
    model = GPT(cfg.model)
    load_weights(out, model)
    return cfg, model.to(resolve_device(device)).eval()


def train(cfg: RunConfig, resume: bool = False, until: int | None = None, overwrite: bool = False,
          show_progress: bool = True) -> dict:
    """Train (or resume) the run described by `cfg`; returns a summary of the last step."""
    tc = cfg.train
    device_kind = "cuda" if tc.device.startswith("cuda") or (tc.device == "auto" and torch.cuda.is_available()) else "cpu"
    info = D.init_distributed(device_kind)
    try:
        return _train(cfg, info, resume, until, overwrite, show_progress)
    finally:
        D.shutdown(info)


def _train(cfg: RunConfig, info: D.DistInfo, resume: bool, until: int | None, overwrite: bool, show_progress: bool) -> dict:
    tc, out = cfg.train, Path(cfg.out)
    device = resolve_device(tc.device, info.local_rank)
    # Everything that can refuse the run happens before anything is written into OUT.
    autocast_for(device, tc.dtype)
    if cfg.model.sparse_grad and not tc.sparse_rows:
        raise MonorouteError("sparse_grad=true needs the row-sparse optimizer: set sparse_rows=true (or use --sparse-rows)")
    if tc.parallel not in ("ddp", "fsdp"):
        raise MonorouteError(f"unknown parallel {tc.parallel!r}; use ddp or fsdp")
    if tc.parallel == "fsdp" and tc.sparse_rows:
        raise MonorouteError("parallel=fsdp works with plain AdamW only (FSDP2 reduce-scatters dense gradients); "
                             "drop sparse_rows or use parallel=ddp")
    if info.is_main:
        check_out_dir(out, resume, overwrite)
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
    torch.manual_seed(tc.seed)
    model = GPT(cfg.model).to(device)  # raises the layer's own errors (k, n_units, router, ...)
    fsdp = info.world > 1 and tc.parallel == "fsdp"
    progress, optimizer_state = {"step": 0, "tokens": 0}, None
    if resume:  # every rank reads the full checkpoint, before any sharding
        optimizer_state, progress = load_checkpoint(out, model)
    elif info.is_main:
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / CONFIG_FILE, {"run": cfg.to_dict(), **run_info(model)})
        write_text(out / TOKENIZER_FILE, store.tokenizer.to_json())
    if info.is_main:
        print(f"monoroute: {cfg.preset} {cfg.model.ffn} params={model.n_params():,} "
              f"active={model.n_active_params():,} flops/token={model.flops_per_token()['total']:,} device={device}")
    net = parallelize(model, info, fsdp)
    # Built after sharding: under FSDP2 the optimizer must hold the sharded (DTensor) parameters.
    optimizer = build_optimizer(model, lr=tc.lr, weight_decay=tc.weight_decay, betas=(tc.beta1, tc.beta2),
                                sparse_rows=tc.sparse_rows)
    if optimizer_state is not None:
        load_optimizer_state(model, optimizer, optimizer_state, fsdp)
    metrics = MetricsLog(out, info.is_main, progress["step"] if resume else None)
    try:
        summary = _loop(cfg, info, model, net, optimizer, store, device, metrics, progress, until, show_progress,
                        fsdp)
    finally:
        metrics.close()
    # Under FSDP2 there is one logical copy of the weights, so there is nothing to compare.
    summary.update(ranks_in_sync=None if fsdp else D.ranks_in_sync(model, info), rank=info.rank)
    return summary


def parallelize(model: GPT, info: D.DistInfo, fsdp: bool) -> torch.nn.Module:
    """The module to run forward on: the model itself, DDP around it, or the model sharded in place."""
    if fsdp:
        return shard_model(model)
    return DistributedDataParallel(model) if info.world > 1 else model


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


def _loop(cfg, info, model, net, optimizer, store, device, metrics, progress, until, show_progress, fsdp) -> dict:
    tc, out = cfg.train, Path(cfg.out)
    stop = min(tc.steps, until) if until is not None else tc.steps
    tokens_per_step = tc.batch_size * cfg.model.block_size * tc.grad_accum * info.world
    step, tokens = progress["step"], progress["tokens"]
    last_saved = step if step > 0 else None
    summary: dict = {"step": step, "tokens": tokens}
    bar = tqdm(total=stop, initial=step, disable=not (show_progress and info.is_main), unit="step", dynamic_ncols=True)
    window_start, window_tokens = time.perf_counter(), 0
    net.train()
    while step < stop:
        lr = lr_at(step, tc)
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss_sum = aux_sum = 0.0
        for micro in range(tc.grad_accum):
            x, y = store.batch(step * tc.grad_accum + micro, tc.batch_size, cfg.model.block_size, tc.seed,
                               info.rank, info.world)
            x, y = x.to(device), y.to(device)
            # DDP skips the all-reduce on all but the last micro-batch; FSDP2 reduce-scatters every one.
            sync = micro == tc.grad_accum - 1 or info.world == 1 or fsdp
            with (contextlib.nullcontext() if sync else net.no_sync()), autocast_for(device, tc.dtype):
                _, loss = net(x, y)
                aux = model.aux_loss()
                ((loss + aux) / tc.grad_accum).backward()
            loss_sum += loss.item()
            aux_sum += aux.item()
        train_loss = loss_sum / tc.grad_accum
        if not math.isfinite(train_loss):
            where = f"{out} (step {last_saved})" if last_saved is not None else "none (no checkpoint was written yet)"
            raise MonorouteError(
                f"training loss became {train_loss} at step {step + 1}; stopped without saving. Last good "
                f"checkpoint: {where}. Lower --lr or raise --warmup, then --resume or start again"
            )
        grad_norm = clip_grad_norm_(model.parameters(), tc.grad_clip).item() if tc.grad_clip > 0 else float("nan")
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        tokens += tokens_per_step
        window_tokens += tokens_per_step
        bar.update(1)
        is_last = step == stop
        if step % tc.log_every == 0 or step % tc.eval_every == 0 or is_last:
            elapsed = time.perf_counter() - window_start
            record = {"step": step, "tokens": tokens, "train_loss": D.mean_across_ranks(train_loss, info),
                      "aux_loss": aux_sum / tc.grad_accum, "lr": lr, "grad_norm": grad_norm,
                      "tokens_per_s": window_tokens / max(elapsed, 1e-9)}
            if model.routed_layers():
                record["dead_fraction"] = model.dead_fraction()
            if step % tc.eval_every == 0 or is_last:
                record["val_loss"] = evaluate(model, store, cfg, device)
            metrics.log(record)
            summary = record
            bar.set_postfix(loss=f"{train_loss:.3f}", tok_s=f"{record['tokens_per_s']:.0f}")
            window_start, window_tokens = time.perf_counter(), 0
        if step % tc.ckpt_every == 0 or is_last:
            to_save, optimizer_state = checkpoint_payload(cfg, model, optimizer, fsdp)
            if info.is_main:
                save_checkpoint(out, to_save, optimizer_state, {"step": step, "tokens": tokens})
            last_saved = step
            D.barrier(info)
    bar.close()
    return summary
