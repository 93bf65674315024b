"""Faults injected into real runs, and what must survive them.

kill -9 of a real training process at chosen points of a checkpoint save, a full disk, two trainings
on one run directory, a stale lock, non-finite weights, --overwrite. After each: the last complete
checkpoint is intact and usable (`eval`), and resuming reproduces the uninterrupted run's losses.
"""
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import safetensors.torch
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from monoroute.cli import main
from monoroute.errors import MonorouteError
from monoroute.train import checkpoint as checkpoint_module
from monoroute.train import trainer as trainer_module
from monoroute.train.rundir import RunLock

FAST = ["--no-progress", "--device", "cpu", "--steps", "6", "--log-every", "1", "--eval-every", "3",
        "--eval-batches", "1", "--ckpt-every", "2", "--batch-size", "4"]


def fresh(out):
    return ["train", "--preset", "tiny", "--out", str(out), *FAST]


def resume(out):
    return ["train", "--resume", str(out), "--no-progress"]


def metrics(out):
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def losses(out):
    return [(r["step"], r["train_loss"], r.get("val_loss")) for r in metrics(out)]


def pointer(out):
    return json.loads((Path(out) / "checkpoint.json").read_text())


def error_line(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("monoroute: error: "), err
    return err[0]


def assert_clean(out, step):
    """Exactly one checkpoint (the pointer's), no half-written save, no lock left behind."""
    assert pointer(out)["step"] == step
    assert sorted(p.name for p in (Path(out) / "checkpoints").iterdir()) == [f"step-{step:06d}"]
    assert not (Path(out) / "train.lock").exists()


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run every faulty run must reproduce."""
    out = tmp_path_factory.mktemp("reference") / "run"
    assert main(fresh(out)) == 0
    return losses(out)


# ---- kill -9 -----------------------------------------------------------------------------------

# Runs `monoroute <argv>` in a fresh interpreter that stalls when a save reaches (stage, step), so
# the test can kill -9 it exactly there.
STALLING_TRAINER = """
import os, sys, time
import torch
torch.set_num_threads(int(os.environ["STALL_THREADS"]))
from monoroute.train import checkpoint
def reached(stage, step):
    if (stage, step) == (os.environ["STALL_STAGE"], int(os.environ["STALL_STEP"])):
        with open(os.environ["STALL_MARKER"], "w") as f:
            f.write(str(os.getpid()))
        time.sleep(600)
checkpoint.reached = reached
from monoroute.cli import main
sys.exit(main(sys.argv[1:]))
"""


def stalled(argv, stage, step, tmp_path) -> subprocess.Popen:
    marker = tmp_path / f"stalled-{stage}-{step}-{time.monotonic_ns()}"
    threads = str(torch.get_num_threads())  # the same as this process: losses must match bit for bit
    env = {**os.environ, "STALL_STAGE": stage, "STALL_STEP": str(step), "STALL_MARKER": str(marker),
           "STALL_THREADS": threads, "OMP_NUM_THREADS": threads}
    proc = subprocess.Popen([sys.executable, "-c", STALLING_TRAINER, *argv], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not marker.exists():
        if proc.poll() is not None:
            pytest.fail(f"the training exited ({proc.returncode}) before reaching {stage} at step {step}: "
                        f"{proc.stderr.read()[-2000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"the training never reached {stage} at step {step}")
        time.sleep(0.05)
    return proc


def kill_9(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL


def test_kill_9_during_saves_loses_nothing_and_resume_matches(reference, tmp_path, capsys):
    out = tmp_path / "run"
    # 1. Killed while writing its first checkpoint: no checkpoint. --resume says so; the same --out
    #    starts again without --overwrite (a run with no checkpoint has nothing to lose).
    kill_9(stalled(fresh(out), "model_written", 2, tmp_path))
    assert not (out / "checkpoint.json").exists()
    assert main(resume(out)) == 2
    assert "stopped before its first checkpoint" in error_line(capsys)

    # 2. Killed with the step-4 folder complete but the pointer still on step 2. While it is alive,
    #    a second training on the same directory (a resume, or a new run with --overwrite) is refused.
    proc = stalled(fresh(out), "step_dir_complete", 4, tmp_path)
    assert main(resume(out)) == 2
    assert f"is in use by another training (pid {proc.pid}" in error_line(capsys)
    assert main([*fresh(out), "--overwrite", "--seed", "2"]) == 2
    assert f"(pid {proc.pid}" in error_line(capsys)
    kill_9(proc)
    assert pointer(out)["step"] == 2
    capsys.readouterr()
    assert main(["eval", str(out), "--batches", "1", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["step"] == 2

    # 3. Resumed (taking over the dead process's lock); killed after the pointer moved to step 4 but
    #    before step 2's folder was deleted. 4. Resumed again; killed in the middle of the step-6 save.
    kill_9(stalled(resume(out), "pointer_switched", 4, tmp_path))
    assert pointer(out)["step"] == 4
    kill_9(stalled(resume(out), "model_written", 6, tmp_path))
    assert pointer(out)["step"] == 4

    # 5. The last resume finishes: every step logged once, losses equal to the uninterrupted run.
    assert main(resume(out)) == 0
    assert losses(out) == reference
    assert_clean(out, 6)


# ---- full disk ---------------------------------------------------------------------------------


def full_disk_at_step_4(fault, monkeypatch):
    """Make the step-4 checkpoint (or the metrics line of step 3) hit a full disk."""
    if fault == "metrics":
        log = trainer_module.MetricsLog.log

        def full_log(self, record):
            if record["step"] == 3:
                raise OSError(errno.ENOSPC, "No space left on device", str(self.path))
            return log(self, record)

        monkeypatch.setattr(trainer_module.MetricsLog, "log", full_log)
        return
    if fault == "preflight":  # the free-space check before writing anything
        usage = shutil.disk_usage
        calls = {"n": 0}

        def little_space(path):
            calls["n"] += 1
            return usage(path)._replace(free=4096) if calls["n"] == 2 else usage(path)

        monkeypatch.setattr(checkpoint_module.shutil, "disk_usage", little_space)
        return
    save_file = safetensors.torch.save_file

    def torn_save_file(tensors, filename, metadata=None):
        if "step-000004" in str(filename) and "train_state" in str(filename):
            Path(filename).write_bytes(b"\0" * 100)  # a torn file, as a full disk leaves it
            if fault == "oserror":
                raise OSError(errno.ENOSPC, "No space left on device")
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        return save_file(tensors, filename, metadata)

    monkeypatch.setattr(safetensors.torch, "save_file", torn_save_file)  # save_model goes through it too


@pytest.mark.parametrize("fault", ["oserror", "safetensors", "preflight", "metrics"])
def test_full_disk_keeps_the_previous_checkpoint(reference, tmp_path, monkeypatch, capsys, fault):
    out = tmp_path / "full"
    full_disk_at_step_4(fault, monkeypatch)
    assert main(fresh(out)) == 2
    line = error_line(capsys)
    assert "disk full while" in line and "the step-2 checkpoint is intact" in line
    if fault != "metrics":
        assert "saving the step-4 checkpoint" in line
    assert_clean(out, 2)  # no torn file where a later run would read it
    monkeypatch.undo()
    assert main(["eval", str(out), "--batches", "1"]) == 0
    assert main(resume(out)) == 0
    assert losses(out) == reference


# ---- two processes, stale locks ------------------------------------------------------------------


def test_a_live_lock_refuses_and_a_stale_one_is_taken_over(tmp_path, capsys):
    out = tmp_path / "locked"
    with RunLock(out) as lock:
        owner = json.loads(lock.path.read_text())
        assert owner["pid"] == os.getpid()
        with pytest.raises(MonorouteError, match=rf"in use by another training \(pid {os.getpid()}"):
            RunLock(out).acquire()  # a second open file description: refused like another process
        assert main(fresh(out)) == 2
        assert "in use by another training" in error_line(capsys)
    assert not (out / "train.lock").exists()
    # A lock file left by a process that died (kill -9 leaves it behind; its flock died with it).
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    out.mkdir(exist_ok=True)
    (out / "train.lock").write_text(json.dumps({"pid": int(dead.stdout), "host": "h", "started": "then"}))
    assert main([*fresh(out), "--steps", "2"]) == 0
    assert f"took over the lock of pid {int(dead.stdout)}" in capsys.readouterr().err
    assert not (out / "train.lock").exists()


def test_overwrite_starts_the_run_fresh(tmp_path):
    out = tmp_path / "over"
    assert main([*fresh(out), "--until", "2"]) == 0
    (out / "notes.txt").write_text("mine")  # not a run file: kept
    assert main([*fresh(out), "--steps", "3", "--overwrite", "--seed", "5"]) == 0
    assert [r["step"] for r in metrics(out)] == [1, 2, 3]  # not appended to the old run's
    assert json.loads((out / "config.json").read_text())["run"]["train"]["seed"] == 5
    assert len(list((out / "tensorboard").iterdir())) == 1
    assert (out / "notes.txt").read_text() == "mine"
    assert_clean(out, 3)


# ---- non-finite values -------------------------------------------------------------------------


def test_non_finite_weights_are_never_saved(reference, tmp_path, monkeypatch, capsys):
    build = trainer_module.build_optimizer_for

    def poisoned_build(model, tc):  # the 4th update turns one weight into inf
        optimizer = build(model, tc)
        step, calls = optimizer.step, {"n": 0}

        def poisoned_step(*args, **kw):
            result = step(*args, **kw)
            calls["n"] += 1
            if calls["n"] == 4:
                with torch.no_grad():
                    model.blocks[0].mlp.w_out[0, 0] = float("inf")
            return result

        optimizer.step = poisoned_step
        return optimizer

    monkeypatch.setattr(trainer_module, "build_optimizer_for", poisoned_build)
    out = tmp_path / "inf"
    assert main(fresh(out)) == 2
    line = error_line(capsys)
    assert "weights became non-finite" in line and "blocks.0.mlp.w_out" in line and "at step 4" in line
    assert f"Last good checkpoint: {out} (step 2)" in line and "without saving" not in line
    assert_clean(out, 2)
    monkeypatch.undo()
    assert main(["eval", str(out), "--batches", "1"]) == 0
    assert main(resume(out)) == 0
    assert losses(out) == reference


def test_a_diverging_run_names_a_finite_checkpoint(tmp_path, capsys):
    """The reported case: --lr 30 --warmup 1 --ckpt-every 1 once saved NaN weights as "last good"."""
    out = tmp_path / "diverge"
    # lr 30 diverged within 6 steps on the code of the report; 1e20 diverges on any version (weights
    # of ~1e20 after one Adam step overflow the next forward) while its first steps still save.
    assert main([*fresh(out), "--lr", "1e20", "--warmup", "1", "--ckpt-every", "1"]) == 2
    line = error_line(capsys)
    step = pointer(out)["step"]
    assert f"Last good checkpoint: {out} (step {step})" in line and "without saving" not in line
    folder = out / pointer(out)["path"]
    for name in ("model.safetensors", "train_state.safetensors"):
        assert all(bool(torch.isfinite(t).all()) for t in load_file(folder / name).values() if t.is_floating_point())
    capsys.readouterr()
    assert main(["eval", str(out), "--batches", "1", "--json"]) == 0  # a huge loss: perplexity null, no OverflowError
    report = json.loads(capsys.readouterr().out)
    assert report["step"] == step and (report["perplexity"] is None or report["perplexity"] < float("inf"))


def test_a_run_that_failed_before_its_first_checkpoint_restarts_without_overwrite(reference, tmp_path, monkeypatch,
                                                                                   capsys):
    def failing_eval(*args, **kwargs):
        raise MonorouteError("the first evaluation failed")

    monkeypatch.setattr(trainer_module, "evaluate", failing_eval)
    out = tmp_path / "failed"
    assert main([*fresh(out), "--ckpt-every", "5"]) == 2  # evaluation at step 3 fails, before any checkpoint
    assert "the first evaluation failed" in error_line(capsys)
    assert (out / "config.json").exists() and not (out / "checkpoint.json").exists()
    monkeypatch.undo()
    assert main(fresh(out)) == 0  # same --out, no --overwrite
    assert "stopped before its first checkpoint; starting it again" in capsys.readouterr().err
    assert losses(out) == reference


def test_any_oserror_of_a_command_is_one_error_line(monkeypatch, capsys):
    """Not only a full disk: a PermissionError deep in a command is one line and exit 2, not a traceback."""
    import monoroute.train.evaluation as evaluation
    from monoroute.cli import main

    def denied(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", "/runs/x/analysis/report.json")

    monkeypatch.setattr(evaluation, "eval_report", denied)
    assert main(["eval", "/runs/x"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("monoroute: error: cannot access /runs/x/analysis/report.json (Permission denied); check the "
                   "path and its permissions, then run the command again")


def test_analyze_on_a_run_it_cannot_write_fails_before_any_work(analysed_runs, tmp_path, capsys):
    import shutil

    from monoroute.cli import main

    run = tmp_path / "copy"
    shutil.copytree(analysed_runs[0], run, ignore=shutil.ignore_patterns("analysis", ".analysis-work"))
    (run / ".analysis-work").write_text("a file where the work folder goes")
    assert main(["analyze", str(run), "--tokens", "4096", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("monoroute: error: cannot write the analysis to")
    assert not (run / "analysis").exists()
