"""`monoroute bench layer`: does a RoutedFFN's cost scale with k and not with the width N?

One run measures, for a grid of N (unit count) x k (units per token) at fixed T tokens and d_model:

- router forward / backward (the product-key router's query, sub-key scores and candidate top-k);
- unit compute forward / backward (the layer with the routing held fixed: gathers, activation,
  weighted sum, and in backward the weight-row gradients);
- the whole layer forward / backward (`fwd_bwd`, the headline time);
- one optimizer step over the layer's parameters, three ways on the same gradients: torch AdamW
  with dense gradients, RowSparseAdamW with dense gradients (nonzero-row scan), and RowSparseAdamW
  with the sparse COO gradients of RoutedFFN(sparse_grad=True);
- peak memory of one forward+backward (CPU: peak RSS; GPU: max_memory_allocated), and on GPU the
  unit compute's achieved bandwidth as a fraction of the device's peak.

Baselines at the same d and T: a dense 4·d FFN (Linear-ReLU-Linear) and, per N, a FLOP-matched
dense FFN of width N/40. Ratios (all from this one run):

    R_N  = fwd_bwd(N=max) / fwd_bwd(N=min)          at k = k_ref (32)
    R_k  = fwd_bwd(k=max) / fwd_bwd(k=min)          at N = n_ref (65536)
    routed_vs_dense4d = fwd_bwd(N=n_compare, k_ref) / fwd_bwd(dense 4·d), n_compare = 32761 = 181²,
                        the perfect square nearest 32k (the product-key router needs a square).

The layer runs in training mode with the dead-unit revival loss off (aux_coef=0): revival is a
training-schedule choice, not part of the per-token cost being measured.
"""
from __future__ import annotations

import gc
import inspect
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from monoroute.bench.timing import peak_bandwidth, peak_memory, time_phases
from monoroute.errors import MonorouteError
from monoroute.layers import RoutedFFN, Routing
from monoroute.train.optim import build_optimizer

DEFAULTS = {"cpu": dict(d=256, tokens=4096, warmup=2, repeats=5), "cuda": dict(d=768, tokens=8192, warmup=2, repeats=5)}
QUICK = dict(d=64, tokens=1024, warmup=1, repeats=3)
OPTIMIZERS = ("adamw_dense_grad", "row_sparse_dense_grad", "row_sparse_sparse_grad")
LR, WEIGHT_DECAY = 1e-3, 0.1


@dataclass
class LayerBenchConfig:
    device: str = "cpu"
    d: int | None = None  # None (here and below): the device's default (DEFAULTS; QUICK with quick=True)
    tokens: int | None = None
    n_units: tuple[int, ...] = (16_384, 65_536, 262_144, 1_048_576)
    ks: tuple[int, ...] = (16, 32, 64)
    k_ref: int = 32  # k of the N sweep (R_N) and of the dense comparison
    n_ref: int = 65_536  # N of the k sweep (R_k)
    n_compare: int = 32_761  # N of routed_vs_dense4d: 181², the perfect square nearest 32k
    router: str = "product_key"
    impl: str = "auto"
    sparse_grad: str = "auto"  # auto: use RoutedFFN(sparse_grad=True) for fwd_bwd where it exists
    dtype: str = "auto"  # auto: float32 on CPU, bfloat16 on CUDA
    quick: bool = False  # N sweep at k_ref and k sweep at n_ref only (optimizers on the N sweep only),
    #                      smaller d and T unless given, fewer repeats
    warmup: int | None = None  # None: 2 (quick: 1)
    repeats: int | None = None  # None: 5 (quick: 3)
    # More RoutedFFN settings for every routed layer of the grid (e.g. coupling="rerank", router_heads=4).
    layer_settings: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def resolve(self) -> "LayerBenchConfig":
        """Fill the device-dependent defaults and check the grid; returns self."""
        if self.device not in DEFAULTS:
            raise MonorouteError(f"unknown device {self.device!r}; use --device cpu or --device cuda")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise MonorouteError("--device cuda but no CUDA device is available; use --device cpu")
        base = {**DEFAULTS[self.device], **(QUICK if self.quick else {})}
        self.d, self.tokens = self.d or base["d"], self.tokens or base["tokens"]
        self.warmup = base["warmup"] if self.warmup is None else self.warmup
        self.repeats = base["repeats"] if self.repeats is None else self.repeats
        if self.dtype == "auto":
            self.dtype = "bfloat16" if self.device == "cuda" else "float32"
        if self.k_ref not in self.ks:
            raise MonorouteError(f"k_ref={self.k_ref} is not in the k grid {self.ks}; add it to --k")
        if self.n_ref not in self.n_units:
            raise MonorouteError(f"n_ref={self.n_ref} is not in the N grid {self.n_units}; add it to --n-units")
        known = set(inspect.signature(RoutedFFN).parameters) - {"d_model", "n_units", "k", "router", "impl"}
        unknown = sorted(set(self.layer_settings) - known)
        if unknown:
            raise MonorouteError(f"--layer-set: unknown RoutedFFN setting(s) {', '.join(unknown)}; valid: "
                                 f"{', '.join(sorted(known))}")
        has_flag = "sparse_grad" in inspect.signature(RoutedFFN).parameters
        if self.sparse_grad == "auto":
            self.sparse_grad = "on" if has_flag else "off"
        if not has_flag:
            if self.sparse_grad == "on":
                raise MonorouteError("--sparse-grad on needs RoutedFFN(sparse_grad=...), which this version lacks")
            self.notes.append("RoutedFFN has no sparse_grad flag yet: the sparse-gradient optimizer is skipped")
        return self

    def grid(self) -> list[tuple[int, int]]:
        """(N, k) pairs: the full cross product, or with quick only the two sweeps; plus n_compare."""
        if self.quick:
            pairs = [(n, self.k_ref) for n in self.n_units] + [(self.n_ref, k) for k in self.ks]
        else:
            pairs = [(n, k) for n in self.n_units for k in self.ks]
        pairs.append((self.n_compare, self.k_ref))
        return sorted(set(pairs))


class FixedRouter(nn.Module):
    """Stands in for a layer's router and returns a precomputed routing: times the compute alone."""

    def __init__(self, routing: Routing) -> None:
        super().__init__()
        self.routing = routing

    def forward(self, x: Tensor, w_in: Tensor | None = None, b_in: Tensor | None = None) -> Routing:
        return self.routing


def run_layer_bench(cfg: LayerBenchConfig, log=print) -> dict:
    """Run the whole grid and the dense baselines; returns the JSON-able result."""
    cfg.resolve()
    device, dtype = torch.device(cfg.device), getattr(torch, cfg.dtype)
    torch.manual_seed(0)
    x = torch.randn(cfg.tokens, cfg.d, device=device, dtype=dtype)
    grad_y = torch.randn_like(x)
    routed = []
    for n, k in cfg.grid():
        log(f"routed N={n} k={k}")
        routed.append(bench_routed(cfg, n, k, x, grad_y))
    log("dense 4d")
    dense4d = bench_dense(cfg, 4 * cfg.d, x, grad_y)
    matched = []
    for n in [cfg.n_compare] if cfg.quick else sorted({n for n, _ in cfg.grid()}):
        log(f"dense matched width={n // 40}")
        matched.append({"n_units": n, **bench_dense(cfg, max(1, n // 40), x, grad_y)})
    result = {
        "config": {key: value for key, value in asdict(cfg).items() if key != "notes"},
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch_threads": torch.get_num_threads(),
        "routed": routed,
        "dense4d": dense4d,
        "dense_matched": matched,
        "notes": cfg.notes,
    }
    result.update(ratios(cfg, routed, dense4d, matched))
    return result


def time_routed(cfg: LayerBenchConfig, n: int, k: int, x: Tensor, grad_y: Tensor) -> tuple[RoutedFFN, dict]:
    """A new layer and its router / unit compute / whole-layer forward and backward times."""
    device, dtype = x.device, x.dtype
    torch.manual_seed(1)
    sparse_kwargs = {"sparse_grad": cfg.sparse_grad == "on"} if cfg.sparse_grad != "off" else {}
    layer = RoutedFFN(cfg.d, n, k, router=cfg.router, impl=cfg.impl, **{**cfg.layer_settings, "aux_coef": 0.0},
                      **sparse_kwargs)
    layer = layer.to(device, dtype).train()
    x = x.detach().requires_grad_()
    time = lambda phases: time_phases(phases, device, cfg.warmup, cfg.repeats)  # noqa: E731

    def clear(_=None):
        layer.zero_grad(set_to_none=True)
        x.grad = None

    out: dict[str, Any] = {"n_units": n, "k": k}
    # Router alone (the dense router's selection has no gradient, so no backward).
    grad_scores = torch.randn(cfg.tokens, k, device=device, dtype=dtype)
    routing = layer.router(x, layer.w_in, layer.b_in)
    if routing.scores.requires_grad:
        _, out["router_fwd"], out["router_bwd"] = time(
            [clear, lambda _: layer.router(x, layer.w_in, layer.b_in).scores, lambda s: s.backward(grad_scores)]
        )
    else:
        _, out["router_fwd"] = time([clear, lambda _: layer.router(x, layer.w_in, layer.b_in)])
        out["router_bwd"] = 0.0

    # Unit compute alone: the same layer with its routing held fixed (and no ranking loss, which is the
    # re-ranking router's own cost and needs the candidates a fixed routing does not carry).
    router, rank_coef = layer.router, layer.rank_coef
    layer.router = FixedRouter(Routing(routing.indices, routing.scores.detach().requires_grad_()))
    layer.rank_coef = 0.0
    _, out["compute_fwd"], out["compute_bwd"] = time([clear, lambda _: layer(x), lambda y: y.backward(grad_y)])
    layer.router, layer.rank_coef = router, rank_coef

    # Whole layer.
    _, out["fwd"], out["bwd"] = time([clear, lambda _: layer(x), lambda y: y.backward(grad_y)])
    out["fwd_bwd"] = out["fwd"] + out["bwd"]
    return layer, out


def bench_routed(cfg: LayerBenchConfig, n: int, k: int, x: Tensor, grad_y: Tensor) -> dict:
    """Times (and peak memory: parameters + gradients + activations, no optimizer) of one layer."""
    with peak_memory(x.device) as mem:
        layer, out = time_routed(cfg, n, k, x, grad_y)
    out["peak_mem_bytes"], out["peak_mem_method"] = mem["bytes"], mem["method"]
    if k == cfg.k_ref or not cfg.quick:  # quick: optimizer costs only along the N sweep (R_N)
        out.update(bench_optimizers(cfg, layer, x, grad_y))
    if x.device.type == "cuda":
        out.update(bandwidth(cfg, k, x.dtype, out["compute_fwd"] + out["compute_bwd"], x.device))
    del layer
    gc.collect()
    return out


def set_sparse_grad(layer: RoutedFFN, on: bool) -> None:
    if hasattr(layer, "sparse_grad"):
        layer.sparse_grad = on


def bench_optimizers(cfg: LayerBenchConfig, layer: RoutedFFN, x: Tensor, grad_y: Tensor) -> dict:
    """Seconds per optimizer step over the layer's parameters, for each (gradient, optimizer) pair.

    Each variant gets the gradients of one real backward; its state is freed before the next.
    """
    times: dict[str, float | None] = {}
    for name in OPTIMIZERS:
        sparse_grad, sparse_rows = name.endswith("_sparse_grad"), name.startswith("row_sparse")
        if sparse_grad and not hasattr(layer, "sparse_grad"):
            times[f"opt_{name}"] = None
            continue
        set_sparse_grad(layer, sparse_grad)
        layer.zero_grad(set_to_none=True)
        layer(x).backward(grad_y)
        opt = build_optimizer(layer, LR, WEIGHT_DECAY, sparse_rows=sparse_rows)
        (times[f"opt_{name}"],) = time_phases([lambda _: opt.step()], x.device, cfg.warmup, cfg.repeats)
        del opt
        gc.collect()
    layer.zero_grad(set_to_none=True)
    return times


def bandwidth(cfg: LayerBenchConfig, k: int, dtype: torch.dtype, seconds: float, device: torch.device) -> dict:
    """Unit-compute bytes moved and the fraction of peak bandwidth achieved (GPU).

    Bytes, per element size e: forward reads k rows of w_in and of w_out per token and x, writes y:
    e·(2·T·k·d + 2·T·d); backward reads the 2·T·k rows again plus grad_y and x, writes dx and at
    most 2·T·k gradient rows: e·(4·T·k·d + 3·T·d). Index and gate traffic (O(T·k)) is ignored.
    """
    t, d, e = cfg.tokens, cfg.d, torch.finfo(dtype).bits // 8
    moved = e * (6 * t * k * d + 5 * t * d)
    peak = peak_bandwidth(device)
    return {
        "compute_bytes": moved,
        "compute_bytes_per_s": moved / seconds,
        "peak_bandwidth": peak,
        "bandwidth_fraction": moved / seconds / peak if peak else None,
    }


def bench_dense(cfg: LayerBenchConfig, width: int, x: Tensor, grad_y: Tensor) -> dict:
    """A dense Linear(d, width)-ReLU-Linear(width, d) FFN: forward, backward, AdamW step, and the
    peak memory of creating it and running forward+backward (as for the routed layer)."""
    with peak_memory(x.device) as mem:
        torch.manual_seed(2)
        ffn = nn.Sequential(nn.Linear(cfg.d, width), nn.ReLU(), nn.Linear(width, cfg.d)).to(x.device, x.dtype)
        x = x.detach().requires_grad_()

        def clear(_=None):
            ffn.zero_grad(set_to_none=True)
            x.grad = None

        _, fwd, bwd = time_phases([clear, lambda _: ffn(x), lambda y: y.backward(grad_y)], x.device,
                                  cfg.warmup, cfg.repeats)
    opt = build_optimizer(ffn, LR, WEIGHT_DECAY)
    (opt_time,) = time_phases([lambda _: opt.step()], x.device, cfg.warmup, cfg.repeats)
    return {"width": width, "fwd": fwd, "bwd": bwd, "fwd_bwd": fwd + bwd, "opt_adamw_dense_grad": opt_time,
            "peak_mem_bytes": mem["bytes"]}


def ratios(cfg: LayerBenchConfig, routed: list[dict], dense4d: dict, matched: list[dict]) -> dict:
    at = {(r["n_units"], r["k"]): r for r in routed}
    n_min, n_max = min(cfg.n_units), max(cfg.n_units)
    k_min, k_max = min(cfg.ks), max(cfg.ks)
    compare = at[(cfg.n_compare, cfg.k_ref)]
    matched_compare = next(m for m in matched if m["n_units"] == cfg.n_compare)

    def ratio(key: str, a: dict, b: dict) -> float | None:
        return a[key] / b[key] if a.get(key) is not None and b.get(key) else None

    best_opt = "opt_row_sparse_sparse_grad" if at[(n_max, cfg.k_ref)]["opt_row_sparse_sparse_grad"] else (
        "opt_row_sparse_dense_grad")
    return {
        "R_N": ratio("fwd_bwd", at[(n_max, cfg.k_ref)], at[(n_min, cfg.k_ref)]),
        "R_N_at": {"k": cfg.k_ref, "n_units": [n_min, n_max]},
        "R_k": ratio("fwd_bwd", at[(cfg.n_ref, k_max)], at[(cfg.n_ref, k_min)]),
        "R_k_at": {"n_units": cfg.n_ref, "k": [k_min, k_max]},
        "routed_vs_dense4d": ratio("fwd_bwd", compare, dense4d),
        "routed_vs_dense_matched": ratio("fwd_bwd", compare, matched_compare),
        "routed_vs_dense4d_at": {"n_units": cfg.n_compare, "k": cfg.k_ref, "measure": "fwd_bwd"},
        "R_N_opt_adamw": ratio("opt_adamw_dense_grad", at[(n_max, cfg.k_ref)], at[(n_min, cfg.k_ref)]),
        "R_N_opt_row_sparse": ratio(best_opt, at[(n_max, cfg.k_ref)], at[(n_min, cfg.k_ref)]),
        "R_N_opt_row_sparse_measure": best_opt,
        "R_N_step_row_sparse": step_ratio(at[(n_max, cfg.k_ref)], at[(n_min, cfg.k_ref)], best_opt),
    }


def step_ratio(big: dict, small: dict, opt_key: str) -> float:
    """Ratio of whole training-step times (fwd + bwd + optimizer step) of two configurations."""
    return (big["fwd_bwd"] + big[opt_key]) / (small["fwd_bwd"] + small[opt_key])


def format_table(result: dict) -> str:
    """The result as a fixed-width text table (milliseconds) followed by the ratios."""
    ms = lambda s: "-" if s is None else f"{1e3 * s:9.2f}"  # noqa: E731
    cols = ("router_fwd", "router_bwd", "compute_fwd", "compute_bwd", "fwd_bwd", *(f"opt_{o}" for o in OPTIMIZERS))
    heads = ("rt_fwd", "rt_bwd", "cmp_fwd", "cmp_bwd", "fwd+bwd", "opt_adamw", "opt_rs_dns", "opt_rs_coo")
    cfg = result["config"]
    lines = [f"RoutedFFN bench: device={result['device_name']} d={cfg['d']} T={cfg['tokens']} "
             f"router={cfg['router']} impl={cfg['impl']} dtype={cfg['dtype']} sparse_grad={cfg['sparse_grad']} "
             f"(ms, median of {cfg['repeats']})",
             f"{'N':>8} {'k':>3} " + " ".join(f"{h:>10}" for h in heads) + f" {'peak MiB':>9}"]
    for r in result["routed"]:
        lines.append(f"{r['n_units']:>8} {r['k']:>3} " + " ".join(f"{ms(r.get(c)):>10}" for c in cols)
                     + f" {r['peak_mem_bytes'] / 2**20:9.1f}")
    for name, rows in (("dense4d", [result["dense4d"]]), ("matched", result["dense_matched"])):
        for r in rows:
            lines.append(f"{name:>8} w={r['width']:<6} fwd+bwd {ms(r['fwd_bwd'])} "
                         f"opt_adamw {ms(r['opt_adamw_dense_grad'])} peak MiB {r['peak_mem_bytes'] / 2**20:.1f}")
    for key in ("R_N", "R_k", "routed_vs_dense4d", "routed_vs_dense_matched", "R_N_opt_adamw", "R_N_opt_row_sparse",
                "R_N_step_row_sparse"):
        value = result[key]
        lines.append(f"{key} = {'n/a' if value is None else f'{value:.3f}'}")
    lines.append(f"R_N at {result['R_N_at']}, R_k at {result['R_k_at']}, "
                 f"routed_vs_dense4d at {result['routed_vs_dense4d_at']}")
    lines += [f"note: {n}" for n in result["notes"]]
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    """Time vs N (log x): routed fwd+bwd per k, dense baselines, optimizer steps at k_ref."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cfg = result["config"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for k in sorted({r["k"] for r in result["routed"]}):
        rows = sorted((r for r in result["routed"] if r["k"] == k), key=lambda r: r["n_units"])
        if len(rows) > 1:
            ax.plot([r["n_units"] for r in rows], [r["fwd_bwd"] for r in rows], "o-", label=f"routed fwd+bwd, k={k}")
    ref = sorted((r for r in result["routed"] if r["k"] == cfg["k_ref"]), key=lambda r: r["n_units"])
    ns = [r["n_units"] for r in ref]
    for key, style in (("opt_adamw_dense_grad", "s:"), ("opt_row_sparse_dense_grad", "^:"),
                       ("opt_row_sparse_sparse_grad", "v:")):
        if all(r[key] is not None for r in ref):
            ax.plot(ns, [r[key] for r in ref], style, label=f"{key[4:]} step, k={cfg['k_ref']}")
    matched = result["dense_matched"]
    ax.plot([m["n_units"] for m in matched], [m["fwd_bwd"] for m in matched], "x--", label="dense width N/40 fwd+bwd")
    ax.axhline(result["dense4d"]["fwd_bwd"], color="k", ls="--", label="dense 4d fwd+bwd")
    ax.set(xscale="log", yscale="log", xlabel="N (units)", ylabel="seconds (median)",
           title=f"RoutedFFN, {result['device_name']}, d={cfg['d']}, T={cfg['tokens']}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_outputs(result: dict, out_dir: Path) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    device = result["config"]["device"]
    json_path, png_path = out_dir / f"bench_layer_{device}.json", out_dir / f"bench_layer_{device}.png"
    json_path.write_text(json.dumps(result, indent=2))
    plot(result, png_path)
    return json_path, png_path
