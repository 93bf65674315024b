"""Hugging Face checkpoints as our GPT: GPT-2 and GPT-NeoX (Pythia) folders, converted by hand.

Supported: folders written by `transformers`' `save_pretrained` (weights in `model.safetensors`, the fast
tokenizer's `tokenizer.json` beside them) of

- `model_type: "gpt2"` (GPT2LMHeadModel / GPT2Model): GPT-2 small..xl, DistilGPT-2, any GPT-2-shaped
  model. GPT-2's Conv1D stores weights as (in, out), our nn.Linear as (out, in): transposed. Its MLP
  uses "gelu_new" (the tanh approximation): our `dense_activation="gelu_tanh"`.
- `model_type: "gpt_neox"` (GPTNeoXForCausalLM): Pythia 14M..12B and any NeoX-shaped model. Rotary
  positions on the first `partial_rotary_factor` of each head (our `position="rotary"`, `rotary_dims`),
  the parallel residual (`parallel_residual`), untied input and output embeddings; its fused
  query_key_value holds [q | k | v] *per head*, reordered into our [q | k | v] over all heads.

Why by hand and not TransformerLens' converters: our GPT is our own module tree (hook names already
TransformerLens'), and the two mappings are a few lines each, tested to transformers' logits.
Not supported (refused with the reason): other architectures (Llama-family ones need RMSNorm,
grouped-query attention and a gated FFN: issue 33), `pytorch_model.bin` weights (pickles are never
loaded: re-save with `safe_serialization=True`), GPT-2's `scale_attn_by_inverse_layer_idx`, NeoX's rope
scaling and `attention_bias: false`, untied embeddings with no output head.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from monoroute.errors import MonorouteError
from monoroute.models.config import GPTConfig

ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu", "silu": "silu"}
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
    kind = cfg.get("model_type")
    if kind not in FAMILIES:
        raise MonorouteError(f"--from-hf {folder}: model_type {kind!r} is not supported; only GPT-2 ('gpt2'), "
                             f"GPT-NeoX / Pythia ('gpt_neox'), Llama ('llama') and Qwen2 ('qwen2') checkpoints load "
                             f"into this GPT")
    if kind == "gpt_neox":
        return check_neox(cfg, folder)
    if kind in ("llama", "qwen2"):
        return check_llama(cfg, folder)
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
NEOX_SIZES = ("hidden_size", "vocab_size", "max_position_embeddings", "num_hidden_layers", "num_attention_heads",
              "intermediate_size")
FAMILIES = ("gpt2", "gpt_neox", "llama", "qwen2")
LLAMA_SIZES = ("hidden_size", "vocab_size", "max_position_embeddings", "num_hidden_layers", "num_attention_heads",
               "intermediate_size")


def check_neox(cfg: dict, folder) -> dict:
    rope = rope_parameters(cfg)
    if rope.get("rope_type", "default") != "default" or cfg.get("rope_scaling"):
        raise MonorouteError(f"--from-hf {folder}: rope scaling ({rope.get('rope_type') or cfg.get('rope_scaling')}) "
                             f"is not supported; only plain rotary positions")
    if cfg.get("attention_bias", True) is not True:
        raise MonorouteError(f"--from-hf {folder}: attention_bias=false is not supported (our linear layers share one "
                             f"bias setting and NeoX's FFN has biases)")
    act = cfg.get("hidden_act", "gelu")
    if act not in ACTIVATIONS:
        raise MonorouteError(f"--from-hf {folder}: hidden_act {act!r} is not supported; one of {', '.join(ACTIVATIONS)}")
    return cfg


def check_llama(cfg: dict, folder) -> dict:
    rope = rope_parameters(cfg)
    if rope.get("rope_type", "default") != "default" or cfg.get("rope_scaling"):
        raise MonorouteError(f"--from-hf {folder}: rope scaling ({rope.get('rope_type') or cfg.get('rope_scaling')}) "
                             f"is not supported; only plain rotary positions (Llama 1/2, SmolLM, TinyLlama, Qwen2)")
    if cfg.get("use_sliding_window") or any(t != "full_attention" for t in cfg.get("layer_types") or []):
        raise MonorouteError(f"--from-hf {folder}: sliding-window attention is not supported; only full attention")
    if cfg.get("mlp_bias") or cfg.get("attention_bias"):
        raise MonorouteError(f"--from-hf {folder}: mlp_bias / attention_bias true is not supported (Llama has none)")
    if cfg.get("pretraining_tp", 1) != 1:
        raise MonorouteError(f"--from-hf {folder}: pretraining_tp={cfg.get('pretraining_tp')} is not supported")
    d, heads = cfg.get("hidden_size"), cfg.get("num_attention_heads")
    if cfg.get("head_dim") is not None and isinstance(d, int) and isinstance(heads, int) and heads \
            and cfg["head_dim"] != d // heads:
        raise MonorouteError(f"--from-hf {folder}: head_dim {cfg['head_dim']} != hidden_size / num_attention_heads "
                             f"({d // heads}) is not supported")
    act = cfg.get("hidden_act", "silu")
    if act != "silu":
        raise MonorouteError(f"--from-hf {folder}: hidden_act {act!r} is not supported for a gated FFN; only 'silu'")
    return cfg


def rope_parameters(cfg: dict) -> dict:
    """rope_theta and partial_rotary_factor (NeoX and Llama alike), from transformers 5's rope_parameters
    or the older keys."""
    rope = dict(cfg.get("rope_parameters") or {})
    rope.setdefault("rope_theta", cfg.get("rotary_emb_base", cfg.get("rope_theta", 10000.0)))
    rope.setdefault("partial_rotary_factor", cfg.get("rotary_pct", cfg.get("partial_rotary_factor", 1.0)))
    return rope


def check_sizes(cfg: dict, keys, folder) -> None:
    for key in keys:
        value = cfg.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise MonorouteError(f"--from-hf {folder}: config.json's {key} must be a whole number >= 1, got "
                                 f"{value!r}; restore the file save_pretrained wrote")


def gpt_config_from_hf(cfg: dict, folder: str | Path = "") -> GPTConfig:
    if cfg.get("model_type") in ("llama", "qwen2"):
        check_sizes(cfg, LLAMA_SIZES, folder)
        d, heads = cfg["hidden_size"], cfg["num_attention_heads"]
        kv = cfg.get("num_key_value_heads") or heads
        if d % heads or isinstance(kv, bool) or not isinstance(kv, int) or heads % kv:
            raise MonorouteError(f"--from-hf {folder}: hidden_size {d}, num_attention_heads {heads} and "
                                 f"num_key_value_heads {kv} do not divide evenly")
        return GPTConfig(
            vocab_size=cfg["vocab_size"], block_size=cfg["max_position_embeddings"], n_layer=cfg["num_hidden_layers"],
            n_head=heads, d_model=d, dropout=0.0, bias=False, qkv_bias=cfg["model_type"] == "qwen2",
            tie_weights=bool(cfg.get("tie_word_embeddings", False)), ffn="dense", d_ff=cfg["intermediate_size"],
            dense_activation="silu", ffn_gated=True, ln_eps=cfg.get("rms_norm_eps", 1e-6), norm="rms",
            n_kv_head=kv, position="rotary", rotary_base=float(rope_parameters(cfg)["rope_theta"]),
        ).validate()
    if cfg.get("model_type") == "gpt_neox":
        check_sizes(cfg, NEOX_SIZES, folder)
        d, heads = cfg["hidden_size"], cfg["num_attention_heads"]
        if d % heads:
            raise MonorouteError(f"--from-hf {folder}: hidden_size {d} is not divisible by num_attention_heads {heads}")
        rope = rope_parameters(cfg)
        return GPTConfig(
            vocab_size=cfg["vocab_size"], block_size=cfg["max_position_embeddings"], n_layer=cfg["num_hidden_layers"],
            n_head=heads, d_model=d, dropout=0.0, bias=True, tie_weights=bool(cfg.get("tie_word_embeddings", False)),
            ffn="dense", d_ff=cfg["intermediate_size"], dense_activation=ACTIVATIONS[cfg.get("hidden_act", "gelu")],
            ln_eps=cfg.get("layer_norm_eps", 1e-5), position="rotary",
            rotary_dims=int(d // heads * float(rope["partial_rotary_factor"])), rotary_base=float(rope["rope_theta"]),
            parallel_residual=bool(cfg.get("use_parallel_residual", True)),
        ).validate()
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


def tensor_reader(hf: dict[str, torch.Tensor], prefix: str, family: str):
    """take(name): the checkpoint's tensor `name`, with or without the model class's `prefix`."""
    src = {(k[len(prefix):] if k.startswith(prefix) else k): v for k, v in hf.items()}

    def take(name: str) -> torch.Tensor:
        if name not in src:
            raise MonorouteError(f"HF checkpoint lacks tensor {name!r}; is it a {family} model?")
        return src[name]

    return take


def output_head(hf: dict[str, torch.Tensor], out: dict, cfg: GPTConfig, name: str) -> torch.Tensor:
    if cfg.tie_weights:
        return out["wte.weight"]
    if name not in hf:
        raise MonorouteError(f"HF checkpoint has untied embeddings but no {name}")
    return hf[name]


def neox_state_dict(hf: dict[str, torch.Tensor], cfg: GPTConfig) -> dict[str, torch.Tensor]:
    """GPT-NeoX tensor names -> ours (the gpt_neox.* prefix of GPTNeoXForCausalLM is optional)."""
    take = tensor_reader(hf, "gpt_neox.", "GPT-NeoX")
    H, d = cfg.n_head, cfg.d_model
    out = {"wte.weight": take("embed_in.weight"), "ln_f.weight": take("final_layer_norm.weight"),
           "ln_f.bias": take("final_layer_norm.bias")}
    for i in range(cfg.n_layer):
        h, b = f"layers.{i}.", f"blocks.{i}."
        for ours, theirs in (("ln_1", "input_layernorm"), ("ln_2", "post_attention_layernorm"),
                             ("attn.proj", "attention.dense"), ("mlp.up", "mlp.dense_h_to_4h"),
                             ("mlp.down", "mlp.dense_4h_to_h")):
            out[b + ours + ".weight"], out[b + ours + ".bias"] = take(h + theirs + ".weight"), take(h + theirs + ".bias")
        # query_key_value's rows are (head, [q | k | v], head_dim): regroup as ([q | k | v], head, head_dim)
        w, bias = take(h + "attention.query_key_value.weight"), take(h + "attention.query_key_value.bias")
        out[b + "attn.qkv.weight"] = w.view(H, 3, d // H, d).transpose(0, 1).reshape(3 * d, d)
        out[b + "attn.qkv.bias"] = bias.view(H, 3, d // H).transpose(0, 1).reshape(3 * d)
    out["lm_head.weight"] = output_head(hf, out, cfg, "embed_out.weight")
    return out


def llama_state_dict(hf: dict[str, torch.Tensor], cfg: GPTConfig) -> dict[str, torch.Tensor]:
    """Llama / Qwen2 tensor names -> ours (the model.* prefix of LlamaForCausalLM is optional): q, k and v
    projections concatenated into qkv (k and v with n_kv_head heads), gate / up / down as ours."""
    take = tensor_reader(hf, "model.", "Llama-family")
    out = {"wte.weight": take("embed_tokens.weight"), "ln_f.weight": take("norm.weight")}
    for i in range(cfg.n_layer):
        h, b = f"layers.{i}.", f"blocks.{i}."
        for ours, theirs in (("ln_1", "input_layernorm"), ("ln_2", "post_attention_layernorm"),
                             ("attn.proj", "self_attn.o_proj"), ("mlp.gate", "mlp.gate_proj"),
                             ("mlp.up", "mlp.up_proj"), ("mlp.down", "mlp.down_proj")):
            out[b + ours + ".weight"] = take(h + theirs + ".weight")
        out[b + "attn.qkv.weight"] = torch.cat([take(h + f"self_attn.{p}_proj.weight") for p in "qkv"])
        if cfg.layer_qkv_bias:
            out[b + "attn.qkv.bias"] = torch.cat([take(h + f"self_attn.{p}_proj.bias") for p in "qkv"])
    out["lm_head.weight"] = output_head(hf, out, cfg, "lm_head.weight")
    return out


def hf_state_dict(hf: dict[str, torch.Tensor], cfg: GPTConfig) -> dict[str, torch.Tensor]:
    """GPT-2 tensor names -> ours (the transformer.* prefix of GPT2LMHeadModel is optional); GPT-NeoX
    (rotary, LayerNorm) and Llama-family (RMSNorm) checkpoints go to their own mappings."""
    if cfg.norm == "rms":
        return llama_state_dict(hf, cfg)
    if cfg.position == "rotary":
        return neox_state_dict(hf, cfg)
    read = tensor_reader(hf, "transformer.", "GPT-2-family")

    def take(name: str, transpose: bool = False) -> torch.Tensor:
        t = read(name)
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
    out["lm_head.weight"] = output_head(hf, out, cfg, "lm_head.weight")
    return out


def load_hf(folder: str | Path, dtype: torch.dtype = torch.float32):
    """(GPT, GPTConfig, tokenizer JSON text) from a local GPT-2 or GPT-NeoX `save_pretrained` folder."""
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
        raise MonorouteError(f"--from-hf {folder}: weights do not match a {hf_cfg['model_type']} of this config (missing "
                             f"{missing[:3]}, unexpected {list(unexpected)[:3]})")
    return model.to(dtype).eval(), cfg, tokenizer.read_text(encoding="utf-8")
