"""Data pipeline: corpus -> tokenizer -> cached token memmaps -> deterministic batches.

    store = prepare_data(DataConfig(source="stdlib", tokenizer="byte"), run_dir="runs/x")
    x, y = store.batch(step, batch_size=32, block_size=256, seed=0, rank=rank, world=world)  # (B, T) int64
    for x, y in store.eval_batches(batch_size=32, block_size=256, max_batches=20): ...

See corpus.py for the sources and the split, token_store.py for the cache and batches.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from monoroute.data.corpus import open_source, split_of
from monoroute.data.token_store import TokenStore, default_cache_root, open_or_build
from monoroute.data.tokenizers import TOKENIZER_KINDS, Tokenizer, check_kind, load_tokenizer
from monoroute.errors import MonorouteError
from monoroute.fileio import write_text_atomic

__all__ = ["DataConfig", "prepare_data", "load_tokenizer", "Tokenizer", "TokenStore", "split_of", "add_parser"]

MIN_BPE_VOCAB = 258  # 256 byte symbols + end-of-text + at least one merge


@dataclass
class DataConfig:
    source: str = "stdlib"  # "stdlib" | path | dir | glob | "hf:NAME[:CONFIG]" (text column via text_column)
    tokenizer: str = "byte"  # "byte" | "bpe" | "file" (the tokenizer.json at tokenizer_file, e.g. a GPT-2's)
    tokenizer_file: str | None = None
    bpe_vocab_size: int = 4096
    val_fraction: float = 0.05
    text_column: str = "text"
    max_bytes: int | None = None  # cap on corpus size read (tests/tiny runs), None = all
    cache_dir: str | None = None  # None: $MONOROUTE_CACHE or ~/.cache/monoroute

    def check(self) -> None:
        check_kind(self.tokenizer)
        if self.tokenizer == "file":
            if not self.tokenizer_file or not Path(self.tokenizer_file).is_file():
                raise MonorouteError(f"tokenizer=file needs tokenizer_file pointing at a tokenizer.json, got "
                                     f"{self.tokenizer_file!r}")
            load_tokenizer(self.tokenizer_file)  # one clear error now if it is not a tokenizer we can use
        if not 0.0 <= self.val_fraction < 1.0:
            raise MonorouteError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.max_bytes is not None and self.max_bytes <= 0:
            raise MonorouteError(f"max_bytes must be positive or None, got {self.max_bytes}")
        if self.tokenizer == "bpe" and self.bpe_vocab_size < MIN_BPE_VOCAB:
            raise MonorouteError(f"bpe_vocab_size must be at least {MIN_BPE_VOCAB}, got {self.bpe_vocab_size}")

    def tokenizer_spec(self) -> dict:
        if self.tokenizer == "byte":
            return {"kind": "byte"}
        if self.tokenizer == "file":
            from monoroute.fileio import sha256

            path = Path(self.tokenizer_file).resolve()
            return {"kind": "file", "path": str(path), "sha256": sha256(path)}
        return {"kind": "bpe", "vocab_size": self.bpe_vocab_size}


def prepare_data(cfg: DataConfig, run_dir: str | None = None) -> TokenStore:
    """Build (or reuse from the cache) the token memmaps for `cfg`. With `run_dir`, also save the
    tokenizer there as tokenizer.json, so the run can decode and be reproduced from its folder."""
    cfg.check()
    source = open_source(cfg.source, cfg.text_column, cfg.val_fraction)
    store = open_or_build(source, cfg.tokenizer_spec(), cfg.val_fraction, cfg.max_bytes,
                          default_cache_root(cfg.cache_dir))
    if run_dir is not None:
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        write_text_atomic(Path(run_dir) / "tokenizer.json", store.tokenizer.to_json())
    return store


def add_parser(subparsers) -> None:
    """`monoroute data`: build or reuse the token cache for a data config and print its meta."""
    p = subparsers.add_parser("data", help="tokenise a corpus into the token cache and print its summary")
    defaults = DataConfig()
    p.add_argument("--source", default=defaults.source, help="stdlib | file | dir | glob | hf:NAME[:CONFIG]")
    p.add_argument("--tokenizer", default=defaults.tokenizer, choices=TOKENIZER_KINDS)
    p.add_argument("--bpe-vocab-size", type=int, default=defaults.bpe_vocab_size)
    p.add_argument("--val-fraction", type=float, default=defaults.val_fraction)
    p.add_argument("--text-column", default=defaults.text_column)
    p.add_argument("--max-bytes", type=int, default=defaults.max_bytes)
    p.add_argument("--cache-dir", default=defaults.cache_dir)
    p.set_defaults(func=data_command)


def data_command(args) -> int:
    cfg = DataConfig(source=args.source, tokenizer=args.tokenizer, bpe_vocab_size=args.bpe_vocab_size,
                     val_fraction=args.val_fraction, text_column=args.text_column,
                     max_bytes=args.max_bytes, cache_dir=args.cache_dir)
    start = time.perf_counter()
    store = prepare_data(cfg)
    seconds = time.perf_counter() - start
    summary = {k: store.meta[k] for k in ("source", "tokenizer", "vocab_size", "dtype", "n_tokens", "n_documents")}
    summary.update(config=asdict(cfg), cache=str(store.path), reused=store.reused, seconds=round(seconds, 3))
    print(json.dumps(summary, indent=2))
    return 0
