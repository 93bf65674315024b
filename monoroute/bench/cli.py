"""`monoroute bench {layer,train,agreement,serve,shard-memory}`: argparse wiring for the benchmarks.

Progress and (with --json) the table go to stderr, so with --json stdout is exactly one JSON object.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path

from monoroute.errors import MonorouteError


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _emit(result: dict, table: str, as_json: bool) -> None:
    if as_json:
        _stderr(table)
        print(json.dumps(result))
    else:
        print(table)


def run_layer(args) -> int:
    import torch

    from monoroute.bench.layer import LayerBenchConfig, format_table, run_layer_bench, write_outputs

    sizes = {key: getattr(args, key) for key in ("n_units", "ks", "n_ref", "n_compare", "k_ref", "d", "tokens",
                                                  "warmup", "repeats") if getattr(args, key) is not None}
    # Quick (CI) runs on CPU default to one thread: on a shared 2-core machine OpenMP barrier
    # stalls make 2-thread timings swing by 10x, and the run takes longer, not shorter.
    threads = args.threads or (1 if args.quick and args.device == "cpu" else None)
    if threads:
        torch.set_num_threads(threads)
    from monoroute.cli import parse_set

    cfg = LayerBenchConfig(device=args.device, router=args.router, impl=args.impl, sparse_grad=args.sparse_grad,
                           dtype=args.dtype, quick=args.quick, layer_settings=dict(parse_set(i) for i in args.layer_set),
                           **sizes)
    result = run_layer_bench(cfg, log=_stderr)
    json_path, png_path = write_outputs(result, Path(args.out))
    _stderr(f"wrote {json_path} and {png_path}")
    _emit(result, format_table(result), args.json)
    return 0


def run_train(args) -> int:
    from monoroute.cli import parse_set

    routed = dict(parse_set(item) for item in args.set)  # routed variants only, e.g. router=cluster
    common = dict(parse_set(item) for item in args.common)  # every variant, e.g. batch_size=4
    if args.profile:
        from monoroute.bench.profile import format_table, run_profile

        if common:
            raise MonorouteError("--common is for the throughput bench; --profile runs the preset as it is")
        with contextlib.redirect_stdout(sys.stderr):
            result = run_profile(args.preset, args.steps, args.device, log=_stderr, routed=routed)
    else:
        from monoroute.bench.train import format_table, run_train_bench

        with contextlib.redirect_stdout(sys.stderr):  # the trainer's own prints must not mix into --json
            result = run_train_bench(args.preset, args.steps, args.device, log=_stderr, routed=routed, common=common)
    _emit(result, format_table(result), args.json)
    return 0


def run_shard_memory(args) -> int:
    from monoroute.train.fsdp import format_memory_table, shard_memory_table

    rows = shard_memory_table()
    _emit({"rows": rows}, format_memory_table(rows), args.json)
    return 0


def run_agreement(args) -> int:
    from monoroute.bench.agreement import format_agreement, run_agreement as measure

    result = measure(args.runs, args.d_model, args.n_units, args.k, args.tokens, args.couplings.split(","),
                     list(args.heads))
    _emit(result, format_agreement(result), args.json)
    return 0


def run_serve(args) -> int:
    from monoroute.bench.serve import format_table, run_serve_bench

    result = run_serve_bench(args.runs, args.n_units, args.positions, args.k, args.repeats, args.browser, log=_stderr)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_serve.json").write_text(json.dumps(result, indent=1))
    _stderr(f"wrote {out / 'bench_serve.json'}")
    _emit(result, format_table(result), args.json)
    return 0


def run_generate(args) -> int:
    from monoroute.bench.generate import format_table, run_generate_bench
    from monoroute.cli import parse_set

    routed = dict(parse_set(item) for item in args.set)
    common = dict(parse_set(item) for item in args.common)
    result = run_generate_bench(args.preset, args.batch, args.prompt, args.new, args.repeats, args.device,
                                log=_stderr, routed=routed, common=common)
    _emit(result, format_table(result), args.json)
    return 0


def add_parser(subparsers) -> None:
    """Register `bench` and its sub-commands on the main CLI's subparsers."""
    bench = subparsers.add_parser("bench", help="benchmarks: layer cost vs N and k, training throughput, sharding")
    sub = bench.add_subparsers(dest="bench_command", required=True)

    p = sub.add_parser("layer", help="RoutedFFN router/compute/optimizer times over an N x k grid vs dense FFNs")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout (table to stderr)")
    p.add_argument("--quick", action="store_true", help="only the N and k sweeps, smaller d and T (CI, < 60 s)")
    p.add_argument("--out", default="runs/bench", help="directory for bench_layer_<device>.json and .png")
    p.add_argument("--router", default="product_key", choices=["product_key", "dense"])
    p.add_argument("--impl", default="auto", help="unit compute implementation (auto, reference, cpu, triton)")
    p.add_argument("--sparse-grad", default="auto", choices=["auto", "on", "off"],
                   help="time fwd+bwd with RoutedFFN(sparse_grad=True) (auto: where the flag exists)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    p.add_argument("--d", type=int, help="d_model (default: 256 CPU, 768 GPU; 128 with --quick)")
    p.add_argument("--tokens", type=int, help="tokens T per step (default: 4096 CPU, 8192 GPU; 1024 with --quick)")
    p.add_argument("--n-units", type=_ints, help="N grid, comma-separated perfect squares")
    p.add_argument("--k", dest="ks", type=_ints, help="k grid, comma-separated")
    p.add_argument("--k-ref", type=int, help="k of the N sweep and the dense comparison (default 32)")
    p.add_argument("--n-ref", type=int, help="N of the k sweep (default 65536)")
    p.add_argument("--n-compare", type=int, help="N compared with the dense FFNs (default 32761 = 181^2)")
    p.add_argument("--warmup", type=int)
    p.add_argument("--repeats", type=int)
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's, but 1 with --quick on CPU)")
    p.add_argument("--layer-set", action="append", default=[], metavar="KEY=VALUE",
                   help="a RoutedFFN setting for every routed layer (e.g. coupling=rerank, router_heads=4)")
    p.set_defaults(func=run_layer)

    p = sub.add_parser("train", help="end-to-end training tokens/s, routed vs dense, through the trainer")
    p.add_argument("--preset", default="tiny")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--device", default="cpu")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a model setting for the routed variants (e.g. router=cluster); dense is the preset's")
    p.add_argument("--common", action="append", default=[], metavar="KEY=VALUE",
                   help="a setting for every variant, dense included (e.g. batch_size=2, block_size=256, "
                        "tokenizer=byte: a large preset sized for a CPU)")
    p.add_argument("--profile", action="store_true",
                   help="split one step of dense 4·d and the routed design into router, units, aux losses, trunk, "
                        "optimizer, stats, logging, data (ms and share; profiler on)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=run_train)

    p = sub.add_parser("generate", help="sampling tokens/s with a KV cache, routed vs dense, batch 1 and 16")
    p.add_argument("--preset", default="cpu-small")
    p.add_argument("--batch", type=_ints, default=(1, 16), help="batch sizes, comma-separated (default 1,16)")
    p.add_argument("--prompt", type=int, default=16, help="prompt tokens (default 16)")
    p.add_argument("--new", type=int, default=64, help="generated tokens (default 64)")
    p.add_argument("--repeats", type=int, default=5, help="paired rounds of dense and routed (default 5)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a model setting for the routed variant (e.g. dense_beside=0)")
    p.add_argument("--common", action="append", default=[], metavar="KEY=VALUE",
                   help="a model setting for both variants (e.g. n_layer=4: a large preset's shape, fewer layers)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=run_generate)

    p = sub.add_parser("agreement", help="live-slot fraction and score/pre-activation correlation: fresh layer, runs")
    p.add_argument("runs", nargs="*", help="run directories to measure on their validation windows")
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--n-units", type=int, default=16384)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--tokens", type=int, default=2048, help="random input tokens for the fresh layer")
    p.add_argument("--couplings", default="none,preact", help="couplings to build the fresh layer with")
    p.add_argument("--heads", type=_ints, default=(1,), help="router_heads values for the fresh layer, e.g. 1,4")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=run_agreement)

    p = sub.add_parser("serve", help="unit browser response times: unit list at N=1M (synthetic), unit pages "
                                     "and live prompt of analysed runs")
    p.add_argument("runs", nargs="*", help="analysed run directories to time unit pages and the live prompt on")
    p.add_argument("--n-units", type=int, default=1_000_000, help="units in the synthetic store (default 1M)")
    p.add_argument("--positions", type=int, default=100_000, help="positions in the synthetic store")
    p.add_argument("--k", type=int, default=32, help="firings per position in the synthetic store")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--browser", default="auto", choices=["auto", "on", "off"],
                   help="also time pages in headless Chromium (auto: where it is installed)")
    p.add_argument("--out", default="runs/bench")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=run_serve)

    p = sub.add_parser("shard-memory", help="bytes per rank of column-sharded unit tables under FSDP2 (computed)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=run_shard_memory)


def main(argv: list[str] | None = None) -> int:
    """`monoroute bench ...` through the top-level CLI (same parsing and error handling)."""
    from monoroute.cli import main as cli_main

    return cli_main(["bench", *(sys.argv[1:] if argv is None else argv)])
