"""Hugging Face GPT-2-family checkpoints as our GPT (the same pre-LN shape; nanoGPT's GPT-2 loading).

Supported: `model_type: "gpt2"` folders written by `transformers`' `save_pretrained` (GPT2LMHeadModel or
GPT2Model weights in `model.safetensors`, with the fast tokenizer's `tokenizer.json` beside them).
That covers GPT-2 small/medium/large/xl, DistilGPT-2 and any GPT-2-shaped model trained with that class.
Not supported (refused with the reason): other architectures (GPT-Neo, GPT-J, Llama, ...: other
attention or MLP shapes), `pytorch_model.bin` weights (pickles are never loaded: re-save with
`safe_serialization=True`), `scale_attn_by_inverse_layer_idx`, untied embeddings with no `lm_head`.

GPT-2's Conv1D stores weights as (in, out); our nn.Linear as (out, in), so they are transposed.
GPT-2's MLP uses "gelu_new" (the tanh approximation): our dense FFN takes `dense_activation="gelu_tanh"`.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from monoroute.errors import MonorouteError
from monoroute.models.config import GPTConfig

ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu"}
WEIGHTS = "model.safetensors"
TOKENIZER = "tokenizer.json"


def read_hf_config(folder: str | Path) -> dict:
    folder = Path(folder)
    path = folder / "config.json"
    if not path.is_file():
        raise MonorouteError(f"--from-hf {folder}: no config.json; point at a folder written by transformers' "
                             f"save_pretrained")
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise MonorouteError(f"--from-hf {folder}: config.json does not parse ({exc.msg})") from None
    if not isinstance(cfg, dict):
        raise MonorouteError(f"--from-hf {folder}: config.json holds a {type(cfg).__name__}, not an object of "
                             f"settings; restore the file save_pretrained wrote")
    if cfg.get("model_type") != "gpt2":
        raise MonorouteError(f"--from-hf {folder}: model_type {cfg.get('model_type')!r} is not supported; only GPT-2-"
                             f"family checkpoints (model_type 'gpt2') load into this GPT")
    if cfg.get("scale_attn_by_inverse_layer_idx"):
        raise MonorouteError(f"--from-hf {folder}: scale_attn_by_inverse_layer_idx=true is not supported")
    if cfg.get("scale_attn_weights", True) is not True:
        raise MonorouteError(f"--from-hf {folder}: scale_attn_weights=false is not supported")
    act = cfg.get("activation_function", "gelu_new")
    if act not in ACTIVATIONS:
        raise MonorouteError(f"--from-hf {folder}: activation_function {act!r} is not supported; one of "
                             f"{', '.join(ACTIVATIONS)}")
    return cfg


SIZES = ("n_embd", "vocab_size", "n_positions", "n_layer", "n_head")


def gpt_config_from_hf(cfg: dict, folder: str | Path = "") -> GPTConfig:
    for key in SIZES:
        value = cfg.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise MonorouteError(f"--from-hf {folder}: config.json's {key} must be a whole number >= 1, got "
                                 f"{value!r}; restore the file save_pretrained wrote")
    inner = cfg.get("n_inner")
    if inner is not None and (isinstance(inner, bool) or not isinstance(inner, int) or inner < 1):
        raise MonorouteError(f"--from-hf {folder}: config.json's n_inner must be a whole number >= 1 or null, got "
                             f"{inner!r}")
    d = cfg["n_embd"]
    return GPTConfig(
        vocab_size=cfg["vocab_size"], block_size=cfg["n_positions"], n_layer=cfg["n_layer"], n_head=cfg["n_head"],
        d_model=d, dropout=0.0, bias=True, tie_weights=cfg.get("tie_word_embeddings", True), ffn="dense",
        d_ff=cfg.get("n_inner") or 4 * d, dense_activation=ACTIVATIONS[cfg.get("activation_function", "gelu_new")],
        ln_eps=cfg.get("layer_norm_epsilon", 1e-5),
    ).validate()


def hf_state_dict(hf: dict[str, torch.Tensor], cfg: GPTConfig) -> dict[str, torch.Tensor]:
    """GPT-2 tensor names -> ours (the transformer.* prefix of GPT2LMHeadModel is optional)."""
    src = {(k[len("transformer."):] if k.startswith("transformer.") else k): v for k, v in hf.items()}

    def take(name: str, transpose: bool = False) -> torch.Tensor:
        if name not in src:
            raise MonorouteError(f"HF checkpoint lacks tensor {name!r}; is it a GPT-2-family model?")
        t = src[name]
        return t.t().contiguous() if transpose else t

    out = {"wte.weight": take("wte.weight"), "wpe.weight": take("wpe.weight"),
           "ln_f.weight": take("ln_f.weight"), "ln_f.bias": take("ln_f.bias")}
    for i in range(cfg.n_layer):
        h, b = f"h.{i}.", f"blocks.{i}."
        for ours, theirs in (("ln_1", "ln_1"), ("ln_2", "ln_2")):
            out[b + ours + ".weight"], out[b + ours + ".bias"] = take(h + theirs + ".weight"), take(h + theirs + ".bias")
        # Conv1D (in, out) -> Linear (out, in); c_attn's output is [q | k | v], as our qkv split expects.
        for ours, theirs in (("attn.qkv", "attn.c_attn"), ("attn.proj", "attn.c_proj"),
                             ("mlp.up", "mlp.c_fc"), ("mlp.down", "mlp.c_proj")):
            out[b + ours + ".weight"] = take(h + theirs + ".weight", transpose=True)
            out[b + ours + ".bias"] = take(h + theirs + ".bias")
    if cfg.tie_weights:
        out["lm_head.weight"] = out["wte.weight"]
    else:
        if "lm_head.weight" not in hf:
            raise MonorouteError("HF checkpoint has untied embeddings but no lm_head.weight")
        out["lm_head.weight"] = hf["lm_head.weight"]
    return out


def load_hf_gpt2(folder: str | Path, dtype: torch.dtype = torch.float32):
    """(GPT, GPTConfig, tokenizer JSON text) from a local GPT-2-family `save_pretrained` folder."""
    import safetensors.torch as st

    from monoroute.models.gpt import GPT

    folder = Path(folder)
    hf_cfg = read_hf_config(folder)
    weights = folder / WEIGHTS
    if not weights.is_file():
        pickled = folder / "pytorch_model.bin"
        hint = (" (it has pytorch_model.bin: pickles are not loaded; re-save with "
                "model.save_pretrained(DIR, safe_serialization=True))") if pickled.exists() else ""
        raise MonorouteError(f"--from-hf {folder}: no {WEIGHTS}{hint}")
    tokenizer = folder / TOKENIZER
    if not tokenizer.is_file():
        raise MonorouteError(f"--from-hf {folder}: no {TOKENIZER}; save the fast tokenizer with it "
                             f"(AutoTokenizer.from_pretrained(...).save_pretrained(DIR))")
    cfg = gpt_config_from_hf(hf_cfg, folder)
    model = GPT(cfg)
    try:
        tensors = st.load_file(str(weights))
    except Exception as exc:  # safetensors raises its own error types for a truncated or empty file
        raise MonorouteError(f"--from-hf {folder}: {WEIGHTS} does not read as safetensors "
                             f"({str(exc).splitlines()[0] if str(exc) else type(exc).__name__}); it may be truncated: "
                             f"save it again") from None
    state = hf_state_dict(tensors, cfg)
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # a tensor whose shape differs from config.json's sizes
        first = next((line.strip() for line in str(exc).splitlines() if "size mismatch" in line), str(exc).splitlines()[0])
        raise MonorouteError(f"--from-hf {folder}: the weights do not match config.json's sizes ({first})") from None
    missing = [m for m in missing if m != "lm_head.weight" or not cfg.tie_weights]
    if missing or unexpected:
        raise MonorouteError(f"--from-hf {folder}: weights do not match a GPT-2 of this config (missing "
                             f"{missing[:3]}, unexpected {list(unexpected)[:3]})")
    return model.to(dtype).eval(), cfg, tokenizer.read_text(encoding="utf-8")
