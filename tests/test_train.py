"""`monoroute train/eval/sample`: outputs, exact resume, refusals and clear errors."""
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from monoroute.cli import main
from ranks import done, spawn_ranks
from monoroute.models import GPT

FAST = ["--no-progress", "--device", "cpu", "--steps", "6", "--log-every", "1", "--eval-every", "3",
        "--eval-batches", "1", "--ckpt-every", "2", "--batch-size", "4"]


def train(out, *extra):
    return main(["train", "--preset", "tiny", "--out", str(out), *FAST, *extra])


def metrics(out):
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def error_line(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("monoroute: error: ")
    return err[0]


def copy_run(run, out):
    shutil.copytree(run, out, ignore=shutil.ignore_patterns("tensorboard"))
    return out


def pointer(out):
    return json.loads((Path(out) / "checkpoint.json").read_text())


def model_file(out):
    return Path(out) / pointer(out)["path"] / "model.safetensors"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "tiny"
    assert train(out) == 0
    return out


def test_run_directory_contents(run):
    names = {p.name for p in run.iterdir()}
    assert names == {"config.json", "checkpoint.json", "checkpoints", "metrics.jsonl", "tokenizer.json", "tensorboard"}
    # One complete checkpoint, in its own step folder, named by the pointer with every file's sha256.
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step-000006"]
    ptr = pointer(run)
    assert (ptr["step"], ptr["tokens"], ptr["path"]) == (6, 6 * 4 * 64, "checkpoints/step-000006")
    assert set(ptr["sha256"]) == {p.name for p in (run / ptr["path"]).iterdir()} == {
        "model.safetensors", "train_state.safetensors", "train_state.json"}
    config = json.loads((run / "config.json").read_text())
    assert config["run"]["model"]["ffn"] == "routed"
    assert config["flops_per_token"]["total"] > 0 and config["active_params"] < config["params"]
    records = metrics(run)
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    for r in records:
        assert {"step", "tokens", "train_loss", "lr", "tokens_per_s", "dead_fraction", "l0", "live_slot_fraction",
                "routed"} <= r.keys()
        assert set(r["routed"]) == {"blocks.0.mlp", "blocks.1.mlp"}
        for layer in r["routed"].values():  # k = 8 in the tiny preset
            assert 0 <= layer["l0"] <= 8 and layer["live_slot_fraction"] == pytest.approx(layer["l0"] / 8)
        assert r["l0"] == pytest.approx(sum(v["l0"] for v in r["routed"].values()) / 2)
    assert "val_loss" in records[2] and "val_loss" not in records[1]
    assert records[-1]["tokens"] == 6 * 4 * 64
    assert records[-1]["train_loss"] < records[0]["train_loss"]


def test_resume_reproduces_the_uninterrupted_run(run, tmp_path):
    out = tmp_path / "split"
    assert train(out, "--until", "3") == 0
    assert pointer(out)["step"] == 3
    assert main(["train", "--resume", str(out), "--no-progress", "--steps", "6"]) == 0
    split, whole = metrics(out), metrics(run)
    assert [r["step"] for r in split] == [1, 2, 3, 4, 5, 6]
    assert [r["train_loss"] for r in split] == [r["train_loss"] for r in whole]
    assert split[-1]["val_loss"] == whole[-1]["val_loss"]


def test_eval_json_and_sample(run, capsys):
    capsys.readouterr()
    assert main(["eval", str(run), "--json", "--batches", "1"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert {"val_loss", "params", "active_params", "flops_per_token", "dead_fraction", "bits_per_byte", "step",
            "l0", "live_slot_fraction", "routed"} <= report.keys()
    assert 0 <= report["dead_fraction"] <= 1 and report["step"] == 6
    assert set(report["routed"]) == {"blocks.0.mlp", "blocks.1.mlp"} and 0 <= report["live_slot_fraction"] <= 1
    assert main(["sample", str(run), "--prompt", "def f", "--max-new-tokens", "20"]) == 0
    assert capsys.readouterr().out.startswith("def f")
    assert main(["sample", str(run), "--prompt", "", "--max-new-tokens", "5"]) == 0
    assert not capsys.readouterr().out.startswith("\x00")  # an empty prompt starts at a document boundary


@pytest.mark.parametrize("argv, message", [
    (["--top-k", "0"], "--top-k must be at least 1"),
    (["--max-new-tokens", "-5"], "--max-new-tokens must be 0 or more"),
    (["--temperature", "-1"], "--temperature must be a finite number >= 0"),
])
def test_sample_refuses_bad_settings(run, argv, message, capsys):
    assert main(["sample", str(run), *argv]) == 2
    assert message in error_line(capsys)


def test_refuses_to_overwrite_a_run(run, capsys):
    before = model_file(run).read_bytes()
    assert train(run) == 2
    assert "is not empty" in error_line(capsys)
    assert model_file(run).read_bytes() == before


def test_nan_loss_stops_and_names_the_last_good_checkpoint(tmp_path, monkeypatch, capsys):
    forward = GPT.forward
    calls = {"n": 0}

    def poisoned(self, idx, targets=None):
        logits, loss = forward(self, idx, targets)
        if self.training:
            calls["n"] += 1
            if calls["n"] == 5:
                loss = loss * float("nan")
        return logits, loss

    monkeypatch.setattr(GPT, "forward", poisoned)
    out = tmp_path / "nan"
    assert train(out) == 2
    line = error_line(capsys)
    assert "loss became nan at step 5" in line and f"{out} (step 4)" in line and "nothing after step 4" in line
    assert pointer(out)["step"] == 4 and not (out / "train.lock").exists()
    monkeypatch.undo()
    assert main(["eval", str(out), "--batches", "1"]) == 0  # the named checkpoint is usable
    assert main(["train", "--resume", str(out), "--no-progress"]) == 0
    assert [r["step"] for r in metrics(out)] == [1, 2, 3, 4, 5, 6] and pointer(out)["step"] == 6


@pytest.mark.parametrize("damage", ["truncated", "64_flipped_bytes"])
def test_corrupt_checkpoint_is_detected_by_train_eval_and_sample(run, tmp_path, capsys, damage):
    out = copy_run(run, tmp_path / "copy")
    path = model_file(out)
    data = bytearray(path.read_bytes())
    if damage == "truncated":
        data = data[: len(data) // 2]
    else:  # same size, valid header: only the checksum can tell
        data[-200:-136] = bytes(b ^ 0xFF for b in data[-200:-136])
    path.write_bytes(bytes(data))
    for argv in (["train", "--resume", str(out), "--no-progress", "--steps", "8"], ["eval", str(out)],
                 ["sample", str(out), "--max-new-tokens", "1"]):
        assert main(argv) == 2
        assert "model.safetensors does not match its checksum" in error_line(capsys)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["train", "--preset", "huge"], "unknown preset 'huge'; choose one of tiny, cpu-small, cpu-long, facts, gpt2-small"),
        (["train", "--set", "n_unit=4"], "unknown config key 'n_unit'; valid keys:"),
        (["train", "--k", "300"], "k must be between 1 and n_units=256"),
        (["train", "--n-units", "300"], "perfect square, got 300; use 289 or 324"),
        (["train", "--router", "hash"], "unknown router 'hash'"),
        (["train", "--activation", "tanh"], "unknown activation 'tanh'"),
        (["train", "--data", "/nonexistent/*.txt"], "/nonexistent"),
        (["train", "--resume", "/nonexistent/run"], "run config /nonexistent/run/config.json is missing"),
        (["eval", "/nonexistent/run"], "is missing"),
        (["train", "--config", "/nonexistent.yaml"], "config file /nonexistent.yaml not found"),
        (["train", "--device", "tpu"], "unknown device 'tpu'; use --device cpu"),
        (["train", "--ckpt-every", "0"], "ckpt_every (--ckpt-every) must be a whole number >= 1, got 0"),
        (["train", "--log-every", "0"], "log_every (--log-every) must be a whole number >= 1, got 0"),
        (["train", "--batch-size", "0"], "batch_size (--batch-size) must be a whole number >= 1, got 0"),
        (["train", "--lr", "-1"], "lr (--lr) must be a finite number > 0"),
        (["train", "--until", "0"], "--until must be a step >= 1"),
    ],
)
def test_bad_input_gives_one_error_line(argv, message, tmp_path, capsys):
    if argv[:2] != ["train", "--resume"] and argv[0] == "train":
        argv = [*argv, "--out", str(tmp_path / "out"), "--no-progress"]
    assert main(argv) == 2
    assert message in error_line(capsys)
    assert not (tmp_path / "out").exists()  # refused before anything was written


def test_a_key_given_twice_in_a_config_file_is_refused(tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text("k: 4\nsteps: 2\nk: 8\n")  # plain YAML would silently keep k: 8
    out = tmp_path / "out"
    assert main(["train", "--config", str(config), "--out", str(out), "--no-progress"]) == 2
    assert "key 'k' appears twice in one mapping (line 3)" in error_line(capsys)
    assert not out.exists()


def test_a_split_too_small_is_refused_before_anything_is_written(tmp_path, capsys):
    (tmp_path / "small.txt").write_text("a few lines of text\n" * 100)  # 2 KB: one chunk, in train
    out = tmp_path / "out"
    assert main(["train", "--data", str(tmp_path / "small.txt"), "--out", str(out), "--no-progress"]) == 2
    assert "the val split has 0 tokens, fewer than block_size+1=65" in error_line(capsys)
    assert not out.exists()


def test_empty_corpus_is_refused(tmp_path, capsys):
    (tmp_path / "empty.txt").write_text("")
    assert main(["train", "--data", str(tmp_path / "empty.txt"), "--out", str(tmp_path / "o"), "--no-progress"]) == 2
    assert "empty" in error_line(capsys)


def test_resume_refuses_shape_changes(run, capsys):
    assert main(["train", "--resume", str(run), "--block-size", "128", "--no-progress"]) == 2
    assert "cannot change 'block_size' when resuming" in error_line(capsys)


@pytest.mark.parametrize("suffix, text", [(".yaml", "model:\n  n_units: 64\n  k: 2\nsteps: 2\n"),
                                          (".toml", "steps = 2\n[model]\nn_units = 64\nk = 2\n")])
def test_config_file(tmp_path, suffix, text):
    path = tmp_path / f"cfg{suffix}"
    path.write_text(text)
    out = tmp_path / "run"
    assert main(["train", "--config", str(path), "--out", str(out), "--no-progress", "--eval-batches", "1"]) == 0
    saved = json.loads((out / "config.json").read_text())["run"]
    assert (saved["model"]["n_units"], saved["model"]["k"], saved["train"]["steps"]) == (64, 2, 2)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_two_cpu_processes(tmp_path):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           "-m", "monoroute", "train", "--preset", "tiny", "--out", str(out), *FAST, "--steps", "3"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["ranks_in_sync"] is True  # weights and the firing-statistics buffers
    assert summary["tokens"] == 3 * 2 * 4 * 64  # both ranks' tokens counted
    assert len(metrics(out)) == 3  # only rank 0 writes
    import monoroute

    for layer in monoroute.load(out).model.routed_layers():  # rank 0's saved statistics are the global ones
        assert int(layer.tokens_seen) == 3 * 2 * 4 * 64 and int(layer.last_fired.max()) == 3 * 2 * 4 * 64


def _firing_sync_worker(rank, port, steps, result_dir):
    import torch.distributed as dist

    from monoroute.layers import RoutedFFN
    from monoroute.train.distributed import DistInfo, FiringSync

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    torch.manual_seed(0)  # the same layer on both ranks
    layer = RoutedFFN(8, 64, 2, aux_coef=0.0, impl="reference", dead_window=30).double().train()
    sync = FiringSync([layer], DistInfo(rank, 2, rank))
    for step in range(steps):
        layer(torch.randn(6 + 4 * rank, 8, dtype=torch.double, generator=torch.Generator().manual_seed(10 * step + rank)))
        sync()
    torch.save({name: b.clone() for name, b in layer.named_buffers() if name in ("last_fired", "fire_count",
                                                                                 "tokens_seen")},
               f"{result_dir}/rank{rank}.pt")
    done(result_dir, rank)
    dist.barrier()  # no teardown while the other rank may still finish the last all-reduce
    dist.destroy_process_group()


def test_firing_statistics_are_merged_across_ranks(tmp_path):
    """Two gloo ranks see different tokens (6 and 10 per step); after each merge both hold exactly
    the statistics of one layer that saw both ranks' tokens of every step."""
    from monoroute.layers import RoutedFFN

    steps = 4
    spawn_ranks(_firing_sync_worker, (free_port(), steps, str(tmp_path)), 2, str(tmp_path))
    got = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    torch.manual_seed(0)
    reference = RoutedFFN(8, 64, 2, aux_coef=0.0, impl="reference", dead_window=30).double().train()
    for step in range(steps):
        reference(torch.cat([torch.randn(6 + 4 * r, 8, dtype=torch.double,
                                         generator=torch.Generator().manual_seed(10 * step + r)) for r in range(2)]))
    for stats in got:
        for name in ("last_fired", "fire_count", "tokens_seen"):
            assert torch.equal(stats[name], getattr(reference, name)), name
    assert int(got[0]["tokens_seen"]) == steps * 16
    # What rank 0 alone would hold (the bug): fewer units tried, and judged on 24 tokens, nothing dead.
    torch.manual_seed(0)
    alone = RoutedFFN(8, 64, 2, aux_coef=0.0, impl="reference", dead_window=30).double().train()
    for step in range(steps):
        alone(torch.randn(6, 8, dtype=torch.double, generator=torch.Generator().manual_seed(10 * step)))
    fired_alone, fired_all = (set(m.last_fired.ge(0).nonzero().flatten().tolist()) for m in (alone, reference))
    assert fired_alone < fired_all
    assert not alone.dead_mask().any() and 0 < int(reference.dead_mask().sum()) < 64


def test_resume_refuses_a_vocab_mismatch(run, tmp_path, capsys):
    out = copy_run(run, tmp_path / "vocab")
    config = json.loads((out / "config.json").read_text())
    config["run"]["model"]["vocab_size"] = 300
    (out / "config.json").write_text(json.dumps(config))
    assert main(["train", "--resume", str(out), "--no-progress", "--steps", "8"]) == 2
    assert "vocab mismatch on resume" in error_line(capsys)


def test_fsdp_two_cpu_processes_saves_a_full_checkpoint_and_resumes(tmp_path, capsys):
    out = tmp_path / "fsdp"
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = [*launch, "--master_port", str(free_port()), "-m", "monoroute", "train", "--preset", "tiny",
             "--out", str(out), *FAST, "--parallel", "fsdp", "--until", "2"]
    result = subprocess.run(first, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    resume = [*launch, "--master_port", str(free_port()), "-m", "monoroute", "train", "--resume", str(out),
              "--no-progress"]
    result = subprocess.run(resume, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    assert [r["step"] for r in metrics(out)] == [1, 2, 3, 4, 5, 6]
    capsys.readouterr()
    assert main(["eval", str(out), "--json", "--batches", "1"]) == 0  # the saved weights are unsharded
    assert json.loads(capsys.readouterr().out)["val_loss"] < metrics(out)[0]["train_loss"]


def test_l0_and_live_slot_fraction_count_the_units_that_fired():
    from monoroute.train.config import build_run_config
    from monoroute.train.trainer import RoutedStats

    cfg = build_run_config("tiny").model
    model = GPT(cfg).eval()
    stats = RoutedStats(model)
    x = torch.randint(0, cfg.vocab_size, (2, 16))
    for bias, expected in ((-1e4, 0.0), (1e4, float(cfg.k))):  # nothing fires / every selected unit fires
        for layer in model.routed_layers():
            layer.b_in.data.fill_(bias)
        stats.reset()
        model(x)
        stats.update()
        summary = stats.summary()
        assert summary["l0"] == expected and summary["live_slot_fraction"] == expected / cfg.k
        assert all(v["l0"] == expected for v in summary["routed"].values())
    torch.manual_seed(0)
    for layer in model.routed_layers():  # a mix: l0 is the mean count of nonzero activations per token
        layer.w_in.data.zero_()  # pre = b_in: ~2 % of units can fire, so most tokens select fewer than k
        layer.b_in.data.normal_(-0.1, 0.05)
    stats.reset()
    model(x)
    model(x[:1])
    stats.update()  # only the last forward counts
    layer = model.routed_layers()[0]
    assert stats.summary()["routed"]["blocks.0.mlp"]["l0"] == pytest.approx(
        (layer.last_activations.values != 0).sum().item() / 16)
    assert 0 < stats.summary()["l0"] < cfg.k


def test_monoroute_load_returns_model_tokenizer_and_config(run):
    import monoroute
    from monoroute.errors import MonorouteError

    loaded = monoroute.load(run, device="cpu")
    assert loaded.run_dir == run and loaded.step == 6 and loaded.config.model.ffn == "routed"
    assert not loaded.model.training
    ids = torch.tensor([loaded.tokenizer.encode("def f(x):")])
    logits, _ = loaded.model(ids)
    assert logits.shape == (1, ids.shape[1], loaded.config.model.vocab_size)
    model, tokenizer, config, run_dir, step = loaded  # a named tuple
    with pytest.raises(MonorouteError, match="is missing"):
        monoroute.load(run.parent / "no-such-run")


def test_a_run_saved_before_checkpoint_folders_still_loads_and_resumes(run, tmp_path, capsys):
    """Older runs kept model.safetensors and train_state.* at the top of OUT, with no checkpoint.json."""
    out = copy_run(run, tmp_path / "legacy")
    folder = out / pointer(out)["path"]
    state = json.loads((folder / "train_state.json").read_text())
    for name in ("model.safetensors", "train_state.safetensors"):
        shutil.move(folder / name, out / name)
    state["sha256"] = {name: pointer(out)["sha256"][name] for name in ("model.safetensors", "train_state.safetensors")}
    (out / "train_state.json").write_text(json.dumps(state))
    shutil.rmtree(out / "checkpoints")
    (out / "checkpoint.json").unlink()
    assert main(["eval", str(out), "--batches", "1"]) == 0
    assert main(["train", "--resume", str(out), "--no-progress", "--steps", "8"]) == 0
    assert pointer(out)["step"] == 8 and not (out / "model.safetensors").exists()  # now in the new layout


def test_coupling_and_router_heads_are_config_keys_and_flags(tmp_path, capsys):
    from monoroute.cli import build_parser, collect_overrides
    from monoroute.train.config import build_run_config

    default = GPT(build_run_config("tiny").model).routed_layers()[0]
    # coupling "auto" (the default) is "rerank" for product keys with ReLU, "none" where it cannot apply
    assert (default.coupling, default.agree_coef, default.router.heads) == ("rerank", 0.1, 1)
    dense_router = GPT(build_run_config("tiny", {"router": "dense"}).model).routed_layers()[0]
    gelu = GPT(build_run_config("tiny", {"activation": "gelu"}).model).routed_layers()[0]
    assert dense_router.coupling == "none" and gelu.coupling == "none"
    args = build_parser().parse_args(["train", "--coupling", "agreement", "--agree-coef", "0.5",
                                      "--set", "router_heads=2"])
    layer = GPT(build_run_config("tiny", collect_overrides(args)).model).routed_layers()[0]
    assert (layer.coupling, layer.agree_coef, layer.router.heads) == ("agreement", 0.5, 2)
    assert train(tmp_path / "bad", "--coupling", "both") == 2
    assert "unknown coupling 'both'; choose one of auto, none, agreement, preact" in error_line(capsys)
    assert not (tmp_path / "bad").exists()


def test_a_run_saved_before_coupling_existed_loads_as_it_was_trained(run, tmp_path):
    """Settings added later take the behaviour of the code that trained the run, not today's
    defaults: an old product-key run has no coupling (today's default 'auto' would pick re-ranking),
    no query BatchNorm, no detached router input."""
    from monoroute.train.trainer import LEGACY_MODEL_DEFAULTS, load_run, read_run_config

    old = tmp_path / "old"
    assert train(old, "--coupling", "none", *[f"--set={k}={json.dumps(v) if isinstance(v, bool) else v}"
                                             for k, v in LEGACY_MODEL_DEFAULTS.items() if k != "coupling"]) == 0
    saved = json.loads((old / "config.json").read_text())
    for key in LEGACY_MODEL_DEFAULTS:  # what a config written before these keys existed looks like
        saved["run"]["model"].pop(key)
    (old / "config.json").write_text(json.dumps(saved))
    cfg = read_run_config(old)
    assert cfg.model.coupling == "none" and cfg.model.layer_query_norm == "none"
    assert read_run_config(run).model.coupling == json.loads((run / "config.json").read_text())["run"]["model"]["coupling"]
    _, model = load_run(old)
    assert model.blocks[0].mlp.coupling == "none" and model.blocks[0].mlp.router.query_norm is None
