"""`monoroute facts make SPEC --out DIR` and `monoroute facts eval RUN`.

    monoroute facts make people=500,exposures=100 --out corpus/   # the text and its ground truth
    monoroute train --preset facts --data facts:people=500,exposures=100 --out runs/f
    monoroute facts eval runs/f [--sae | --transcoder] [--json]   # writes runs/f/facts/<units>.json
"""
from __future__ import annotations

import json
from pathlib import Path

from monoroute.errors import MonorouteError


def add_parser(sub) -> None:
    p = sub.add_parser("facts", help="the synthetic-knowledge corpus: make it, or measure a run on it")
    fsub = p.add_subparsers(dest="facts_command", required=True)
    m = fsub.add_parser("make", help="write a facts corpus and its ground truth to a folder")
    m.add_argument("spec", help="people=P,exposures=E,seed=S[,middle=1] (the facts: prefix is optional)")
    m.add_argument("--out", required=True, help="folder for corpus.txt, truth.json, queries.jsonl, spans.jsonl")
    m.add_argument("--val-fraction", type=float, default=0.05)
    m.set_defaults(func=cmd_make)
    e = fsub.add_parser("eval", help="recall, stored bits, erase, edit and entity selectivity of a run")
    e.add_argument("run")
    e.add_argument("--facts", type=int, default=1200, help="facts scored for recall (default 1200; 0 = all)")
    e.add_argument("--erase", type=int, default=32,
                   help="facts to erase: chosen on two training templates, scored on the rest (default 32)")
    e.add_argument("--edit", type=int, default=8, help="erased facts to edit (default 8)")
    e.add_argument("--max-units", type=int, default=2048, help="largest erase set tried (default 2048)")
    e.add_argument("--controls", type=int, default=50,
                   help="other people's facts in erase's specificity (mean log p drop; default 50)")
    e.add_argument("--lookup-facts", type=int, default=600,
                   help="facts whose renderings are read at the value-lookup positions (default 600)")
    e.add_argument("--quantile", type=float, default=0.99,
                   help="a dense neuron fires at or above this quantile of its own activations (default 0.99)")
    e.add_argument("--no-selectivity", action="store_true", help="skip where facts live and entity selectivity")
    e.add_argument("--sae", action="store_true", help="measure a TopK SAE (sae-lens) spliced into a dense run")
    e.add_argument("--transcoder", action="store_true", help="measure a TopK transcoder spliced into a dense run")
    e.add_argument("--layer", type=int, help="the layer of --sae / --transcoder (default n_layer // 2)")
    e.add_argument("--latents", type=int, default=4096, help="SAE / transcoder width (default 4096)")
    e.add_argument("--latent-k", type=int, default=32, help="SAE / transcoder top-k (default 32)")
    e.add_argument("--baseline-tokens", type=int, help="SAE / transcoder training tokens (default: their own)")
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--device", default="cpu")
    e.add_argument("--json", action="store_true", help="print the headline numbers as one JSON object")
    e.set_defaults(func=cmd_eval)
    c = fsub.add_parser("plot", help="capacity curve: recall against people, from evaluated runs")
    c.add_argument("runs", nargs="+", help="run directories with RUN/facts/units.json")
    c.add_argument("--label", action="append", default=[], metavar="SUBSTRING=NAME",
                   help="name the curve of runs whose path contains SUBSTRING (first match wins; default: "
                        "the unit kind)")
    c.add_argument("--out", required=True, help="PNG file")
    c.set_defaults(func=cmd_plot)


def cmd_make(args) -> int:
    from monoroute.data.facts import FactsSpec, FactsWorld
    from monoroute.fileio import check_writable, write_json_atomic, write_text_atomic

    spec = FactsSpec.parse(args.spec)
    if not 0 <= args.val_fraction < 1:
        raise MonorouteError(f"--val-fraction must be in [0, 1), got {args.val_fraction}")
    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        what = "is not a folder" if not out.is_dir() else "is not empty"
        raise MonorouteError(f"--out {out} {what}; `facts make` writes corpus.txt, truth.json, queries.jsonl and "
                             f"spans.jsonl into a new or empty folder: choose another --out")
    check_writable(out, "the facts corpus")
    world = FactsWorld(spec)
    texts, spans = [], []
    for key, text in world.documents(args.val_fraction):
        p, e = (int(x[1:]) for x in key.split("/"))
        texts.append(text)
        spans.append(json.dumps({"key": str(key), "split": key.fixed_split, "person": p,
                                 "spans": [list(s) for s in world.biography(p, e)[1]]}))
    truth = {"spec": spec.text(), "attributes": [
        {"name": a.name, "values": list(a.values), "templates": list(a.templates), "heldout": a.heldout,
         "question": a.question}
        for a in world.attributes], "qa_seen": sorted(world.qa_seen),
        "people": [{"name": world.names[p], **{a.name: world.value(p, i) for i, a in enumerate(world.attributes)}}
                   for p in range(world.n_people)]}
    queries = [json.dumps({k: v for k, v in world.query(p, a, f)._asdict().items() if k != "values"})
               for p in range(world.n_people) for a in range(len(world.attributes)) for f in world.families()
               if f != "qa" or p not in world.qa_seen]
    write_text_atomic(out / "spans.jsonl", "\n".join(spans) + "\n")
    write_text_atomic(out / "queries.jsonl", "\n".join(queries) + "\n")
    write_json_atomic(out / "truth.json", truth)
    write_text_atomic(out / "corpus.txt", "\n\n".join(texts) + "\n")  # last: its presence means complete
    print(json.dumps({"out": str(out), "spec": spec.text(), "documents": len(texts),
                      "bytes": sum(len(t) + 2 for t in texts), "people": world.n_people}))
    return 0


def cmd_eval(args) -> int:
    from monoroute.facts.report import headline
    from monoroute.facts.run import EvalOptions, evaluate_run

    if args.sae and args.transcoder:
        raise MonorouteError("pass one of --sae and --transcoder per call (each writes its own report)")
    for name in ("facts", "erase", "edit", "max_units", "latents", "latent_k", "controls", "lookup_facts"):
        if getattr(args, name) < 0:
            raise MonorouteError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    if not 0 < args.quantile < 1:
        raise MonorouteError(f"--quantile must be in (0, 1), got {args.quantile}")
    opts = EvalOptions(facts=args.facts or None, erase=args.erase, edit=args.edit, max_units=args.max_units,
                       controls=args.controls, lookup_facts=args.lookup_facts, quantile=args.quantile,
                       selectivity=not args.no_selectivity,
                       baseline="sae" if args.sae else "transcoder" if args.transcoder else None,
                       layer=args.layer, latents=args.latents, latent_k=args.latent_k,
                       baseline_tokens=args.baseline_tokens, seed=args.seed, device=args.device)
    report = evaluate_run(args.run, opts)
    if args.json:
        print(json.dumps(headline(report)))
    else:
        for key, value in headline(report).items():
            print(f"{key:>32}: {value}")
    return 0


def cmd_plot(args) -> int:
    from monoroute.facts.report import capacity_points, load_facts, plot_capacity, prior_points

    labels = []
    for item in args.label:
        key, eq, name = item.partition("=")
        if not eq:
            raise MonorouteError(f"--label takes SUBSTRING=NAME, got {item!r}")
        labels.append((key, name))
    reports = []
    for run in args.runs:
        own = [r for r in load_facts(run) if r["units"] not in ("sae", "transcoder")]
        if not own:
            raise MonorouteError(f"{run} has no facts report; run `monoroute facts eval {run}` first")
        reports.append(own[0])

    def label_of(rep):
        return next((name for key, name in labels if key in rep["run"]), rep["units"])

    curves = capacity_points(reports, label_of)
    prior = prior_points(reports)
    plot_capacity(curves, args.out, prior)
    print(json.dumps({"out": args.out, "curves": curves, "person_blind": prior}))
    return 0
