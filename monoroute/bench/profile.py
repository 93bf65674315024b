"""`monoroute bench train --profile`: where one training step's time goes, routed vs dense, one run.

Each variant trains the preset through the real trainer under `torch.profiler` (CPU activity), and
the steps of the second half (the first half warms up) are split by the named scopes the code opens
(`record_function`): the trainer's `monoroute::{data, forward, backward, stats, optimizer, logging}`
and, inside a routed layer's forward, `monoroute::{router, units, aux}`.

A backward node is charged to the scope of the forward op that created it: the autograd engine's
`evaluate_function: <Node>` event carries the sequence number of that forward op, whose enclosing
scope is found through its parents. So "router" is the router search forward *and* backward,
"units" the selected units' compute both ways, "aux" the auxiliary losses (revival, L1, ranking)
and firing bookkeeping both ways, "trunk" everything else of forward and backward (embeddings,
attention, layer norms, a dense FFN, the LM loss). "optimizer" is gradient clipping and the
optimizer step, "stats" the per-step routed statistics and firing sync, "logging" the log steps'
records (diagnostics, recall; validation only at the last step, which is not measured), "data" the
batch, "other" the rest of the measured window. The profiler's own overhead inflates every
category a little; read shares and ratios, and the unprofiled tokens/s of `bench train` for speed.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

from monoroute.errors import MonorouteError
from monoroute.layers.compiled import search_impl

CATEGORIES = ("router", "units", "aux", "trunk", "optimizer", "stats", "logging", "data", "other")
LAYER_SCOPES = {"monoroute::router": "router", "monoroute::units": "units", "monoroute::aux": "aux"}
STEP_SCOPES = {"monoroute::optimizer": "optimizer", "monoroute::stats": "stats", "monoroute::logging": "logging",
               "monoroute::data": "data"}
BACKWARD_PREFIX = "autograd::engine::evaluate_function: "


def _span(ev) -> tuple[float, float]:
    return ev.time_range.start, ev.time_range.end


def split_events(events, measure_steps: int) -> dict:
    """Milliseconds per step in each category over the last `measure_steps` step scopes of a profiler's
    events (FunctionEvent-like: name, time_range, cpu_parent, sequence_nr)."""
    steps = sorted((e for e in events if e.name == "monoroute::step"), key=lambda e: e.time_range.start)
    if len(steps) < measure_steps or measure_steps < 1:
        raise MonorouteError(f"the profile holds {len(steps)} training steps, fewer than the {measure_steps} to measure")
    lo, hi = steps[-measure_steps].time_range.start, steps[-1].time_range.end
    inside = [e for e in events if lo <= e.time_range.start and e.time_range.end <= hi]
    total = {c: 0.0 for c in CATEGORIES}
    forward = backward = 0.0
    layer_fwd = {c: 0.0 for c in LAYER_SCOPES.values()}
    by_seq: dict[int, object] = {}
    for e in inside:
        if e.name in LAYER_SCOPES:
            layer_fwd[LAYER_SCOPES[e.name]] += e.time_range.elapsed_us()
        elif e.name in STEP_SCOPES:
            total[STEP_SCOPES[e.name]] += e.time_range.elapsed_us()
        elif e.name == "monoroute::forward":
            forward += e.time_range.elapsed_us()
        elif e.name == "monoroute::backward":
            backward += e.time_range.elapsed_us()
        seq = getattr(e, "sequence_nr", -1)
        if seq is not None and seq >= 0 and not e.name.startswith(BACKWARD_PREFIX):
            first = by_seq.get(seq)
            if first is None or e.time_range.start < first.time_range.start:  # the outermost op holds the node
                by_seq[seq] = e
    layer_bwd = {c: 0.0 for c in LAYER_SCOPES.values()}
    for e in inside:
        if not e.name.startswith(BACKWARD_PREFIX):
            continue
        fwd = by_seq.get(getattr(e, "sequence_nr", -1))
        scope = None
        while fwd is not None and scope is None:
            scope = LAYER_SCOPES.get(fwd.name)
            fwd = fwd.cpu_parent
        if scope is not None:
            layer_bwd[scope] += e.time_range.elapsed_us()
    for c in LAYER_SCOPES.values():
        total[c] = layer_fwd[c] + layer_bwd[c]
    total["trunk"] = max(0.0, forward - sum(layer_fwd.values())) + max(0.0, backward - sum(layer_bwd.values()))
    window = hi - lo
    total["other"] = max(0.0, window - sum(total.values()))
    ms = {c: v / 1000.0 / measure_steps for c, v in total.items()}
    step_ms = window / 1000.0 / measure_steps
    return {"step_ms": step_ms, "ms": ms, "share": {c: v / step_ms if step_ms else 0.0 for c, v in ms.items()},
            "forward_ms": {c: v / 1000.0 / measure_steps for c, v in layer_fwd.items()},
            "backward_ms": {c: v / 1000.0 / measure_steps for c, v in layer_bwd.items()}}


def run_profile(preset: str = "cpu-small", steps: int = 8, device: str = "cpu", log=print,
                routed: dict | None = None) -> dict:
    """The split of both variants (dense 4·d and the preset's routed design) in one run."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from monoroute.models.flops import flops_per_token
    from monoroute.train.config import build_run_config
    from monoroute.train.trainer import train

    if steps < 4:
        raise MonorouteError(f"--steps must be at least 4 (half are warm-up), got {steps}")
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
    out = {"preset": preset, "steps": steps, "measured_steps": steps // 2, "device": device,
           "routed_settings": dict(routed or {}), "threads": torch.get_num_threads(), "search": search_impl(device),
           "variants": {}}
    with tempfile.TemporaryDirectory(prefix="monoroute-profile-") as tmp:
        for variant in ("dense", "routed"):
            log(f"profiling {variant}")
            extra = {} if variant == "dense" else dict(routed or {})
            overrides = {"ffn": "dense"} if variant == "dense" else {"ffn": "routed"}
            cfg = build_run_config(preset, {**extra, **overrides, "steps": steps, "out": str(Path(tmp) / variant),
                                            "device": device, "log_every": steps // 2, "eval_every": steps,
                                            "ckpt_every": steps})
            with profile(activities=activities) as prof:
                train(cfg, show_progress=False)
            split = split_events(prof.events(), steps // 2)
            split["tokens_per_step"] = cfg.train.batch_size * cfg.model.block_size * cfg.train.grad_accum
            split["flops_per_token"] = float(flops_per_token(cfg.model)["total"])
            split["config"] = {"ffn": cfg.model.ffn, "d_model": cfg.model.d_model, "n_units": cfg.model.n_units,
                               "k": cfg.model.k, "router": cfg.model.router, "coupling": cfg.model.coupling,
                               "dense_beside": cfg.model.dense_beside, "d_ff": cfg.model.ffn_width}
            out["variants"][variant] = split
    d, r = out["variants"]["dense"], out["variants"]["routed"]
    out["routed_vs_dense_step_time"] = r["step_ms"] / d["step_ms"]
    out["routed_vs_dense_flops"] = r["flops_per_token"] / d["flops_per_token"]
    return out


def format_table(result: dict) -> str:
    d, r = result["variants"]["dense"], result["variants"]["routed"]
    lines = [f"one training step, split (preset={result['preset']}, {result['measured_steps']} measured steps of "
             f"{result['steps']}, device={result['device']}, {result['threads']} threads; under the profiler)",
             f"{'category':>10} {'routed ms':>10} {'share':>6} {'dense ms':>9} {'share':>6}"]
    for c in CATEGORIES:
        lines.append(f"{c:>10} {r['ms'][c]:10.1f} {r['share'][c]:6.1%} {d['ms'][c]:9.1f} {d['share'][c]:6.1%}")
    lines.append(f"{'step':>10} {r['step_ms']:10.1f} {'':>6} {d['step_ms']:9.1f}")
    lines.append(f"routed / dense step time = {result['routed_vs_dense_step_time']:.3f} at "
                 f"{result['routed_vs_dense_flops']:.2f}x the FLOPs per token")
    return "\n".join(lines)
