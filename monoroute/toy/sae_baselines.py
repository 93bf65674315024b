"""TopK and L1 sparse autoencoders trained through sae-lens on an arbitrary activation iterator.

sae-lens' `SAETrainer` takes any iterator of (B, d) activation batches as its data provider, so
no model or HookedTransformer is involved. sae-lens imports wandb and huggingface_hub; both are
switched to offline before the import (it is deferred to here, so the other experiments do not
pay its seconds of import time).
"""
from __future__ import annotations

import contextlib
import io
import os
from typing import Iterator

from torch import Tensor


def _offline_sae_lens():
    for var, value in (("WANDB_MODE", "disabled"), ("HF_HUB_OFFLINE", "1")):
        os.environ.setdefault(var, value)
    import sae_lens
    from sae_lens.config import LoggingConfig, SAETrainerConfig

    return sae_lens, LoggingConfig, SAETrainerConfig


def train_saes(cfg, data: Iterator[Tensor]) -> dict:
    """{"sae_topk": ..., "sae_l1": ...} trained sae-lens TrainingSAEs (W_dec (d_sae, d), encode, decode).

    cfg: a RecoveryConfig (d, dict_size, k, l1_sae, steps, batch, lr, seed, device). Both see the
    same iterator in turn, so each trains on fresh samples from the same distribution.
    """
    import torch

    sae_lens, LoggingConfig, SAETrainerConfig = _offline_sae_lens()
    common = dict(d_in=cfg.d, d_sae=cfg.dict_size, device=cfg.device)
    configs = {
        "sae_topk": (sae_lens.TopKTrainingSAE, sae_lens.TopKTrainingSAEConfig(k=cfg.k, **common)),
        "sae_l1": (
            sae_lens.StandardTrainingSAE,
            sae_lens.StandardTrainingSAEConfig(l1_coefficient=cfg.l1_sae, **common),
        ),
    }
    trainer_cfg = SAETrainerConfig(
        total_training_samples=cfg.steps * cfg.batch,
        train_batch_size_samples=cfg.batch,
        lr=cfg.lr,
        lr_end=cfg.lr,  # SAETrainer needs it set explicitly when built outside a runner config
        device=cfg.device,
        logger=LoggingConfig(log_to_wandb=False),
    )
    saes = {}
    for name, (sae_class, sae_cfg) in configs.items():
        with torch.random.fork_rng(devices=[]):  # sae-lens initialises from the global RNG
            torch.manual_seed(cfg.seed)
            sae = sae_class(sae_cfg)
        # SAETrainer.fit always draws a tqdm bar; keep it off the caller's terminal.
        with contextlib.redirect_stderr(io.StringIO()):
            saes[name] = sae_lens.SAETrainer(trainer_cfg, sae, data).fit().eval()
    return saes
