"""Smoke tests of the benchmark commands on tiny sizes: output shape and sane ratios, no timings."""
import json
import math

import pytest

from monoroute.bench.cli import main
from monoroute.bench.layer import OPTIMIZERS

TINY = ["--d", "16", "--tokens", "64", "--n-units", "64,256", "--k", "4,8", "--k-ref", "8", "--n-ref", "64",
        "--n-compare", "144", "--warmup", "0", "--repeats", "1"]


def positive_finite(value):
    return isinstance(value, float) and math.isfinite(value) and value > 0


def test_bench_layer_json(tmp_path, capsys):
    assert main(["layer", "--json", "--out", str(tmp_path), *TINY]) == 0
    result = json.loads(capsys.readouterr().out)  # exactly one JSON object on stdout
    for key in ("R_N", "R_k", "routed_vs_dense4d", "routed_vs_dense_matched", "R_N_opt_adamw", "R_N_opt_row_sparse"):
        assert positive_finite(result[key]), key
    assert result["R_N_at"] == {"k": 8, "n_units": [64, 256]}
    assert result["routed_vs_dense4d_at"]["n_units"] == 144
    grid = {(r["n_units"], r["k"]) for r in result["routed"]}
    assert grid == {(64, 4), (64, 8), (256, 4), (256, 8), (144, 8)}
    for row in result["routed"]:
        for key in ("router_fwd", "router_bwd", "compute_fwd", "compute_bwd", "fwd", "bwd", "opt_adamw_dense_grad"):
            assert positive_finite(row[key]), key
        assert all(row[f"opt_{o}"] is None or positive_finite(row[f"opt_{o}"]) for o in OPTIMIZERS)
        assert row["peak_mem_bytes"] >= 0
    assert result["dense4d"]["width"] == 64
    assert [m["width"] for m in result["dense_matched"]] == [1, 3, 6]
    # each ratio is the one its `_at` names, from the rows printed beside it in the same run
    at = {(r["n_units"], r["k"]): r for r in result["routed"]}
    for r in list(at.values()) + [result["dense4d"]]:
        assert r["fwd_bwd"] == pytest.approx(r["fwd"] + r["bwd"])
    assert result["R_N"] == pytest.approx(at[(256, 8)]["fwd_bwd"] / at[(64, 8)]["fwd_bwd"])
    assert result["routed_vs_dense4d"] == pytest.approx(at[(144, 8)]["fwd_bwd"] / result["dense4d"]["fwd_bwd"])
    assert (tmp_path / "bench_layer_cpu.json").is_file() and (tmp_path / "bench_layer_cpu.png").stat().st_size > 0


def test_bench_layer_times_the_default_re_ranking_layer_with_heads(tmp_path, capsys):
    # the compute-alone phase holds the routing fixed: a re-ranking layer must not need its candidates there
    assert main(["layer", "--json", "--out", str(tmp_path), *TINY, "--layer-set", "coupling=rerank",
                 "--layer-set", "router_candidates=16", "--layer-set", "router_heads=2"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert all(positive_finite(row["compute_fwd"]) and positive_finite(row["router_fwd"]) for row in result["routed"])


def test_bench_layer_rejects_bad_grid(tmp_path, capsys):
    assert main(["layer", "--out", str(tmp_path), *TINY, "--k-ref", "16"]) == 2
    assert "k_ref=16 is not in the k grid" in capsys.readouterr().err


def test_shard_memory_json(capsys):
    assert main(["shard-memory", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["rows"]
    assert len(rows) == 3 * 2 * 3
    assert all(r["state_bytes_per_rank"] > 0 for r in rows)


def test_bench_train_json(capsys):
    assert main(["train", "--preset", "tiny", "--steps", "4", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert set(result["variants"]) == {"dense", "routed", "routed_sparse_rows"}
    assert all(positive_finite(v["tokens_per_s"]) and math.isfinite(v["val_loss"]) for v in result["variants"].values())
    v = result["variants"]
    assert result["routed_vs_dense_tokens_per_s"] == pytest.approx(v["routed"]["tokens_per_s"] / v["dense"]["tokens_per_s"])


def test_bench_serve_times_a_synthetic_store_and_a_real_run(analysed_runs, tmp_path, capsys):
    from monoroute.bench.serve import synthetic_store
    from monoroute.interp.store import AnalysisStore

    store = AnalysisStore(synthetic_store(tmp_path / "syn", n_units=5000, n_positions=1024, k=8))
    df = store.table("routed_units")
    assert len(df) == 5000 and df.n_firings.sum() == store.activations("routed_units").nnz
    assert main(["serve", str(analysed_runs[0]), "--n-units", "3000", "--positions", "1024", "--k", "4",
                 "--repeats", "1", "--browser", "off", "--out", str(tmp_path / "out"), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["n_units"] == 3000 and not result["browser"]
    assert {"first_open", "search 'concept:07'", "sort by density"} <= set(result["list"])
    row = result["runs"][0]
    assert row["set"] == "routed_units" and row["unit page (API)"]["n"] >= 1
    assert (tmp_path / "out" / "bench_serve.json").is_file()


def test_grid_spread_counts_rows_and_columns_and_the_random_expectation():
    import itertools

    import torch

    from monoroute.bench.agreement import grid_spread

    # N = 16 (a 4 x 4 grid), k = 4: token 0 takes one whole row, token 1 the diagonal
    idx = torch.tensor([[4, 5, 6, 7], [0, 5, 10, 15]])
    out = grid_spread(idx, 16)
    assert out["grid_rows"] == 2.5 and out["grid_cols"] == 4.0  # rows (1 + 4) / 2; columns 4 for both
    rows = [len({u // 4 for u in c}) for c in itertools.combinations(range(16), 4)]
    assert out["grid_random"] == pytest.approx(sum(rows) / len(rows))


def test_bench_train_set_reaches_the_routed_variants_only(capsys):
    assert main(["train", "--preset", "tiny", "--steps", "4", "--set", "router=cluster", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    routers = {name: v["router"] for name, v in result["variants"].items()}
    assert routers == {"dense": "product_key", "routed": "cluster", "routed_sparse_rows": "cluster"}
    assert result["routed_settings"] == {"router": "cluster"}


def test_bench_train_common_reaches_every_variant_and_refuses_the_bench_own_keys(capsys):
    assert main(["train", "--preset", "tiny", "--steps", "4", "--common", "d_model=16", "--common", "batch_size=2",
                 "--set", "n_units=64", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert {name: v["d_model"] for name, v in result["variants"].items()} == dict.fromkeys(result["variants"], 16)
    assert {name: v["n_units"] for name, v in result["variants"].items()}["routed"] == 64
    assert result["common_settings"] == {"d_model": 16, "batch_size": 2}
    assert main(["train", "--preset", "tiny", "--steps", "4", "--common", "ffn=dense"]) == 2
    assert "--common cannot set ffn" in capsys.readouterr().err


def test_bench_generate_common_sets_both_variants_shape(capsys):
    assert main(["generate", "--preset", "tiny", "--batch", "1", "--prompt", "2", "--new", "2", "--repeats", "1",
                 "--common", "n_layer=1", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    one_layer = {name: v["params"] for name, v in result["variants"].items()}
    assert main(["generate", "--preset", "tiny", "--batch", "1", "--prompt", "2", "--new", "2", "--repeats", "1",
                 "--json"]) == 0
    two_layers = {name: v["params"] for name, v in json.loads(capsys.readouterr().out)["variants"].items()}
    assert all(one_layer[name] < two_layers[name] for name in ("dense", "routed"))  # tiny has 2 layers
    assert main(["generate", "--preset", "tiny", "--common", "ffn=routed"]) == 2
    assert "--common cannot set ffn" in capsys.readouterr().err
    assert main(["generate", "--preset", "tiny", "--repeats", "0"]) == 2
    assert "--repeats must be >= 1, got 16, 64 and 0" in capsys.readouterr().err
    assert main(["train", "--preset", "tiny", "--steps", "4", "--profile", "--common", "batch_size=2"]) == 2
    assert "--common is for the throughput bench" in capsys.readouterr().err


# --- bench train --profile: the split of one step --------------------------------------------------------

class _Range:
    def __init__(self, start, end):
        self.start, self.end = start, end

    def elapsed_us(self):
        return self.end - self.start


class _Ev:
    def __init__(self, name, start, end, parent=None, seq=-1):
        self.name, self.time_range, self.cpu_parent, self.sequence_nr = name, _Range(start, end), parent, seq


def test_profile_split_by_hand():
    from monoroute.bench.profile import split_events

    events = []
    for s in (0, 1000):  # two steps of 1000 us; only the last is measured
        step = _Ev("monoroute::step", s, s + 1000)
        data = _Ev("monoroute::data", s, s + 50, step)
        fwd = _Ev("monoroute::forward", s + 50, s + 450, step)
        router = _Ev("monoroute::router", s + 100, s + 200, fwd)
        topk = _Ev("aten::topk", s + 110, s + 190, router, seq=10 + s)
        units = _Ev("monoroute::units", s + 200, s + 300, fwd)
        fn = _Ev("UnitFFN", s + 210, s + 290, units, seq=11 + s)
        inner = _Ev("aten::mm", s + 220, s + 280, fn, seq=12 + s)  # a nested op's own node: the outer scope too
        lin = _Ev("aten::linear", s + 300, s + 400, fwd, seq=13 + s)  # trunk
        bwd = _Ev("monoroute::backward", s + 450, s + 850, step)
        b_units = _Ev("autograd::engine::evaluate_function: UnitFFNBackward", s + 450, s + 650, bwd, seq=11 + s)
        b_mm = _Ev("autograd::engine::evaluate_function: MmBackward0", s + 650, s + 700, bwd, seq=12 + s)
        b_topk = _Ev("autograd::engine::evaluate_function: TopkBackward0", s + 700, s + 720, bwd, seq=10 + s)
        b_lin = _Ev("autograd::engine::evaluate_function: AddmmBackward0", s + 720, s + 850, bwd, seq=13 + s)
        opt = _Ev("monoroute::optimizer", s + 850, s + 950, step)
        events += [step, data, fwd, router, topk, units, fn, inner, lin, bwd, b_units, b_mm, b_topk, b_lin, opt]
    out = split_events(events, 1)
    ms = {k: round(v * 1000) for k, v in out["ms"].items()}  # us per step
    assert ms["router"] == 100 + 20  # forward scope + the top-k's backward
    assert ms["units"] == 100 + 200 + 50  # forward + the function's and its nested op's backward
    assert ms["trunk"] == (400 - 200) + (400 - 270)  # forward and backward outside the layer scopes
    assert (ms["data"], ms["optimizer"], ms["aux"]) == (50, 100, 0)
    assert ms["other"] == 1000 - 120 - 350 - 330 - 50 - 100  # the window's remainder
    assert out["step_ms"] == pytest.approx(1.0) and sum(out["share"].values()) == pytest.approx(1.0)
    with pytest.raises(Exception, match="fewer than the 3"):
        split_events(events, 3)


def test_bench_train_profile_splits_routed_and_dense(capsys):
    assert main(["train", "--preset", "tiny", "--steps", "4", "--profile", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    dense, routed = result["variants"]["dense"], result["variants"]["routed"]
    for c in ("router", "units", "aux"):
        assert dense["ms"][c] == 0.0 and routed["ms"][c] > 0.0
    # backward nodes are charged to the layer scope that created them
    assert routed["backward_ms"]["units"] > 0.0 and dense["ms"]["trunk"] > 0.0
    assert sum(routed["ms"].values()) == pytest.approx(routed["step_ms"], rel=1e-6)
    assert result["routed_vs_dense_step_time"] == pytest.approx(routed["step_ms"] / dense["step_ms"])


def test_bench_generate_times_routed_and_dense_with_a_kv_cache(capsys):
    assert main(["generate", "--preset", "tiny", "--batch", "1,2", "--prompt", "4", "--new", "6", "--repeats", "1",
                 "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    for name in ("dense", "routed"):
        rows = result["variants"][name]["batches"]
        assert set(rows) == {"1", "2"} and all(r["tokens_per_s"] > 0 for r in rows.values())
        # the cache holds keys and values of every layer for prompt + new tokens
        assert rows["2"]["kv_cache_bytes"] == 2 * rows["1"]["kv_cache_bytes"] > 0
    assert set(result["routed_vs_dense_tokens_per_s"]) == {"1", "2"}
    assert main(["generate", "--preset", "tiny", "--prompt", "60", "--new", "10"]) == 2
    assert "exceeds the preset's context" in capsys.readouterr().err


def test_generate_bench_times_the_variants_in_turn_after_one_warm_up_each():
    import torch

    from monoroute.bench.generate import _paired_times

    calls = []
    times = _paired_times({"dense": lambda: calls.append("d"), "routed": lambda: calls.append("r")}, 3,
                          torch.device("cpu"))
    assert "".join(calls) == "dr" + "dr" * 3  # warm-ups, then rounds of one call each, in turn
    assert {name: len(t) for name, t in times.items()} == {"dense": 3, "routed": 3}
    assert all(t >= 0 for ts in times.values() for t in ts)
