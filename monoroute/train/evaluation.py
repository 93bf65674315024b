"""The numbers `monoroute eval` reports for a trained run, as one dict (also used by `monoroute sweep`)."""
from __future__ import annotations

import math
from pathlib import Path

from monoroute.errors import MonorouteError


def eval_report(run: str | Path, device: str = "cpu", batches: int | None = None) -> dict:
    """Validation loss over the run's deterministic eval windows, sizes, FLOPs/token and, for routed
    models, dead fraction plus L0 / live-slot fraction over those windows (per layer and mean)."""
    from monoroute.data import prepare_data
    from monoroute.train.trainer import evaluate_with_stats, load, recall_on_val

    if batches is not None and batches < 1:
        raise MonorouteError(f"--batches must be at least 1, got {batches}")
    loaded = load(run, device)  # verifies the checkpoint's sha256
    cfg, model = loaded.config, loaded.model
    if batches:
        cfg.train.eval_batches = batches
    store = prepare_data(cfg.data)
    val_loss, routed = evaluate_with_stats(model, store, cfg, next(model.parameters()).device)
    report = {
        "step": loaded.step,
        "val_loss": val_loss,
        "perplexity": math.exp(val_loss) if val_loss < 700 else None,  # None: too large for a float
        "params": model.n_params(),
        "active_params": model.n_active_params(),
        "flops_per_token": model.flops_per_token()["total"],
        "flops_by_component": model.flops_per_token(),
    }
    if cfg.data.tokenizer == "byte":
        report["bits_per_byte"] = val_loss / math.log(2)
    if model.routed_layers():
        report["dead_fraction"] = model.dead_fraction()
        report.update(routed)  # l0 and live_slot_fraction over the evaluated tokens, per layer and mean
        # Selection recall against the exact top-k, on the first 2,048 validation positions.
        recall = recall_on_val(model, store, cfg, next(model.parameters()).device, max_tokens=2048)
        report["selection_recall"], report["selection_mass"] = recall["recall"], recall["mass"]
        for name, layer in recall["layers"].items():
            report["routed"].setdefault(name, {}).update(selection_recall=layer["recall"], selection_mass=layer["mass"])
        diagnostics = search_diagnostics_on_val(model, store, cfg)
        for name, values in diagnostics.pop("diagnostics", {}).items():
            report["routed"].setdefault(name, {}).update(values)
        report.update(diagnostics)  # means over layers
    return report


def search_diagnostics_on_val(model, store, cfg) -> dict:
    """The routers' search diagnostics (routers.search_diagnostics, the query's shared-component ratio)
    on the first validation batch, in eval mode: {"diagnostics": {layer: {...}}, means}, or {}."""
    import torch

    from monoroute.train.trainer import autocast_for, collect_diagnostics, request_diagnostics

    device = next(model.parameters()).device
    x, _ = next(iter(store.eval_batches(cfg.train.batch_size, cfg.model.block_size, 1)))
    request_diagnostics(model)
    with torch.no_grad(), autocast_for(device, cfg.train.dtype):
        model(x.to(device))
    return collect_diagnostics(model)
