"""Data pipeline: sources and split, tokenizers, token cache, batches, errors, Python labels."""
from __future__ import annotations

import argparse
import errno
import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from monoroute.data import DataConfig, add_parser, load_tokenizer, prepare_data, split_of
from monoroute.data import token_store as token_store_module
from monoroute.data.corpus import CHUNK_CHARS, ChunkKey, cap_bytes, chunk_blocks, merge_chunks, open_source
from monoroute.data.python_labels import KINDS, label_python, label_python_bytes
from monoroute.data.token_store import dtype_for
from monoroute.data.tokenizers import BYTE_SEPARATOR, BPETokenizer, ByteTokenizer
from monoroute.errors import MonorouteError

STDLIB_CAP = 300_000  # bytes of the stdlib read by the small stores below
VAL = 0.05  # the default: the cap gives validation 15 KB


def expected_stream(docs, split, val_fraction, sep=BYTE_SEPARATOR) -> np.ndarray:
    """Reference for a byte-level split: its documents' UTF-8 bytes, each followed by the separator."""
    joined = b"".join(text.encode() + sep for key, text in docs if split_of(key, val_fraction) == split)
    return np.frombuffer(joined, dtype=np.uint8)


@pytest.fixture
def stdlib_docs():
    return list(cap_bytes(open_source("stdlib").documents(), STDLIB_CAP, VAL))


def small_cfg(tmp_path, **overrides) -> DataConfig:
    return DataConfig(**{"max_bytes": STDLIB_CAP, "val_fraction": VAL, "cache_dir": str(tmp_path / "cache"),
                         **overrides})


@pytest.fixture
def byte_store(tmp_path):
    return prepare_data(small_cfg(tmp_path))


# ---- sources and split ----------------------------------------------------------------------


def test_split_is_a_stable_hash_of_the_key():
    keys = [f"pkg/module_{i}.py" for i in range(20_000)]
    splits = [split_of(k, 0.05) for k in keys]
    for k, s in zip(keys[:200], splits):  # reference: the first 8 bytes of sha1 as a fraction of 2**64
        h = int(hashlib.sha1(k.encode()).hexdigest()[:16], 16) / 2**64
        assert s == ("val" if h < 0.05 else "train")
    assert 0.04 < splits.count("val") / len(keys) < 0.06
    assert all(split_of(k, 0.0) == "train" for k in keys[:100])


def test_stdlib_documents_are_sorted_relative_paths(stdlib_docs):
    keys = [k for k, _ in stdlib_docs]
    assert keys == sorted(keys) and len(set(keys)) == len(keys)
    assert all(k.endswith(".py") and not k.startswith("/") and "site-packages" not in k for k in keys)
    val_bytes = sum(len(t.encode()) for k, t in stdlib_docs if split_of(k, VAL) == "val")
    train_bytes = sum(len(t.encode()) for k, t in stdlib_docs if split_of(k, VAL) == "train")
    assert (train_bytes, val_bytes) == (STDLIB_CAP - 15_000, 15_000)  # each split's last document is cut


def test_store_holds_exactly_its_split_documents(byte_store, stdlib_docs):
    """No validation file in train: each split's memmap is exactly its documents, in order."""
    for split in ("train", "val"):
        ref = expected_stream(stdlib_docs, split, VAL)
        assert byte_store.tokens(split).dtype == np.uint16
        np.testing.assert_array_equal(np.asarray(byte_store.tokens(split)), ref)
    assert byte_store.meta["n_documents"]["val"] > 0
    assert byte_store.meta["n_documents"]["train"] + byte_store.meta["n_documents"]["val"] == len(stdlib_docs)


def test_local_glob_directory_and_single_file(tmp_path):
    root = tmp_path / "corpus"
    (root / "sub").mkdir(parents=True)
    (root / "a.txt").write_text("alpha text\n")
    (root / "sub" / "b.txt").write_text("beta text\n")
    (root / "notes.md").write_text("markdown\n")
    (root / ".hidden").write_text("secret\n")
    (root / "blob.bin").write_bytes(b"\xff\xfe\x00binary")  # not UTF-8: skipped

    # Fewer than FEW_FILES files: each file is chunked (here each fits in one chunk, "<path>@0").
    glob_docs = list(open_source(str(root / "**" / "*.txt")).documents())
    assert glob_docs == [("a.txt@0", "alpha text\n"), ("sub/b.txt@0", "beta text\n")]
    assert all(isinstance(k, ChunkKey) for k, _ in glob_docs)
    dir_keys = [k for k, _ in open_source(str(root)).documents()]
    assert dir_keys == ["a.txt@0", "notes.md@0", "sub/b.txt@0"]
    (tmp_path / "one.txt").write_text("first para\n\n\n\nsecond para\n\nthird")
    assert list(open_source(str(tmp_path / "one.txt")).documents()) == [
        ("one.txt@0", "first para\n\n\n\nsecond para\n\nthird")]

    cfg = DataConfig(source=str(root / "**" / "*.txt"), val_fraction=0.0, cache_dir=str(tmp_path / "c"))
    store = prepare_data(cfg)
    assert store.tokenizer.decode(store.tokens("train").tolist()) == "alpha text\n\n\nbeta text\n\n\n"


def test_hf_dataset_built_locally(tmp_path):
    """The by-name loader (datasets.load_dataset(NAME, streaming=True)) on a local jsonl folder."""
    ds = tmp_path / "ds"
    ds.mkdir()
    rows = [{"content": f"document {i}: " + "x" * i, "id": i} for i in range(60)]
    rows[7]["content"] = "   "  # blank: dropped, but still counts as row 7
    (ds / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = DataConfig(source=f"hf:{ds}", text_column="content", val_fraction=0.2, cache_dir=str(tmp_path / "c"))
    store = prepare_data(cfg)
    docs = [(str(i), r["content"]) for i, r in enumerate(rows) if i != 7]
    for split in ("train", "val"):
        np.testing.assert_array_equal(np.asarray(store.tokens(split)), expected_stream(docs, split, 0.2))
    assert store.meta["n_documents"] == {"train": sum(split_of(k, 0.2) == "train" for k, _ in docs),
                                        "val": sum(split_of(k, 0.2) == "val" for k, _ in docs)}
    with pytest.raises(MonorouteError, match=r"no text column 'text'; available columns: content, id; .*"
                                             r"\(--text-column content\)"):
        prepare_data(DataConfig(source=f"hf:{ds}", cache_dir=str(tmp_path / "c")))
    with pytest.raises(MonorouteError, match=r"column 'id' of .* holds int, not text; set text_column to a text "
                                             r"column \(content\)"):
        prepare_data(DataConfig(source=f"hf:{ds}", text_column="id", cache_dir=str(tmp_path / "c")))


# ---- tokenizers -----------------------------------------------------------------------------

TEXT = "def f(x):\n    return x + 'héllo ☃ 🐍'\n"


def test_byte_tokenizer_roundtrip(tmp_path):
    tok = ByteTokenizer()
    ids = tok.encode(TEXT)
    assert ids == list(TEXT.encode("utf-8")) and max(ids) < tok.vocab_size == 256
    assert tok.decode(ids) == TEXT
    np.testing.assert_array_equal(tok.encode_documents(["ab", "c"]), tok.encode("ab\n\nc\n\n"))
    (tmp_path / "tokenizer.json").write_text(tok.to_json())
    assert isinstance(load_tokenizer(tmp_path / "tokenizer.json"), ByteTokenizer)


def test_bpe_train_save_load_roundtrip(tmp_path, stdlib_docs):
    tok = BPETokenizer.train((t for _, t in stdlib_docs), vocab_size=400)
    assert 257 < tok.vocab_size <= 400
    ids = tok.encode(TEXT)
    assert tok.decode(ids) == TEXT  # byte-level: exact even for characters unseen in training
    assert len(ids) < len(TEXT.encode())  # merges learned on Python code compress Python code
    (tmp_path / "tokenizer.json").write_text(tok.to_json())
    loaded = load_tokenizer(tmp_path / "tokenizer.json")
    assert isinstance(loaded, BPETokenizer) and loaded.vocab_size == tok.vocab_size
    assert loaded.encode(TEXT) == ids
    docs = loaded.encode_documents(["a = 1", "b"]).tolist()
    assert docs == loaded.encode("a = 1") + [loaded.eot_id] + loaded.encode("b") + [loaded.eot_id]


def test_bpe_store_matches_tokenizer_and_is_saved_with_the_run(tmp_path, stdlib_docs):
    cfg = small_cfg(tmp_path, tokenizer="bpe", bpe_vocab_size=300)
    store = prepare_data(cfg, run_dir=str(tmp_path / "run"))
    assert store.meta["dtype"] == "uint16" and store.tokens("train").dtype == np.uint16
    run_tok = load_tokenizer(tmp_path / "run" / "tokenizer.json")
    for split in ("train", "val"):
        texts = [t for k, t in stdlib_docs if split_of(k, VAL) == split]
        np.testing.assert_array_equal(np.asarray(store.tokens(split)), run_tok.encode_documents(texts))


def test_dtype_by_vocab_size():
    assert dtype_for(256) == dtype_for(65535) == "uint16"
    assert dtype_for(65536) == "uint32"


# ---- cache ----------------------------------------------------------------------------------


def test_cache_reused_without_retokenising(tmp_path, monkeypatch, byte_store):
    assert not byte_store.reused
    mtime = os.stat(byte_store.path / "train.bin").st_mtime_ns

    def no_tokenising(*args, **kwargs):
        raise AssertionError("re-tokenised a cached corpus")

    monkeypatch.setattr(token_store_module, "write_splits", no_tokenising)
    again = prepare_data(small_cfg(tmp_path))
    assert again.reused and again.path == byte_store.path
    assert os.stat(again.path / "train.bin").st_mtime_ns == mtime
    # Any setting in the key gets its own entry.
    monkeypatch.undo()
    other = prepare_data(small_cfg(tmp_path, val_fraction=0.1))
    assert other.path != byte_store.path and not other.reused


@pytest.mark.parametrize("damage", ["meta_not_json", "meta_missing_keys", "meta_wrong_count", "truncated_bin",
                                    "flipped_bytes"])
def test_corrupt_cache_is_rebuilt(tmp_path, byte_store, damage):
    path, train = byte_store.path, np.array(byte_store.tokens("train"))
    if damage == "meta_not_json":
        (path / "meta.json").write_text("{")
    elif damage == "meta_missing_keys":
        (path / "meta.json").write_text(json.dumps({"format": token_store_module.FORMAT_VERSION}))
    elif damage == "meta_wrong_count":
        meta = json.loads((path / "meta.json").read_text())
        meta["n_tokens"]["train"] += 1
        (path / "meta.json").write_text(json.dumps(meta))
    elif damage == "truncated_bin":
        with open(path / "train.bin", "r+b") as f:
            f.truncate(100)
    else:  # same size, so only the sha256 in meta.json can tell
        with open(path / "train.bin", "r+b") as f:
            f.seek(1000)
            f.write(b"\x07" * 64)
    with pytest.warns(UserWarning, match="unusable.*rebuilding"):
        store = prepare_data(small_cfg(tmp_path))
    assert not store.reused and store.path == path
    np.testing.assert_array_equal(np.asarray(store.tokens("train")), train)


def test_cache_dir_defaults_to_env(tmp_path, monkeypatch):
    monkeypatch.setenv("MONOROUTE_CACHE", str(tmp_path / "env_cache"))
    assert token_store_module.default_cache_root(None) == tmp_path / "env_cache"
    assert token_store_module.default_cache_root(str(tmp_path / "arg")) == tmp_path / "arg"


def test_data_subcommand_prints_the_summary(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers())
    argv = ["data", "--max-bytes", str(STDLIB_CAP), "--val-fraction", str(VAL), "--cache-dir", str(tmp_path / "c")]
    for reused in (False, True):
        args = parser.parse_args(argv)
        assert args.func(args) == 0
        summary = json.loads(capsys.readouterr().out)
        assert summary["reused"] is reused and summary["vocab_size"] == 256
        assert sum(summary["n_tokens"].values()) == STDLIB_CAP + 2 * sum(summary["n_documents"].values())


# ---- batches --------------------------------------------------------------------------------


def test_batch_is_a_pure_function_of_seed_step_rank(tmp_path, byte_store):
    B, T = 4, 32
    x, y = byte_store.batch(step=5, batch_size=B, block_size=T, seed=1, rank=0, world=2)
    assert x.shape == y.shape == (B, T) and x.dtype == y.dtype == torch.int64
    # A fresh store (as after a restart) replays the same batch.
    reopened = prepare_data(small_cfg(tmp_path))
    x2, y2 = reopened.batch(step=5, batch_size=B, block_size=T, seed=1, rank=0, world=2)
    assert torch.equal(x, x2) and torch.equal(y, y2)
    for other in [dict(step=5, seed=1, rank=1), dict(step=6, seed=1, rank=0), dict(step=5, seed=2, rank=0)]:
        assert not torch.equal(x, byte_store.batch(batch_size=B, block_size=T, world=2, **other)[0])
    # Each row is a real window of the train split and y is x shifted by one token.
    windows = np.lib.stride_tricks.sliding_window_view(np.asarray(byte_store.tokens("train")), T + 1)
    for xb, yb in zip(x, y):
        row = np.concatenate([xb.numpy(), yb.numpy()[-1:]])
        assert (windows == row).all(axis=1).any()
        assert torch.equal(xb[1:], yb[:-1])


def test_eval_batches_are_deterministic_consecutive_windows(byte_store):
    B, T = 3, 64
    first = list(byte_store.eval_batches(batch_size=B, block_size=T, max_batches=4))
    second = list(byte_store.eval_batches(batch_size=B, block_size=T, max_batches=4))
    assert len(first) == 4 and all(x.shape == (B, T) for x, _ in first)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(first, second))
    val = np.asarray(byte_store.tokens("val")).astype(np.int64)
    xs = torch.cat([x for x, _ in first]).flatten().numpy()
    ys = torch.cat([y for _, y in first]).flatten().numpy()
    np.testing.assert_array_equal(xs, val[: 4 * B * T])  # non-overlapping, in order from the start
    np.testing.assert_array_equal(ys, val[1 : 4 * B * T + 1])
    everything = list(byte_store.eval_batches(batch_size=B, block_size=T))
    assert sum(len(x) for x, _ in everything) == (len(val) - 1) // T


def test_split_shorter_than_a_block_is_an_error(byte_store):
    n_val = byte_store.n_tokens("val")
    with pytest.raises(MonorouteError, match=rf"val split has {n_val} tokens, fewer than block_size\+1"):
        byte_store.eval_batches(batch_size=1, block_size=n_val)
    with pytest.raises(MonorouteError, match="rank must be in"):
        byte_store.batch(0, 1, 8, seed=0, rank=2, world=2)


# ---- bad input ------------------------------------------------------------------------------


def one_line_error(cfg: DataConfig) -> str:
    with pytest.raises(MonorouteError) as info:
        prepare_data(cfg)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_bad_inputs_give_one_clear_line(tmp_path):
    cache = str(tmp_path / "c")
    assert "does not exist" in one_line_error(DataConfig(source=str(tmp_path / "missing.txt"), cache_dir=cache))
    assert "matches no files" in one_line_error(DataConfig(source=str(tmp_path / "*.nothing"), cache_dir=cache))
    assert "unknown tokenizer kind 'wordpiece'" in one_line_error(DataConfig(tokenizer="wordpiece", cache_dir=cache))
    assert "val_fraction" in one_line_error(DataConfig(val_fraction=1.0, cache_dir=cache))
    assert "bpe_vocab_size" in one_line_error(DataConfig(tokenizer="bpe", bpe_vocab_size=100, cache_dir=cache))
    blank = tmp_path / "blank"
    blank.mkdir()
    (blank / "a.txt").write_text("  \n\n")
    (blank / "b.bin").write_bytes(b"\xff\xfe")
    for kind in ("byte", "bpe"):
        message = one_line_error(DataConfig(source=str(blank), tokenizer=kind, cache_dir=cache))
        assert "empty corpus" in message and "of its 2 files, 1 not UTF-8 text (b.bin); 1 empty or blank (a.txt)" \
            in message and "add UTF-8 text files" in message
    assert not any(p.name.startswith(".") for p in (tmp_path / "c" / "tokens").iterdir())  # no temp left


def test_each_corpus_error_names_the_cause_and_the_fix(tmp_path):
    cache = str(tmp_path / "c")

    def error_for(name, content):
        path = tmp_path / name
        path.write_bytes(content)
        return one_line_error(DataConfig(source=str(path), cache_dir=cache))

    assert "is empty (0 bytes); point --data at a file with text" in error_for("empty.txt", b"")
    assert "holds only whitespace" in error_for("blank.txt", b"  \n\n\t\n")
    message = error_for("image.png", b"\x89PNG\r\n\x1a\n" + bytes(range(256)))
    assert "is not UTF-8 text (byte 0x89 at offset 0 is not UTF-8)" in message and "iconv" in message
    assert "is not UTF-8 text" in error_for("zeros.bin", b"abc\x00\x00\x00def")  # valid UTF-8, still binary
    (tmp_path / "pictures").mkdir()
    (tmp_path / "pictures" / "a.png").write_bytes(b"\x89PNG\r\n")
    (tmp_path / "pictures" / "b.jpg").write_bytes(b"\xff\xd8\xff\xe0")
    message = one_line_error(DataConfig(source=str(tmp_path / "pictures"), cache_dir=cache))
    assert "has no text: of its 2 files, 2 not UTF-8 text (a.png, b.jpg)" in message
    assert "contains no files" in one_line_error(DataConfig(source=str(tmp_path / "c"), cache_dir=str(tmp_path / "d")))


# ---- one file with no document boundaries ---------------------------------------------------


def lines_book(n_lines: int) -> str:
    """Unique numbered lines, no blank line anywhere (a book with one sentence per line)."""
    words = "alpha beta gamma delta the of and to in is it that was he for on are with as".split()
    return "".join(f"{i:06d} " + " ".join(words[(i * 7 + j) % len(words)] for j in range(4 + i % 11)) + "\n"
                   for i in range(n_lines))


def test_a_single_file_without_blank_lines_gets_a_validation_split(tmp_path):
    text = lines_book(9200)
    assert 350_000 < len(text) < 450_000 and "\n\n" not in text
    (tmp_path / "book.txt").write_text(text)
    cfg = DataConfig(source=str(tmp_path / "book.txt"), val_fraction=0.05, cache_dir=str(tmp_path / "c"))
    store = prepare_data(cfg)
    train_text = store.tokenizer.decode(store.tokens("train").tolist())
    val_text = store.tokenizer.decode(store.tokens("val").tolist())
    val_bytes = len(val_text) - 2 * store.meta["n_documents"]["val"]  # minus the separators
    assert 0.04 < val_bytes / len(text) < 0.06
    train_lines, val_lines = set(train_text.split("\n")) - {""}, set(val_text.split("\n")) - {""}
    assert not train_lines & val_lines  # chunks end at line breaks: no validation line is trained on
    assert train_lines | val_lines == set(text.splitlines())
    # Validation is spread along the file, and train is put back together between its pieces.
    assert store.meta["n_documents"]["val"] >= 3
    assert store.meta["n_documents"]["train"] <= store.meta["n_documents"]["val"] + 1


def test_chunks_are_contiguous_and_their_split_is_systematic():
    text = lines_book(3000)
    blocks = [text[i:i + 10_000] for i in range(0, len(text), 10_000)]  # any block size: the same chunks
    chunks = list(chunk_blocks(blocks))
    assert "".join(chunks) == text and chunks == list(chunk_blocks([text]))
    assert all(c.endswith("\n") and CHUNK_CHARS // 2 <= len(c) <= CHUNK_CHARS for c in chunks[:-1])
    keys = [ChunkKey("book.txt", i) for i in range(len(chunks))]
    for fraction in (0.05, 0.1, 0.5):
        n_val = sum(split_of(k, fraction) == "val" for k in keys)
        assert abs(n_val - fraction * len(keys)) <= 1  # exactly one in 1/fraction, not a coin flip per chunk
    assert all(split_of(k, 0.0) == "train" for k in keys)
    merged = list(merge_chunks(zip(keys, chunks), 0.1))
    assert "".join(t for _, t in merged) == text
    splits = [split_of(k, 0.1) for k, _ in merged]
    assert all(a != b for a, b in zip(splits, splits[1:]))  # same-split neighbours were merged
    assert splits.count("val") == sum(split_of(k, 0.1) == "val" for k in keys)  # val chunks 10 apart: never merged


def test_a_single_text_file_trains_with_the_readme_command(tmp_path, capsys):
    from monoroute.cli import main

    (tmp_path / "book.txt").write_text(lines_book(9200))
    out = tmp_path / "run"
    assert main(["train", "--preset", "tiny", "--data", str(tmp_path / "book.txt"), "--out", str(out),
                 "--steps", "2", "--eval-batches", "1", "--no-progress"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["step"] == 2 and summary["val_loss"] > 0


def test_full_disk_while_building_the_cache_leaves_nothing(tmp_path, monkeypatch):
    def full(docs, tokenizer, folder, dtype, val_fraction):
        (folder / "train.bin").write_bytes(b"\0" * 10)  # half-written
        raise OSError(errno.ENOSPC, "No space left on device")

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    tokens = tmp_path / "cache" / "tokens"
    (tokens / f".somekey.tmp-{int(dead.stdout)}-abc").mkdir(parents=True)  # a build killed by kill -9
    monkeypatch.setattr(token_store_module, "write_splits", full)
    message = one_line_error(small_cfg(tmp_path))
    assert "disk full while building the token cache" in message and "MONOROUTE_CACHE" in message
    assert list(tokens.iterdir()) == []  # no half entry, no temporary folder, the dead build's removed too
    monkeypatch.undo()
    assert prepare_data(small_cfg(tmp_path)).n_tokens("train") > 0


def test_tokenizer_file_errors(tmp_path):
    with pytest.raises(MonorouteError, match="cannot read tokenizer"):
        load_tokenizer(tmp_path / "nope.json")
    (tmp_path / "bad.json").write_text('{"kind": "sentencepiece"}')
    with pytest.raises(MonorouteError, match="neither a byte tokenizer nor a BPE"):
        load_tokenizer(tmp_path / "bad.json")


# ---- Python labels --------------------------------------------------------------------------

SNIPPET = 'def f(x):\n    if x:  # c(\n        return [1, "a("]\n    y = $\nz = (1,\n  2)\n'
# One letter per character: .whitespace >indent Nnewline nname kkeyword 0number sstring #comment
# ooperator Eerror; and the bracket depth of each character.
EXPECTED = [
    ("def f(x):\n", "kkk.nonooN", "0000001000"),
    ("    if x:  # c(\n", ">>>>kk.no..####N", "0000000000000000"),
    ('        return [1, "a("]\n', ">>>>>>>>kkkkkk.o0o.ssssoN", "0000000000000000111111100"),
    ("    y = $\n", ">>>>n.o.EN", "0000000000"),
    ("z = (1,\n", "n.o.o0oN", "00000111"),
    ("  2)\n", ">>0oN", "11100"),
]
LETTER = dict(zip(KINDS, ".>Nnk0s#oE"))


def letters(labels) -> str:
    return "".join(LETTER[name] for name in labels.kind_names())


def test_python_labels_on_a_handcrafted_snippet():
    assert SNIPPET == "".join(line for line, _, _ in EXPECTED)
    labels = label_python(SNIPPET)
    assert letters(labels) == "".join(kinds for _, kinds, _ in EXPECTED)
    assert "".join(map(str, labels.depth)) == "".join(depth for _, _, depth in EXPECTED)


def test_python_labels_after_a_tokenize_error_and_per_byte():
    text = 'x = (1)\ns = """never closed\n'
    assert letters(label_python(text)) == "n.o.o0oN" + "n.o" + "E" * 17  # from the end of the last token
    by_byte = label_python_bytes("é(ü)")
    assert letters(by_byte) == "nnonno"  # é and ü are 2 UTF-8 bytes each
    assert by_byte.depth.tolist() == [0, 0, 0, 1, 1, 0]
