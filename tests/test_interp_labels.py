"""Concept labellers: token bytes, the token rule, Python / plain-text / regex concepts, documents."""
from __future__ import annotations

import numpy as np
import pytest

from monoroute.data.tokenizers import BPETokenizer, ByteTokenizer
from monoroute.errors import MonorouteError
from monoroute.interp import labels as L

SNIPPET = 'def f(x):\n    return "a(b"  # c\n'
NON_ASCII = "café → naïve 🙂 ok\n"


@pytest.fixture(scope="module")
def bpe():
    texts = [SNIPPET * 3, NON_ASCII * 3, "The cat sat on the mat. The end!\n" * 3]
    return BPETokenizer.train(texts, vocab_size=300)


def picture(matrix: np.ndarray, names: list[str], concept: str) -> str:
    """One column as a string: x where the concept holds."""
    return "".join("x" if v else "." for v in matrix[:, names.index(concept)])


def concepts_of(row: np.ndarray, names: list[str]) -> set[str]:
    return {names[i] for i in np.flatnonzero(row)}


# ---- token bytes ----------------------------------------------------------------------------------


@pytest.mark.parametrize("text", [SNIPPET, NON_ASCII, "é", "→x", "🙂🙂", "\t\n  \n", ""])
def test_token_bytes_spell_the_document_for_both_tokenizers(bpe, text):
    for tok in (ByteTokenizer(), bpe):
        pieces = L.token_bytes(tok, tok.encode(text))
        assert len(pieces) == len(tok.encode(text))
        assert b"".join(pieces) == text.encode("utf-8")
    assert L.token_bytes(ByteTokenizer(), list("é".encode())) == [b"\xc3", b"\xa9"]


def test_bpe_special_token_is_empty_and_foreign_ids_are_refused(bpe):
    ids = bpe.encode("ab") + [bpe.eot_id] + bpe.encode("é")
    pieces = L.token_bytes(bpe, ids)
    assert pieces[len(bpe.encode("ab"))] == b""
    assert b"".join(pieces) == "abé".encode()
    with pytest.raises(MonorouteError, match="token id 256 is outside the byte tokenizer's vocabulary"):
        L.token_bytes(ByteTokenizer(), [65, 256])
    with pytest.raises(MonorouteError, match="outside the bpe tokenizer's vocabulary"):
        L.token_bytes(bpe, [bpe.vocab_size])


# ---- the token rule ---------------------------------------------------------------------------------


def test_token_rule_reads_last_or_first_non_whitespace_byte():
    lab = L.PythonLabeller()
    names = lab.concept_names()
    pieces = [b"def", b" f", b"(", b"x", b"):", b"\n   ", b" return", b' "', b"a", b"(", b"b", b'"', b"  #", b" c",
              b"\n"]
    assert b"".join(pieces) == SNIPPET.encode()
    rows = L.label_tokens(lab, SNIPPET, pieces)
    assert rows.shape == (len(pieces), len(names))
    got = {p: concepts_of(r, names) for p, r in zip(pieces, rows)}
    # " return" is a keyword (its last non-whitespace byte), not whitespace, and starts its line
    # (its first non-whitespace byte); "\n   " is all whitespace: read at its last byte (indentation)
    assert got[b" return"] == {"py:kind:keyword", "py:kw:return", "py:indent:1", "py:line_start"}
    assert "py:line_start" not in got[b'  #']  # a comment after code does not start its line
    assert got[b"\n   "] == {"py:kind:indent", "py:indent:1"}
    assert got[b"def"] == {"py:kind:keyword", "py:kw:def", "py:indent:0", "py:line_start"}
    assert got[b" f"] == {"py:kind:name", "py:def_name", "py:indent:0"}
    assert got[b"x"] == {"py:kind:name", "py:depth>=1", "py:indent:0"}
    assert got[b"):"] == {"py:kind:operator", "py:indent:0"}  # read at ":", outside the brackets
    assert got[b"  #"] == {"py:kind:comment", "py:indent:1"}
    assert got[b"\n"] == {"py:kind:newline", "py:indent:1"}
    string_rows = rows[7:12]
    assert string_rows[:, names.index("py:kind:string")].all()
    assert not string_rows[:, names.index("py:depth>=1")].any()  # "(" inside a string opens nothing
    # a prefix of the text (a document cut short) is fine; other bytes are a caller's bug
    assert L.label_tokens(lab, SNIPPET, pieces[:3]).shape == (3, len(names))
    with pytest.raises(ValueError, match="not the text's UTF-8 bytes"):
        L.label_tokens(lab, SNIPPET, [b"dex"])


def test_word_positions_of_multi_byte_tokens():
    lab = L.PlainTextLabeller()
    names = lab.concept_names()
    pieces = [b" runn", b"ing", b" a", b" te", b"st", b"."]
    rows = L.label_tokens(lab, " running a test.", pieces)
    pos = ["txt:word_start", "txt:word_middle", "txt:word_end", "txt:word_single"]
    got = [sorted(concepts_of(r, names) & set(pos)) for r in rows]
    assert got == [["txt:word_middle", "txt:word_start"],  # starts the word, stops inside it
                   ["txt:word_end"], ["txt:word_single"], ["txt:word_middle", "txt:word_start"], ["txt:word_end"], []]


# ---- Python ---------------------------------------------------------------------------------------------


def test_python_concepts_per_byte_token():
    lab = L.PythonLabeller()
    names = lab.concept_names()
    tok = ByteTokenizer()
    m = L.label_documents(lab, [np.asarray(tok.encode(SNIPPET))], tok, trailing_separator=False).matrix
    assert m.shape == (len(SNIPPET), len(names))
    #        'def f(x):~    return "a(b"  # c~'
    want = {
        "py:kind:keyword": "xxx...........xxxxxx............",
        "py:kw:def": "xxx.............................",
        "py:kw:return": "..............xxxxxx............",
        "py:def_name": "....x...........................",
        "py:depth>=1": "......x.........................",
        "py:kind:string": ".....................xxxxx......",
        "py:kind:comment": "............................xxx.",
        "py:kind:newline": ".........x.....................x",
        "py:kind:indent": "..........xxxx..................",
        "py:kind:whitespace": "...x................x.....xx....",
        "py:kind:operator": ".....x.xx.......................",
        "py:indent:0": "xxxxxxxxxx......................",
        "py:indent:1": "..........xxxxxxxxxxxxxxxxxxxxxx",
        "py:line_start": "x.............x.................",
        "py:call": "................................",
    }
    for concept, expected in want.items():
        assert picture(m, names, concept) == expected, concept


def test_python_concepts_per_bpe_token(bpe):
    lab = L.PythonLabeller()
    names = lab.concept_names()
    ids = bpe.encode(SNIPPET)
    pieces = L.token_bytes(bpe, ids)
    assert len(pieces) < len(SNIPPET)  # merges happened: tokens of several bytes
    rows = L.label_documents(lab, [np.asarray(ids)], bpe, trailing_separator=False).matrix
    ends = np.cumsum([len(p) for p in pieces])
    starts = ends - [len(p) for p in pieces]
    checked = 0
    for s, e, p, row in zip(starts, ends, pieces, rows):
        got = concepts_of(row, names)
        solid = [i for i in range(s, e) if not SNIPPET[i].isspace()]  # SNIPPET is ASCII: byte == char
        if solid and 14 <= solid[0] and solid[-1] < 20:  # a piece of "return", whatever the split
            assert {"py:kind:keyword", "py:kw:return", "py:indent:1"} <= got
            assert ("py:line_start" in got) == (solid[0] == 14)
            checked += 1
        elif solid and 21 <= solid[0] and solid[-1] < 26:  # "a(b" with its quotes
            assert "py:kind:string" in got and "py:depth>=1" not in got
            checked += 1
        elif solid == [6]:
            assert "py:depth>=1" in got and "py:kind:name" in got
            checked += 1
        elif solid == [4]:
            assert "py:def_name" in got
            checked += 1
        elif not solid and 10 < e <= 14:  # pieces ending in the indentation ("\n  ", " "): read at their last byte
            assert got == {"py:kind:indent", "py:indent:1"}
            checked += 1
    assert checked >= 6
    assert any(p.startswith(b" ") and p.strip() and p.strip() in b"return" for p in pieces)  # a " ret..." piece


def test_docstrings_only_first_statement_strings_and_only_when_it_parses():
    lab = L.PythonLabeller()
    names = lab.concept_names()
    text = '"""M."""\nclass Ä: "K"\ndef f():\n    x = 1\n    "no"\n'
    m = lab.label_text(text)
    enc = text.encode()
    at = np.flatnonzero(m[:, names.index("py:docstring")])
    # module and class docstrings, byte-exact (after "Ä", ast's byte column differs from the character
    # column); the string in f() is not its first statement
    assert at.tolist() == list(range(8)) + list(range(enc.index(b'"K"'), enc.index(b'"K"') + 3))
    broken = text + "def g(:\n"
    m2 = lab.label_text(broken)
    assert not m2[:, names.index("py:docstring")].any()  # no ast: no docstring info
    assert m2[:, names.index("py:kw:class")].sum() == 5  # the rest still labelled


def test_indentation_levels_line_starts_and_name_concepts():
    lab = L.PythonLabeller()
    names = lab.concept_names()
    text = ("@deco\n"
            "class K(Base):\n"
            "\tdef m(self, cls):\n"
            "\t\t# note\n"
            "\t\ty = foo(a,\n"
            "  b)\n"
            "\n"
            "\t\t\tz = self.__dict__ + MAX_N + len(f'{y}')\n"
            "import os\n")
    m = lab.label_text(text)
    lines = text.split("\n")[:-1]
    starts = np.cumsum([0] + [len(line) + 1 for line in lines])

    def line_pic(concept: str) -> list[str]:
        col = picture(m, names, concept)
        return [col[starts[i]:starts[i + 1]] for i in range(len(lines))]

    levels = [next((lv for lv in L.PY_LEVELS if line_pic(f"py:indent:{lv}")[i].strip(".")), None)
              for i in range(len(lines))]
    assert levels == ["0", "0", "1", "2", "2", "2", None, "3+", "0"]  # "  b)" continues level 2; blank: none
    assert [p.count("x") for p in line_pic("py:indent:2")] == [0, 0, 0, 9, 13, 5, 0, 0, 0]  # whole lines
    assert line_pic("py:line_start") == ["x.....", "x..............", ".x.................", "..x......",
                                         "..x..........", ".....", ".",  # "  b)" continues a statement
                                         "...x" + "." * 39, "x........."]
    assert line_pic("py:decorator")[0] == "xxxxxx" and not line_pic("py:decorator")[1].count("x")
    assert line_pic("py:import_line")[-1] == "xxxxxxxxxx"
    assert line_pic("py:class_name")[1] == "......x........"
    assert line_pic("py:def_name")[2] == ".....x............."
    assert line_pic("py:self")[2] == ".......xxxx........"
    assert line_pic("py:cls")[2] == ".............xxx..."
    z = lines[7]
    assert line_pic("py:attribute")[7] == "." * z.index("__dict__") + "x" * 8 + "." * (len(z) - z.index("__dict__") - 7)
    assert line_pic("py:dunder")[7] == line_pic("py:attribute")[7]
    assert line_pic("py:const_name")[7].strip(".") == "xxxxx" and z[line_pic("py:const_name")[7].index("x")] == "M"
    assert line_pic("py:builtin")[7].count("x") == 3 and z[line_pic("py:builtin")[7].index("x")] == "l"
    assert line_pic("py:call")[4] == "......xxx...."  # foo( ; not K(Base) nor def m(
    assert line_pic("py:call")[1].count("x") == 0 and line_pic("py:call")[2].count("x") == 0
    f_at = z.index("f'")
    assert line_pic("py:fstring")[7] == "." * f_at + "x" * 6 + "." * (len(z) - f_at - 5)


# ---- plain text ------------------------------------------------------------------------------------------


def test_plain_text_concepts():
    lab = L.PlainTextLabeller()
    names = lab.concept_names()
    text = 'Hello, World. I saw NASA (a cat) "hi"\n  Next (x\n\ny) z'
    m = lab.label_chars(text)
    assert m.shape == (len(text), len(names))
    want = {  # 'Hello, World. I saw NASA (a cat) "hi"~  Next (x~~y) z'
        "txt:upper": "x......x......x.....xxxx................x............",
        "txt:punct": ".....x......x............x.....x.x..x........x....x..",
        "txt:word_start": "x......x........x...x.......x.....x.....x............",
        "txt:word_middle": ".xxx....xxx......x...xx......x...........xx..........",
        "txt:word_end": "....x......x......x....x......x....x.......x.........",
        "txt:word_single": "..............x...........x...................x..x..x",
        "txt:capitalised": "xxxxx..xxxxx..x.........................xxxx.........",
        "txt:all_caps": "....................xxxx.............................",
        "txt:after_punct": ".......x......x......................................",
        "txt:line_start": "x.......................................x........x...",
        "txt:in_parens": "..........................xxxxx...............xxx....",  # a blank line closes "("
        "txt:in_quotes": ".................................xxxx................",
    }
    for concept, expected in want.items():
        assert picture(m, names, concept) == expected, concept


def test_plain_text_character_classes_per_byte():
    lab = L.PlainTextLabeller()
    names = lab.concept_names()
    text = "é1 →“q”"
    m = lab.label_text(text)  # é: 2 bytes, →“”: 3 bytes each
    assert m.shape == (len(text.encode()), len(names))
    #                                              é 1 _ →  “  q ”
    assert picture(m, names, "txt:letter") == "xx" "." "." "..." "..." "x" "..."
    assert picture(m, names, "txt:digit") == ".." "x" "." "..." "..." "." "..."
    assert picture(m, names, "txt:space") == ".." "." "x" "..." "..." "." "..."
    assert picture(m, names, "txt:non_ascii") == "xx" "." "." "xxx" "xxx" "." "xxx"
    assert picture(m, names, "txt:punct") == ".." "." "." "..." "xxx" "." "xxx"  # "→" is a symbol (Sm)
    assert picture(m, names, "txt:in_quotes") == ".." "." "." "..." "xxx" "x" "xxx"


def test_plain_text_fit_learns_frequent_words_ties_alphabetically():
    lab = L.PlainTextLabeller(n_words=3)
    assert not any(n.startswith("txt:word:") for n in lab.concept_names())  # nothing learned yet
    lab.fit(["the The THE cat cat a b c", "dog ant cat x"])
    words = [n for n in lab.concept_names() if n.startswith("txt:word:")]
    assert words == ["txt:word:cat", "txt:word:the", "txt:word:ant"]  # 3, 3 (ties: alphabetical), then ant < dog
    names = lab.concept_names()
    m = lab.label_chars("The cats, a cat.")
    assert picture(m, names, "txt:word:the") == "xxx............."
    assert picture(m, names, "txt:word:cat") == "............xxx."  # "cats" is another word


# ---- regex files -----------------------------------------------------------------------------------------

YAML = 'concepts:\n  url: "https?://\\\\S+"\n  todo: {pattern: "todo|fixme", flags: "i"}\n'
TOML = '[concepts]\nurl = \'https?://\\S+\'\ntodo = { pattern = "todo|fixme", flags = "i" }\n'


@pytest.mark.parametrize("name,content", [("c.yaml", YAML), ("c.yml", YAML), ("c.toml", TOML)])
def test_regex_labeller_from_yaml_and_toml(tmp_path, name, content):
    path = tmp_path / name
    path.write_text(content)
    lab = L.RegexLabeller.from_file(path)
    assert lab.concept_names() == ["re:url", "re:todo"]
    text = "see http://x.io/a b TODO: Fixme"
    m = lab.label_text(text)
    names = lab.concept_names()
    assert picture(m, names, "re:url") == "....xxxxxxxxxxxxx.............."
    assert picture(m, names, "re:todo") == "....................xxxx..xxxxx"


@pytest.mark.parametrize("name,content,message", [
    ("c.yaml", "concepts:\n  a: x\nextra: 1\n", "unknown top-level key 'extra'; the only key is 'concepts'"),
    ("c.yaml", "concepts:\n  a: {pattern: x, flag: i}\n", "concept 'a' in .* has unknown key 'flag'"),
    ("c.yaml", "concepts:\n  a: '(x'\n", "concept 'a' in .* has an invalid regex '\\(x' \\(missing \\)"),
    ("c.yaml", "concepts:\n  a: {pattern: x, flags: iq}\n", "unknown flag 'q' in 'iq'; use letters from imsxa"),
    ("c.toml", "[concepts]\na = { pattern = 'x', flags = 'z' }\n", "unknown flag 'z'"),
    ("c.yaml", "concepts:\n  a: {flags: i}\n", "concept 'a' in .* has no 'pattern'"),
    ("c.yaml", "concepts: {}\n", "defines no concepts"),
    ("c.yaml", "patterns:\n  a: x\n", "unknown top-level key 'patterns'"),
    ("c.yaml", "concepts: [\n", "is not valid YAML"),
    ("c.toml", "[concepts\n", "is not valid TOML"),
    ("c.json", '{"concepts": {}}', "has extension '.json'; write it as .yaml, .yml, .toml"),
    (None, None, "cannot read concepts file .*missing.yaml: No such file"),
])
def test_regex_file_errors_are_one_clear_line(tmp_path, name, content, message):
    path = tmp_path / (name or "missing.yaml")
    if content is not None:
        path.write_text(content)
    with pytest.raises(MonorouteError, match=message) as info:
        L.RegexLabeller.from_file(path)
    assert "\n" not in str(info.value) and str(path) in str(info.value)


# ---- combined, defaults ------------------------------------------------------------------------------------


def test_labeller_for_picks_concepts_by_source(tmp_path):
    (tmp_path / "c.yaml").write_text("concepts:\n  todo: TODO\n")
    py = L.labeller_for("stdlib", None)
    names = py.concept_names()
    assert names[0] == "py:kind:name" and "py:kw:def" in names and "txt:letter" in names
    assert len(py.concept_reads()) == len(names)
    assert [r for n, r in zip(names, py.concept_reads()) if r == L.READ_FIRST] and \
        {n for n, r in zip(names, py.concept_reads()) if r == L.READ_FIRST} == \
        {"py:line_start", "txt:word_start", "txt:after_punct", "txt:line_start"}
    assert L.is_python_source("src/**/*.py") and L.is_python_source("a.py")
    text_only = L.labeller_for("hf:wikitext", str(tmp_path / "c.yaml")).concept_names()
    assert not any(n.startswith("py:") for n in text_only) and text_only[-1] == "re:todo"
    (tmp_path / "pkg").mkdir()
    for f in ("a.py", "b.py", "c.txt"):
        (tmp_path / "pkg" / f).write_text("x\n")
    assert L.is_python_source(str(tmp_path / "pkg")) and not L.is_python_source(str(tmp_path / "c.yaml"))
    with pytest.raises(MonorouteError, match="cannot read concepts file"):
        L.labeller_for("stdlib", str(tmp_path / "nope.yaml"))
    with pytest.raises(MonorouteError, match="concept 'txt:letter' is defined twice"):
        L.CombinedLabeller([L.PlainTextLabeller(), L.PlainTextLabeller()])


# ---- documents ---------------------------------------------------------------------------------------------

DOCS = ["x = 1\n", "café → ok\n\n", "def g():\n    pass\n"]


def test_label_documents_aligns_rows_with_ids_and_blanks_separators(bpe):
    lab = L.labeller_for("stdlib", None)
    lab.fit(DOCS)
    for tok in (ByteTokenizer(), bpe):
        sep = tok.boundary_ids()
        docs = [np.asarray(tok.encode(t) + sep) for t in DOCS]
        labels = L.label_documents(lab, docs, tok)
        assert labels.names == lab.concept_names()
        assert labels.matrix.shape == (sum(len(d) for d in docs), len(labels.names))
        first = 0
        for text, doc in zip(DOCS, docs):
            body = doc[: len(doc) - len(sep)]
            alone = L.label_tokens(lab, text, L.token_bytes(tok, body))
            np.testing.assert_array_equal(labels.matrix[first:first + len(body)], alone)
            assert not labels.matrix[first + len(body):first + len(doc)].any()  # the separator
            assert alone.any(axis=1).all()  # every body token carries some concept
            first += len(doc)
    # BPE: an EOT inside a document splits it into parts labelled on their own
    a, b = bpe.encode("x = (1"), bpe.encode("y = 2\n")
    labels = L.label_documents(lab, [np.asarray(a + [bpe.eot_id] + b)], bpe)
    np.testing.assert_array_equal(labels.matrix[len(a) + 1:], L.label_tokens(lab, "y = 2\n", L.token_bytes(bpe, b)))
    assert not labels.matrix[len(a)].any()
    depth = labels.names.index("py:depth>=1")
    assert labels.matrix[len(a) + 1:, depth].sum() == 0  # the "(" before EOT does not leak into the next part
    empty = L.label_documents(lab, [], ByteTokenizer())
    assert empty.matrix.shape == (0, len(lab.concept_names()))


def test_truncated_and_invalid_utf8_documents(bpe):
    lab = L.labeller_for("stdlib", None)
    names = lab.concept_names()
    letter, string = names.index("txt:letter"), names.index("py:kind:string")
    byte = ByteTokenizer()
    cut = "x = 'é'\n".encode()[:6]  # ends inside "é"
    garbage = bytes([0xFF, 0x41, 0xFE, 0xC3])
    labels = L.label_documents(lab, [np.frombuffer(cut, np.uint8), np.frombuffer(garbage, np.uint8)], byte,
                               trailing_separator=False)
    assert labels.matrix.shape == (10, len(names))
    m = labels.matrix
    assert m[0, letter] and m[0, names.index("py:kind:name")]  # "x" still labelled
    assert not m[5].any()  # the cut byte
    assert [bool(r.any()) for r in m[6:]] == [False, True, False, False]  # only "A" decodes
    assert m[7, letter] and m[7, names.index("txt:upper")]
    # BPE cut after a token that holds half a character
    ids = bpe.encode("é→🙂 x")
    pieces = L.token_bytes(bpe, ids)
    k = next(i for i in range(1, len(ids)) if b"".join(pieces[:i]).decode("utf-8", "replace").endswith("\ufffd"))
    labels = L.label_documents(lab, [np.asarray(ids[:k])], bpe, trailing_separator=False)
    assert labels.matrix.shape == (k, len(names))
    assert not labels.matrix[k - 1].any()
    assert labels.matrix[0, letter] and labels.matrix[0, names.index("txt:non_ascii")]
    # the byte separator "\n\n" is only blanked when it trails: trailing_separator=False keeps it
    both = L.label_documents(lab, [np.asarray(byte.encode("x\n\n"))], byte, trailing_separator=False).matrix
    assert both[1:, names.index("py:kind:newline")].all()
    assert not L.label_documents(lab, [np.asarray(byte.encode("x\n\n"))], byte).matrix[1:].any()
    assert m[4, names.index("txt:punct")] and not m[4, string]  # an unterminated quote: a tokenize error
