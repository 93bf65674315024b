"""`monoroute upcycle`: a routed model made from a trained dense one, in two stages.

    monoroute upcycle runs/dense --out runs/upcycled            # a dense monoroute run as teacher
    monoroute upcycle --from-hf ./gpt2-folder --data corpus.txt --out runs/gpt2-routed
    monoroute upcycle --resume runs/upcycled                    # after a kill, at any point

Stage 1, layer-local (`train/layerwise.py`): every dense FFN of the teacher gets a `RoutedFFN`
student (with an output bias) fitted to reproduce the FFN's output from its input,
ln_2(resid_mid) -> hook_mlp_out (resid_pre under a parallel residual), the teacher frozen, activations streamed from the teacher's
forward on TRAIN windows, all layers from one forward per batch, for `distill_tokens` tokens.

Stage 2, end to end: the student (the teacher's embeddings, attention, LayerNorms and head, with
the fitted routed layers spliced in) is trained on the same corpus with cross-entropy plus
kl_coef · KL(teacher ‖ student) (`train/distill.py`), keeping the routed layers' L1 and dead-unit
revival. This is `monoroute train` itself, resumed from a step-0 checkpoint the upcycle writes: so
the result is an ordinary run directory (`eval`, `sample`, `analyze`, `serve`, `export`,
`train --resume`), whose config.json records the teacher (path and weights sha256) and both stages.

Run directory additions: OUT/upcycle/ holds stage 1's checkpoint while it runs (removed when it
completes) and stage1.json (its record); OUT/teacher/ is the converted Hugging Face teacher with
--from-hf. Everything that can refuse the job (teacher, flags, corpus, OUT) is checked before any
file is written.
"""
from __future__ import annotations

import json
import shutil
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from monoroute.errors import MonorouteError

STAGE1_DIR = "upcycle"
TEACHER_DIR = "teacher"
STAGE1_RECORD = "stage1.json"
SPLIT_KEYS = ("val_fraction", "max_bytes")  # data settings that decide which documents are validation
DISTILL_TOKENS = 300_000
# Stage 2's training defaults (a fine-tune of an already trained model): chosen on cpu-small, see docs/upcycle.md.
STAGE2_DEFAULTS = dict(steps=200, lr=1e-3, min_lr=1e-4, warmup=20, eval_every=50, ckpt_every=50)
KL_COEF = 1.0


def teacher_config(teacher: str):
    """The dense teacher run's RunConfig, after checking it has a checkpoint and no routed layer."""
    from monoroute.train.checkpoint import current_checkpoint
    from monoroute.train.trainer import read_run_config

    path = Path(teacher)
    if path.exists() and not path.is_dir():
        raise MonorouteError(f"teacher {teacher} is a file, not a run directory; pass the dense run's folder (the one "
                             f"holding config.json and checkpoint.json)")
    if not path.is_dir():
        raise MonorouteError(f"teacher run {teacher} is missing; pass a dense run directory written by "
                             f"`monoroute train --ffn dense`")
    cfg = read_run_config(path)
    if current_checkpoint(path) is None:
        # `train --resume` needs a checkpoint too; the same `train` command restarts such a run from step 0.
        raise MonorouteError(f"teacher run {teacher} has no checkpoint (it stopped before its first save); run its "
                             f"`monoroute train ... --out {teacher}` command again (it restarts from step 0), then "
                             f"upcycle it")
    kinds = cfg.model.ffn_kinds()
    if any(kind != "dense" for kind in kinds):
        raise MonorouteError(f"teacher run {teacher} has routed layers (ffn={cfg.model.ffn}); upcycle takes a dense "
                             f"run as teacher (train one with --ffn dense)")
    if cfg.train.dense_fraction > 0:
        raise MonorouteError(f"teacher run {teacher} is a dense_fraction run (routed after its switch); upcycle "
                             f"takes a dense run")
    return cfg


GATED_CANDIDATES = 256  # proposals re-ranked by the gate's pre-activation when a SwiGLU teacher is upcycled


def student_config(teacher_cfg, out: str, overrides: dict, teacher_path: str, teacher_sha: str):
    """The routed run's config: the teacher's shape and data, routed FFNs with an output bias, stage 2's
    training defaults, then the user's overrides (flat keys), the distillation settings last."""
    from monoroute.data import DataConfig
    from monoroute.models.config import UPCYCLE_ROUTING, GPTConfig
    from monoroute.train.config import (ALIASES, RunConfig, TrainConfig, field_owner, fit_schedule, flatten_overrides,
                                        row_sparse_by_default)

    sections = {"model": {**teacher_cfg.model.to_dict(), **UPCYCLE_ROUTING, "ffn": "routed", "out_bias": True},
                "data": dict(vars(teacher_cfg.data)),
                "train": {**vars(teacher_cfg.train), **STAGE2_DEFAULTS, "kl_coef": KL_COEF}}
    if teacher_cfg.model.ffn_gated:
        # A SwiGLU teacher: gated units with its activation on the gate, chosen by candidate re-ranking
        # (the keys propose GATED_CANDIDATES units, the k largest gate pre-activations among them run, as
        # the teacher's own largest gates would): Llama-shaped k 64 went from +0.026 / +0.028 over the
        # teacher (the keys' own choice behind a sigmoid gate) to below it (docs/upcycle.md).
        sections["model"].update(activation=teacher_cfg.model.dense_activation, coupling="rerank",
                                 router_candidates=GATED_CANDIDATES)
    given = set()
    for key, value in flatten_overrides(overrides):
        section, name = ALIASES.get(key) or field_owner(key)
        if section == "model" and name in ("d_model", "n_layer", "n_head", "block_size", "vocab_size", "bias",
                                           "tie_weights", "ln_eps", "dense_activation", "ffn_gated", "norm",
                                           "n_kv_head", "position", "rotary_dims", "rotary_base",
                                           "parallel_residual", "qkv_bias"):
            raise MonorouteError(f"{key} is the teacher's ({sections['model'][name]}); the student keeps the "
                                 f"teacher's shape outside its FFNs")
        if section == "model" and name == "ffn" and value != "routed":
            raise MonorouteError("upcycle makes every FFN routed; --ffn cannot be set")
        sections[section][name] = value
        given.add(name)
    if "coupling" in given and "router_candidates" not in given and sections["model"]["coupling"] != "rerank":
        sections["model"]["router_candidates"] = None  # the gated default's proposals go with its re-ranking
    teacher_data = vars(teacher_cfg.data)
    if sections["data"]["source"] == teacher_data["source"]:
        for name in SPLIT_KEYS:  # on the teacher's corpus, its split must stay: no teacher-train document in val
            if sections["data"][name] != teacher_data[name]:
                raise MonorouteError(f"{name}={sections['data'][name]!r} differs from the teacher's "
                                     f"({teacher_data[name]!r}) and would move documents the teacher trained on into "
                                     f"the student's validation split; drop it (upcycling keeps the teacher's split)")
    sections["train"].update(teacher=str(Path(teacher_path).resolve()), teacher_sha256=teacher_sha,
                             dense_fraction=0.0, k_start=sections["train"].get("k_start"))
    sections["train"]["kl_coef"] = sections["train"]["kl_coef"] if "kl_coef" in given else KL_COEF
    cfg = RunConfig(preset=f"upcycle:{teacher_cfg.preset}", out=out, model=GPTConfig.from_dict(sections["model"]),
                    data=DataConfig(**sections["data"]), train=TrainConfig(**sections["train"]))
    cfg.model.validate()
    fit_schedule(cfg.train, given, STAGE2_DEFAULTS["lr"], STAGE2_DEFAULTS["min_lr"])
    if not given & {"sparse_rows", "sparse_grad"}:
        cfg.model.sparse_grad = cfg.train.sparse_rows = row_sparse_by_default(cfg)
    return cfg


def convert_hf(folder: str, data_overrides: dict):
    """(teacher GPT, teacher RunConfig) for a local Hugging Face GPT-2 or GPT-NeoX folder, its tokenizer fixed
    ("file")."""
    from monoroute.data import DataConfig
    from monoroute.models.hf import TOKENIZER, load_hf
    from monoroute.train.config import RunConfig, TrainConfig

    model, gcfg, _ = load_hf(folder)
    data = DataConfig(tokenizer="file", tokenizer_file=str((Path(folder) / TOKENIZER).resolve()))
    for key, value in data_overrides.items():
        setattr(data, key, value)
    if data.tokenizer != "file":
        raise MonorouteError("--from-hf keeps the checkpoint's own tokenizer; drop --tokenizer")
    return model, RunConfig(preset="hf", out="", model=gcfg, data=data, train=TrainConfig(batch_size=16))


def check_tokenizer(store, teacher_tokenizer_json: str, teacher: str) -> None:
    from monoroute.data.tokenizers import tokenizer_from_json

    ours = tokenizer_from_json(teacher_tokenizer_json)
    if store.tokenizer.to_json() != ours.to_json():
        raise MonorouteError(f"the corpus's tokenizer differs from the teacher's ({teacher}: {ours.kind}, vocab "
                             f"{ours.vocab_size}; this corpus: {store.tokenizer.kind}, vocab "
                             f"{store.tokenizer.vocab_size}); a BPE is learned per corpus, so upcycle on the "
                             f"teacher's own corpus (drop --data) or give --set tokenizer=file "
                             f"--set tokenizer_file={teacher}/tokenizer.json")


def upcycle(teacher: str | None, out: str, overrides: dict | None = None, from_hf: str | None = None,
            distill_tokens: int = DISTILL_TOKENS, init: str = "random", fit_lr: float = 2e-3,
            resume: bool = False, overwrite: bool = False, show_progress: bool = True) -> dict:
    """Upcycle `teacher` (a dense run directory) or `from_hf` (a GPT-2 folder) into the routed run OUT.
    With resume=True only `out` is read: the job continues where it stopped. Returns stage 2's summary
    with the upcycle record under "upcycle"."""
    if resume:
        return resume_upcycle(Path(out), show_progress)
    from monoroute.data import prepare_data
    from monoroute.devices import resolve_device
    from monoroute.models import GPT
    from monoroute.train.checkpoint import TOKENIZER_FILE
    from monoroute.train.config import field_owner
    from monoroute.train.distill import teacher_weights_sha256
    from monoroute.train.layerwise import INITS
    from monoroute.train.rundir import start_mode
    from monoroute.train.trainer import check_settings, check_splits

    overrides = dict(overrides or {})
    if (teacher is None) == (from_hf is None):
        raise MonorouteError("give a dense teacher run (DENSE_RUN) or --from-hf DIR, not both and not neither")
    if init not in INITS:
        raise MonorouteError(f"unknown --init {init!r}; choose one of {', '.join(INITS)}")
    if isinstance(distill_tokens, bool) or not isinstance(distill_tokens, int) or distill_tokens < 1:
        raise MonorouteError(f"--distill-tokens must be a whole number >= 1, got {distill_tokens!r}")
    hf_model = None
    if from_hf is not None:
        data_over = {field_owner(k)[1]: v for k, v in overrides.items() if field_owner(k)[0] == "data"}
        hf_model, tcfg = convert_hf(from_hf, data_over)
        overrides = {k: v for k, v in overrides.items() if field_owner(k)[0] != "data"}
        teacher_tokenizer = (Path(from_hf) / "tokenizer.json").read_text(encoding="utf-8")
        teacher_path, teacher_sha, teacher_name = str(Path(out) / TEACHER_DIR), None, from_hf
    else:
        tcfg = teacher_config(teacher)
        teacher_tokenizer = (Path(teacher) / TOKENIZER_FILE).read_text(encoding="utf-8")
        teacher_path, teacher_sha, teacher_name = teacher, teacher_weights_sha256(teacher), teacher
    cfg = student_config(tcfg, out, overrides, teacher_path, teacher_sha)
    device = resolve_device(cfg.train.device)
    check_settings(cfg, device, None)
    student = GPT(cfg.model)  # the router's own errors (n_units not a square, k > n_units, ...) come here
    del student
    store = prepare_data(cfg.data)
    check_tokenizer(store, teacher_tokenizer, teacher_name)
    if store.vocab_size != cfg.model.vocab_size:
        raise MonorouteError(f"the corpus's tokenizer has {store.vocab_size} tokens, the teacher's model "
                             f"{cfg.model.vocab_size}; use the teacher's tokenizer")
    check_splits(store, cfg)
    start_mode(Path(out), False, overwrite)
    steps1 = max(1, distill_tokens // (cfg.train.batch_size * cfg.model.block_size))
    record = {"teacher": str(Path(teacher_path).resolve()), "teacher_sha256": teacher_sha, "source": "hf" if from_hf
              else "run", "hf_dir": str(Path(from_hf).resolve()) if from_hf else None,
              "stage1": {"steps": steps1, "tokens": steps1 * cfg.train.batch_size * cfg.model.block_size,
                         "batch_windows": cfg.train.batch_size, "init": init, "lr": fit_lr, "seed": cfg.train.seed},
              "stage2": {"steps": cfg.train.steps, "kl_coef": cfg.train.kl_coef,
                         "kl_temperature": cfg.train.kl_temperature, "lr": cfg.train.lr}}
    return run_stages(cfg, record, store, hf_model, overwrite, show_progress)


def run_stages(cfg, record: dict, store, hf_model, overwrite: bool, show_progress: bool) -> dict:
    from monoroute.train.checkpoint import CONFIG_FILE, TOKENIZER_FILE, save_checkpoint, write_json, write_text
    from monoroute.train.distill import teacher_weights_sha256
    from monoroute.train.rundir import RunLock, clear_run, start_mode
    from monoroute.train.trainer import run_info

    out = Path(cfg.out)
    created = not out.exists()
    lock = RunLock(out)
    lock.acquire()
    try:
        if start_mode(out, False, overwrite) in ("overwrite", "restart"):
            clear_run(out)
        if hf_model is not None:  # the converted teacher: an ordinary dense run directory, step 0
            tdir = out / TEACHER_DIR
            tdir.mkdir(parents=True, exist_ok=True)
            from monoroute.data.tokenizers import load_tokenizer

            tcfg_dict = {"preset": "hf", "out": str(tdir), "model": hf_model.cfg.to_dict(),
                         "data": vars(cfg.data), "train": {"steps": 1, "seed": cfg.train.seed}}
            write_json(tdir / CONFIG_FILE, {"run": tcfg_dict, **run_info(hf_model), "hf_dir": record["hf_dir"]})
            write_text(tdir / TOKENIZER_FILE, load_tokenizer(cfg.data.tokenizer_file).to_json())
            save_checkpoint(tdir, hf_model, {}, {"step": 0, "tokens": 0})
            sha = teacher_weights_sha256(tdir)
            record["teacher_sha256"] = sha
            cfg = replace(cfg, train=replace(cfg.train, teacher_sha256=sha))
        # The tokenizer first: config.json is what marks a run, so a kill between the two leaves no run
        # that resumes but cannot be read.
        write_text(out / TOKENIZER_FILE, store.tokenizer.to_json())
        write_json(out / CONFIG_FILE, {"run": cfg.to_dict(), **run_info_for(cfg), "upcycle": record})
    finally:
        lock.release()
    del created
    return continue_upcycle(cfg, record, store, show_progress)


def run_info_for(cfg) -> dict:
    from monoroute.models import GPT
    from monoroute.train.trainer import run_info

    return run_info(GPT(cfg.model))


def read_upcycle(out: Path) -> tuple:
    from monoroute.train.checkpoint import CONFIG_FILE, read_json
    from monoroute.train.trainer import read_run_config

    saved = read_json(out / CONFIG_FILE, "run config")
    if not isinstance(saved.get("upcycle"), dict):
        raise MonorouteError(f"{out} is not an upcycled run (its {CONFIG_FILE} has no \"upcycle\" record); resume "
                             f"an ordinary run with `monoroute train --resume {out}`")
    return read_run_config(out), saved["upcycle"]


def resume_upcycle(out: Path, show_progress: bool) -> dict:
    from monoroute.data import prepare_data

    if not out.is_dir():
        raise MonorouteError(f"nothing to resume: {out} is missing")
    cfg, record = read_upcycle(out)
    cfg.out = str(out)
    return continue_upcycle(cfg, record, prepare_data(cfg.data), show_progress)


def continue_upcycle(cfg, record: dict, store, show_progress: bool) -> dict:
    """Stage 1 (from its checkpoint if one exists) unless stage 2 has its step-0 checkpoint; then stage 2."""
    from monoroute.train.checkpoint import current_checkpoint
    from monoroute.train.trainer import train

    out = Path(cfg.out)
    if current_checkpoint(out) is None:
        stage1(cfg, record, store, show_progress)
    summary = train(cfg, resume=True, show_progress=show_progress)
    stage1_info = json.loads((out / STAGE1_DIR / STAGE1_RECORD).read_text())
    summary["upcycle"] = {**record, "stage1": {**record["stage1"], **stage1_info}}
    return summary


def stage1(cfg, record: dict, store, show_progress: bool) -> None:
    """Fit every routed layer to its teacher FFN; write the student as OUT's step-0 checkpoint."""
    from monoroute.devices import resolve_device
    from monoroute.train.checkpoint import (current_checkpoint, load_checkpoint, save_checkpoint, write_json)
    from monoroute.train.distill import routed_from_dense, routed_layer_fitter
    from monoroute.train.trainer import load_teacher
    from monoroute.train.layerwise import fit_layers
    from monoroute.train.optim import build_optimizer_for
    from monoroute.train.rundir import RunLock

    out, tc = Path(cfg.out), cfg.train
    s1 = record["stage1"]
    device = resolve_device(tc.device)
    lock = RunLock(out)
    lock.acquire()
    try:
        teacher = load_teacher(tc.teacher, tc.teacher_sha256, device)
        torch.manual_seed(tc.seed)
        student = routed_from_dense(teacher, cfg.model)
        fitter = routed_layer_fitter(teacher, student)
        folder = out / STAGE1_DIR
        start, optimizer_state = 0, None
        if current_checkpoint(folder) is not None:
            optimizer_state, progress = load_checkpoint(folder, fitter)
            start = int(progress["step"])
            print(f"monoroute: resuming stage 1 at step {start} of {s1['steps']}", file=sys.stderr)
        windows, block = s1["batch_windows"], cfg.model.block_size
        batch_at = lambda s: store.batch(s, windows, block, s1["seed"], split="train")[0]  # noqa: E731
        every = max(1, min(tc.ckpt_every, s1["steps"] // 4 or 1))
        t0 = time.perf_counter()

        def on_step(step: int, optimizer, rec: dict) -> None:
            if step % every == 0 and step < s1["steps"]:
                save_checkpoint(folder, fitter, optimizer.state_dict(), {"step": step, "tokens": step * windows * block})

        last = fit_layers(fitter, teacher, batch_at, s1["steps"], s1["lr"], start, optimizer_state, s1["init"],
                          s1["seed"], show_progress, on_step=on_step)
        fitter.fold()
        from monoroute.train.trainer import evaluate

        # Where stage 2 starts from: the spliced student's and the teacher's loss on the validation windows.
        spliced, clean = evaluate(student, store, cfg, device), evaluate(teacher, store, cfg, device)
        student.train()
        optimizer = build_optimizer_for(student, tc)
        info = {"final_fvu": last.get("fvu"), "val_loss_spliced": spliced, "teacher_val_loss": clean, "seconds": round(time.perf_counter() - t0, 1), "resumed_at": start or None}
        folder.mkdir(parents=True, exist_ok=True)  # a stage 1 shorter than one save interval never made it
        write_json(folder / STAGE1_RECORD, info)
        save_checkpoint(out, student, optimizer.state_dict(), {"step": 0, "tokens": 0})  # stage 2 starts here
        for name in ("checkpoints", "checkpoint.json"):
            path = folder / name
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            elif path.exists():
                path.unlink()
    finally:
        lock.release()


# --- command line -------------------------------------------------------------------------------------
def add_parser(sub) -> None:
    from monoroute.cli import OVERRIDE_FLAGS

    p = sub.add_parser("upcycle", help="a routed model from a trained dense one: layer-local fit, then distillation")
    p.add_argument("teacher", nargs="?", help="a dense run directory (or use --from-hf DIR)")
    p.add_argument("--from-hf", metavar="DIR", help="a local save_pretrained folder (model_type gpt2, gpt_neox, "
                                                    "llama or qwen2; model.safetensors and tokenizer.json)")
    p.add_argument("--out", help="the new routed run directory")
    p.add_argument("--resume", metavar="OUT", help="continue an upcycle that stopped (either stage)")
    p.add_argument("--distill-tokens", type=int, default=DISTILL_TOKENS,
                   help=f"stage 1's tokens (default {DISTILL_TOKENS:,})")
    p.add_argument("--init", default="random", help="stage 1's init of the routed layers: random or data")
    p.add_argument("--fit-lr", type=float, default=2e-3, help="stage 1's learning rate")
    p.add_argument("--kl-coef", type=float, help=f"stage 2's KL weight (default {KL_COEF})")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--config", help="YAML/TOML/JSON file of overrides")
    p.add_argument("--sparse-rows", action="store_true", help=argparse_suppress())
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override any config key")
    for flag, _, kind in OVERRIDE_FLAGS:
        p.add_argument(flag, type=kind, default=None)
    p.set_defaults(func=cmd_upcycle)


def argparse_suppress():
    import argparse

    return argparse.SUPPRESS


def cmd_upcycle(args) -> int:
    from monoroute.cli import collect_overrides

    if args.resume:
        if args.teacher or args.from_hf or args.out:
            raise MonorouteError("--resume OUT takes no teacher, --from-hf or --out (they are in OUT's config.json)")
        summary = upcycle(None, args.resume, resume=True, show_progress=not args.no_progress)
    else:
        if not args.out:
            raise MonorouteError("give --out RUN for the routed run")
        overrides = collect_overrides(args)
        if args.kl_coef is not None:
            overrides["kl_coef"] = args.kl_coef
        summary = upcycle(args.teacher, args.out, overrides, args.from_hf, args.distill_tokens, args.init,
                          args.fit_lr, overwrite=args.overwrite, show_progress=not args.no_progress)
    summary.pop("rank", None)
    summary.pop("ranks_in_sync", None)
    print(json.dumps(summary))
    return 0
