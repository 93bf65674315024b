"""`monoroute bench generate`: sampling tokens/s with a KV cache, routed vs dense, batch 1 and 16.

Both variants are the preset's model shape (dense: ffn="dense" at the preset's d_ff; routed: the
preset's routed design), untrained (speed does not depend on the weights' values), in eval mode.
Each generates `new` tokens after a `prompt`-token random prompt with `generate(..., use_cache=True)`
(greedy, so no sampling noise in the work). After one warm-up each, the two variants are timed in
turn, `repeats` times: a machine whose speed drifts (a shared VM's clock moved dense's own tokens/s
by up to 25 % between runs) moves both sides of each pair alike, so the ratio reported is the median
of the per-pair ratios, and each variant's tokens/s the median of its times. Also the uncached time
(the context re-read every token), to show what the cache buys. Memory: the weights' bytes and the KV
cache's at the end (both computed), and on CUDA the peak allocated.
"""
from __future__ import annotations

import statistics
import time

from monoroute.errors import MonorouteError
from monoroute.layers.compiled import search_impl

VARIANTS = ("dense", "routed")


def _once(fn, device) -> float:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t


def _paired_times(fns: dict, repeats: int, device) -> dict[str, list[float]]:
    """Each variant's times over `repeats` rounds, the variants timed in turn within a round."""
    for fn in fns.values():
        fn()  # warm-up
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(_once(fn, device))
    return times


def run_generate_bench(preset: str = "cpu-small", batches: tuple[int, ...] = (1, 16), prompt: int = 16,
                       new: int = 64, repeats: int = 5, device: str = "cpu", log=print,
                       routed: dict | None = None, common: dict | None = None) -> dict:
    import torch

    from monoroute.models import GPT
    from monoroute.models.gpt import KVCache, generate
    from monoroute.train.config import build_run_config

    dev = torch.device(device)
    if prompt < 1 or new < 1 or repeats < 1:
        raise MonorouteError(f"--prompt, --new and --repeats must be >= 1, got {prompt}, {new} and {repeats}")
    if "ffn" in (common or {}):
        raise MonorouteError("--common cannot set ffn: the bench runs one dense and one routed variant")
    out = {"preset": preset, "prompt": prompt, "new": new, "repeats": repeats, "device": device,
           "threads": torch.get_num_threads(), "search": search_impl(device), "routed_settings": dict(routed or {}),
           "common_settings": dict(common or {}), "variants": {}}
    models = {}
    for variant in VARIANTS:
        overrides = {**dict(common or {}), **({"ffn": "dense"} if variant == "dense" else {**dict(routed or {}),
                                                                                         "ffn": "routed"})}
        cfg = build_run_config(preset, {**overrides, "out": "unused", "device": device}).model
        if prompt + new > cfg.block_size:
            raise MonorouteError(f"--prompt {prompt} + --new {new} exceeds the preset's context ({cfg.block_size}); "
                                 f"use fewer tokens")
        torch.manual_seed(0)
        models[variant] = GPT(cfg).to(dev).eval()
        out["variants"][variant] = {"batches": {}, "weight_bytes": sum(p.numel() * p.element_size()
                                                                       for p in models[variant].parameters()),
                                    "params": models[variant].n_params(),
                                    "flops_per_token": models[variant].flops_per_token()["total"]}
    vocab = min(m.cfg.vocab_size for m in models.values())
    ratios = {}
    for b in batches:
        log(f"batch {b}: {repeats} rounds of dense and routed in turn")
        idx = torch.randint(0, vocab, (b, prompt), device=dev)

        def run(model, use_cache):
            return lambda: generate(model, idx, new, temperature=1e-6, top_k=1, use_cache=use_cache)

        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        cached = _paired_times({name: run(m, True) for name, m in models.items()}, repeats, dev)
        peak = torch.cuda.max_memory_allocated() if dev.type == "cuda" else None  # the larger variant's
        uncached = _paired_times({name: run(m, False) for name, m in models.items()}, repeats, dev)
        ratios[str(b)] = statistics.median(d / r for d, r in zip(cached["dense"], cached["routed"]))
        for name, model in models.items():
            cache = KVCache(model.cfg.n_layer)
            with torch.no_grad():
                model(torch.zeros(b, prompt + new, dtype=torch.long, device=dev), cache=cache)
            out["variants"][name]["batches"][str(b)] = {
                "tokens_per_s": b * new / statistics.median(cached[name]),
                "tokens_per_s_uncached": b * new / statistics.median(uncached[name]),
                "kv_cache_bytes": cache.nbytes(), "cuda_peak_bytes": peak}
    out["routed_vs_dense_tokens_per_s"] = ratios  # median over rounds of (dense time / routed time)
    d, r = out["variants"]["dense"], out["variants"]["routed"]
    out["routed_vs_dense_flops"] = r["flops_per_token"] / d["flops_per_token"]
    return out


def format_table(result: dict) -> str:
    common = " ".join(f"{k}={v}" for k, v in result.get("common_settings", {}).items())
    lines = [f"generation with a KV cache (preset={result['preset']}{' ' + common if common else ''}, prompt "
             f"{result['prompt']} + {result['new']} new tokens, greedy, device={result['device']}, "
             f"{result['threads']} threads, untrained weights)",
             f"{'variant':>8} {'batch':>5} {'tokens/s':>10} {'uncached':>10} {'KV cache MB':>11} {'weights MB':>10}"]
    for name, v in result["variants"].items():
        for b, row in v["batches"].items():
            lines.append(f"{name:>8} {b:>5} {row['tokens_per_s']:10.1f} {row['tokens_per_s_uncached']:10.1f} "
                         f"{row['kv_cache_bytes'] / 2**20:11.2f} {v['weight_bytes'] / 2**20:10.1f}")
    for b, ratio in result["routed_vs_dense_tokens_per_s"].items():
        lines.append(f"routed / dense tokens/s at batch {b} = {ratio:.3f} (median over {result['repeats']} paired rounds)")
    lines.append(f"(routed / dense FLOPs per token = {result['routed_vs_dense_flops']:.2f})")
    return "\n".join(lines)
