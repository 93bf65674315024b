"""Which circuit tasks a model can do along its training (docs/circuits.md, "capable models").

The trainer keeps only its latest checkpoint, so the run's checkpoints were copied as they were
written (each with its checkpoint.json, config.json and tokenizer.json) into SNAPS/step-N. For each
copy: every task's loss on the split that `monoroute circuits` chooses K on (the model unmasked, which
equals every node kept; tests/test_circuits.py), and the tasks at or under the target.

    python docs/task_curve.py runs/py/dense-long-snaps runs/py/dense-long [--target 0.15] > curve.json
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from monoroute.circuits.run import facts_world
from monoroute.circuits.search import make_batch, task_loss
from monoroute.circuits.tasks import select_tasks
from monoroute.train.rundir import read_metrics
from monoroute.train.trainer import load


def task_losses(run: Path, pairs: int = 48) -> tuple[int, dict[str, float]]:
    loaded = load(run, "cpu")
    model = loaded.model.eval()
    out = {}
    for task in select_tasks([], facts_world(loaded.config)):
        _, choose, _ = task.splits(pairs, 3, seed=0, max_prompt_bytes=model.cfg.block_size - 1)
        with torch.no_grad():
            out[task.name] = task_loss(model, make_batch(choose, loaded.tokenizer)).item()
    return loaded.step, out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("snaps")
    ap.add_argument("run", help="the run itself (its metrics.jsonl gives each step's val loss)")
    ap.add_argument("--target", type=float, default=0.15)
    args = ap.parse_args()
    val = {r["step"]: r["val_loss"] for r in read_metrics(Path(args.run)) if "val_loss" in r}
    rows = []
    for snap in sorted(Path(args.snaps).glob("step-*"), key=lambda p: int(p.name.split("-")[1])):
        step, losses = task_losses(snap)
        doable = sorted(n for n, v in losses.items() if v <= args.target)
        rows.append({"step": step, "val_loss": val.get(step), "doable": len(doable), "of": len(losses),
                     "tasks": doable, "losses": {k: round(v, 4) for k, v in losses.items()}})
    print(json.dumps({"run": args.run, "target": args.target, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
