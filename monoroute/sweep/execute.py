"""Run a planned sweep: for each run, train (or resume, or skip), evaluate, analyse, then record.

Training goes through `trainer.train`, the function `monoroute train` calls, so a sweep's run
directory is an ordinary run: `monoroute eval/analyze/sample/train --resume` all work on it. After
every run sweep.json and sweep.csv are replaced atomically, so a killed sweep loses at most the run
in progress, and running the same command again picks up where it stopped.

What a re-run reuses, and why it is safe:
- a finished run (checkpoint at the spec's steps, same config) is not trained again;
- its evaluation, when the previous sweep.json recorded one for the same checkpoint (step + model sha256);
- its analysis, when OUT/NAME/analysis/ holds the marker this sweep wrote beside the report naming that
  checkpoint, token count, SAE setting and analyze_options. `monoroute analyze` replaces the whole analysis folder,
  so an analysis made by hand (possibly with other settings) has no marker and is redone.
"""
from __future__ import annotations

import contextlib
import json
import sys
import time
from pathlib import Path

from monoroute.errors import MonorouteError
from monoroute.fileio import write_json_atomic
from monoroute.interp import analyze as A
from monoroute.sweep import results as R
from monoroute.sweep.plan import Planned
from monoroute.sweep.plots import plot_all
from monoroute.sweep.spec import SweepSpec
from monoroute.train import trainer
from monoroute.train.checkpoint import MODEL_FILE, current_checkpoint
from monoroute.train.evaluation import eval_report
from monoroute.train.rundir import RunLock

LOCK_FILE = "sweep.lock"
MARKER = "sweep-request.json"  # inside OUT/NAME/analysis/: what that analysis was made from


class SweepLock(RunLock):
    """One sweep per sweep directory (the trainings inside take their own run locks too)."""

    def __init__(self, out: Path) -> None:
        super().__init__(out)
        self.path = self.out / LOCK_FILE

    def refuse(self, owner: dict) -> MonorouteError:
        return MonorouteError(f"sweep directory {self.out} is in use by another sweep (pid {owner.get('pid', '?')}); "
                              f"wait for it or pick another --out (if no such process exists, delete {self.path})")


def log(message: str) -> None:
    print(f"monoroute sweep: {message}", file=sys.stderr, flush=True)


def read_previous(out: Path) -> dict[str, dict]:
    """The entries of the sweep.json an earlier invocation left, by run name ({} if none)."""
    path = out / R.JSON_FILE
    if not path.is_file():
        return {}
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
        return {e["name"]: e for e in doc.get("runs", []) if isinstance(e, dict) and "name" in e}
    except (json.JSONDecodeError, AttributeError, TypeError):
        raise MonorouteError(f"{path} is not a sweep record (not valid JSON); delete it (the runs are kept and "
                             f"reused) and run the sweep again") from None


def checkpoint_identity(run_dir: Path) -> dict:
    ckpt = current_checkpoint(run_dir)
    if ckpt is None:
        raise MonorouteError(f"{run_dir} has no checkpoint after training; run the sweep again")
    return {"step": ckpt.step, "model_sha256": ckpt.sha.get(MODEL_FILE)}


def pending_entry(p: Planned) -> dict:
    return {"name": p.run.name, "status": "pending", "action": p.action, "analyze": p.run.analyze, "sae": p.run.sae,
            "overrides": p.run.overrides, "config": R.key_settings(p.config), "sizes": p.sizes}


def run_sweep(spec: SweepSpec, planned: list[Planned], out: Path, progress: bool = True) -> dict:
    """Execute every planned run in spec order; returns the final sweep document (also on disk)."""
    out = Path(out)
    lock = SweepLock(out).acquire()
    try:
        previous = read_previous(out)
        entries = [pending_entry(p) for p in planned]
        for i, p in enumerate(planned):
            log(f"[{i + 1}/{len(planned)}] {p.run.name}: " + {
                "train": "training", "resume": f"resuming from step {p.step}",
                "skip": f"finished at step {p.step}, not trained again"}[p.action])
            entries[i] = run_one(spec, p, out, previous.get(p.run.name), progress)
            R.write_results(out, R.document(spec, out, entries))
        doc = R.document(spec, out, entries)
        plot_all(doc["rows"], out)
        return doc
    finally:
        lock.release()


def run_one(spec: SweepSpec, p: Planned, out: Path, previous: dict | None, progress: bool) -> dict:
    run_dir = out / p.run.name
    seconds = {}
    t0 = time.perf_counter()
    if p.action != "skip":
        # stdout is the sweep's own (--json prints one object there); the trainer's banner goes to stderr
        with contextlib.redirect_stdout(sys.stderr):
            trainer.train(p.config, resume=p.action == "resume", show_progress=progress)
        seconds["train"] = round(time.perf_counter() - t0, 1)
    identity = checkpoint_identity(run_dir)
    device = p.config.train.device
    t0 = time.perf_counter()
    if previous and previous.get("checkpoint") == identity and previous.get("eval"):
        ev = previous["eval"]
    else:
        ev = eval_report(run_dir, device)
        ev["tokens_per_s"] = A.median_tokens_per_s(run_dir)
        seconds["eval"] = round(time.perf_counter() - t0, 1)
    analysis = None
    if p.run.analyze:
        t0 = time.perf_counter()
        request = {**identity, "tokens": spec.analyze_tokens, "sae": p.run.sae, **spec.analyze_options}
        report = reusable_analysis(run_dir, request)
        if report is None:
            with_sae = " (with the SAE baseline)" if p.run.sae else ""
            log(f"{p.run.name}: analysing {spec.analyze_tokens} tokens{with_sae}")
            with contextlib.redirect_stdout(sys.stderr):
                report = A.analyze(run_dir, A.AnalyzeOptions(tokens=spec.analyze_tokens, sae=p.run.sae, device=device,
                                                             progress=progress, **spec.analyze_options))
            write_json_atomic(run_dir / A.OUT_DIR / MARKER, request)
            seconds["analyze"] = round(time.perf_counter() - t0, 1)
        else:
            log(f"{p.run.name}: analysis reused")
        analysis = R.analysis_numbers(report)
    entry = pending_entry(p)
    entry.update(status="done", checkpoint=identity, eval=ev, analysis=analysis, seconds=seconds)
    return entry


def reusable_analysis(run_dir: Path, request: dict) -> dict | None:
    """The run's analysis report if this sweep made it from the current checkpoint with the same
    settings; None otherwise (or when it is unreadable: it is redone, never trusted half-read)."""
    folder = run_dir / A.OUT_DIR
    try:
        marker = json.loads((folder / MARKER).read_text(encoding="utf-8"))
        if marker != request:
            return None
        return json.loads((folder / "report.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
