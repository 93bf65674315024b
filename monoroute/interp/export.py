"""`monoroute export RUN --format FORMAT --out DIR`: a run's units and analysis in formats other tools read.

Formats, and who reads them:

- `saelens`: weights for SAELens (`sae_lens.SAE.load_from_disk(DIR/<set>-L<layer>)`), and so for
  everything built on it (SAEDashboard, circuit tools, HookedSAETransformer). One folder per
  exported dictionary, `DIR/<set>-L<layer>/{cfg.json, sae_weights.safetensors}`, in sae-lens 6's
  inference layout (architecture "topk": W_enc (d_in, N), b_enc (N,), W_dec (N, d_out), b_dec (d_out,)):

    sae-L<l>            the post-hoc TopK SAE (RUN/analysis/sae/, rebuilt from baseline.json +
                        baseline.safetensors alone). Exactly sae-lens's TopKSAE: it reads and
                        reconstructs `blocks.<l>.mlp.hook_post`.
    transcoder-L<l>     the post-hoc TopK transcoder (RUN/analysis/transcoder/): x = ln_2(resid_mid)
                        -> top-k ReLU latents -> mlp_out. W_enc = ffn.w_in.T, b_enc = ffn.b_in,
                        W_dec = ffn.w_out, b_dec = b_out.
    routed_units-L<l>   every routed layer with the *dense* router: a RoutedFFN(router="dense",
                        activation="relu") is exactly a TopK transcoder (top-k of all N
                        pre-activations w_in·x + b_in, ReLU, no gate, y = Σ h_i w_out[i], no output
                        bias): the same mapping with b_dec = 0. Its latents are the layer's
                        `blocks.<l>.mlp.hook_post` units, one for one.

  Why transcoders are stored as architecture "topk": sae-lens 6.54 has no TopK transcoder class.
  Its `Transcoder`/`SkipTranscoder` apply a ReLU to all N latents and `JumpReLUTranscoder` a fixed
  per-latent threshold; none keeps only the k largest, so none computes our transcoder. sae-lens's
  `TopKSAE` with apply_b_dec_to_input=False does compute it exactly (d_in = d_out = d_model here):
  encode = ReLU(top-k(x @ W_enc + b_enc)), decode = acts @ W_dec + b_dec. Its decode is a
  *prediction of hook_name_out*, not a reconstruction of hook_name, which cfg.json says in
  metadata.hook_name_out and metadata.monoroute.note: do not splice it in at hook_name as an SAE.
  The input hook is TransformerLens's `blocks.<l>.ln2.hook_normalized` (the FFN's input with
  ln_2's weight and bias applied, i.e. fold_ln=False); monoroute's GPT has no hook point there, so
  feed it `model.blocks[l].ln_2(blocks.<l>.hook_resid_mid)`.

  Product-key routed layers pick their units by a separate query over sub-keys, not by top-k of
  the units' own pre-activations, so no SAELens SAE computes them: asked for with
  `--set routed_units` they are an error, otherwise they are skipped with a printed note. A layer
  whose activation is not ReLU is refused the same way (sae-lens's TopK applies ReLU).

- `parquet` / `csv`: the analysis tables for pandas, polars, DuckDB, spreadsheets. One file per
  table, one row per record, these columns in this order (null where report.json has no value):

    unit_sets.<ext>     per unit set (random_init is the floor): unit_set, layer, n_units, k, l0,
                        live_slot_fraction, dead_fraction, coverage, mean_purity, mean_purity_null,
                        share_pure, share_pure_null, sparse_probe_f1, sparse_probe_f1_top1,
                        explanation_f1, explained_variance, mse, clean_val_loss, spliced_val_loss,
                        zero_ablation_val_loss, loss_recovered, train_tokens
                        (report.json unit_sets; the last seven only for post-hoc baselines)
    coverage.<ext>      per (unit set, concept): unit_set, concept, frequency, n_positives,
                        best_unit, f1, precision, recall, threshold
                        (report.json unit_sets[*].details.coverage.per_concept)
    per_layer.<ext>     per (layer, unit set): layer, unit_set, n_positions, n_units, k, l0,
                        live_slot_fraction, dead_fraction, n_live, n_dead, min_firings,
                        share_live_frequent, then coverage ... explanation_f1 as in unit_sets
                        for layers scored with --all-layers (null otherwise; the headline
                        layer's scores are in unit_sets) (report.json per_layer)
    interventions.<ext> per (concept, unit, kind): concept, layer, unit, kind, value, kl,
                        kl_concept, kl_elsewhere, kl_ratio, dloss, dloss_concept, dloss_elsewhere,
                        specificity, n_concept, n_elsewhere, then any other scalar key a newer
                        `analyze` adds, by name (report.json interventions; empty when none ran)
    units/<set>.<ext>   when `analyze` wrote RUN/analysis/units/<set>.parquet: one row per unit,
                        its columns as written (unit, n_firings, density, max_act, mean_act, purity,
                        best_concept, lift, f1_concept, f1, top_tokens, explanation, explanation_f1;
                        see unit_table.py)

- `neuronpedia`: per-unit feature dashboards as JSON for Neuronpedia and SAEDashboard-style
  viewers. `DIR/<set>/<unit>.json` is one feature with Neuronpedia's own field names (modelId,
  layer = source id "<layer>-<set>", index, hookName, maxActApprox, frac_nonzero, pos_str /
  pos_values and neg_str / neg_values (the unit's direct logit effect: boosted / suppressed
  tokens), freq_hist_data_bar_heights / _values (histogram of its nonzero activations: counts, bin
  centres), activations [{tokens, values, maxValue, maxValueTokenIndex, minValue, binMin, binMax,
  binContains}] (top contexts: binMin -1, as SAEDashboard's "TOP ACTIVATIONS"; then samples from
  activation quantile bands), explanations [{description, typeName, explanationModelName,
  scores}]) plus a "monoroute" object (set, layer, n_firings, density, best concepts, the unit
  table row). `DIR/<set>/batch-0.json` holds the same features in SAEDashboard's Neuronpedia batch
  layout ({model_id, layer, sae_set, features: [{feature_index, pos_str, ..., activations:
  [{bin_min, bin_max, bin_contains, tokens, values}]}]}), and `DIR/index.json` lists sets and units.

- `html`: a static site for a browser, no server and no network: `DIR/index.html` lists the
  exported units of each set (with their unit-table columns), `DIR/<set>/unit-<unit>.html` is one
  dashboard (tokens shaded by activation, the value on hover), drawn by report.py's
  `dashboard_html`, with inline styles only.

  Dashboards come from `AnalysisStore` (RUN/analysis/ as `monoroute analyze` writes it). Units:
  the `--units N` (default 200) units of each set with the most firings (never-firing units left
  out), plus the unit coverage names best for each concept.

Every format writes DIR/manifest.json (format, run, files, notes). Bad input is one
`MonorouteError` line before anything is written; the export is built in a temporary folder beside
DIR and renamed into place at the end, so DIR never holds half an export. Weights are safetensors,
configs JSON; nothing is pickled.
"""
from __future__ import annotations

import html
import math
import os
import shutil
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from monoroute.errors import MonorouteError
from monoroute.interp.store import per_concept_rows

FORMATS = ("saelens", "parquet", "csv", "neuronpedia", "html")
MODEL_NAME = "monoroute"
DEFAULT_UNITS = 200
SAELENS_SETS = ("sae", "transcoder", "routed_units")
SAE_LENS_CFG = "cfg.json"  # sae_lens.constants.SAE_CFG_FILENAME
SAE_LENS_WEIGHTS = "sae_weights.safetensors"  # sae_lens.constants.SAE_WEIGHTS_FILENAME
SAE_LENS_MIN_VERSION = "6.0.0"  # cfg.json follows sae-lens 6's layout (older versions are converted on load)
MANIFEST = "manifest.json"
OWN_SETS = ("routed_units", "dense_neurons")  # the model's own units (interventions are about them)

TRANSCODER_NOTE = (
    "A TopK transcoder: encode reads metadata.hook_name, decode predicts metadata.hook_name_out (it is not a "
    "reconstruction of hook_name). sae-lens has no TopK transcoder class (Transcoder/SkipTranscoder apply ReLU to "
    "all latents, JumpReLUTranscoder a fixed per-latent threshold, none keeps only the top k), so it is stored as "
    "architecture 'topk' with apply_b_dec_to_input=false, whose encode ReLU(top-k(x @ W_enc + b_enc)) and decode "
    "acts @ W_dec + b_dec compute exactly this transcoder. Do not splice it in at hook_name as an SAE, and do not "
    "use use_error_term (x - decode(encode(x)) mixes two hook points).")


# --- command line ----------------------------------------------------------------------------------
def add_parser(sub) -> None:
    p = sub.add_parser("export", help="write a run's units and analysis as SAELens weights, parquet/csv tables, "
                                      "Neuronpedia JSON or a static HTML site")
    p.add_argument("run")
    # No argparse `choices`: an unknown format gets the same one-line error as every other bad input.
    p.add_argument("--format", required=True, help=f"one of {', '.join(FORMATS)}")
    p.add_argument("--out", required=True, help="output folder; must be empty or missing unless --overwrite")
    p.add_argument("--set", dest="set_name", metavar="NAME",
                   help="only this unit set (saelens: sae, transcoder or routed_units; others: a set of the analysis)")
    p.add_argument("--layer", type=int, help="saelens only: only the dictionaries of this layer")
    p.add_argument("--units", type=int, help=f"neuronpedia/html: the N most-firing units per set, plus each "
                                             f"concept's best unit (default {DEFAULT_UNITS})")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=cmd_export)


def cmd_export(args) -> int:
    result = export(args.run, args.format, args.out, set_name=args.set_name, layer=args.layer, units=args.units,
                    overwrite=args.overwrite, device=args.device)
    for note in result.notes:
        print(f"note: {note}")
    print(f"wrote {len(result.files)} files ({args.format}) to {result.out}")
    return 0


@dataclass
class ExportResult:
    out: Path
    files: list[str] = field(default_factory=list)  # paths relative to `out`
    notes: list[str] = field(default_factory=list)


def export(run: str | Path, fmt: str, out: str | Path, *, set_name: str | None = None, layer: int | None = None,
           units: int | None = None, overwrite: bool = False, device: str = "cpu") -> ExportResult:
    """Write RUN's `fmt` export into `out` (see the module docstring). Bad input is refused before
    anything is written; a failure while writing leaves `out` as it was."""
    run, out = Path(run), Path(out)
    if fmt not in FORMATS:
        raise MonorouteError(f"unknown --format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if not run.is_dir():
        raise MonorouteError(f"run directory {run} does not exist; pass a folder written by `monoroute train`")
    if layer is not None and fmt != "saelens":
        raise MonorouteError(f"--layer selects SAELens dictionaries; --format {fmt} exports the analysed layer "
                             f"(run `monoroute analyze {run} --layer L` to analyse another one)")
    if units is not None and fmt not in ("neuronpedia", "html"):
        raise MonorouteError(f"--units picks dashboards; it applies to --format neuronpedia or html, not {fmt}")
    if units is not None and units < 0:
        raise MonorouteError(f"--units must be 0 or more, got {units}; e.g. --units {DEFAULT_UNITS}")
    check_out(run, out, overwrite)
    result = ExportResult(out)
    # Gather everything (loading weights, reading the analysis) before writing, so bad input
    # fails with nothing on disk; then write it all into a temporary folder and rename it in.
    if fmt == "saelens":
        items = saelens_items(run, set_name, layer, device, result.notes)
        write = lambda tmp: write_saelens(items, tmp)  # noqa: E731
    elif fmt in ("parquet", "csv"):
        tables = analysis_tables(run, set_name)
        write = lambda tmp: write_tables(tables, tmp, fmt)  # noqa: E731
    else:
        store = open_store(run, device)
        sets = store_sets(store, set_name)
        n = DEFAULT_UNITS if units is None else units
        writer = write_neuronpedia if fmt == "neuronpedia" else write_html
        write = lambda tmp: writer(store, sets, n, tmp, run)  # noqa: E731
    with staged(out) as tmp:
        result.files = write(tmp)
        manifest = {"format": fmt, "run": str(run.resolve()), "files": sorted(result.files), "notes": result.notes}
        _write_json(tmp / MANIFEST, manifest)
        result.files.append(MANIFEST)
    return result


# --- the output folder -------------------------------------------------------------------------------
def check_out(run: Path, out: Path, overwrite: bool) -> None:
    """`out` must be missing, an empty folder, or (with --overwrite) a folder we may replace, and
    never one whose replacement would delete the run or its analysis."""
    target, run_abs = out.resolve(), run.resolve()
    protected = [run_abs / "analysis", run_abs / "checkpoints"]
    if target == run_abs or run_abs.is_relative_to(target) or any(target.is_relative_to(p) for p in protected):
        raise MonorouteError(f"--out {out} would overwrite the run or its analysis; choose a folder outside "
                             f"{run}/analysis and {run}/checkpoints, e.g. {run}/exports/NAME")
    if out.exists() and not out.is_dir():
        raise MonorouteError(f"--out {out} is a file; pass a folder (missing or empty)")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise MonorouteError(f"--out {out} exists and is not empty; pass --overwrite to replace it, or choose "
                             f"another folder")


@contextmanager
def staged(out: Path):
    """`with staged(out) as tmp:` yields an empty folder beside `out` (same file system, so the
    final rename is atomic). On success it replaces `out` in one rename (an old folder is moved
    aside first and deleted after); on failure it is removed and `out` is left as it was."""
    from monoroute.fileio import replace_dir

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.export-{os.getpid()}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)  # a leftover of a killed export that had our pid
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    try:
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _write_json(path: Path, obj) -> None:
    from monoroute.fileio import json_safe, write_json_atomic

    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, json_safe(obj))


# --- saelens -------------------------------------------------------------------------------------------
def hook_names(set_name: str, layer: int) -> tuple[str, str | None]:
    """(hook_name, hook_name_out) of a unit set in TransformerLens names: what its encoder reads
    and, for transcoders, what its decoder predicts (None: it reconstructs its input)."""
    if set_name in ("transcoder", "routed_units"):
        return f"blocks.{layer}.ln2.hook_normalized", f"blocks.{layer}.hook_mlp_out"
    return f"blocks.{layer}.mlp.hook_post", None


@dataclass
class SAELensItem:
    set_name: str
    layer: int
    cfg: dict
    tensors: dict  # name -> float32 CPU tensor

    @property
    def folder(self) -> str:
        return f"{self.set_name}-L{self.layer}"


def _sae_lens_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:  # the installed version, without importing sae-lens (~10 s)
        return version("sae-lens")
    except PackageNotFoundError:
        return SAE_LENS_MIN_VERSION


def topk_cfg(d_in: int, d_sae: int, k: int, apply_b_dec_to_input: bool, rescale: bool, metadata: dict) -> dict:
    """sae-lens's TopKSAEConfig.to_dict() layout, field for field."""
    return {"architecture": "topk", "d_in": d_in, "d_sae": d_sae, "k": k, "dtype": "float32", "device": "cpu",
            "apply_b_dec_to_input": apply_b_dec_to_input, "rescale_acts_by_decoder_norm": rescale,
            "normalize_activations": "none", "reshape_activations": "none", "metadata": metadata}


def sae_metadata(run: Path, run_cfg, set_name: str, layer: int, monoroute: dict) -> dict:
    version = _sae_lens_version()
    hook, hook_out = hook_names(set_name, layer)
    meta = {"sae_lens_version": version, "sae_lens_training_version": version, "model_name": MODEL_NAME,
            "hook_name": hook, "hook_head_index": None, "context_size": run_cfg.model.block_size,
            "dataset_path": run_cfg.data.source}
    if hook_out is not None:
        meta.update(hook_name_out=hook_out, hook_head_index_out=None)
    meta["monoroute"] = dict({"run": str(run.resolve()), "set": set_name, "layer": layer}, **monoroute)
    return meta


def _tensors(**named) -> dict:
    return {name: t.detach().to("cpu").float().contiguous().clone() for name, t in named.items()}


def topk_expressible(router: str, activation: str, gate: str = "none", gated: bool = False) -> str | None:
    """Why a routed layer is not a TopK transcoder sae-lens can run, or None if it is one."""
    if gated:
        return "have gated units (act(w_gate·x) · (w_in·x + b)), which no SAELens TopK SAE can express"
    if router != "dense":
        return ("route with product keys, which no SAELens SAE can express (an SAE picks its k latents by top-k of "
                "their own pre-activations x @ W_enc + b_enc; product keys pick them by a separate query over "
                "sub-keys)")
    if activation != "relu":
        return f"apply {activation} after the top-k, which SAELens's TopK (top-k, then ReLU) cannot express"
    if gate != "none":
        return f"scale each unit by a {gate} gate, which SAELens's TopK cannot express"
    return None


def saelens_items(run: Path, set_name: str | None, layer: int | None, device: str,
                  notes: list[str]) -> list[SAELensItem]:
    """The dictionaries to write, weights in hand. `notes` gets one line per thing skipped."""
    from monoroute.interp import baselines as B
    from monoroute.train.trainer import read_run_config

    if set_name is not None and set_name not in SAELENS_SETS:
        raise MonorouteError(f"--set {set_name} has no SAELens form; choose one of {', '.join(SAELENS_SETS)} "
                             f"(dense neurons are not a sparse dictionary)")
    run_cfg = read_run_config(run)  # a clear error for a folder that is not a run
    wanted = [set_name] if set_name else list(SAELENS_SETS)
    items: list[SAELensItem] = []
    reasons: list[str] = []

    for kind in ("sae", "transcoder"):
        if kind not in wanted:
            continue
        folder = run / "analysis" / kind
        if not (folder / B.CONFIG_FILE).is_file():
            if set_name == kind:
                raise MonorouteError(f"{run} has no {kind} baseline ({folder / B.CONFIG_FILE} missing); run "
                                     f"`monoroute analyze {run} --{kind}` first (on a run with a dense layer)")
            reasons.append(f"no {kind} baseline in {folder}")
            continue
        base = B.load_baseline(folder)  # our own files only (not the sae_lens/ copy); one line if corrupt
        if layer is not None and base.layer != layer:
            if set_name == kind:
                raise MonorouteError(f"the {kind} baseline of {run} is on layer {base.layer}, not --layer {layer}")
            reasons.append(f"the {kind} baseline is on layer {base.layer}, not {layer}")
            continue
        source = {"source": f"analysis/{kind}/{B.WEIGHTS_FILE}", "train": base.train_info, "exact": True}
        if kind == "sae":
            meta = sae_metadata(run, run_cfg, kind, base.layer, dict(
                source, kind="sae", input=f"blocks.{base.layer}.mlp.hook_post (the dense MLP's GELU activations)"))
            cfg = topk_cfg(base.d_in, base.n_latents, base.k, bool(base.apply_b_dec_to_input),
                           bool(base.rescale_acts_by_decoder_norm), meta)
            tensors = _tensors(W_enc=base.W_enc, b_enc=base.b_enc, W_dec=base.W_dec, b_dec=base.b_dec)
        else:
            ffn = base.ffn
            why = topk_expressible(ffn.router_name, ffn.activation, ffn.gate)
            if why:  # a format-1 transcoder is always dense/relu; refuse rather than export something else
                raise MonorouteError(f"the transcoder baseline of {run} would {why}; it cannot be exported to SAELens")
            meta = sae_metadata(run, run_cfg, kind, base.layer, dict(
                source, kind="transcoder", input=_ln_input(base.layer, base.parallel), note=TRANSCODER_NOTE))
            cfg = topk_cfg(base.d_model, base.n_latents, base.k, False, False, meta)
            b_in = ffn.b_in if ffn.b_in is not None else ffn.w_in.new_zeros(ffn.n_units)
            # (d, N), (N,), (N, d), (d,): pre = x @ w_in.T + b_in is the dense router's score
            tensors = _tensors(W_enc=ffn.w_in.t(), b_enc=b_in, W_dec=ffn.w_out, b_dec=base.b_out)
            notes.append(f"transcoder-L{base.layer}: stored as sae-lens architecture 'topk' (sae-lens has no TopK "
                         f"transcoder class); decode predicts hook_mlp_out, see metadata.monoroute.note")
        items.append(SAELensItem(kind, base.layer, cfg, tensors))

    if "routed_units" in wanted:
        items += _routed_items(run, run_cfg, set_name, layer, device, notes, reasons)

    if not items:
        because = "; ".join(reasons) or "nothing matched"
        raise MonorouteError(f"{run} has nothing to export in SAELens format ({because}); train the post-hoc "
                             f"baselines with `monoroute analyze RUN --sae --transcoder` on a dense run, or train "
                             f"routed layers with --router dense")
    return items


def _ln_input(layer: int, parallel: bool = False) -> str:
    from monoroute.train.layerwise import input_hook

    hook = input_hook(layer, parallel)  # resid_pre under GPT-NeoX's parallel residual
    return (f"the FFN input ln_2({hook}), ln_2's weight and bias applied (TransformerLens "
            f"blocks.{layer}.ln2.hook_normalized with fold_ln=False); monoroute's GPT has no hook point there: "
            f"apply model.blocks[{layer}].ln_2 to {hook}")


def _routed_items(run: Path, run_cfg, set_name, layer, device, notes, reasons) -> list[SAELensItem]:
    from monoroute.layers import RoutedFFN
    from monoroute.train.trainer import load

    kinds = run_cfg.model.ffn_kinds()
    routed = [i for i, kind in enumerate(kinds) if kind == "routed" and (layer is None or i == layer)]
    explicit = set_name == "routed_units"
    if not routed:
        where = f"layer {layer} is not routed" if layer is not None else "the model has no routed layer"
        if explicit:
            raise MonorouteError(f"--set routed_units: {where} in {run}; drop --set, or pick a routed --layer")
        reasons.append(where)
        return []
    names = ", ".join(map(str, routed))
    why = topk_expressible(run_cfg.model.router, run_cfg.model.activation, gated=run_cfg.model.ffn_gated)
    if why:
        if explicit:
            raise MonorouteError(f"routed layer(s) {names} of {run} {why}; drop --set routed_units, export them "
                                 f"with --format neuronpedia, html or parquet, or train with --router dense")
        notes.append(f"skipped routed layer(s) {names}: they {why}")
        reasons.append(f"routed layer(s) {names} {why}")
        return []
    loaded = load(run, device)  # the current checkpoint, sha256-checked
    items = []
    for i in routed:
        ffn = loaded.model.blocks[i].mlp
        assert isinstance(ffn, RoutedFFN)
        why = topk_expressible(ffn.router_name, ffn.activation, ffn.gate, ffn.w_gate is not None)
        if why:  # the config said dense/relu; the module disagrees: never export it anyway
            raise MonorouteError(f"routed layer {i} of {run} would {why}; it cannot be exported to SAELens")
        meta = sae_metadata(run, run_cfg, "routed_units", i, {
            "source": f"checkpoint step {loaded.step}: blocks.{i}.mlp (w_in, b_in, w_out)", "step": loaded.step,
            "kind": "routed_layer", "exact": True, "input": _ln_input(i, loaded.model.cfg.parallel_residual),
            "latents_hook": f"blocks.{i}.mlp.hook_post",
            "note": TRANSCODER_NOTE + f" Its latents are the layer's own units (blocks.{i}.mlp.hook_post) and its "
                                      f"decode is the layer's output; b_dec is its output bias (0 without out_bias)."})
        cfg = topk_cfg(ffn.d_model, ffn.n_units, ffn.k, False, False, meta)
        b_in = ffn.b_in if ffn.b_in is not None else ffn.w_in.new_zeros(ffn.n_units)
        tensors = _tensors(W_enc=ffn.w_in.t(), b_enc=b_in, W_dec=ffn.w_out,
                           b_dec=ffn.b_out if ffn.b_out is not None else ffn.w_out.new_zeros(ffn.d_model))
        items.append(SAELensItem("routed_units", i, cfg, tensors))
    return items


def write_saelens(items: list[SAELensItem], tmp: Path) -> list[str]:
    from monoroute.fileio import save_safetensors_atomic

    files = []
    for item in items:
        folder = tmp / item.folder
        folder.mkdir()
        save_safetensors_atomic(folder / SAE_LENS_WEIGHTS, item.tensors)
        _write_json(folder / SAE_LENS_CFG, item.cfg)
        files += [f"{item.folder}/{SAE_LENS_WEIGHTS}", f"{item.folder}/{SAE_LENS_CFG}"]
    return files


# --- parquet / csv ---------------------------------------------------------------------------------------
HEADLINE = ("l0", "live_slot_fraction", "dead_fraction", "coverage", "mean_purity", "mean_purity_null", "share_pure",
            "share_pure_null", "sparse_probe_f1", "sparse_probe_f1_top1", "explanation_f1")
SCORES = HEADLINE[3:]  # what --all-layers adds to per_layer
BASELINE_KEYS = ("explained_variance", "mse", "clean_val_loss", "spliced_val_loss", "zero_ablation_val_loss",
                 "loss_recovered")


def _schemas() -> dict:
    import pyarrow as pa

    f, i, s = pa.float64(), pa.int64(), pa.string()
    return {
        "unit_sets": [("unit_set", s), ("layer", i), ("n_units", i), ("k", i)] + [(k, f) for k in HEADLINE]
                     + [(k, f) for k in BASELINE_KEYS] + [("train_tokens", i)],
        "coverage": [("unit_set", s), ("concept", s), ("frequency", f), ("n_positives", i), ("best_unit", i),
                     ("f1", f), ("precision", f), ("recall", f), ("threshold", f)],
        "per_layer": [("layer", i), ("unit_set", s), ("n_positions", i), ("n_units", i), ("k", i), ("l0", f),
                      ("live_slot_fraction", f), ("dead_fraction", f), ("n_live", i), ("n_dead", i),
                      ("min_firings", i), ("share_live_frequent", f)] + [(k, f) for k in SCORES],
        "interventions": [("concept", s), ("layer", i), ("unit", i), ("kind", s), ("value", f), ("kl", f),
                          ("kl_concept", f), ("kl_elsewhere", f), ("kl_ratio", f), ("dloss", f), ("dloss_concept", f),
                          ("dloss_elsewhere", f), ("specificity", f), ("n_concept", i), ("n_elsewhere", i)],
    }


def _coerce(value, kind):
    """A report.json value as the column's type (JSON has one number type; 4096.0 is an int here)."""
    import pyarrow as pa

    if value is None or isinstance(value, (dict, list)):
        return None
    if pa.types.is_integer(kind):
        if isinstance(value, float):
            return int(value) if math.isfinite(value) and value.is_integer() else None
        return int(value)
    if pa.types.is_floating(kind):
        return float(value)
    return str(value)


def _table(rows: list[dict], columns: list, extra: bool = False):
    """An arrow table with exactly `columns` (name, type), in order; with `extra`, any other scalar
    key of the rows follows, by name, its type inferred."""
    import pyarrow as pa

    data = {name: pa.array([_coerce(r.get(name), kind) for r in rows], type=kind) for name, kind in columns}
    if extra:
        known = {name for name, _ in columns}
        others = {k for r in rows for k, v in r.items() if k not in known and not isinstance(v, (dict, list))}
        for key in sorted(others):
            data[key] = pa.array([r.get(key) for r in rows])
    return pa.table(data)


def analysis_tables(run: Path, set_name: str | None) -> dict:
    """{relative name without extension: arrow table} from report.json and units/<set>.parquet."""
    import pyarrow.parquet as pq

    from monoroute.interp.cli import load_report

    report = load_report(str(run))  # one line if missing or not JSON
    try:
        unit_sets, per_layer = dict(report["unit_sets"]), dict(report["per_layer"])
        headline_layer = int(report["layer"])
        interventions = list(report.get("interventions") or [])
    except (KeyError, TypeError, ValueError) as exc:
        raise MonorouteError(f"{run}/analysis/report.json lacks {exc}; run `monoroute analyze {run}` again") from None
    if set_name is not None and set_name not in unit_sets:
        raise MonorouteError(f"--set {set_name}: the analysis of {run} has no such unit set; choose one of "
                             f"{', '.join(unit_sets)}")
    keep = (lambda name: name == set_name) if set_name else (lambda name: True)
    schemas = _schemas()

    set_rows = [dict(s, unit_set=name, layer=headline_layer) for name, s in unit_sets.items() if keep(name)]
    coverage_rows = [dict(row, unit_set=name) for name, s in unit_sets.items() if keep(name)
                     for row in per_concept_rows(s)]
    layer_rows = [dict(stats, layer=int(lname.lstrip("L")), unit_set=name)
                  for lname, sets in sorted(per_layer.items(), key=lambda kv: int(kv[0].lstrip("L")))
                  for name, stats in sets.items() if keep(name)]
    if set_name is not None and set_name not in OWN_SETS:
        interventions = []  # they ablate / clamp / steer the model's own units only
    tables = {"unit_sets": _table(set_rows, schemas["unit_sets"]),
              "coverage": _table(coverage_rows, schemas["coverage"]),
              "per_layer": _table(layer_rows, schemas["per_layer"]),
              "interventions": _table(interventions, schemas["interventions"], extra=True)}
    for name in unit_sets:
        path = run / "analysis" / "units" / f"{name}.parquet"
        if keep(name) and path.is_file():
            try:
                tables[f"units/{name}"] = pq.read_table(str(path))
            except Exception as exc:  # a torn or foreign file: say which, never a traceback
                raise MonorouteError(f"{path} is corrupt ({type(exc).__name__}: {exc}); run `monoroute analyze "
                                     f"{run}` again") from None
    return tables


def write_tables(tables: dict, tmp: Path, fmt: str) -> list[str]:
    import pyarrow.csv as pcsv
    import pyarrow.parquet as pq

    files = []
    for name, table in tables.items():
        rel = f"{name}.{fmt}"
        path = tmp / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if fmt == "parquet":
            pq.write_table(table, str(path))
        else:  # shortest round-trip floats, empty for null, strings quoted
            pcsv.write_csv(table, str(path))
        files.append(rel)
    return files


# --- neuronpedia / html ------------------------------------------------------------------------------------
def open_store(run: Path, device: str):
    from monoroute.interp.store import AnalysisStore

    return AnalysisStore(run, device=device)  # one MonorouteError line if the analysis is missing or corrupt


def store_sets(store, set_name: str | None) -> list[str]:
    if set_name is None:
        return list(store.set_names)
    if set_name not in store.set_names:
        raise MonorouteError(f"--set {set_name}: the analysis has no such unit set; choose one of "
                             f"{', '.join(store.set_names)}")
    return [set_name]


def best_unit_concepts(store, set_name: str) -> dict[int, list[str]]:
    """unit -> the concepts coverage names it the best unit for."""
    out: dict[int, list[str]] = {}
    for row in per_concept_rows(store.report["unit_sets"][set_name]):
        if row.get("best_unit") is not None:
            out.setdefault(int(row["best_unit"]), []).append(row["concept"])
    return out


def pick_units(store, set_name: str, n: int) -> list[int]:
    """The n units with the most firings (ties: lower unit first; never-firing ones left out), plus
    every concept's best unit; most firings first."""
    df = store.table(set_name)
    firings = dict(zip(df["unit"].astype(int), df["n_firings"].astype(int)))
    live = sorted((u for u, f in firings.items() if f > 0), key=lambda u: (-firings[u], u))
    chosen = set(live[:n]) | set(best_unit_concepts(store, set_name))
    return sorted(chosen, key=lambda u: (-firings.get(u, 0), u))


def source_id(layer: int, set_name: str) -> str:
    """Neuronpedia's source id: "<layer>-<set>" (ids are lower case with dashes, like "6-res-jb")."""
    return f"{layer}-{set_name.replace('_', '-')}"


def dashboard_hook(set_name: str, layer: int) -> str:
    """Where a set's activations live: the model's own units at mlp.hook_post; a baseline at the
    hook its encoder reads (as in its SAELens export)."""
    return hook_names(set_name, layer)[0] if set_name in ("sae", "transcoder") else f"blocks.{layer}.mlp.hook_post"


def _np_activation(ctx: dict, bin_min: float, bin_max: float, bin_contains: float) -> dict:
    values = [float(v) for v in ctx["acts"]]
    top = max(range(len(values)), key=lambda i: values[i]) if values else 0
    if values and values[ctx["focus"]] == values[top]:  # a tie (values are rounded): the context's own position
        top = ctx["focus"]
    return {"tokens": list(ctx["tokens"]), "values": values, "maxValue": values[top] if values else 0.0,
            "maxValueTokenIndex": top, "minValue": min(values) if values else 0.0,
            "binMin": bin_min, "binMax": bin_max, "binContains": bin_contains, "qualifyingTokenIndex": ctx["focus"]}


def _contexts(d: dict) -> list[dict]:
    """The dashboard's contexts with SAEDashboard's bins: top activations (bin_min -1, bin_max the
    unit's max, contains -1), then each quantile band (its range, 1/bands of the firings)."""
    out = [_np_activation(c, -1.0, float(d["max"]), -1.0) for c in d["top"]]
    bands = d.get("quantiles") or []
    for q in bands:
        lo, hi = q["range"]
        out += [_np_activation(c, float(lo), float(hi), 1.0 / len(bands)) for c in q["examples"]]
    return out


def neuronpedia_feature(d: dict, set_name: str, layer: int) -> dict:
    """One unit's dashboard (AnalysisStore.dashboard) as a Neuronpedia feature JSON."""
    eff = d.get("logit_effect") or {}
    hist = d.get("histogram") or {"counts": [], "edges": []}
    edges = hist["edges"]
    centres = [(a + b) / 2 for a, b in zip(edges[:-1], edges[1:])]
    exp = d.get("explanation")
    explanations = [{"description": exp["text"], "typeName": "monoroute-ngram",
                     "explanationModelName": "monoroute n-gram explainer (metrics.explanation_scores)",
                     "scores": [{"method": "held-out F1", "value": exp.get("f1")}]}] if exp and exp.get("text") else []
    return {
        "modelId": MODEL_NAME, "layer": source_id(layer, set_name), "index": str(int(d["unit"])),
        "hookName": dashboard_hook(set_name, layer),
        "maxActApprox": float(d["max"]), "frac_nonzero": float(d["density"]),
        "pos_str": list(eff.get("boosted_text", [])), "pos_values": list(eff.get("boosted_logits", [])),
        "neg_str": list(eff.get("suppressed_text", [])), "neg_values": list(eff.get("suppressed_logits", [])),
        "freq_hist_data_bar_heights": list(hist["counts"]), "freq_hist_data_bar_values": centres,
        "logits_hist_data_bar_heights": [], "logits_hist_data_bar_values": [],  # not computed by analyze
        "activations": _contexts(d), "explanations": explanations,
        "monoroute": {"set": set_name, "layer": layer, "unit": int(d["unit"]), "n_firings": d["n_firings"],
                      "density": d["density"], "best_concepts": d.get("best_concepts", []), "row": d.get("row"),
                      "logit_effect_note": "direct effect on the logits per unit of activation (unit_logit_effect)"},
    }


def saedashboard_feature(feature: dict, n_positions: int) -> dict:
    """The same feature in SAEDashboard's NeuronpediaDashboardFeature.to_dict() layout."""
    return {
        "feature_index": int(feature["index"]),
        "neg_str": feature["neg_str"], "neg_values": feature["neg_values"],
        "pos_str": feature["pos_str"], "pos_values": feature["pos_values"],
        "frac_nonzero": feature["frac_nonzero"],
        "freq_hist_data_bar_values": feature["freq_hist_data_bar_values"],
        "freq_hist_data_bar_heights": feature["freq_hist_data_bar_heights"],
        "logits_hist_data_bar_heights": [], "logits_hist_data_bar_values": [],
        "n_prompts_total": 0, "n_tokens_in_prompt": 0, "num_tokens_for_dashboard": n_positions, "dataset": "",
        "activations": [{"bin_min": a["binMin"], "bin_max": a["binMax"], "bin_contains": a["binContains"],
                         "tokens": a["tokens"], "values": a["values"]} for a in feature["activations"]],
    }


def write_neuronpedia(store, sets: list[str], n_units: int, tmp: Path, run: Path) -> list[str]:
    files = []
    index = {"format": "neuronpedia", "model_id": MODEL_NAME, "run": str(run.resolve()),
             "layer": store.layer, "sets": []}
    n_positions = int(store.report.get("n_positions", 0))
    for set_name in sets:
        units = pick_units(store, set_name, n_units)
        batch = []
        for unit in units:
            feature = neuronpedia_feature(store.dashboard(set_name, unit), set_name, store.layer)
            _write_json(tmp / set_name / f"{unit}.json", feature)
            files.append(f"{set_name}/{unit}.json")
            batch.append(saedashboard_feature(feature, n_positions))
        _write_json(tmp / set_name / "batch-0.json", {"model_id": MODEL_NAME, "layer": store.layer,
                                                      "sae_set": set_name.replace("_", "-"), "features": batch})
        files.append(f"{set_name}/batch-0.json")
        index["sets"].append({"set": set_name, "source": source_id(store.layer, set_name),
                              "hook_name": dashboard_hook(set_name, store.layer), "units": units,
                              "folder": set_name})
    _write_json(tmp / "index.json", index)
    return files + ["index.json"]


INDEX_COLUMNS = ("n_firings", "density", "max_act", "mean_act", "best_concept", "purity", "lift", "top_tokens",
                 "explanation", "explanation_f1")


def _page(title: str, body: str) -> str:
    from monoroute.tables import html_page

    return html_page(title, body)


def _cell(value) -> str:
    import numpy as np

    if value is None or (isinstance(value, (float, np.floating)) and not math.isfinite(value)):
        return "–"
    if isinstance(value, (float, np.floating)):
        return f"{float(value):.4g}"
    return html.escape(str(value))


def write_html(store, sets: list[str], n_units: int, tmp: Path, run: Path) -> list[str]:
    from monoroute.fileio import write_text_atomic
    from monoroute.interp.report import dashboard_html

    files = []
    sections = []
    for set_name in sets:
        units = pick_units(store, set_name, n_units)
        best_for = best_unit_concepts(store, set_name)
        table = store.table(set_name).set_index("unit", drop=False)
        (tmp / set_name).mkdir(parents=True, exist_ok=True)
        rows = []
        for unit in units:
            d = store.dashboard(set_name, unit)
            view = dict(d, concept=", ".join(best_for.get(unit, [])) or None)
            exp = d.get("explanation")  # dashboard_html reads analyze's explanation keys
            view["explanation"] = {"explanation_text": exp["text"], "f1": exp.get("f1")} if exp else None
            rel = f"{set_name}/unit-{unit}.html"
            body = (f'<p><a href="../index.html">all units</a> · {html.escape(str(run))}</p>'
                    + dashboard_html(view))
            write_text_atomic(tmp / rel, _page(f"{set_name} unit {unit}", body))
            files.append(rel)
            row = table.loc[unit]
            rows.append(f'<tr><td><a href="{rel}">{unit}</a></td>'
                        + "".join(f"<td>{_cell(row[c]) if c in row else '–'}</td>" for c in INDEX_COLUMNS) + "</tr>")
        head = "<tr><th>unit</th>" + "".join(f"<th>{c}</th>" for c in INDEX_COLUMNS) + "</tr>"
        sections.append(f"<h2>{html.escape(set_name)} · layer {store.layer}</h2>"
                        f"<p class='muted'>{len(units)} of {len(table)} units: the most firing, and each concept's "
                        f"best unit</p><table>{head}{''.join(rows)}</table>")
    title = f"monoroute units: {run}"
    write_text_atomic(tmp / "index.html", _page(title, f"<h1>{html.escape(title)}</h1>" + "".join(sections)))
    return files + ["index.html"]
