"""`facts eval` on a run directory: load, pick the unit set, measure, write RUN/facts/<units>.json."""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

from monoroute.errors import MonorouteError

OUT_DIR = "facts"


@dataclass
class EvalOptions:
    facts: int | None = 1200  # facts scored for recall (None: all)
    erase: int = 48
    edit: int = 32
    max_units: int = 2048
    selectivity: bool = True
    baseline: str | None = None  # None (the model's own units) | "sae" | "transcoder"
    layer: int | None = None
    latents: int = 4096
    latent_k: int = 32
    baseline_tokens: int | None = None
    seed: int = 0
    device: str = "cpu"


def check_facts_run(cfg, run: str):
    from monoroute.data.facts import PREFIX, FactsSpec

    source = cfg.data.source
    if not source.startswith(PREFIX):
        raise MonorouteError(f"{run} was trained on {source!r}, not a facts corpus; facts eval needs a run "
                             f"trained with --data facts:people=P,exposures=E (see `monoroute facts make --help`)")
    return FactsSpec.parse(source)


def report_name(opts: EvalOptions) -> str:
    return f"{opts.baseline}.json" if opts.baseline else "units.json"


def evaluate_run(run: str, opts: EvalOptions) -> dict:
    from monoroute.data.facts import FactsWorld
    from monoroute.facts.measure import Subject, edit, erase, recall, sample_facts, selectivity
    from monoroute.facts.sites import baseline_site, model_sites
    from monoroute.fileio import check_writable, write_json_atomic
    from monoroute.tables import peak_rss_mb
    from monoroute.train.trainer import load, read_run_config

    start = time.perf_counter()
    spec = check_facts_run(read_run_config(run), run)
    out = Path(run) / OUT_DIR
    check_writable(out, "the facts report")
    loaded = load(run, opts.device)
    model = loaded.model.eval()
    model.requires_grad_(False)
    world = FactsWorld(spec)
    check_context(world, loaded.tokenizer, model.cfg.block_size, run)
    sites = model_sites(model)
    baseline_info = None
    if opts.baseline:
        base = train_baseline(loaded, opts)
        sites = [baseline_site(model, base)]
        baseline_info = {"kind": base.name, "layer": base.layer, "n_latents": base.n_latents, "k": base.k,
                         **base.train_info}
    subject = Subject(model, loaded.tokenizer, sites)
    facts = sample_facts(world, opts.facts, opts.seed)
    report = {"run": str(run), "step": loaded.step, "spec": spec.text(), "options": asdict(opts),
              "units": sites[0].kind, "sites": [s.label for s in sites], "baseline": baseline_info,
              "params": model.n_params(), "flops_per_token": model.flops_per_token()["total"]}
    report["recall"] = recall(subject, world, facts, "train")
    report["recall_heldout"] = recall(subject, world, facts, "heldout")
    report["bits_per_param"] = report["recall"]["bits"] / report["params"]
    report["bits_per_flop"] = report["recall"]["bits"] / report["flops_per_token"]
    erase_facts = sample_facts(world, opts.erase * 3, opts.seed + 1)  # ~1/3 may not be known; erase the first known
    erased = erase(subject, world, erase_facts, opts.max_units, seed=opts.seed) if opts.erase else None
    if erased:
        erased = trim(erased, opts.erase)
    report["erase"] = erased
    report["edit"] = edit(subject, world, erased["facts"], opts.edit, seed=opts.seed) if erased and opts.edit else None
    report["selectivity"] = selectivity(subject, world) if opts.selectivity else None
    report["selectivity_floor"] = floor_selectivity(loaded, opts, world) if opts.selectivity else None
    report["seconds"] = round(time.perf_counter() - start, 1)
    report["peak_rss_mb"] = peak_rss_mb()
    write_json_atomic(out / report_name(opts), report)
    refresh_analysis_page(Path(run))
    return report


def refresh_analysis_page(run: Path) -> None:
    """An analysed run's report.html gets (or updates) its facts section."""
    import json

    from monoroute.fileio import write_text_atomic
    from monoroute.interp.report import build_html, run_circuits, run_facts

    analysis = run / "analysis" / "report.json"
    if not analysis.is_file():
        return
    try:
        page = build_html(json.loads(analysis.read_text("utf-8")), run_circuits(run), run_facts(run))
    except (json.JSONDecodeError, KeyError):
        return  # an old or broken analysis: its page stays as it was; facts/*.json has the results
    write_text_atomic(analysis.parent / "report.html", page)





def floor_selectivity(loaded, opts: EvalOptions, world) -> dict:
    """Selectivity of the same unit set *untrained*, on the same sentences: the model's own units at the
    run's initialisation (its config and seed), or an untrained SAE / transcoder of the same width, k and
    seed reading the trained model. Sparse sets are person-selective by chance more often than dense ones
    (a unit that fires 20 times can have most of them on one person), so only the excess is evidence.
    {"of": the floor's name, then selectivity()'s per-site numbers without the unit and person lists}."""
    import torch

    from monoroute.facts.measure import Subject, selectivity
    from monoroute.facts.sites import baseline_site, model_sites

    model, cfg = loaded.model, loaded.config
    if opts.baseline:
        from monoroute.interp import baselines as B

        layer = baseline_layer(cfg, opts)
        if opts.baseline == "sae":
            from monoroute.data import prepare_data

            init = B.init_sae(model, prepare_data(cfg.data), layer, opts.latents, opts.latent_k, seed=opts.seed,
                              device=opts.device)
        else:
            init = B.init_transcoder(model, layer, opts.latents, opts.latent_k, opts.seed, opts.device)
        subject, of = Subject(model, loaded.tokenizer, [baseline_site(model, init)]), f"{opts.baseline}_init"
    else:
        from monoroute.models import GPT

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.train.seed)  # the trainer builds the model right after this seed
            untrained = GPT(cfg.model).to(next(model.parameters()).device).eval()
        untrained.requires_grad_(False)
        subject, of = Subject(untrained, loaded.tokenizer, model_sites(untrained)), "random_init"
    lists = ("unit_people", "person_best_unit")
    per_site = {name: {k: v for k, v in site.items() if k not in lists}
                for name, site in selectivity(subject, world).items()}
    return {"of": of, **per_site}


def baseline_layer(cfg, opts: EvalOptions) -> int:
    layer = cfg.model.n_layer // 2 if opts.layer is None else opts.layer
    if not 0 <= layer < cfg.model.n_layer:
        raise MonorouteError(f"--layer {layer} is not a layer of this run (0..{cfg.model.n_layer - 1})")
    return layer


def check_context(world, tokenizer, block_size: int, run: str) -> None:
    """Every query with its longest candidate must fit the model's context (one clear line if not)."""
    from monoroute.data.facts import ATTRIBUTES
    from monoroute.facts.score import encode_query

    longest = 0
    for p in range(world.n_people):
        for a in range(len(ATTRIBUTES)):
            for family in ("train", "heldout"):
                for t in range(len(ATTRIBUTES[a].templates)) if family == "train" else [None]:
                    enc = encode_query(tokenizer, world.query(p, a, family, template=t))
                    longest = max(longest, len(enc.prompt) + max(map(len, enc.candidates)))
    if longest - 1 > block_size:
        raise MonorouteError(f"{run}'s context is {block_size} tokens but the longest fact query needs {longest - 1}; "
                             f"train it with --block-size {longest} or more")


def trim(erased: dict, n: int) -> dict:
    """The erase summary recomputed over the first n tried facts."""
    from monoroute.facts.measure import summarise_erase

    return summarise_erase(erased["facts"][:n], erased["max_units"])


def train_baseline(loaded, opts: EvalOptions):
    from monoroute.data import prepare_data
    from monoroute.interp.baselines import SAE_TOKENS, TRANSCODER_TOKENS, train_sae, train_transcoder

    model, cfg = loaded.model, loaded.config
    if model.routed_layers():
        raise MonorouteError(f"--{opts.baseline} reads a dense run's layer; {loaded.run_dir} is routed")
    layer = baseline_layer(cfg, opts)
    store = prepare_data(cfg.data)
    model.requires_grad_(False)
    if opts.baseline == "sae":
        return train_sae(model, store, layer, opts.latents, opts.latent_k, opts.baseline_tokens or SAE_TOKENS,
                         seed=opts.seed, device=opts.device, progress=False)
    return train_transcoder(model, store, layer, opts.latents, opts.latent_k,
                            opts.baseline_tokens or TRANSCODER_TOKENS, seed=opts.seed, device=opts.device,
                            progress=False)
