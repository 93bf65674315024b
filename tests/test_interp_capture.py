"""Activation capture: exact against the model's own cache, resumable, and the analysed token stream."""
import json

import numpy as np
import pytest
import torch

from monoroute.data.tokenizers import ByteTokenizer
from monoroute.errors import MonorouteError
from monoroute.interp.capture import Capture, capture, model_unit_sets
from monoroute.interp.stream import build_stream, doc_token_rows
from monoroute.interp.types import Positions
from monoroute.models import GPT, GPTConfig

BLOCK = 16


def tiny(ffn: str, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(n_layer=2, n_head=2, d_model=16, block_size=BLOCK, ffn=ffn, n_units=64, k=4, d_ff=32)).eval()


def positions(n_windows: int, seed: int = 0) -> Positions:
    rng = np.random.default_rng(seed)
    P = n_windows * BLOCK
    return Positions(rng.integers(0, 256, P), np.repeat(np.arange(n_windows), BLOCK), np.tile(np.arange(BLOCK), n_windows))


def reference(model, pos: Positions, hook: str) -> np.ndarray:
    ids = torch.from_numpy(pos.token_ids.reshape(-1, BLOCK))
    with torch.no_grad():
        _, cache = model.run_with_cache(ids, names_filter=hook)
    act = cache[hook]
    return (act.to_dense() if hasattr(act, "to_dense") else act).reshape(len(pos), -1).numpy()


def test_routed_capture_equals_the_layer_cache(tmp_path):
    model, pos = tiny("routed"), positions(6)
    capture(model, pos, model_unit_sets(model), tmp_path, BLOCK, "fp", batch_windows=4, shard_windows=4,
            progress=False)
    cap = Capture(tmp_path)
    assert cap.keys == ["routed_units.L0", "routed_units.L1"]
    acts = cap.load("routed_units.L1")
    expected = reference(model, pos, "blocks.1.mlp.hook_post")
    np.testing.assert_allclose(acts.matrix.toarray(), expected, atol=1e-6)
    assert acts.k == 4 and acts.n_units == 64
    assert acts.matrix.nnz == int((expected != 0).sum())  # only fired slots are stored
    assert np.array_equal(cap.positions.token_ids, pos.token_ids)


def test_dense_capture_is_exact_and_signed_by_default(tmp_path):
    model, pos = tiny("dense"), positions(5)
    sets = model_unit_sets(model)
    assert all(s.dense and s.cap is None for s in sets)
    capture(model, pos, sets, tmp_path, BLOCK, "fp", batch_windows=2, shard_windows=2, progress=False)
    acts = Capture(tmp_path).load("dense_neurons.L1")
    full = reference(model, pos, "blocks.1.mlp.hook_post")
    assert (full < 0).mean() > 0.2 and (full > 0).mean() > 0.2  # GELU: both signs, nothing censored
    # every value, negatives included, to float16's precision (the store's dtype)
    np.testing.assert_allclose(acts.matrix.toarray(), full.astype(np.float16).astype(np.float32), rtol=0, atol=0)
    np.testing.assert_allclose(acts.matrix.toarray(), full, rtol=1e-3, atol=1e-4)
    assert acts.meta["cap_hit_fraction"] is None and acts.meta["dense"]


def test_dense_capture_keeps_top_positive_and_counts_cap_hits(tmp_path):
    model, pos = tiny("dense"), positions(3)
    capture(model, pos, model_unit_sets(model, keep=5), tmp_path, BLOCK, "fp", progress=False)
    loaded = Capture(tmp_path).load("dense_neurons.L0")
    acts = loaded.matrix.toarray()
    full = reference(model, pos, "blocks.0.mlp.hook_post")
    for row, ref in zip(acts, full):
        top5 = np.sort(ref)[-5:]
        kept = np.sort(row[row != 0])
        np.testing.assert_allclose(kept, top5[top5 > 0], atol=1e-6)
    hits = float(((full > 0).sum(1) > 5).mean())
    assert 0.5 < hits and loaded.meta["cap_hit_fraction"] == pytest.approx(hits)  # 32 GELU neurons, cap 5


class Crash(Exception):
    pass


def test_interrupted_capture_resumes_to_the_same_result(tmp_path, monkeypatch):
    model, pos = tiny("routed"), positions(10)
    sets = model_unit_sets(model)
    capture(model, pos, sets, tmp_path / "whole", BLOCK, "fp", batch_windows=2, shard_windows=2, progress=False)
    calls = {"n": 0}
    original = model.run_with_cache

    def flaky(*a, **kw):
        calls["n"] += 1
        if calls["n"] == 4:  # dies in the middle of the second shard
            raise Crash
        return original(*a, **kw)

    monkeypatch.setattr(model, "run_with_cache", flaky)
    with pytest.raises(Crash):
        capture(model, pos, sets, tmp_path / "cut", BLOCK, "fp", batch_windows=1, shard_windows=2, progress=False)
    index = json.loads((tmp_path / "cut" / "index.json").read_text())
    assert len(index["shards"]) == 1 and not index["complete"]
    with pytest.raises(MonorouteError, match="no complete activation capture"):
        Capture(tmp_path / "cut")
    calls["n"] = 100  # no more crashes; count the windows still to run
    capture(model, pos, sets, tmp_path / "cut", BLOCK, "fp", batch_windows=1, shard_windows=2, progress=False)
    assert calls["n"] - 100 == 8  # 10 windows, the first shard's 2 were not recomputed
    a = Capture(tmp_path / "whole").load("routed_units.L0").matrix
    b = Capture(tmp_path / "cut").load("routed_units.L0").matrix
    assert (a != b).nnz == 0


def test_corrupt_shard_is_recomputed_and_changed_settings_restart(tmp_path):
    model, pos = tiny("routed"), positions(4)
    sets = model_unit_sets(model)
    capture(model, pos, sets, tmp_path, BLOCK, "fp", shard_windows=1, progress=False)
    good = Capture(tmp_path).load("routed_units.L0").matrix
    shard = tmp_path / "shard-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:-8] + b"\0" * 8)
    capture(model, pos, sets, tmp_path, BLOCK, "fp", shard_windows=1, progress=False)
    assert (Capture(tmp_path).load("routed_units.L0").matrix != good).nnz == 0
    other = tiny("routed", seed=1)
    capture(other, pos, model_unit_sets(other), tmp_path, BLOCK, "fp2", shard_windows=1, progress=False)
    assert (Capture(tmp_path).load("routed_units.L0").matrix != good).nnz > 0  # new fingerprint: not reused


def write_corpus(folder, n_files=12):
    folder.mkdir()
    for i in range(n_files):
        (folder / f"m{i}.py").write_text(f"def f{i}(x):\n    return x + {i}  # é\n" * (3 + i))
    return folder


def test_stream_positions_documents_and_separators(tmp_path):
    corpus = write_corpus(tmp_path / "c")
    tok = ByteTokenizer()
    stream = build_stream(tok, str(corpus), n_tokens=10_000, block_size=BLOCK, val_fraction=0.5)
    P = len(stream.positions)
    assert P % BLOCK == 0 and 0 < P <= 10_000
    rows = doc_token_rows(stream)
    for (first, n), body, text in zip(rows, stream.docs, stream.texts):
        assert np.array_equal(stream.positions.token_ids[first:first + n], body[:n])
        assert bytes(body.tolist()) == text.encode()
        if first + n < P:  # a whole document is followed by the separator "\n\n"
            assert stream.positions.token_ids[first + n:first + n + 2].tolist() == [10, 10]
            assert stream.positions.doc_ids[first + n + 1] == stream.positions.doc_ids[first]
    assert stream.positions.doc_ids[0] == 0 and np.all(np.diff(stream.positions.doc_ids) >= 0)
    assert np.array_equal(stream.positions.window_pos[:BLOCK + 1], list(range(BLOCK)) + [0])


def test_stream_errors(tmp_path):
    corpus = write_corpus(tmp_path / "c", n_files=2)
    with pytest.raises(MonorouteError, match="less than one context window"):
        build_stream(ByteTokenizer(), str(corpus), n_tokens=3, block_size=BLOCK, val_fraction=0.5)
    with pytest.raises(MonorouteError, match="no validation split"):
        build_stream(ByteTokenizer(), str(corpus), n_tokens=1000, block_size=BLOCK, val_fraction=0.0)


def test_a_format_1_capture_still_reads_but_is_not_resumed(tmp_path):
    """Analyses written before exact dense captures (format 1: every set as COO triples) still load in
    the browser; a new capture into that folder starts over instead of appending to it."""
    model, pos = tiny("routed"), positions(4)
    capture(model, pos, model_unit_sets(model), tmp_path, BLOCK, "fp", shard_windows=2, progress=False)
    expected = Capture(tmp_path).load("routed_units.L0").matrix.toarray()
    index = json.loads((tmp_path / "index.json").read_text())
    index["format"] = 1
    for info in index["unit_sets"].values():
        info.pop("dense"), info.pop("cap")
    (tmp_path / "index.json").write_text(json.dumps(index))
    np.testing.assert_array_equal(Capture(tmp_path).load("routed_units.L0").matrix.toarray(), expected)
    from monoroute.interp.capture import read_index

    assert read_index(tmp_path) is None  # what `capture` resumes from: nothing
