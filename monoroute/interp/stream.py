"""The token stream an analysis runs on: one split's documents, encoded with the run's tokenizer.

The model sees the same thing as in training and `eval` (documents each followed by the
tokenizer's separator, cut into non-overlapping context windows), but here every position also
knows its document, so labels are computed on whole documents and probes are split by document.
The stream is rebuilt from the documents rather than read from the token cache because the byte
tokenizer's separator ("\\n\\n") also occurs inside documents: the flat cache cannot say where one
document ends.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from monoroute.data.corpus import cap_bytes, open_source, split_of
from monoroute.data.tokenizers import BYTE_SEPARATOR
from monoroute.errors import MonorouteError
from monoroute.interp.types import Positions


@dataclass
class Stream:
    positions: Positions  # (P,) with P a multiple of block_size
    docs: list[np.ndarray]  # token ids of each document's body (no separator), the last one possibly cut
    texts: list[str]  # each document's text (whole, even where the stream cuts it)
    source: str


def separator_ids(tokenizer) -> list[int]:
    if tokenizer.kind == "byte":
        return list(BYTE_SEPARATOR)
    return [tokenizer.eot_id]


SPLITS = ("train", "val", "all")


def split_documents(source: str, text_column: str, val_fraction: float, max_bytes: int | None, split: str = "val"):
    """The documents of one split ("train", "val" or "all") of a corpus spec, in corpus order, as
    training splits them."""
    if split not in SPLITS:
        raise MonorouteError(f"--split {split!r} is not one of {', '.join(SPLITS)}")
    if split == "val" and val_fraction <= 0:
        raise MonorouteError(f"the run has val_fraction={val_fraction}, so there is no validation split to analyse; "
                             f"pass --split all, or --data SPEC with another corpus")
    for key, text in cap_bytes(open_source(source, text_column, val_fraction).documents(), max_bytes, val_fraction):
        if split == "all" or split_of(key, val_fraction) == split:
            yield text


def build_stream(tokenizer, source: str, n_tokens: int, block_size: int, val_fraction: float,
                 text_column: str = "text", max_bytes: int | None = None, split: str = "val") -> Stream:
    """The first ~n_tokens tokens of the split's documents (rounded down to whole windows, at least one)."""
    if n_tokens < block_size:
        raise MonorouteError(f"--tokens {n_tokens} is less than one context window ({block_size} tokens); "
                             f"ask for at least {block_size}")
    sep = separator_ids(tokenizer)
    ids, doc_ids, docs, texts, total = [], [], [], [], 0
    for text in split_documents(source, text_column, val_fraction, max_bytes, split):
        body = np.asarray(tokenizer.encode(text), dtype=np.int64)
        if len(body) == 0:
            continue
        chunk = np.concatenate([body, np.asarray(sep, dtype=np.int64)])
        ids.append(chunk)
        doc_ids.append(np.full(len(chunk), len(docs), dtype=np.int64))
        docs.append(body)
        texts.append(text)
        total += len(chunk)
        if total >= n_tokens:
            break
    P = min(n_tokens, total) // block_size * block_size
    if P == 0:
        raise MonorouteError(
            f"the {split} split of {source!r} has {total} tokens, fewer than one context window "
            f"({block_size}); use a larger corpus (--data SPEC)"
        )
    token_ids = np.concatenate(ids)[:P]
    doc_of = np.concatenate(doc_ids)[:P]
    n_docs = int(doc_of[-1]) + 1
    docs, texts = docs[:n_docs], texts[:n_docs]
    window_pos = np.tile(np.arange(block_size, dtype=np.int64), P // block_size)
    return Stream(Positions(token_ids, doc_of, window_pos), docs, texts, source)


def doc_token_rows(stream: Stream) -> list[tuple[int, int]]:
    """(first position, n body tokens in the stream) of each document: where its labels go."""
    P = len(stream.positions)
    starts = np.searchsorted(stream.positions.doc_ids, np.arange(len(stream.docs)))
    return [(int(s), int(min(len(body), P - s))) for s, body in zip(starts, stream.docs)]
