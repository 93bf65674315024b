"""Issue 32: what a fault probe of a fresh clone found, each case as a test that failed before its fix.
No data loss, no traceback, no contradiction accepted: one `monoroute: error:` line and exit 2."""
import errno
import json

import pytest

from monoroute.cli import main

TINY = ["--no-progress", "--device", "cpu", "--steps", "4", "--log-every", "2", "--eval-every", "2",
        "--eval-batches", "1", "--ckpt-every", "2", "--batch-size", "4", "--warmup", "1"]


def error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("monoroute: error: "), err
    return err[0]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("probe") / "run"
    assert main(["train", "--preset", "tiny", "--out", str(out), *TINY]) == 0
    return out


# --- 1. data loss ----------------------------------------------------------------------------------------------

def test_facts_make_refuses_a_non_empty_folder_and_keeps_the_users_files(tmp_path, capsys):
    mine = tmp_path / "corpus.txt"
    mine.write_text("my own text")
    assert main(["facts", "make", "people=5,exposures=2", "--out", str(tmp_path)]) == 2
    assert "not empty" in error_line(capsys)
    assert mine.read_text() == "my own text" and sorted(p.name for p in tmp_path.iterdir()) == ["corpus.txt"]
    assert main(["facts", "make", "people=5,exposures=2", "--out", str(mine)]) == 2  # a file, not a folder
    assert "not a folder" in error_line(capsys)
    assert main(["facts", "make", "people=5,exposures=2", "--out", str(tmp_path / "new")]) == 0  # control
    assert (tmp_path / "new" / "corpus.txt").is_file()


# --- 4. tracebacks -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("flags, words", [
    (["--batch-size", "1000000000"], "needs at least"),
    (["--router", "dense", "--n-units", "1000000000"], "needs at least"),
    (["--d-model", "1000000", "--n-head", "1"], "needs at least"),
    (["--seed", "1180591620717411303424"], "seed"),
    (["--seed", "-1"], "seed"),
    (["--data-seed", "1180591620717411303424"], "data_seed"),
])
def test_train_refuses_what_cannot_be_allocated_or_seeded_in_one_line(tmp_path, capsys, flags, words):
    out = tmp_path / "run"
    assert main(["train", "--preset", "tiny", "--out", str(out), *TINY, *flags]) == 2
    assert words in error_line(capsys)
    assert not out.exists()


def test_memory_estimate_counts_weights_state_and_activations():
    from monoroute.train.config import build_run_config
    from monoroute.train.trainer import memory_estimate

    cfg = build_run_config("tiny", {"router": "dense", "n_units": 4096})
    est = memory_estimate(cfg)
    from monoroute import GPT

    assert est["state"] == 16 * GPT(cfg.model).n_params()  # weights, gradients, two AdamW moments, float32
    tokens = cfg.train.batch_size * cfg.model.block_size
    assert est["activations"] >= 2 * 4 * tokens * 2 * cfg.model.vocab_size  # at least the logits and their grad
    bigger = memory_estimate(build_run_config("tiny", {"router": "dense", "n_units": 4096, "batch_size": 80}))
    assert bigger["activations"] == 10 * est["activations"] and bigger["state"] == est["state"]


def test_sample_with_a_prompt_that_is_not_utf8_is_one_line(tiny_run, capsys):
    bad = b"ab\xffcd".decode("utf-8", "surrogateescape")  # how Python hands such argv bytes over
    assert main(["sample", str(tiny_run), "--prompt", bad, "--max-new-tokens", "2"]) == 2
    assert "not valid UTF-8" in error_line(capsys)


def test_binary_spec_and_config_files_are_one_line(tmp_path, capsys):
    binary = tmp_path / "blob.yaml"
    binary.write_bytes(bytes(range(256)) * 4)
    assert main(["sweep", str(binary), "--dry-run"]) == 2
    assert "not a UTF-8 text file" in error_line(capsys)
    assert main(["train", "--config", str(binary), "--out", str(tmp_path / "r")]) == 2
    assert "not a UTF-8 text file" in error_line(capsys)
    assert not (tmp_path / "r").exists()


# --- 5. contradictions ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("flags, words", [
    (["--min-lr", "1.0", "--lr", "0.001"], "min_lr"),
    (["--warmup", "1000"], "warmup"),
    (["--set", "steps=abc", "--steps", "30"], "given twice"),
    (["--set", "k=4", "--set", "k=8"], "given twice"),
])
def test_contradictions_are_refused(tmp_path, capsys, flags, words):
    out = tmp_path / "run"
    base = TINY[:TINY.index("--warmup")] if "--warmup" in flags else TINY  # --warmup is TINY's last pair
    assert main(["train", "--preset", "tiny", "--out", str(out), *base, *flags]) == 2
    assert words in error_line(capsys)
    assert not out.exists()


def test_a_config_file_value_may_still_be_overridden_by_a_flag(tmp_path):
    from argparse import Namespace

    from monoroute.cli import OVERRIDE_FLAGS, collect_overrides

    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"steps": 9}))
    args = Namespace(config=str(cfg), set=[], sparse_rows=False,
                     **{flag[2:].replace("-", "_"): None for flag, _, _ in OVERRIDE_FLAGS})
    args.steps = 3
    assert collect_overrides(args)["steps"] == 3  # documented: --set and flags override the file


def test_facts_spec_with_a_repeated_key_is_refused(tmp_path, capsys):
    assert main(["facts", "make", "people=5,people=7,exposures=2", "--out", str(tmp_path / "f")]) == 2
    assert "given twice" in error_line(capsys)
    assert not (tmp_path / "f").exists()


# --- 6. minor --------------------------------------------------------------------------------------------------------

def test_circuits_with_an_unknown_task_writes_nothing(tiny_run, capsys):
    assert main(["circuits", str(tiny_run), "--tasks", "bogus"]) == 2
    assert "unknown task" in error_line(capsys)
    assert not (tiny_run / "circuits").exists()


def test_a_write_error_without_a_file_name_names_the_output(tiny_run, tmp_path, capsys, monkeypatch):
    import monoroute.interp.export as export_module

    def full(*args, **kwargs):
        raise OSError(errno.EFBIG, "File too large")  # as a library writer raises it: no filename

    monkeypatch.setattr(export_module, "export", full)
    out = tmp_path / "exp"
    assert main(["export", str(tiny_run), "--format", "csv", "--out", str(out)]) == 2
    line = error_line(capsys)
    assert str(out) in line and "File too large" in line


def test_a_checkpoint_pointer_leading_out_of_the_run_is_refused(tiny_run, tmp_path, capsys):
    import shutil

    run = tmp_path / "copy"
    shutil.copytree(tiny_run, run)
    pointer = json.loads((run / "checkpoint.json").read_text())
    outside = tmp_path / "elsewhere"
    shutil.copytree(run / pointer["path"], outside)  # a valid checkpoint, sha256 and all, outside the run
    (run / "checkpoint.json").write_text(json.dumps({**pointer, "path": "../elsewhere"}))
    assert main(["eval", str(run)]) == 2
    assert "outside the run directory" in error_line(capsys)
    (run / "checkpoint.json").write_text(json.dumps(pointer))
    assert main(["eval", str(run), "--json"]) == 0  # control: the same files through the pointer as written


@pytest.mark.parametrize("argv, words", [
    (["train", "--steps", "abc"], "invalid int value"),
    (["eval"], "required"),
    (["bogus-command"], "invalid choice"),
])
def test_argparse_usage_errors_are_one_line(capsys, argv, words):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    line = error_line(capsys)
    assert words in line
