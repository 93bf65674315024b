"""Ground-truth labels for Python source, per character (and per byte, for byte-level tokens).

Interpretability metrics compare units against these: does a unit fire inside strings, on
comments, at bracket depth 2? Labels come from the standard `tokenize` module, so a "(" inside a
string or comment is a string/comment character and opens no bracket.

Kinds (`KINDS`, `PythonLabels.kind` holds indices into it):
    whitespace  spaces/tabs between tokens (and line-continuation backslashes)
    indent      whitespace at the start of a physical line
    newline     the end of a line (tokenize NEWLINE and NL)
    name        identifiers, including soft keywords (match, case, _, type)
    keyword     hard keywords (keyword.kwlist: def, if, None, ...)
    number, string (f-string parts too), comment, operator (tokenize OP: brackets, punctuation)
    error       what tokenize rejects: a stray character (e.g. "$"), and everything after a fatal
                tokenize error (an unterminated triple-quoted string, an inconsistent dedent)
Bracket depth: how many ( [ { enclose the character; a bracket itself has the outer depth, so
"f(a)" has depths 0 0 1 0. Unmatched closing brackets never take the depth below 0.
"""
from __future__ import annotations

import io
import keyword
import token
import tokenize
from dataclasses import dataclass

import numpy as np

KINDS = ("whitespace", "indent", "newline", "name", "keyword", "number", "string", "comment", "operator", "error")
KIND = {name: i for i, name in enumerate(KINDS)}
OPENING, CLOSING = "([{", ")]}"
STRING_TOKENS = {token.STRING} | {getattr(token, n) for n in ("FSTRING_START", "FSTRING_MIDDLE", "FSTRING_END")
                                  if hasattr(token, n)}  # f-strings are split into parts from 3.12
TOKEN_KIND = {token.NUMBER: "number", token.COMMENT: "comment", token.OP: "operator", token.NEWLINE: "newline",
              token.NL: "newline", token.INDENT: "indent", **{t: "string" for t in STRING_TOKENS}}


@dataclass
class PythonLabels:
    kind: np.ndarray  # (n,) int8 indices into KINDS
    depth: np.ndarray  # (n,) int16 bracket depth

    def kind_names(self) -> list[str]:
        return [KINDS[k] for k in self.kind]


def token_kind(tok: tokenize.TokenInfo) -> str | None:
    """The label of a token's characters; None for zero-width tokens (DEDENT, ENDMARKER)."""
    if tok.type == token.NAME:
        return "keyword" if keyword.iskeyword(tok.string) else "name"
    if tok.type == token.ERRORTOKEN:  # 3.11 reports the space before a stray char as an error token too
        return "whitespace" if tok.string.isspace() else "error"
    return TOKEN_KIND.get(tok.type)


def label_python(text: str) -> PythonLabels:
    """(n_chars,) kind and bracket depth of every character of `text`."""
    return label_python_spans(text, *tokenize_spans(text))


TokenSpan = tuple[tokenize.TokenInfo, int, int]  # a token and its [start, end) character offsets


def tokenize_spans(text: str) -> tuple[list[TokenSpan], int | None]:
    """Every token `tokenize` yields for `text` with its [start, end) character offsets, and where a
    fatal tokenize error stopped it: the end offset of the last good token (None when it reached the
    end). One tokenize pass that `label_python_spans` and other labellers share."""
    lines = io.StringIO(text).readlines()  # the same split tokenize sees: on "\n" only
    line_start = [0]
    for line in lines:
        line_start.append(line_start[-1] + len(line))
    last_row = len(lines)

    spans: list[TokenSpan] = []
    end = 0
    try:
        for tok in tokenize.generate_tokens(io.StringIO(text).readline):
            (srow, scol), (erow, ecol) = tok.start, tok.end
            start = line_start[min(srow - 1, last_row)] + scol
            end = line_start[min(erow - 1, last_row)] + ecol
            spans.append((tok, start, end))
    except (tokenize.TokenError, SyntaxError):  # SyntaxError covers IndentationError
        return spans, end
    return spans, None


def label_python_spans(text: str, spans: list[TokenSpan], error_at: int | None) -> PythonLabels:
    """`label_python` from the output of `tokenize_spans(text)`."""
    lines = io.StringIO(text).readlines()
    line_start = np.concatenate([[0], np.cumsum([len(line) for line in lines])]).astype(np.int64)
    n = len(text)
    kind = np.full(n, KIND["whitespace"], dtype=np.int8)
    # Leading whitespace of each physical line; tokens below overwrite what is not whitespace.
    for start, line in zip(line_start, lines):
        width = len(line) - len(line.lstrip(" \t\f"))
        kind[start : start + width] = KIND["indent"]
    depth_delta = np.zeros(n + 1, dtype=np.int16)
    depth = 0
    for tok, start, end in spans:
        label = token_kind(tok)
        if label is not None and end > start:
            kind[start:end] = KIND[label]
        if tok.type == token.OP and tok.string in OPENING:
            depth += 1
            depth_delta[end] += 1
        elif tok.type == token.OP and tok.string in CLOSING and depth > 0:
            depth -= 1
            depth_delta[start] -= 1
    if error_at is not None:
        kind[error_at:] = KIND["error"]
    return PythonLabels(kind, np.cumsum(depth_delta[:n], dtype=np.int16))


def label_python_bytes(text: str) -> PythonLabels:
    """(n_bytes,) labels of `text`'s UTF-8 bytes: each byte takes its character's labels, so they
    align with byte-level tokens (ByteTokenizer ids of `text`)."""
    labels = label_python(text)
    codepoints = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)  # (n_chars,)
    n_bytes = 1 + (codepoints >= 0x80) + (codepoints >= 0x800) + (codepoints >= 0x10000)  # (n_chars,)
    return PythonLabels(np.repeat(labels.kind, n_bytes), np.repeat(labels.depth, n_bytes))
