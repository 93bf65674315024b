"""`monoroute bench train`: end-to-end training tokens/s, routed vs dense at equal d, one run.

Each variant trains the same preset through the real trainer (`monoroute.train.trainer.train`),
in a temporary directory, with only the FFN changed:

- dense:              ffn="dense" (the preset's d_ff, 4·d by default);
- routed:             ffn="routed", torch AdamW over everything;
- routed_sparse_rows: ffn="routed" with the lazy row-wise AdamW for the unit tables (and
                      sparse COO table gradients when the model config has `sparse_grad`).

tokens/s is the trainer's own measure over the second half of the steps (log_every = steps/2),
so start-up and the first, slower steps are left out; validation runs only after the last
window and the single checkpoint is written after it, so neither is counted.
"""
from __future__ import annotations

import tempfile
from dataclasses import fields
from pathlib import Path

from monoroute.errors import MonorouteError
from monoroute.layers.compiled import search_impl

VARIANTS = ("dense", "routed", "routed_sparse_rows")


def variant_overrides(variant: str) -> dict:
    from monoroute.models.config import GPTConfig

    if variant == "dense":
        return {"ffn": "dense"}
    if variant == "routed":
        return {"ffn": "routed", "sparse_rows": False, "sparse_grad": False}  # stated: CPU defaults to sparse rows
    has_sparse_grad = "sparse_grad" in {f.name for f in fields(GPTConfig)}
    return {"ffn": "routed", "sparse_rows": True, **({"sparse_grad": True} if has_sparse_grad else {})}


# what the bench itself sets for every variant: --common may not change them
BENCH_KEYS = ("ffn", "steps", "out", "device", "log_every", "eval_every", "ckpt_every", "sparse_rows", "sparse_grad")


def run_train_bench(preset: str = "tiny", steps: int = 20, device: str = "cpu", log=print,
                    routed: dict | None = None, common: dict | None = None) -> dict:
    """tokens/s of each variant; `routed` holds extra settings for the two routed variants (the
    router under test), so routed / dense is one run's ratio for any routed design; `common` holds
    settings for every variant (a large preset's batch or context cut to a CPU's size)."""
    from monoroute.train.config import build_run_config
    from monoroute.train.trainer import train

    if steps < 4:
        raise MonorouteError(f"--steps must be at least 4 (half are warm-up), got {steps}")
    common = dict(common or {})
    clash = sorted(set(common) & set(BENCH_KEYS))
    if clash:
        raise MonorouteError(f"--common cannot set {', '.join(clash)}: the bench sets it for each variant")
    results = {}
    with tempfile.TemporaryDirectory(prefix="monoroute-bench-") as tmp:
        for variant in VARIANTS:
            log(f"training {variant}")
            extra = {} if variant == "dense" else dict(routed or {})
            cfg = build_run_config(preset, {
                **common, **extra, **variant_overrides(variant), "steps": steps, "out": str(Path(tmp) / variant), "device": device,
                "log_every": steps // 2, "eval_every": steps, "ckpt_every": steps,
            })
            summary = train(cfg, show_progress=False)
            results[variant] = {
                "tokens_per_s": summary["tokens_per_s"], "val_loss": summary["val_loss"],
                "d_model": cfg.model.d_model, "ffn_width": cfg.model.ffn_width,
                "n_units": cfg.model.n_units, "k": cfg.model.k, "router": cfg.model.router,
                "overrides": {**extra, **variant_overrides(variant)},
            }
    dense = results["dense"]["tokens_per_s"]
    return {
        "preset": preset, "steps": steps, "device": device, "routed_settings": dict(routed or {}),
        "common_settings": common, "variants": results,
        "search": search_impl(device),  # the product-key search: the compiled CPU kernel or torch's
        "routed_vs_dense_tokens_per_s": results["routed"]["tokens_per_s"] / dense,
        "routed_sparse_rows_vs_dense_tokens_per_s": results["routed_sparse_rows"]["tokens_per_s"] / dense,
    }


def format_table(result: dict) -> str:
    settings = " ".join(f"{k}={v}" for k, v in result.get("routed_settings", {}).items())
    common = " ".join(f"{k}={v}" for k, v in result.get("common_settings", {}).items())
    lines = [f"training throughput: preset={result['preset']} steps={result['steps']} device={result['device']}"
             f" search={result.get('search', 'torch')}" + (f" all: {common}" if common else "")
             + (f" routed: {settings}" if settings else ""),
             f"{'variant':>20} {'tokens/s':>10} {'val_loss':>9}"]
    for name, r in result["variants"].items():
        lines.append(f"{name:>20} {r['tokens_per_s']:10.0f} {r['val_loss']:9.4f}")
    lines.append(f"routed / dense tokens/s = {result['routed_vs_dense_tokens_per_s']:.3f}")
    lines.append(f"routed_sparse_rows / dense tokens/s = {result['routed_sparse_rows_vs_dense_tokens_per_s']:.3f}")
    return "\n".join(lines)
