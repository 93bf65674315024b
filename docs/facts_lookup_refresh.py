"""Re-read "where facts live" (facts/lookup.py) into finished `facts eval` reports, in place.

    python docs/facts_lookup_refresh.py runs/f2/d4-p25 runs/f2/r-p25 ...

For reports written before a lookup reading was added (the dedication at the prompt's end): recomputes report["lookup"] and report["lookup_untrained"] with the report's own options
(facts sample, quantile, seed) and rewrites RUN/facts/units.json atomically; nothing else changes.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from monoroute.data.facts import FactsWorld
from monoroute.facts.lookup import where_facts_live
from monoroute.facts.measure import Subject, sample_facts
from monoroute.facts.run import EvalOptions, check_facts_run, untrained_subject
from monoroute.facts.sites import model_sites
from monoroute.fileio import write_json_atomic
from monoroute.train.trainer import load, read_run_config


def refresh(run: str) -> None:
    path = Path(run) / "facts" / "units.json"
    report = json.loads(path.read_text())
    opts = EvalOptions(**{k: v for k, v in report["options"].items() if k in EvalOptions.__dataclass_fields__})
    world = FactsWorld(check_facts_run(read_run_config(run), run))
    loaded = load(run, opts.device)
    model = loaded.model.eval()
    model.requires_grad_(False)
    subject = Subject(model, loaded.tokenizer, model_sites(model))
    untrained, _ = untrained_subject(loaded, opts, world)
    facts = sample_facts(world, opts.lookup_facts, opts.seed + 2)
    report["lookup"] = where_facts_live(subject, world, facts, opts.quantile, seed=opts.seed)
    report["lookup_untrained"] = where_facts_live(untrained, world, facts, opts.quantile, n_perm=1, seed=opts.seed)
    write_json_atomic(path, report)
    print(run, report["lookup"]["all_sites"]["dedicated_facts_share_prompt_end"])


if __name__ == "__main__":
    for r in sys.argv[1:]:
        refresh(r)
