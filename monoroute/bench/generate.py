"""`monoroute bench generate`: sampling tokens/s with a KV cache, routed vs dense, batch 1 and 16.

Both variants are the preset's model shape (dense: ffn="dense" at the preset's d_ff; routed: the
preset's routed design), untrained (speed does not depend on the weights' values), in eval mode.
Each generates `new` tokens after a `prompt`-token random prompt with `generate(..., use_cache=True)`
(greedy, so no sampling noise in the work); the time is the median of `repeats` runs after one
warm-up. Also the uncached time (the context re-read every token), to show what the cache buys.
Memory: the weights' bytes and the KV cache's at the end (both computed), and on CUDA the peak
allocated.
"""
from __future__ import annotations

import statistics
import time

from monoroute.errors import MonorouteError
from monoroute.layers.compiled import search_impl


def _time(fn, repeats: int, device) -> float:
    import torch

    fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def run_generate_bench(preset: str = "cpu-small", batches: tuple[int, ...] = (1, 16), prompt: int = 16,
                       new: int = 64, repeats: int = 3, device: str = "cpu", log=print,
                       routed: dict | None = None) -> dict:
    import torch

    from monoroute.models import GPT
    from monoroute.models.gpt import KVCache, generate
    from monoroute.train.config import build_run_config

    dev = torch.device(device)
    if prompt < 1 or new < 1:
        raise MonorouteError(f"--prompt and --new must be >= 1, got {prompt} and {new}")
    out = {"preset": preset, "prompt": prompt, "new": new, "repeats": repeats, "device": device,
           "threads": torch.get_num_threads(), "search": search_impl(device), "routed_settings": dict(routed or {}),
           "variants": {}}
    for variant in ("dense", "routed"):
        overrides = {"ffn": "dense"} if variant == "dense" else {**dict(routed or {}), "ffn": "routed"}
        cfg = build_run_config(preset, {**overrides, "out": "unused", "device": device}).model
        if prompt + new > cfg.block_size:
            raise MonorouteError(f"--prompt {prompt} + --new {new} exceeds the preset's context ({cfg.block_size}); "
                                 f"use fewer tokens")
        torch.manual_seed(0)
        model = GPT(cfg).to(dev).eval()
        weights = sum(p.numel() * p.element_size() for p in model.parameters())
        rows = {}
        for b in batches:
            log(f"{variant}: batch {b}")
            idx = torch.randint(0, cfg.vocab_size, (b, prompt), device=dev)
            if dev.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            cached = _time(lambda: generate(model, idx, new, temperature=1e-6, top_k=1, use_cache=True), repeats, dev)
            peak = torch.cuda.max_memory_allocated() if dev.type == "cuda" else None
            uncached = _time(lambda: generate(model, idx, new, temperature=1e-6, top_k=1, use_cache=False),
                             repeats, dev)
            cache = KVCache(cfg.n_layer)
            with torch.no_grad():
                model(torch.zeros(b, prompt + new, dtype=torch.long, device=dev), cache=cache)
            rows[str(b)] = {"tokens_per_s": b * new / cached, "tokens_per_s_uncached": b * new / uncached,
                            "kv_cache_bytes": cache.nbytes(), "cuda_peak_bytes": peak}
        out["variants"][variant] = {"batches": rows, "weight_bytes": weights, "params": model.n_params(),
                                    "flops_per_token": model.flops_per_token()["total"]}
    d, r = out["variants"]["dense"], out["variants"]["routed"]
    out["routed_vs_dense_tokens_per_s"] = {b: r["batches"][b]["tokens_per_s"] / d["batches"][b]["tokens_per_s"]
                                           for b in d["batches"]}
    out["routed_vs_dense_flops"] = r["flops_per_token"] / d["flops_per_token"]
    return out


def format_table(result: dict) -> str:
    lines = [f"generation with a KV cache (preset={result['preset']}, prompt {result['prompt']} + {result['new']} "
             f"new tokens, greedy, device={result['device']}, {result['threads']} threads, untrained weights)",
             f"{'variant':>8} {'batch':>5} {'tokens/s':>10} {'uncached':>10} {'KV cache MB':>11} {'weights MB':>10}"]
    for name, v in result["variants"].items():
        for b, row in v["batches"].items():
            lines.append(f"{name:>8} {b:>5} {row['tokens_per_s']:10.1f} {row['tokens_per_s_uncached']:10.1f} "
                         f"{row['kv_cache_bytes'] / 2**20:11.2f} {v['weight_bytes'] / 2**20:10.1f}")
    for b, ratio in result["routed_vs_dense_tokens_per_s"].items():
        lines.append(f"routed / dense tokens/s at batch {b} = {ratio:.3f}")
    lines.append(f"(routed / dense FLOPs per token = {result['routed_vs_dense_flops']:.2f})")
    return "\n".join(lines)
