"""Concept labellers: the ground truth that interpretability metrics score units against.

A labeller turns a document into a boolean (positions x concepts) matrix with concept names. It
labels the document's text once, per UTF-8 *byte* (`Labeller.label_text(text) -> (n_bytes, C)`),
and one shared function, `label_tokens`, moves those byte labels onto the tokens of any tokenizer,
whose tokens are runs of bytes (`token_bytes`: one byte per byte-level token, one or more per BPE
token, none for special tokens such as EOT).

The token rule (one mechanism, two read points)
------------------------------------------------
A token carries a concept when the concept holds on the token's *read byte*:

- read "last" (the default, most concepts): the token's last non-whitespace byte. So a BPE token
  " def" is a keyword, not whitespace; "):" is outside the brackets it closes; " runn" stops in the
  middle of a word.
- read "first" (concepts about where a token *starts*: first token of a line, start of a word,
  first word after punctuation, start of a line): the token's first non-whitespace byte. So
  " return" after an indent is the first token of its line.
- a token that is all whitespace (" ", "\\n", "\\n   ") is read at its last byte in both cases, so
  "\\n   " is indentation of the next line, and "\\n" is a newline.

Whitespace here is ASCII whitespace (space, tab, \\n, \\r, \\v, \\f). Tokens with no bytes (special
tokens: EOT) and bytes that do not decode as UTF-8 carry no concept (all-False rows). Each
labeller says which concepts read "first" (`Labeller.concept_reads`); every other concept reads
"last".

Labellers (concept names are prefixed by their family)
-------------------------------------------------------
`PythonLabeller` ("py:"), for Python source, from `tokenize` (via `monoroute.data.python_labels`)
and, when the document parses, `ast`. Per character, then per byte:

    concept               holds on                                                       read
    py:kind:KIND          characters of that tokenize kind, KIND one of name, keyword,    last
                          number, string (f-strings too), comment, operator, newline,
                          indent (leading whitespace of a line), whitespace (other)
    py:kw:WORD            the characters of hard keyword WORD (keyword.kwlist: False,     last
                          None, True, and, ..., def, ..., yield)
    py:docstring          a string statement that is the first statement of a module,    last
                          class or def body (ast; documents that do not parse: never)
    py:depth>=D           bracket depth >= D, D = 1, 2, 3 (( [ { outside strings and      last
                          comments; a bracket has the depth outside it)
    py:indent:L           every character of a line whose indentation is L levels, L =    last
                          0, 1, 2, 3+ (4 spaces or a tab = one level, rounded down); the
                          continuation lines of a statement (open brackets, backslash,
                          multi-line strings) take the level of its first line; blank
                          lines have none
    py:line_start         the first character of the first token of a line: of each       first
                          statement, and of a comment on a line of its own (not
                          indentation, not the continuation lines of a statement), so
                          " ret" + "urn" -> only " ret" is the line's first token
    py:def_name           the NAME right after `def`                                      last
    py:class_name         the NAME right after `class`                                    last
    py:decorator          every character of a statement that starts with "@"            last
    py:import_line        every character of a statement that starts with import/from    last
    py:self, py:cls       the names `self` and `cls`                                     last
    py:builtin            a name of the `builtins` module that does not start with "_"    last
                          (print, len, ValueError, ...; True/False/None are keywords)
    py:dunder             a name __like_this__                                            last
    py:const_name         an UPPER_CASE name with at least two letters                     last
    py:attribute          a name right after "." (x.attr, also `from .mod`)              last
    py:call               a name right before "(" that is not a keyword, def or class     last
                          name (f(x), obj.method(x))
    py:fstring            an f-string literal, prefix, quotes and replacement fields      last

`PlainTextLabeller` ("txt:"), for any text. A *word* is a maximal run of letters (regex
`[^\\W\\d_]+`: "don't" is "don" + "t"; "x_1" holds one word, "x").

    concept               holds on                                                       read
    txt:letter            a letter (str.isalpha)                                         last
    txt:upper             an uppercase letter (str.isupper)                               last
    txt:digit             a digit (str.isdigit)                                           last
    txt:space             whitespace (str.isspace)                                        last
    txt:punct             ASCII punctuation/symbols (string.punctuation) or a Unicode     last
                          punctuation character (category P*)
    txt:non_ascii         a character above U+007F                                        last
    txt:word:W            every character of each occurrence of W, matched without case;  last
                          W one of the `n_words` (50) most frequent lower-cased words of
                          at least two letters in the texts given to `fit` (ties broken
                          alphabetically; no word concepts before `fit`)
    txt:word_start        the first letter of a word of two or more letters               first
    txt:word_middle       a letter of a word that is neither its first nor its last       last
                          (a token that stops inside a word)
    txt:word_end          the last letter of a word of two or more letters                last
    txt:word_single       a one-letter word                                               last
    txt:capitalised       every letter of a word whose first letter is uppercase and      last
                          the others lowercase ("The", "I")
    txt:all_caps          every letter of a word of two or more letters, all uppercase    last
    txt:after_punct       the first letter of a word whose previous non-whitespace        first
                          character is one of . ! ? , ; :
    txt:line_start        the first non-whitespace character of a line                     first
    txt:in_parens         inside ( ... ), parentheses excluded, nesting counted; unmatched  last
                          ")" are ignored and a blank line closes everything
    txt:in_quotes         inside "..." (each ASCII double quote toggles; a blank line     last
                          resets) or a curly “...” pair (nested like brackets), the quotes
                          included

`RegexLabeller` ("re:NAME", read "last"), user concepts from a YAML or TOML file
(`RegexLabeller.from_file`); a concept holds on every character of each match of its regex in the
document's text (zero-width matches label nothing):

    concepts:
      url: "https?://\\\\S+"
      todo: {pattern: "TODO|FIXME", flags: "i"}   # flags: letters of i m s x a (re.I, M, S, X, A)

The same in TOML: `[concepts]` then `url = 'https?://\\S+'` and
`todo = { pattern = "TODO|FIXME", flags = "i" }`. Any other key, a bad regex or flag, an unreadable
file or another extension is a MonorouteError naming the file and the key.

`CombinedLabeller` concatenates labellers' concepts; `labeller_for(source, concepts_file)` picks
the default set for a corpus: Python + plain text for the stdlib and specs naming .py files, plain
text for anything else, plus the user's regex concepts.

`label_documents(labeller, docs, tokenizer)` labels token-id documents (each optionally followed by
the tokenizer's separator) into one `ConceptLabels`, rows aligned with the ids.
"""
from __future__ import annotations

import ast
import builtins
import io
import keyword
import os
import re
import string
import token as token_module
import unicodedata
import warnings
import weakref
from collections import Counter
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from monoroute.data.python_labels import KIND, label_python_spans, tokenize_spans
from monoroute.errors import MonorouteError
from monoroute.interp.types import ConceptLabels

READ_LAST, READ_FIRST = "last", "first"
READS = (READ_LAST, READ_FIRST)
WHITESPACE_BYTES = b" \t\n\r\x0b\x0c"
_WS_LUT = np.zeros(256, dtype=bool)
_WS_LUT[list(WHITESPACE_BYTES)] = True


# ---- token bytes ----------------------------------------------------------------------------------


def bytes_to_unicode() -> dict[int, str]:
    """The GPT-2 byte-level alphabet (the one HF `tokenizers` ByteLevel uses): byte -> printable char."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


_SINGLE_BYTES = [bytes((b,)) for b in range(256)]
_BPE_TABLES: "weakref.WeakKeyDictionary[object, list[bytes]]" = weakref.WeakKeyDictionary()


def _bpe_table(tokenizer) -> list[bytes]:
    """id -> the bytes the token stands for (b"" for special tokens), built once per tokenizer."""
    table = _BPE_TABLES.get(tokenizer)
    if table is not None:
        return table
    hf = tokenizer.hf
    byte_of = {c: b for b, c in bytes_to_unicode().items()}
    added = hf.get_added_tokens_decoder()  # id -> AddedToken: stored as plain text, not in the alphabet
    vocab = hf.get_vocab(with_added_tokens=True)
    table = [b""] * (max(vocab.values(), default=-1) + 1)
    for text, i in vocab.items():
        if i in added:
            table[i] = b"" if added[i].special else added[i].content.encode("utf-8")
        elif all(ch in byte_of for ch in text):
            table[i] = bytes(byte_of[ch] for ch in text)
        else:  # not byte-level: take the token's text as it is
            table[i] = text.encode("utf-8")
    _BPE_TABLES[tokenizer] = table
    return table


def token_bytes(tokenizer, ids) -> list[bytes]:
    """The UTF-8 bytes each token stands for; joined they are the document's bytes. Byte tokenizer:
    one byte per id. BPE: the byte-level alphabet mapped back to bytes; special tokens (EOT) -> b""."""
    ids = np.asarray(ids, dtype=np.int64).ravel()
    if getattr(tokenizer, "kind", None) == "byte":
        table = _SINGLE_BYTES
    elif getattr(tokenizer, "kind", None) == "bpe":
        table = _bpe_table(tokenizer)
    else:
        raise MonorouteError(f"cannot label tokens of a {getattr(tokenizer, 'kind', type(tokenizer).__name__)!r} "
                             f"tokenizer; use a byte or bpe tokenizer")
    if len(ids) and (ids.min() < 0 or ids.max() >= len(table)):
        bad = int(ids.min() if ids.min() < 0 else ids.max())
        raise MonorouteError(f"token id {bad} is outside the {tokenizer.kind} tokenizer's vocabulary "
                             f"(0..{len(table) - 1}); the ids do not come from this tokenizer")
    return [table[i] for i in ids.tolist()]


# ---- labellers --------------------------------------------------------------------------------------


class Labeller:
    """Base of all labellers. Subclasses give `name`, `concept_names()` and either `label_chars`
    (per character; the base turns it into per-byte labels) or `label_text` (per byte). Concepts
    read at the token's first non-whitespace byte are listed by `concept_reads`."""

    name = "labeller"

    def concept_names(self) -> list[str]:
        raise NotImplementedError

    def concept_reads(self) -> list[str]:
        """READ_LAST or READ_FIRST per concept: where in a token the concept is read (module doc)."""
        return [READ_LAST] * len(self.concept_names())

    def fit(self, texts: Sequence[str]) -> None:
        """Learn from the corpus (e.g. its frequent words). Most labellers learn nothing."""

    def label_chars(self, text: str) -> np.ndarray:
        """(n_chars, C) bool."""
        raise NotImplementedError

    def label_text(self, text: str) -> np.ndarray:
        """(n_bytes, C) bool: the concepts of each UTF-8 byte of `text` (a byte takes its character's)."""
        return chars_to_bytes(text, self.label_chars(text))


def chars_to_bytes(text: str, per_char: np.ndarray) -> np.ndarray:
    """Rows per character -> rows per UTF-8 byte (each byte repeats its character's row)."""
    if text.isascii():
        return per_char
    codepoints = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
    n_bytes = 1 + (codepoints >= 0x80) + (codepoints >= 0x800) + (codepoints >= 0x10000)
    return np.repeat(per_char, n_bytes, axis=0)


def fill_spans(matrix: np.ndarray, starts, ends, cols) -> None:
    """matrix[s:e, c] = True for every (s, e, c), vectorised (spans are clipped to the matrix)."""
    n = matrix.shape[0]
    starts = np.clip(np.asarray(starts, dtype=np.int64), 0, n)
    ends = np.clip(np.asarray(ends, dtype=np.int64), 0, n)
    cols = np.asarray(cols, dtype=np.int64)
    lengths = np.maximum(ends - starts, 0)
    total = int(lengths.sum())
    if total == 0:
        return
    offsets = np.cumsum(lengths) - lengths  # where each span's run begins in the flat index
    rows = np.arange(total, dtype=np.int64) + np.repeat(starts - offsets, lengths)
    matrix[rows, np.repeat(cols, lengths)] = True


def _check_reads(labeller: Labeller) -> list[str]:
    reads = list(labeller.concept_reads())
    if len(reads) != len(labeller.concept_names()) or not set(reads) <= set(READS):
        raise ValueError(f"labeller {labeller.name}: concept_reads() must give one of {READS} per concept")
    return reads


# -- Python --------------------------------------------------------------------------------------------

PY_KINDS = ("name", "keyword", "number", "string", "comment", "operator", "newline", "indent", "whitespace")
PY_DEPTHS = (1, 2, 3)
PY_LEVELS = ("0", "1", "2", "3+")
PY_TOKEN_CONCEPTS = ("line_start", "def_name", "class_name", "self", "cls", "builtin", "dunder", "const_name",
                     "attribute", "call")
PY_SPAN_CONCEPTS = ("docstring", "decorator", "import_line", "fstring")
BUILTIN_NAMES = frozenset(n for n in dir(builtins) if not n.startswith("_")) - frozenset(keyword.kwlist)
_FSTRING_START = getattr(token_module, "FSTRING_START", None)  # Python 3.12+ splits f-strings into parts
_FSTRING_END = getattr(token_module, "FSTRING_END", None)
_STRING_PREFIX = re.compile(r"[A-Za-z]*")
_SKIP_AT_LINE_START = {token_module.NL, token_module.COMMENT, token_module.INDENT, token_module.DEDENT,
                       token_module.ENDMARKER, token_module.NEWLINE}
_CONST_NAME = re.compile(r"[A-Z0-9_]*[A-Z][A-Z0-9_]*[A-Z][A-Z0-9_]*\Z")


class PythonLabeller(Labeller):
    """Python source concepts ("py:"), see the module docstring's table."""

    name = "python"

    def __init__(self) -> None:
        names = [f"py:kind:{k}" for k in PY_KINDS] + [f"py:kw:{k}" for k in keyword.kwlist]
        names += [f"py:depth>={d}" for d in PY_DEPTHS] + [f"py:indent:{lv}" for lv in PY_LEVELS]
        names += [f"py:{c}" for c in PY_TOKEN_CONCEPTS + PY_SPAN_CONCEPTS]
        self._names = names
        self._col = {n: i for i, n in enumerate(names)}

    def concept_names(self) -> list[str]:
        return list(self._names)

    def concept_reads(self) -> list[str]:
        return [READ_FIRST if n == "py:line_start" else READ_LAST for n in self._names]

    def label_chars(self, text: str) -> np.ndarray:
        col = self._col
        n = len(text)
        out = np.zeros((n, len(self._names)), dtype=bool)
        spans, error_at = tokenize_spans(text)
        base = label_python_spans(text, spans, error_at)

        # tokenize kinds and bracket depth: per-character arrays
        kind_cols = np.array([KIND[k] for k in PY_KINDS])
        out[:, [col[f"py:kind:{k}"] for k in PY_KINDS]] = base.kind[:, None] == kind_cols[None, :]
        for d in PY_DEPTHS:
            out[:, col[f"py:depth>={d}"]] = base.depth >= d

        lines = io.StringIO(text).readlines()  # the rows tokenize counts
        line_len = np.fromiter((len(line) for line in lines), dtype=np.int64, count=len(lines))
        line_start = np.concatenate([[0], np.cumsum(line_len)])
        level = np.array([_indent_level(line) for line in lines], dtype=np.int64)

        # one pass over the tokens: token concepts, statements (rows, first token), f-strings
        t_start, t_end, t_col = [], [], []
        s_start, s_end, s_col = [], [], []

        def mark(s: int, e: int, name: str) -> None:
            t_start.append(s), t_end.append(e), t_col.append(col[name])

        kw_col = {k: col[f"py:kw:{k}"] for k in keyword.kwlist}
        prev = prev2 = None  # the two previous significant tokens (not NL / COMMENT)
        prev_span = (0, 0)
        in_statement, first_row, first_tok = False, 0, None
        fstring_stack: list[int] = []
        last_row = 1
        for tok, s, e in spans:
            tt, ts = tok.type, tok.string
            last_row = tok.end[0]
            if not in_statement:
                if tt == token_module.COMMENT:
                    mark(s, s + 1, "py:line_start")
                elif tt not in _SKIP_AT_LINE_START:
                    in_statement, first_row, first_tok = True, tok.start[0], tok
                    mark(s, s + 1, "py:line_start")
            if tt == token_module.NAME:
                if ts in kw_col:
                    t_start.append(s), t_end.append(e), t_col.append(kw_col[ts])
                else:
                    if prev is not None and prev.type == token_module.NAME and prev.string in ("def", "class"):
                        mark(s, e, "py:def_name" if prev.string == "def" else "py:class_name")
                    if prev is not None and prev.type == token_module.OP and prev.string == ".":
                        mark(s, e, "py:attribute")
                    if ts == "self" or ts == "cls":
                        mark(s, e, f"py:{ts}")
                    if ts in BUILTIN_NAMES:
                        mark(s, e, "py:builtin")
                    if len(ts) > 4 and ts.startswith("__") and ts.endswith("__"):
                        mark(s, e, "py:dunder")
                    if _CONST_NAME.match(ts):
                        mark(s, e, "py:const_name")
            elif tt == token_module.OP and ts == "(":
                if (prev is not None and prev.type == token_module.NAME and not keyword.iskeyword(prev.string)
                        and not (prev2 is not None and prev2.type == token_module.NAME
                                 and prev2.string in ("def", "class"))):
                    mark(*prev_span, "py:call")
            elif tt == token_module.STRING:
                prefix = _STRING_PREFIX.match(ts).group()
                if "f" in prefix or "F" in prefix:
                    s_start.append(s), s_end.append(e), s_col.append(col["py:fstring"])
            elif _FSTRING_START is not None and tt == _FSTRING_START:
                fstring_stack.append(s)
            elif _FSTRING_END is not None and tt == _FSTRING_END and fstring_stack:
                s_start.append(fstring_stack.pop()), s_end.append(e), s_col.append(col["py:fstring"])
            if tt == token_module.NEWLINE and in_statement:
                self._statement(first_tok, first_row, tok.start[0], e, line_start, level, s_start, s_end, s_col)
                in_statement = False
            if tt not in (token_module.NL, token_module.COMMENT):
                prev2, prev = prev, tok
                prev_span = (s, e)
        if in_statement:  # cut short by a tokenize error
            self._statement(first_tok, first_row, last_row, n if error_at is None else error_at,
                            line_start, level, s_start, s_end, s_col)

        for s, e in _docstrings(text, lines, line_start):
            s_start.append(s), s_end.append(e), s_col.append(col["py:docstring"])

        per_char_level = np.repeat(level, line_len)  # (n,)
        for i, lv in enumerate(PY_LEVELS):
            out[:, col[f"py:indent:{lv}"]] = (per_char_level >= 3) if lv == "3+" else (per_char_level == i)
        fill_spans(out, t_start + s_start, t_end + s_end, t_col + s_col)
        return out

    def _statement(self, first_tok, first_row, end_row, end, line_start, level, s_start, s_end, s_col) -> None:
        """A statement from row first_row to end_row (1-based) ending at char `end`."""
        if end_row > first_row and first_row <= len(level):  # continuation lines take the first line's level
            level[first_row:end_row] = level[first_row - 1]
        start = int(line_start[first_row - 1])
        if first_tok.type == token_module.OP and first_tok.string == "@":
            s_start.append(start), s_end.append(end), s_col.append(self._col["py:decorator"])
        elif first_tok.type == token_module.NAME and first_tok.string in ("import", "from"):
            s_start.append(start), s_end.append(end), s_col.append(self._col["py:import_line"])


def _indent_level(line: str) -> int:
    """Indentation levels of a physical line (4 spaces or a tab = one), -1 for a blank line."""
    stripped = line.lstrip(" \t\f")
    if not stripped.strip():
        return -1
    prefix = line[: len(line) - len(stripped)]
    return (prefix.count(" ") + 4 * prefix.count("\t")) // 4


def _docstrings(text: str, lines: list[str], line_start: np.ndarray) -> list[tuple[int, int]]:
    """[start, end) character spans of the docstrings of a module, its classes and defs; [] when
    the text does not parse (or ast's positions do not land on string literals)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # invalid escape sequences and the like
            tree = ast.parse(text)
    except (SyntaxError, ValueError, RecursionError, MemoryError, OverflowError):
        return []
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) or not node.body:
            continue
        first = node.body[0]
        if (isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant)
                and isinstance(first.value.value, str) and first.end_lineno is not None):
            found.append(first)

    def offset(row: int, byte_col: int) -> int | None:
        if not 1 <= row <= len(lines):
            return None
        line = lines[row - 1]
        col = byte_col if line.isascii() else len(line.encode("utf-8")[:byte_col].decode("utf-8", "replace"))
        return int(line_start[row - 1]) + col

    out = []
    for node in found:
        s, e = offset(node.lineno, node.col_offset), offset(node.end_lineno, node.end_col_offset)
        if s is None or e is None or not (s < e <= len(text)) or text[e - 1] not in "'\"" \
                or not re.match(r"[A-Za-z]*['\"]", text[s:e]):
            return []  # positions do not match this text's lines (e.g. lone "\r" line ends): no info
        out.append((s, e))
    return out


# -- plain text ------------------------------------------------------------------------------------------

WORD_RE = re.compile(r"[^\W\d_]+")
TXT_CLASSES = ("letter", "upper", "digit", "space", "punct", "non_ascii")
TXT_POSITIONS = ("word_start", "word_middle", "word_end", "word_single")
TXT_OTHER = ("capitalised", "all_caps", "after_punct", "line_start", "in_parens", "in_quotes")
TXT_FIRST = {"txt:word_start", "txt:after_punct", "txt:line_start"}
AFTER_PUNCT = ".!?,;:"
_BLANK_LINE = re.compile(r"\n[ \t\r\f\v]*\n")


def _char_classes(ch: str) -> tuple[bool, ...]:
    return (ch.isalpha(), ch.isupper(), ch.isdigit(), ch.isspace(),
            ch in string.punctuation or unicodedata.category(ch).startswith("P"), ord(ch) > 0x7F)


_ASCII_CLASSES = np.array([_char_classes(chr(c)) for c in range(128)], dtype=bool)


def _codepoints(text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32).astype(np.int64)


def _clipped_depth(step: np.ndarray, segment: np.ndarray) -> np.ndarray:
    """Running sum of `step` that never goes below 0 and restarts at 0 in each segment (segment ids
    non-decreasing): the depth of a bracket walk where unmatched closers are ignored."""
    n = len(step)
    if n == 0:
        return step
    total = np.cumsum(step)
    seg_first = np.flatnonzero(np.r_[True, segment[1:] != segment[:-1]])  # first index of each segment
    before = np.r_[0, total][seg_first]  # the sum before each segment starts
    run_len = np.diff(np.r_[seg_first, n])
    local = total - np.repeat(before, run_len)
    big = 2 * n + 2  # each later segment's values sit below all earlier ones, so the running min restarts
    seg_rank = np.repeat(np.arange(len(seg_first)), run_len)
    run_min = np.minimum.accumulate(local - seg_rank * big) + seg_rank * big
    return local - np.minimum(run_min, 0)


class PlainTextLabeller(Labeller):
    """Text concepts for any corpus ("txt:"), see the module docstring's table."""

    name = "text"

    def __init__(self, n_words: int = 50, words: Iterable[str] | None = None) -> None:
        if n_words < 0:
            raise MonorouteError(f"n_words must be 0 or more, got {n_words}")
        self.n_words = n_words
        self.words: list[str] = [w.lower() for w in words] if words is not None else []

    def fit(self, texts: Sequence[str]) -> None:
        """Learn the `n_words` most frequent lower-cased words of two or more letters (ties: alphabetical)."""
        counts: Counter[str] = Counter()
        for text in texts:
            counts.update(w for w in WORD_RE.findall(text.lower()) if len(w) >= 2)
        ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
        self.words = [w for w, _ in ranked[: self.n_words]]

    def concept_names(self) -> list[str]:
        return ([f"txt:{c}" for c in TXT_CLASSES] + [f"txt:{c}" for c in TXT_POSITIONS + TXT_OTHER]
                + [f"txt:word:{w}" for w in self.words])

    def concept_reads(self) -> list[str]:
        return [READ_FIRST if n in TXT_FIRST else READ_LAST for n in self.concept_names()]

    def label_chars(self, text: str) -> np.ndarray:
        names = self.concept_names()
        col = {n: i for i, n in enumerate(names)}
        n = len(text)
        out = np.zeros((n, len(names)), dtype=bool)
        if n == 0:
            return out
        cp = _codepoints(text)
        # character classes: a table lookup (ASCII) plus str methods once per distinct other character
        classes = np.zeros((n, len(TXT_CLASSES)), dtype=bool)
        ascii_ = cp < 128
        classes[ascii_] = _ASCII_CLASSES[cp[ascii_]]
        if not ascii_.all():
            uniq, inverse = np.unique(cp[~ascii_], return_inverse=True)
            table = np.array([_char_classes(chr(c)) for c in uniq.tolist()], dtype=bool)
            classes[~ascii_] = table[inverse]
        out[:, [col[f"txt:{c}"] for c in TXT_CLASSES]] = classes
        space = classes[:, TXT_CLASSES.index("space")]

        # words: per-word facts, spread over the word's letters
        spans = [m.span() for m in WORD_RE.finditer(text)]
        w_start = np.fromiter((s for s, _ in spans), dtype=np.int64, count=len(spans))
        w_end = np.fromiter((e for _, e in spans), dtype=np.int64, count=len(spans))
        idx = np.arange(n)
        prev_nonspace = np.r_[-1, np.maximum.accumulate(np.where(space, -1, idx))[:-1]]  # last non-space before i
        if len(spans):
            single = (w_end - w_start) == 1
            out[w_start[~single], col["txt:word_start"]] = True
            out[w_end[~single] - 1, col["txt:word_end"]] = True
            out[w_start[single], col["txt:word_single"]] = True
            fill_spans(out, w_start + 1, w_end - 1, np.full(len(spans), col["txt:word_middle"]))
            word_text = [text[s:e] for s, e in spans]
            caps = np.array([w[0].isupper() and (len(w) == 1 or w[1:].islower()) for w in word_text], dtype=bool)
            all_caps = np.array([len(w) >= 2 and w.isupper() for w in word_text], dtype=bool)
            before = prev_nonspace[w_start]
            after_punct = (before >= 0) & np.isin(cp[np.maximum(before, 0)], [ord(c) for c in AFTER_PUNCT])
            starts, ends, cols = [], [], []
            for mask, name in ((caps, "txt:capitalised"), (all_caps, "txt:all_caps")):
                starts.append(w_start[mask]), ends.append(w_end[mask]), cols.append(np.full(mask.sum(), col[name]))
            out[w_start[after_punct], col["txt:after_punct"]] = True
            if self.words:
                word_col = {w: col[f"txt:word:{w}"] for w in self.words}
                hits = [(i, word_col[w.lower()]) for i, w in enumerate(word_text) if w.lower() in word_col]
                if hits:
                    which = np.array([i for i, _ in hits], dtype=np.int64)
                    starts.append(w_start[which]), ends.append(w_end[which])
                    cols.append(np.array([c for _, c in hits], dtype=np.int64))
            fill_spans(out, np.concatenate(starts), np.concatenate(ends), np.concatenate(cols))

        # start of a line: the first non-space character after the last line break
        newline = cp == ord("\n")
        last_newline = np.r_[-1, np.maximum.accumulate(np.where(newline, idx, -1))[:-1]]  # last "\n" before i
        out[:, col["txt:line_start"]] = ~space & ((prev_nonspace < last_newline) | (prev_nonspace == -1))

        # brackets and quotes, restarting at each blank line
        breaks = np.array([m.end() for m in _BLANK_LINE.finditer(text)], dtype=np.int64)
        segment = np.searchsorted(breaks, idx, side="right")
        opens, closes = cp == ord("("), cp == ord(")")
        step = np.r_[0, opens[:-1].astype(np.int64)] - closes  # an opener counts after itself
        out[:, col["txt:in_parens"]] = _clipped_depth(step, segment) > 0
        quote = (cp == ord('"')).astype(np.int64)
        count = np.cumsum(quote)
        seg_first = np.searchsorted(segment, segment, side="left")  # first index of each char's segment
        local = count - (count[seg_first] - quote[seg_first])
        # curly quotes nest like brackets, both quotes inside: an opener counts at itself, a closer after
        curly = _clipped_depth((cp == 0x201C).astype(np.int64) - np.r_[0, cp[:-1] == 0x201D], segment)
        out[:, col["txt:in_quotes"]] = (local % 2 == 1) | (quote == 1) | (curly > 0)
        return out


# -- regex ---------------------------------------------------------------------------------------------

REGEX_FLAGS = {"i": re.IGNORECASE, "m": re.MULTILINE, "s": re.DOTALL, "x": re.VERBOSE, "a": re.ASCII}
REGEX_KEYS = ("pattern", "flags")
CONCEPT_FILE_SUFFIXES = (".yaml", ".yml", ".toml")


class RegexLabeller(Labeller):
    """User concepts ("re:"): each holds on every character of each match of its regex."""

    name = "regex"

    def __init__(self, patterns: dict[str, str | re.Pattern]) -> None:
        self.patterns = {name: re.compile(p) if isinstance(p, str) else p for name, p in patterns.items()}

    @classmethod
    def from_file(cls, path: str | Path) -> "RegexLabeller":
        """Read concepts from a YAML (.yaml/.yml) or TOML (.toml) file (schema in the module docstring)."""
        path = Path(path)
        suffix = path.suffix.lower()
        if suffix not in CONCEPT_FILE_SUFFIXES:
            raise MonorouteError(f"concepts file {path} has extension {suffix or '(none)'!r}; "
                                 f"write it as {', '.join(CONCEPT_FILE_SUFFIXES)}")
        try:
            raw = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            why = e.strerror if isinstance(e, OSError) and e.strerror else str(e).splitlines()[0]
            raise MonorouteError(f"cannot read concepts file {path}: {why}; check the path") from e
        data = _parse_toml(path, raw) if suffix == ".toml" else _parse_yaml(path, raw)
        if not isinstance(data, dict):
            raise MonorouteError(f"concepts file {path} needs a top-level 'concepts' mapping of name: pattern")
        unknown = sorted(str(k) for k in data if k != "concepts")
        if unknown:
            raise MonorouteError(f"concepts file {path} has unknown top-level key {unknown[0]!r}; "
                                 f"the only key is 'concepts'")
        if "concepts" not in data:
            raise MonorouteError(f"concepts file {path} needs a top-level 'concepts' mapping of name: pattern")
        concepts = data["concepts"]
        if not isinstance(concepts, dict) or not concepts:
            raise MonorouteError(f"concepts file {path} defines no concepts; put name: pattern entries "
                                 f"under 'concepts'")
        patterns = {}
        for name, spec in concepts.items():
            name = str(name)
            if not name.strip():
                raise MonorouteError(f"concepts file {path} has an empty concept name; name every concept")
            flags_text = ""
            if isinstance(spec, dict):
                bad = sorted(str(k) for k in spec if k not in REGEX_KEYS)
                if bad:
                    raise MonorouteError(f"concept {name!r} in {path} has unknown key {bad[0]!r}; "
                                         f"allowed keys are {', '.join(REGEX_KEYS)}")
                if "pattern" not in spec:
                    raise MonorouteError(f"concept {name!r} in {path} has no 'pattern'; add pattern: REGEX")
                pattern, flags_text = spec["pattern"], spec.get("flags", "")
                if not isinstance(flags_text, str):
                    raise MonorouteError(f"concept {name!r} in {path} has flags {flags_text!r}; "
                                         f"write them as a string of letters from {''.join(REGEX_FLAGS)}")
            else:
                pattern = spec
            if not isinstance(pattern, str) or not pattern:
                raise MonorouteError(f"concept {name!r} in {path} needs a non-empty regex string "
                                     f"(name: REGEX or name: {{pattern: REGEX, flags: i}}), got {pattern!r}")
            flags = 0
            for letter in flags_text:
                if letter not in REGEX_FLAGS:
                    raise MonorouteError(f"concept {name!r} in {path} has unknown flag {letter!r} in "
                                         f"{flags_text!r}; use letters from {''.join(REGEX_FLAGS)}")
                flags |= REGEX_FLAGS[letter]
            try:
                patterns[name] = re.compile(pattern, flags)
            except re.error as e:
                raise MonorouteError(f"concept {name!r} in {path} has an invalid regex {pattern!r} "
                                     f"({str(e).splitlines()[0]}); fix the pattern") from e
        return cls(patterns)

    def concept_names(self) -> list[str]:
        return [f"re:{name}" for name in self.patterns]

    def label_chars(self, text: str) -> np.ndarray:
        out = np.zeros((len(text), len(self.patterns)), dtype=bool)
        starts, ends, cols = [], [], []
        for c, pattern in enumerate(self.patterns.values()):
            for m in pattern.finditer(text):
                starts.append(m.start()), ends.append(m.end()), cols.append(c)
        fill_spans(out, starts, ends, cols)
        return out


def _parse_yaml(path: Path, raw: str):
    import yaml

    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise MonorouteError(f"concepts file {path} is not valid YAML ({problem}{where}); fix its syntax") from e


def _parse_toml(path: Path, raw: str):
    try:
        import tomllib
    except ImportError:  # Python 3.10
        try:
            import tomli as tomllib
        except ImportError as e:
            raise MonorouteError(f"reading {path} needs Python 3.11+ or the tomli package; "
                                 f"pip install tomli or write the file as YAML") from e
    try:
        return tomllib.loads(raw)
    except tomllib.TOMLDecodeError as e:
        raise MonorouteError(f"concepts file {path} is not valid TOML ({str(e).splitlines()[0]}); "
                             f"fix its syntax") from e


# -- combined and defaults ----------------------------------------------------------------------------------


class CombinedLabeller(Labeller):
    """The concepts of several labellers side by side (their names must not clash)."""

    def __init__(self, labellers: Sequence[Labeller]) -> None:
        self.labellers = list(labellers)
        self.name = "+".join(lab.name for lab in self.labellers)
        self._check_names()

    def _check_names(self) -> list[str]:
        names = [n for lab in self.labellers for n in lab.concept_names()]
        dup = [n for n, k in Counter(names).items() if k > 1]
        if dup:
            raise MonorouteError(f"concept {dup[0]!r} is defined twice; rename one of them")
        return names

    def fit(self, texts: Sequence[str]) -> None:
        for lab in self.labellers:
            lab.fit(texts)
        self._check_names()  # learned words are prefixed, but a user's regex could still clash

    def concept_names(self) -> list[str]:
        return [n for lab in self.labellers for n in lab.concept_names()]

    def concept_reads(self) -> list[str]:
        return [r for lab in self.labellers for r in _check_reads(lab)]

    def label_text(self, text: str) -> np.ndarray:
        n_bytes = len(text.encode("utf-8", "surrogatepass"))
        parts = [lab.label_text(text) for lab in self.labellers]
        return np.concatenate(parts, axis=1) if parts else np.zeros((n_bytes, 0), dtype=bool)


def is_python_source(source: str) -> bool:
    """The stdlib, or a corpus spec naming .py files: a .py file or glob, or a folder mostly of .py files."""
    if source == "stdlib":
        return True
    if source.startswith("hf:"):
        return False
    if source.lower().endswith((".py", ".pyi")):
        return True
    if os.path.isdir(source):
        seen = py = 0
        for root, dirs, files in os.walk(source):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            for f in sorted(files):
                if f.startswith("."):
                    continue
                seen += 1
                py += f.endswith(".py")
                if seen >= 200:
                    return py * 2 > seen
        return seen > 0 and py * 2 > seen
    return False


def labeller_for(source: str, concepts_file: str | Path | None = None) -> Labeller:
    """The default labeller of a corpus: Python + plain text for Python source (`is_python_source`),
    plain text otherwise, plus the regex concepts of `concepts_file` when given."""
    labellers: list[Labeller] = [PythonLabeller()] if is_python_source(source) else []
    labellers.append(PlainTextLabeller())
    if concepts_file is not None:
        labellers.append(RegexLabeller.from_file(concepts_file))
    return CombinedLabeller(labellers)


# ---- bytes -> tokens ---------------------------------------------------------------------------------------


def byte_labels_to_tokens(byte_labels: np.ndarray, tok_bytes: Sequence[bytes], reads: Sequence[str]) -> np.ndarray:
    """(T, C) token labels from (n_bytes, C) byte labels by the token rule (module docstring): each
    concept is read at the token's last (or first, per `reads`) non-whitespace byte, at its last byte
    when it is all whitespace. Empty tokens, and tokens past the labelled bytes, get no concept."""
    T, C = len(tok_bytes), byte_labels.shape[1]
    out = np.zeros((T, C), dtype=bool)
    lengths = np.fromiter(map(len, tok_bytes), dtype=np.int64, count=T)
    joined = b"".join(tok_bytes)
    n, n_labelled = len(joined), byte_labels.shape[0]
    if n == 0 or C == 0:
        return out
    ends = np.cumsum(lengths)
    starts = ends - lengths
    idx = np.arange(n, dtype=np.int64)
    ws = _WS_LUT[np.frombuffer(joined, dtype=np.uint8)]
    last_solid = np.maximum.accumulate(np.where(ws, -1, idx))  # last non-whitespace byte at or before i
    first_solid = np.minimum.accumulate(np.where(ws, n, idx)[::-1])[::-1]  # first at or after i
    nonempty = lengths > 0
    last_byte = np.maximum(ends - 1, 0)
    last = last_solid[last_byte]
    last = np.where(last >= starts, last, last_byte)
    first = first_solid[np.minimum(starts, n - 1)]
    first = np.where(first < ends, first, last_byte)
    reads = np.asarray(reads)
    for mode, at in ((READ_LAST, last), (READ_FIRST, first)):
        cols = np.flatnonzero(reads == mode)
        if len(cols) == 0:
            continue
        ok = nonempty & (at < n_labelled)
        rows = np.flatnonzero(ok)
        out[rows[:, None], cols[None, :]] = byte_labels[at[rows]][:, cols]
    return out


def label_tokens(labeller: Labeller, text: str, tok_bytes: Sequence[bytes]) -> np.ndarray:
    """(T, C) bool labels of the tokens whose bytes are `tok_bytes` (see `token_bytes`) in `text`.
    The tokens must spell `text`'s UTF-8 bytes, or a prefix of them (a document cut short)."""
    byte_labels = labeller.label_text(text)
    encoded = text.encode("utf-8", "surrogatepass")
    joined = b"".join(tok_bytes)
    if not encoded.startswith(joined):
        raise ValueError(f"the {len(tok_bytes)} tokens' bytes are not the text's UTF-8 bytes (nor a prefix); "
                         f"pass the tokens of this very text")
    _check_shape(labeller, byte_labels, len(encoded))
    return byte_labels_to_tokens(byte_labels, tok_bytes, _check_reads(labeller))


def _check_shape(labeller: Labeller, byte_labels: np.ndarray, n_bytes: int) -> None:
    if byte_labels.shape != (n_bytes, len(labeller.concept_names())):
        raise ValueError(f"labeller {labeller.name} gave labels of shape {byte_labels.shape} for {n_bytes} bytes "
                         f"and {len(labeller.concept_names())} concepts")


def decode_lossy(raw: bytes) -> tuple[str, np.ndarray | None]:
    """`raw` as text whose UTF-8 bytes line up with `raw`: every byte that is not valid UTF-8 (a
    character cut at the end of a document, stray bytes) becomes one space. Returns the text and a
    (len(raw),) mask of those bytes (None when every byte decoded)."""
    try:
        return raw.decode("utf-8"), None
    except UnicodeDecodeError:
        pass
    escaped = raw.decode("utf-8", "surrogateescape")  # each bad byte -> one lone surrogate U+DC80..U+DCFF
    text = escaped.translate(_SURROGATE_TO_SPACE)
    fixed = np.frombuffer(text.encode("utf-8"), dtype=np.uint8)
    return text, fixed != np.frombuffer(raw, dtype=np.uint8)  # bad bytes are >= 0x80, a space is not


_SURROGATE_TO_SPACE = {0xDC80 + b: " " for b in range(128)}


def label_documents(labeller: Labeller, docs: Sequence, tokenizer, *, trailing_separator: bool = True) -> ConceptLabels:
    """Labels of documents given as token ids, concatenated in order: row p is token p of the
    documents laid end to end (P = total ids). Each document is decoded from its tokens' bytes and
    labelled whole. Rows of special tokens (EOT, which also splits a document into separately
    labelled parts) are all False; with `trailing_separator`, so are a document's final ids when they
    are the tokenizer's separator (`boundary_ids()`: byte-level "\\n\\n"), the layout
    `encode_documents` and the analysis stream write. Bytes that are not valid UTF-8 (a document
    cut mid-character) label nothing; every document, whatever it holds, gets exactly len(ids) rows."""
    names = labeller.concept_names()
    reads = _check_reads(labeller)
    separator = list(tokenizer.boundary_ids()) if trailing_separator else []
    blocks = []
    for doc in docs:
        ids = np.asarray(doc, dtype=np.int64).ravel()
        rows = np.zeros((len(ids), len(names)), dtype=bool)
        n_body = len(ids)
        if separator and n_body >= len(separator) and ids[n_body - len(separator):].tolist() == separator:
            n_body -= len(separator)
        tok = token_bytes(tokenizer, ids[:n_body])
        empty = np.fromiter((len(b) == 0 for b in tok), dtype=bool, count=n_body)
        # runs of non-empty tokens between special tokens, each labelled as a document of its own
        edges = np.flatnonzero(np.diff(np.r_[False, ~empty, False].astype(np.int8)))
        for a, b in zip(edges[::2], edges[1::2]):
            part = tok[a:b]
            text, bad = decode_lossy(b"".join(part))
            byte_labels = labeller.label_text(text)
            _check_shape(labeller, byte_labels, len(text.encode("utf-8")))
            if bad is not None:
                byte_labels = byte_labels.copy()
                byte_labels[bad] = False
            rows[a:b] = byte_labels_to_tokens(byte_labels, part, reads)
        blocks.append(rows)
    matrix = np.concatenate(blocks) if blocks else np.zeros((0, len(names)), dtype=bool)
    return ConceptLabels(names, matrix)
