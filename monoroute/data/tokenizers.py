"""Tokenizers: byte-level (vocab 256, the default) and a byte-level BPE trained on the corpus.

Both satisfy the `Tokenizer` protocol and serialise to one JSON file:
- byte: `{"kind": "byte", "vocab_size": 256}`;
- bpe: the Hugging Face `tokenizers` JSON itself, so `tokenizers.Tokenizer.from_file` reads it too.

`encode_documents` is the bulk path used to fill the token store: it encodes many documents at
once and puts the tokenizer's separator after each one (byte-level: "\\n\\n", BPE: its own
end-of-text token), so training windows may cross document boundaries but still see where one ends.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Protocol

import numpy as np

from monoroute.errors import MonorouteError

TOKENIZER_KINDS = ("byte", "bpe", "file")  # file: a fixed tokenizer.json (a pretrained model's), never retrained
EOT = "<|endoftext|>"
BYTE_SEPARATOR = b"\n\n"


class Tokenizer(Protocol):
    kind: str
    vocab_size: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...

    def to_json(self) -> str: ...

    def boundary_ids(self) -> list[int]:
        """The separator put between documents: a context that means "a new document starts here"."""
        ...

    def encode_documents(self, texts: list[str]) -> np.ndarray:
        """(n_tokens,) int64 ids of all texts, each followed by the separator."""
        ...


class ByteTokenizer:
    """UTF-8 bytes are the tokens. Decoding replaces bytes that do not form valid UTF-8."""

    kind = "byte"
    vocab_size = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(ids).decode("utf-8", errors="replace")

    def to_json(self) -> str:
        return json.dumps({"kind": self.kind, "vocab_size": self.vocab_size})

    def boundary_ids(self) -> list[int]:
        return list(BYTE_SEPARATOR)

    def encode_documents(self, texts: list[str]) -> np.ndarray:
        # One join and one frombuffer: no per-byte Python work, so the stdlib takes seconds.
        joined = b"".join(t.encode("utf-8") + BYTE_SEPARATOR for t in texts)
        return np.frombuffer(joined, dtype=np.uint8).astype(np.int64)


class BPETokenizer:
    """Byte-level BPE (GPT-2 style) from Hugging Face `tokenizers`, with one special token EOT."""

    kind = "bpe"

    def __init__(self, hf_tokenizer) -> None:
        self.hf = hf_tokenizer
        self.vocab_size = hf_tokenizer.get_vocab_size()
        self.eot_id = hf_tokenizer.token_to_id(EOT)
        if self.eot_id is None:
            raise MonorouteError(f"BPE tokenizer JSON has no {EOT} token; retrain it with monoroute")

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int) -> "BPETokenizer":
        """Learn merges on `texts` until the vocabulary (256 bytes + EOT + merges) has `vocab_size`
        entries, or fewer when the corpus runs out of pairs."""
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers import decoders, models, pre_tokenizers, trainers

        hf = HFTokenizer(models.BPE())
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        hf.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=[EOT],
            # All 256 byte symbols up front: any text stays encodable, even bytes unseen in training.
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        hf.train_from_iterator(texts, trainer=trainer)
        return cls(hf)

    @classmethod
    def from_json(cls, text: str) -> "BPETokenizer":
        from tokenizers import Tokenizer as HFTokenizer

        return cls(HFTokenizer.from_str(text))

    def encode(self, text: str) -> list[int]:
        return self.hf.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=False)

    def to_json(self) -> str:
        return self.hf.to_str()

    def boundary_ids(self) -> list[int]:
        return [self.eot_id]

    def encode_documents(self, texts: list[str]) -> np.ndarray:
        encodings = self.hf.encode_batch(texts, add_special_tokens=False)  # parallel in Rust
        return np.concatenate(
            [np.asarray(e.ids + [self.eot_id], dtype=np.int64) for e in encodings]
            or [np.zeros(0, dtype=np.int64)]
        )


def check_kind(kind: str) -> None:
    if kind not in TOKENIZER_KINDS:
        raise MonorouteError(f"unknown tokenizer kind {kind!r}; choose one of {', '.join(TOKENIZER_KINDS)}")


def tokenizer_from_json(text: str) -> Tokenizer:
    """Either kind, from the JSON written by `to_json`."""
    obj = json.loads(text)
    if obj.get("kind") == "byte":
        return ByteTokenizer()
    if obj.get("model", {}).get("type") == "BPE":
        return BPETokenizer.from_json(text)
    raise MonorouteError("tokenizer JSON is neither a byte tokenizer nor a BPE tokenizer")


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Read a tokenizer.json saved with a run (both kinds)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise MonorouteError(f"cannot read tokenizer {path}: {e.strerror or e}") from e
    try:
        return tokenizer_from_json(text)
    except MonorouteError:
        raise
    except Exception as e:  # json and Rust-side parse errors share no narrower base class
        first_line = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise MonorouteError(f"tokenizer {path} is not a valid tokenizer JSON ({first_line}); re-save it") from e
