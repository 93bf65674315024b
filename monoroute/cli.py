"""The `monoroute` command line: train, eval, sample, data, toy, bench, analyze, compare, sweep, export."""
from __future__ import annotations

import argparse
import errno
import json
import math
import sys

from monoroute.errors import MonorouteError

# (flag, config key, type): flags that override a preset field; anything else goes through --set.
OVERRIDE_FLAGS = [
    ("--ffn", "ffn", str), ("--n-units", "n_units", int), ("--k", "k", int), ("--router", "router", str),
    ("--activation", "activation", str), ("--d-model", "d_model", int), ("--n-layer", "n_layer", int),
    ("--n-head", "n_head", int), ("--block-size", "block_size", int), ("--d-ff", "d_ff", int),
    ("--impl", "impl", str), ("--aux-coef", "aux_coef", float), ("--l1-coef", "l1_coef", float),
    ("--dead-window", "dead_window", int), ("--dead-grace", "dead_grace", int), ("--router-heads", "router_heads", int), ("--coupling", "coupling", str),
    ("--agree-coef", "agree_coef", float), ("--router-probes", "router_probes", int),
    ("--router-candidates", "router_candidates", int),
    ("--data", "data", str), ("--tokenizer", "tokenizer", str), ("--bpe-vocab-size", "bpe_vocab_size", int),
    ("--max-bytes", "max_bytes", int), ("--text-column", "text_column", str),
    ("--steps", "steps", int), ("--batch-size", "batch_size", int), ("--grad-accum", "grad_accum", int),
    ("--lr", "lr", float), ("--min-lr", "min_lr", float), ("--warmup", "warmup", int),
    ("--weight-decay", "weight_decay", float), ("--grad-clip", "grad_clip", float),
    ("--eval-every", "eval_every", int), ("--eval-batches", "eval_batches", int), ("--log-every", "log_every", int),
    ("--ckpt-every", "ckpt_every", int), ("--seed", "seed", int), ("--data-seed", "data_seed", int),
    ("--device", "device", str), ("--dtype", "dtype", str),
    ("--parallel", "parallel", str),
]


def parse_set(item: str) -> tuple[str, object]:
    """`key=value` with value parsed as JSON when it parses (numbers, true/false, null), else a string."""
    if "=" not in item:
        raise MonorouteError(f"--set takes key=value, got {item!r}")
    key, raw = item.split("=", 1)
    try:
        return key.strip(), json.loads(raw)
    except json.JSONDecodeError:
        return key.strip(), raw


def collect_overrides(args) -> dict:
    """Config file, then --set and the named flags on top. A key given twice on the command line (two
    --set, or --set and its flag) is refused: one of the values would be dropped without a check."""
    from monoroute.train.config import load_config_file

    overrides = load_config_file(args.config) if args.config else {}
    given: dict[str, str] = {}
    for item in args.set:
        key, value = parse_set(item)
        if key in given:
            raise MonorouteError(f"{key} is given twice (--set {given[key]} and --set {item}); give it once")
        given[key], overrides[key] = item, value
    for flag, key, _ in OVERRIDE_FLAGS:
        value = getattr(args, flag[2:].replace("-", "_"))
        if value is not None:
            if key in given:
                raise MonorouteError(f"{key} is given twice (--set {given[key]} and {flag} {value}); give it once")
            overrides[key] = value
    if args.sparse_rows:  # row-sparse gradients and the optimizer that consumes them go together
        overrides.update(sparse_rows=True, sparse_grad=True)
    return overrides


def cmd_train(args) -> int:
    from monoroute.train.config import build_run_config, with_train_overrides
    from monoroute.train.trainer import read_run_config, train

    overrides = collect_overrides(args)
    if args.resume:
        cfg = with_train_overrides(read_run_config(args.resume), overrides)
        cfg.out = args.resume
    else:
        preset = overrides.pop("preset", args.preset)
        if args.out:
            overrides["out"] = args.out
        cfg = build_run_config(preset, overrides)
    summary = train(cfg, resume=bool(args.resume), until=args.until, overwrite=args.overwrite,
                    show_progress=not args.no_progress)
    if summary.get("ranks_in_sync") is False:
        raise MonorouteError("data-parallel ranks ended with different weights; report this as a bug")
    if summary.pop("rank") == 0:
        print(json.dumps(summary))
    return 0


def cmd_eval(args) -> int:
    from monoroute.train.evaluation import eval_report

    report = eval_report(args.run, args.device, args.batches)
    if args.json:
        print(json.dumps(report))
    else:
        for key, value in report.items():
            if key == "routed":
                for name, layer in value.items():
                    recall, mass = (f"{v:.3f}" if v is not None else "-" for v in
                                    (layer.get("selection_recall"), layer.get("selection_mass")))
                    search = ""
                    if "proposed_share" in layer:
                        search = f", proposed {layer['proposed_share']:.3f} of units"
                        if "distinct_rows" in layer:
                            search += (f", {layer['distinct_rows']:.1f} distinct sub-key rows/token, query shared/spread "
                                       f"{layer.get('query_shared_ratio', float('nan')):.2f}")
                    print(f"{name:>20}: l0 {layer['l0']:.2f}, live slots {layer['live_slot_fraction']:.3f}, "
                          f"selection recall {recall} (mass {mass}){search}")
            else:
                print(f"{key:>20}: {value:,.4f}" if isinstance(value, float) else f"{key:>20}: {value}")
    return 0


def cmd_sample(args) -> int:
    import torch

    from monoroute.models.gpt import generate
    from monoroute.train.trainer import load

    if args.max_new_tokens < 0:
        raise MonorouteError(f"--max-new-tokens must be 0 or more, got {args.max_new_tokens}")
    if args.top_k is not None and args.top_k < 1:
        raise MonorouteError(f"--top-k must be at least 1 (1 = always the likeliest token), got {args.top_k}")
    if not (args.temperature >= 0 and math.isfinite(args.temperature)):
        raise MonorouteError(f"--temperature must be a finite number >= 0 (0 = greedy), got {args.temperature}")
    run = load(args.run, args.device)  # verifies the checkpoint's sha256
    model, tokenizer = run.model, run.tokenizer
    device = next(model.parameters()).device
    # An empty prompt starts at a document boundary, which is not printed.
    try:
        ids = tokenizer.encode(args.prompt) if args.prompt else tokenizer.boundary_ids()
    except UnicodeEncodeError as exc:  # bytes that are not UTF-8 on the command line arrive as lone surrogates
        bad = exc.object[exc.start:exc.end].encode("utf-8", "surrogateescape")
        raise MonorouteError(f"--prompt is not valid UTF-8 text (byte {bad[:1].hex()} at character {exc.start}); "
                             f"pass the prompt as UTF-8") from None
    if max(ids) >= model.cfg.vocab_size:
        raise MonorouteError(f"the prompt has token ids beyond the model's vocabulary ({model.cfg.vocab_size}); "
                             f"the run's tokenizer.json does not match its model")
    idx = torch.tensor([ids[-model.cfg.block_size:]], dtype=torch.long, device=device)
    gen = torch.Generator(device=device).manual_seed(args.seed)
    out = generate(model, idx, args.max_new_tokens, args.temperature, args.top_k, gen)[0].tolist()
    new = out[idx.shape[1]:]
    print(args.prompt + tokenizer.decode(new) if args.prompt else tokenizer.decode(new))
    return 0


def add_train_parser(sub) -> None:
    from monoroute.train.config import PRESETS

    p = sub.add_parser("train", help="train a GPT with dense or routed FFNs")
    p.add_argument("--preset", default="tiny", help=f"one of {', '.join(PRESETS)}")
    p.add_argument("--config", help="YAML/TOML/JSON file of overrides (flat keys or model/data/train sections)")
    p.add_argument("--out", help="run directory (default runs/PRESET); must be empty unless --overwrite")
    p.add_argument("--resume", metavar="OUT", help="continue the run in OUT (only training settings may change)")
    p.add_argument("--until", type=int, help="stop (with a checkpoint) at this step; the schedule still spans --steps")
    p.add_argument("--overwrite", action="store_true", help="allow writing into a non-empty --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--sparse-rows", action="store_true", help="row-sparse gradients + lazy row-wise AdamW for the unit tables")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override any config key")
    for flag, _, kind in OVERRIDE_FLAGS:
        p.add_argument(flag, type=kind, default=None)
    p.set_defaults(func=cmd_train)


def add_run_parsers(sub) -> None:
    p = sub.add_parser("eval", help="validation loss, sizes, FLOPs and dead units of a run")
    p.add_argument("run")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--batches", type=int, help="validation batches (default: the run's eval_batches)")
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=cmd_eval)
    p = sub.add_parser("sample", help="generate text from a run")
    p.add_argument("run")
    p.add_argument("--prompt", default="def ")
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-k", type=int, default=40)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=cmd_sample)


class OneLineParser(argparse.ArgumentParser):
    """argparse whose usage errors (`--steps abc`, a missing argument) are one `monoroute: error:` line
    with exit code 2, like every other refusal, instead of the usage block and argparse's own prefix."""

    def error(self, message: str):
        print(f"monoroute: error: {message}; see `{self.prog} --help`", file=sys.stderr)
        sys.exit(2)


def build_parser() -> argparse.ArgumentParser:
    from monoroute import data

    parser = OneLineParser(prog="monoroute", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    add_train_parser(sub)
    add_run_parsers(sub)
    data.add_parser(sub)
    for module in ("monoroute.train.upcycle", "monoroute.toy.cli", "monoroute.bench.cli", "monoroute.interp.cli", "monoroute.sweep.cli",
                   "monoroute.serve.cli", "monoroute.interp.export", "monoroute.circuits.run", "monoroute.facts.cli"):
        __import__(module, fromlist=["add_parser"]).add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except MonorouteError as exc:
        print(f"monoroute: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a full disk, a read-only or missing path the commands did not expect: one line
        # An error raised by a library writer (pyarrow, a stream) may carry no file name: name the output.
        path = exc.filename or getattr(args, "out", None)
        where = f" {path}" if path else ""
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            print(f"monoroute: error: disk full while writing{where} ({exc.strerror}); free space and run the "
                  f"command again", file=sys.stderr)
        else:
            print(f"monoroute: error: cannot access{where} ({exc.strerror or type(exc).__name__}); check the path "
                  f"and its permissions, then run the command again", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("monoroute: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
