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
    erase: int = 32  # facts erased (those known on both selection prompts)
    edit: int = 8
    max_units: int = 2048
    controls: int = 50  # other people's facts whose log p drop is the erase's specificity
    selectivity: bool = True  # where facts live (lookup positions) and entity selectivity
    lookup_facts: int = 600
    quantile: float = 0.99  # a dense neuron "fires" at its own quantile of the lookup positions
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
    from monoroute.facts.lookup import where_facts_live
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
    untrained, floor_of = untrained_subject(loaded, opts, world)
    report["untrained"] = floor_of
    for key, family in (("recall", "train"), ("recall_heldout", "heldout"), ("recall_qa", "qa")):
        if family not in world.families():
            continue
        fam_facts = facts if family != "qa" else [(p, a) for p, a in facts if p not in world.qa_seen]
        report[key] = recall(subject, world, fam_facts, family)
    report["recall"]["untrained_accuracy"] = recall(untrained, world, facts, "train")["accuracy"]
    report["bits_per_param"] = report["recall"]["bits_above_prior"] / report["params"]
    report["bits_per_flop"] = report["recall"]["bits_above_prior"] / report["flops_per_token"]
    erase_facts = sample_facts(world, opts.erase * 3, opts.seed + 1)  # some are not known; erase the first known
    erased = erase(subject, world, erase_facts, opts.max_units, n_other=opts.controls, seed=opts.seed,
                   stop_after=opts.erase) if opts.erase else None
    report["erase"] = erased
    report["edit"] = edit(subject, world, erased["facts"], opts.edit, seed=opts.seed) if erased and opts.edit else None
    if opts.selectivity:
        lookup_facts = sample_facts(world, opts.lookup_facts, opts.seed + 2)
        report["lookup"] = where_facts_live(subject, world, lookup_facts, opts.quantile, seed=opts.seed)
        report["lookup_untrained"] = where_facts_live(untrained, world, lookup_facts, opts.quantile, n_perm=1,
                                                      seed=opts.seed)
        report["selectivity"] = selectivity(subject, world)
        report["selectivity_floor"] = {"of": floor_of, **strip_lists(selectivity(untrained, world))}
    else:
        report["lookup"] = report["lookup_untrained"] = report["selectivity"] = report["selectivity_floor"] = None
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





def untrained_subject(loaded, opts: EvalOptions, world):
    """The same unit set *untrained*: the model's own units at the run's initialisation (its config and
    seed), or an untrained SAE / transcoder of the same width, k and seed spliced into the trained model.
    Every reading is also taken on it (recall, where facts live, selectivity): sparse sets look
    person-selective by chance more often than dense ones, so only the excess over this floor is evidence.
    Returns (Subject, its name)."""
    import torch

    from monoroute.facts.measure import Subject
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
        return Subject(model, loaded.tokenizer, [baseline_site(model, init)]), f"{opts.baseline}_init"
    from monoroute.models import GPT

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.train.seed)  # the trainer builds the model right after this seed
        untrained = GPT(cfg.model).to(next(model.parameters()).device).eval()
    untrained.requires_grad_(False)
    return Subject(untrained, loaded.tokenizer, model_sites(untrained)), "random_init"


def strip_lists(selectivity: dict) -> dict:
    lists = ("unit_people", "person_best_unit")
    return {name: {k: v for k, v in site.items() if k not in lists} for name, site in selectivity.items()}


def baseline_layer(cfg, opts: EvalOptions) -> int:
    layer = cfg.model.n_layer // 2 if opts.layer is None else opts.layer
    if not 0 <= layer < cfg.model.n_layer:
        raise MonorouteError(f"--layer {layer} is not a layer of this run (0..{cfg.model.n_layer - 1})")
    return layer


def check_context(world, tokenizer, block_size: int, run: str) -> None:
    """Every query with its longest candidate must fit the model's context (one clear line if not)."""
    from monoroute.facts.score import encode_query

    longest = 0
    for p in range(world.n_people):
        for a in range(len(world.attributes)):
            for family in world.families():
                for t in range(len(world.attributes[a].templates)) if family == "train" else [None]:
                    enc = encode_query(tokenizer, world.query(p, a, family, template=t))
                    longest = max(longest, len(enc.prompt) + max(map(len, enc.candidates)))
    if longest - 1 > block_size:
        raise MonorouteError(f"{run}'s context is {block_size} tokens but the longest fact query needs {longest - 1}; "
                             f"train it with --block-size {longest} or more")


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
