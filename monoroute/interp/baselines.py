"""Post-hoc baselines trained on a dense model's FFN layer: a TopK SAE and a TopK transcoder.

Both get the routed model's width N and cap k, so the comparison is at equal N and k:

- "sae": a sae-lens `TopKTrainingSAE` trained by `sae_lens.SAETrainer` to reconstruct the dense
  MLP's GELU activations `blocks.{L}.mlp.hook_post` (T, d_ff).
- "transcoder": our own `RoutedFFN(d_model, N, k, router="dense", activation="relu")` (the exact
  top-k of all N ReLU pre-activations: a TopK transcoder) plus an output bias, trained post hoc
  with Adam to map the MLP's input x = ln_2(resid_mid) to its output `blocks.{L}.hook_mlp_out`.
  It is the routed model's layer, trained post hoc on the dense model instead of natively.

Training data: activations of the dense model computed on the fly from the TRAIN split's random
windows (`store.batch`), never the validation split, which `spliced_loss` evaluates on.

Both baselines share one interface (`Baseline`), so capture, metrics and splicing treat them alike:

    baseline.input_hook   the hook point its input is read from (capture's UnitSet.hook)
    baseline.target_hook  the hook point whose activation it reconstructs and, spliced, replaces
    baseline.input_of(cache) -> (T, d_in)   baseline.target_of(cache) -> (T, d_out)
    baseline.encode(x) -> indices (T, k) int64, values (T, k) float32 (0 where a latent does not fire)
    baseline.reconstruct(x) -> (T, d_out)
    baseline.save(dir) / load_baseline(dir): baseline.json + baseline.safetensors (no pickles); the SAE
        also writes sae-lens's own format to dir/sae_lens/ (cfg.json + sae_weights.safetensors)

sae-lens is imported only to train (it takes ~10 s to import); a saved SAE loads and runs without it.
"""
from __future__ import annotations

import contextlib
import copy
import io
import json
import time
from pathlib import Path
from typing import Callable, Iterator, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from monoroute.errors import MonorouteError
from monoroute.train.layerwise import layer_cache  # one teacher-reading helper for baselines and upcycling

FORMAT = 1
CONFIG_FILE = "baseline.json"
WEIGHTS_FILE = "baseline.safetensors"
SAE_LENS_DIR = "sae_lens"
KINDS = ("sae", "transcoder")

# Defaults sized for the cpu-small preset (d_model 128, d_ff 512, N = 16384, k = 32) on 2 CPU cores
# shared with a training job, layer 2, 2048-token batches. Measured per step: SAE 3-5.5 s (~8 s once
# AuxK runs on dead latents; sae-lens decodes densely: six 2048 x 512 x 16384 matmuls per step, and
# its sparse-activation path has no CPU backward), transcoder 0.3-0.45 s, the dense model's forward
# 0.15 s. Full runs at these defaults: SAE 143-240 s, transcoder 101-143 s at 700k tokens (so
# ~120-185 s at 800k). Raise `tokens` on a GPU.
SAE_TOKENS = 100_000
SAE_LR = 2e-3
TRANSCODER_TOKENS = 800_000
TRANSCODER_LR = 2e-3
BATCH_TOKENS = 2048
NORM_BATCHES = 4  # batches used to estimate the SAE's input scale before training
DECAY_FRACTION = 0.2  # the SAE's learning rate decays linearly to zero over the last 20 % of steps
DEAD_TOKENS = 50_000  # a latent that has not fired in this many training tokens counts as dead


# --- reading activations ------------------------------------------------------------------------------


def model_device(model) -> torch.device:
    return next(model.parameters()).device


def train_batches(model, store, baseline: "Baseline", batch_tokens: int, seed: int,
                  device: torch.device) -> Iterator[tuple[Tensor, Tensor]]:
    """Endless (input (T, d_in), target (T, d_out)) pairs of the dense model on random TRAIN windows:
    step s reads `store.batch(s, ...)`, so the stream is a pure function of `seed`."""
    block = model.cfg.block_size
    windows = max(1, batch_tokens // block)
    step = 0
    while True:
        x, _ = store.batch(step, windows, block, seed, split="train")
        cache = layer_cache(model, x.to(model_device(model)), baseline.hooks)
        yield baseline.input_of(cache).to(device), baseline.target_of(cache).to(device)
        step += 1


# --- the common interface -----------------------------------------------------------------------------
class Baseline(nn.Module):
    """A post-hoc dictionary on one layer of a dense model. Subclasses set `name`, the hooks, and
    implement `input_of`, `encode`, `reconstruct`, `tensors`/`from_saved`."""

    name: str = ""

    def __init__(self, layer: int, n_latents: int, k: int) -> None:
        super().__init__()
        if not 1 <= k <= n_latents:
            raise MonorouteError(f"k must be between 1 and n_latents={n_latents}, got k={k}")
        self.layer, self.n_latents, self.k = layer, n_latents, k
        self.train_info: dict = {}

    # hook points
    @property
    def input_hook(self) -> str:
        raise NotImplementedError

    @property
    def target_hook(self) -> str:
        raise NotImplementedError

    @property
    def hook(self) -> str:
        """The single hook point `encode`'s input comes from (what a capture UnitSet reads)."""
        return self.input_hook

    @property
    def hooks(self) -> list[str]:
        """Every hook point needed to compute both the input and the target."""
        return list(dict.fromkeys([self.input_hook, self.target_hook]))

    @property
    def device(self) -> torch.device:
        return next(self.buffers(), next(self.parameters(), torch.empty(0))).device

    def input_of(self, cache: dict) -> Tensor:
        """(T, d_in) the baseline's input, from a cache holding `input_hook`."""
        raise NotImplementedError

    def target_of(self, cache: dict) -> Tensor:
        """(T, d_out) what the baseline reconstructs, from a cache holding `target_hook`."""
        return cache[self.target_hook].reshape(-1, cache[self.target_hook].shape[-1])

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x (T, d_in) -> latents as sparse top-k: indices (T, k) int64, values (T, k) float32."""
        raise NotImplementedError

    def reconstruct(self, x: Tensor) -> Tensor:
        """x (T, d_in) -> (T, d_out) the reconstruction of the target."""
        raise NotImplementedError

    def extractor(self) -> Callable[[dict], tuple[Tensor, Tensor]]:
        """cache -> (indices, values) (T, k) each: a capture `Extractor` for this baseline's latents."""

        def extract(cache: dict) -> tuple[Tensor, Tensor]:
            with torch.no_grad():
                x = self.input_of(cache).to(self.device)
                indices, values = self.encode(x)
            return indices, values.float()

        return extract

    def splice_hooks(self, mode: str = "reconstruct") -> list[tuple[str, Callable]]:
        """Forward hooks that replace `target_hook` by the reconstruction ("reconstruct") or by zeros
        ("zero"), for `model.hooks(...)` / `run_with_hooks`."""
        if mode == "zero":
            return [(self.target_hook, lambda act, hook: torch.zeros_like(act))]
        if mode != "reconstruct":
            raise MonorouteError(f"unknown splice mode {mode!r}; use reconstruct or zero")
        seen: dict[str, Tensor] = {}

        def remember(act, hook):
            seen[hook.name] = act

        def replace(act, hook):
            recon = self.reconstruct(self.input_of(seen).to(self.device))
            return recon.to(act.dtype).to(act.device).view_as(act)

        return [(self.input_hook, remember), (self.target_hook, replace)]

    # saving
    def config(self) -> dict:
        return {"format": FORMAT, "kind": self.name, "layer": self.layer, "n_latents": self.n_latents, "k": self.k}

    def tensors(self) -> dict[str, Tensor]:
        raise NotImplementedError

    def save(self, folder: str | Path) -> Path:
        """Write baseline.json and baseline.safetensors into `folder` (created if missing)."""
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {name: t.detach().cpu().contiguous() for name, t in self.tensors().items()}
        save_file(tensors, str(folder / WEIGHTS_FILE))
        config = dict(self.config(), train=self.train_info)
        (folder / CONFIG_FILE).write_text(json.dumps(config, indent=1), encoding="utf-8")
        return folder


def load_baseline(folder: str | Path, device: str | torch.device = "cpu") -> Baseline:
    """A baseline saved by `Baseline.save`, in eval mode (safetensors + JSON only)."""
    from safetensors.torch import load_file

    folder = Path(folder)
    try:
        config = json.loads((folder / CONFIG_FILE).read_text(encoding="utf-8"))
        tensors = load_file(str(folder / WEIGHTS_FILE))
    except (OSError, ValueError) as e:
        raise MonorouteError(f"{folder} holds no saved baseline ({type(e).__name__}: {e}); train it again") from None
    if not isinstance(config, dict) or config.get("format") != FORMAT or config.get("kind") not in KINDS:
        raise MonorouteError(f"{folder / CONFIG_FILE} is not a format-{FORMAT} baseline config; train it again")
    cls = SAEBaseline if config["kind"] == "sae" else TranscoderBaseline
    try:
        baseline = cls.from_saved(config, tensors)
    except (KeyError, RuntimeError) as e:
        raise MonorouteError(f"{folder} does not match its config ({type(e).__name__}: {e}); train it again") from None
    baseline.train_info = config.get("train", {})
    return baseline.to(device).eval()


def check_dense_layer(model, layer: int, what: str) -> None:
    from monoroute.models.gpt import DenseMLP

    n_layer = len(model.blocks)
    if not 0 <= layer < n_layer:
        raise MonorouteError(f"layer {layer} is out of range: the model has layers 0..{n_layer - 1}")
    if not isinstance(model.blocks[layer].mlp, DenseMLP):
        raise MonorouteError(f"the {what} trains on a dense FFN's activations, but layer {layer} is routed; "
                             f"use a dense model (or a dense layer)")


def check_budget(tokens: int, batch_tokens: int, block_size: int) -> tuple[int, int]:
    """(tokens per batch, steps): batches are whole context windows, at least one step."""
    if tokens <= 0 or batch_tokens <= 0:
        raise MonorouteError(f"tokens and batch_tokens must be positive, got {tokens} and {batch_tokens}")
    batch = max(1, batch_tokens // block_size) * block_size
    return batch, max(1, tokens // batch)


# --- SAE ----------------------------------------------------------------------------------------------
class SAEBaseline(Baseline):
    """A TopK SAE on `blocks.{layer}.mlp.hook_post`, in sae-lens's parametrisation (same tensors,
    same encode arithmetic as `TopKTrainingSAE.encode`):

        hidden_pre = ((x - b_dec·apply_b_dec_to_input) @ W_enc + b_enc) [· ‖W_dec[i]‖ if rescale]
        acts = ReLU(top-k(hidden_pre))          x̂ = Σ_i acts_i / [‖W_dec[i]‖] · W_dec[i] + b_dec

    `sae` is the sae-lens training SAE when this object came out of `train_sae` (None after load)."""

    name = "sae"

    def __init__(self, layer: int, d_in: int, n_latents: int, k: int, apply_b_dec_to_input: bool = True,
                 rescale_acts_by_decoder_norm: bool = False) -> None:
        super().__init__(layer, n_latents, k)
        self.d_in = d_in
        self.apply_b_dec_to_input = apply_b_dec_to_input
        self.rescale_acts_by_decoder_norm = rescale_acts_by_decoder_norm
        self.register_buffer("W_enc", torch.zeros(d_in, n_latents))
        self.register_buffer("b_enc", torch.zeros(n_latents))
        self.register_buffer("W_dec", torch.zeros(n_latents, d_in))
        self.register_buffer("b_dec", torch.zeros(d_in))
        object.__setattr__(self, "sae", None)  # not a submodule: kept out of state_dict and .to()

    @classmethod
    def from_sae_lens(cls, sae, layer: int) -> "SAEBaseline":
        """A copy of a sae-lens TopK SAE's weights and encode settings (normalisation must be folded)."""
        if sae.cfg.normalize_activations != "none":
            raise MonorouteError(f"the SAE still normalises its input ({sae.cfg.normalize_activations}); fold it first")
        base = cls(layer, sae.cfg.d_in, sae.cfg.d_sae, sae.cfg.k, bool(sae.cfg.apply_b_dec_to_input),
                   bool(getattr(sae.cfg, "rescale_acts_by_decoder_norm", False)))
        with torch.no_grad():
            for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
                getattr(base, name).copy_(getattr(sae, name).detach().float())
        object.__setattr__(base, "sae", sae)
        return base.to(sae.W_enc.device)

    @property
    def input_hook(self) -> str:
        return f"blocks.{self.layer}.mlp.hook_post"

    @property
    def target_hook(self) -> str:
        return self.input_hook

    def input_of(self, cache: dict) -> Tensor:
        act = cache[self.input_hook]
        return act.reshape(-1, act.shape[-1])

    def hidden_pre(self, x: Tensor) -> Tensor:
        """(T, d_in) -> (T, N) pre-activations (what the top-k is taken over)."""
        sae_in = x.to(self.W_enc.dtype) - self.b_dec * self.apply_b_dec_to_input
        pre = sae_in @ self.W_enc + self.b_enc
        if self.rescale_acts_by_decoder_norm:
            pre = pre * self.W_dec.norm(dim=-1)
        return pre

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        top = self.hidden_pre(x.reshape(-1, self.d_in)).topk(self.k, dim=-1, sorted=False)
        return top.indices, top.values.relu()

    def decode(self, indices: Tensor, values: Tensor) -> Tensor:
        """Sparse latents (T, k) -> (T, d_in), without building the dense (T, N) code."""
        if self.rescale_acts_by_decoder_norm:
            values = values / self.W_dec.norm(dim=-1)[indices]
        return F.embedding_bag(indices, self.W_dec, per_sample_weights=values, mode="sum") + self.b_dec

    def reconstruct(self, x: Tensor) -> Tensor:
        return self.decode(*self.encode(x))

    def config(self) -> dict:
        return dict(super().config(), d_in=self.d_in, apply_b_dec_to_input=self.apply_b_dec_to_input,
                    rescale_acts_by_decoder_norm=self.rescale_acts_by_decoder_norm, hook=self.input_hook)

    def tensors(self) -> dict[str, Tensor]:
        return {name: getattr(self, name) for name in ("W_enc", "b_enc", "W_dec", "b_dec")}

    @classmethod
    def from_saved(cls, config: dict, tensors: dict[str, Tensor]) -> "SAEBaseline":
        base = cls(config["layer"], config["d_in"], config["n_latents"], config["k"],
                   config["apply_b_dec_to_input"], config["rescale_acts_by_decoder_norm"])
        base.load_state_dict(tensors)
        return base

    def save(self, folder: str | Path) -> Path:
        """Our format, plus sae-lens's inference format in folder/sae_lens/ when the sae-lens object
        is at hand (loadable with `sae_lens.SAE.load_from_disk`)."""
        folder = super().save(folder)
        if self.sae is not None:
            self.sae.save_inference_model(folder / SAE_LENS_DIR)
        return folder


def _start_sae(model, store, layer: int, n_latents: int, k: int, batch: int, seed: int, dev):
    """What `train_sae` starts from: the sae-lens TopK SAE at its seeded initialisation with b_dec at the
    (scaled) mean input, the input scale, the first NORM_BATCHES input batches and the rest of the stream."""
    from monoroute.toy.sae_baselines import _offline_sae_lens

    check_dense_layer(model, layer, "SAE")
    d_in = model.blocks[layer].mlp.down.in_features
    sae_lens, _, _ = _offline_sae_lens()
    from sae_lens.saes.sae import SAEMetadata

    probe = SAEBaseline(layer, d_in, n_latents, k)  # only for its hook names
    data = train_batches(model, store, probe, batch, seed, dev)
    with torch.no_grad():  # scale and mean from the first batches (which are then trained on too)
        first = torch.cat([next(data)[0] for _ in range(NORM_BATCHES)]).float()
        scale = d_in**0.5 / first.norm(dim=-1).mean().clamp(min=1e-12).item()
        mean = first.mean(0) * scale
    sae_cfg = sae_lens.TopKTrainingSAEConfig(
        k=k, d_in=d_in, d_sae=n_latents, device=str(dev),
        metadata=SAEMetadata(model_name="monoroute", hook_name=probe.input_hook, context_size=model.cfg.block_size),
    )
    with torch.random.fork_rng(devices=[]):  # sae-lens initialises from the global RNG
        torch.manual_seed(seed)
        sae = sae_lens.TopKTrainingSAE(sae_cfg)
    with torch.no_grad():
        sae.b_dec.copy_(mean.to(sae.b_dec))
    return sae, scale, first, data


def init_sae(model, store, layer: int, n_latents: int, k: int, batch_tokens: int = BATCH_TOKENS, seed: int = 0,
             device: str = "cpu") -> SAEBaseline:
    """The SAE `train_sae` would train, at its initialisation (same seed, same input scale folded into
    the weights, so it reads raw activations): the matched random-init floor of the trained SAE."""
    from monoroute.devices import resolve_device

    batch, _ = check_budget(batch_tokens, batch_tokens, model.cfg.block_size)
    sae, scale, _, _ = _start_sae(model, store, layer, n_latents, k, batch, seed, resolve_device(device))
    sae.fold_activation_norm_scaling_factor(scale)
    base = SAEBaseline.from_sae_lens(sae, layer).eval()
    object.__setattr__(base, "sae", None)  # nothing of sae-lens's to save: it was never trained
    base.train_info = {"tokens": 0, "steps": 0, "seed": seed, "input_scale": scale, "init_only": True}
    return base


def train_sae(model, store, layer: int, n_latents: int, k: int, tokens: int = SAE_TOKENS,
              batch_tokens: int = BATCH_TOKENS, lr: float = SAE_LR, seed: int = 0, device: str = "cpu",
              progress: bool = True) -> SAEBaseline:
    """A TopK SAE (sae-lens `TopKTrainingSAE`, N = n_latents, cap k) on `blocks.{layer}.mlp.hook_post`
    of a dense `model`, trained through `sae_lens.SAETrainer` on ~`tokens` activations computed on
    the fly from the store's TRAIN windows. Returned in eval mode, on `device`.

    Inputs are scaled to mean norm sqrt(d_in) (sae-lens's "expected_average_only_in", estimated on
    NORM_BATCHES batches) and b_dec starts at their mean; the trainer folds the scale back into the
    weights, so the result reads raw activations. Constant learning rate, linear decay to zero over
    the last 20 % of steps; latents with no firing in the last DEAD_TOKENS tokens get AuxK loss."""
    from monoroute.devices import resolve_device
    from monoroute.toy.sae_baselines import _offline_sae_lens

    batch, steps = check_budget(tokens, batch_tokens, model.cfg.block_size)
    dev = resolve_device(device)
    start = time.perf_counter()
    sae_lens, LoggingConfig, SAETrainerConfig = _offline_sae_lens()
    sae, scale, first, data = _start_sae(model, store, layer, n_latents, k, batch, seed, dev)
    trainer_cfg = SAETrainerConfig(
        total_training_samples=steps * batch, train_batch_size_samples=batch, lr=lr, lr_end=lr,
        lr_decay_steps=int(steps * DECAY_FRACTION), device=str(dev),
        dead_feature_window=max(1, DEAD_TOKENS // batch), logger=LoggingConfig(log_to_wandb=False),
    )

    def inputs() -> Iterator[Tensor]:
        for chunk in first.split(batch):
            yield chunk
        for x, _ in data:
            yield x

    trainer = sae_lens.SAETrainer(trainer_cfg, sae, inputs())
    trainer.activation_scaler.scaling_factor = scale  # fit() then skips its own estimate and folds this one
    quiet = contextlib.nullcontext() if progress else contextlib.redirect_stderr(io.StringIO())
    with quiet:  # SAETrainer.fit always draws a tqdm bar
        sae = trainer.fit().eval()
    base = SAEBaseline.from_sae_lens(sae, layer).eval()
    base.train_info = {"tokens": steps * batch, "steps": steps, "batch_tokens": batch, "lr": lr, "seed": seed,
                       "input_scale": scale, "seconds": round(time.perf_counter() - start, 2),
                       "trainer": "sae_lens.SAETrainer", "sae_lens_version": sae_lens.__version__}
    return base


# --- transcoder ---------------------------------------------------------------------------------------
class TranscoderBaseline(Baseline):
    """A TopK transcoder for layer L of a dense model: x = ln_2(resid_mid) (the model's own ln_2,
    copied and frozen) -> RoutedFFN(router="dense", activation="relu") + b_out ≈ mlp_out.

    Its latents are the layer's units: `encode` returns exactly what the RoutedFFN computes
    (`last_activations`). b_out is an output bias the RoutedFFN lacks (the MLP output's mean would
    otherwise cost units)."""

    name = "transcoder"

    def __init__(self, layer: int, d_model: int, n_units: int, k: int, ln_bias: bool = True, ln_eps: float = 1e-5,
                 aux_coef: float = 0.1, dead_window: int = DEAD_TOKENS, norm: str = "layer",
                 parallel: bool = False) -> None:
        from monoroute.layers import RoutedFFN

        super().__init__(layer, n_units, k)
        self.d_model = d_model
        # the model's own ln_2 kind (Llama: RMSNorm) and where it reads (NeoX's parallel residual: resid_pre)
        self.norm, self.parallel = norm, parallel
        self.ln = nn.RMSNorm(d_model, eps=ln_eps) if norm == "rms" else nn.LayerNorm(d_model, eps=ln_eps, bias=ln_bias)
        self.ln.requires_grad_(False)
        self.ffn = RoutedFFN(d_model, n_units, k, router="dense", activation="relu", aux_coef=aux_coef,
                             dead_window=dead_window)
        self.b_out = nn.Parameter(torch.zeros(d_model))

    @classmethod
    def for_model(cls, model, layer: int, n_units: int, k: int, **kwargs) -> "TranscoderBaseline":
        ln = model.blocks[layer].ln_2
        base = cls(layer, model.cfg.d_model, n_units, k, ln_bias=getattr(ln, "bias", None) is not None, ln_eps=ln.eps,
                   norm=model.cfg.norm, parallel=model.cfg.parallel_residual, **kwargs)
        base.ln.load_state_dict(copy.deepcopy(ln.state_dict()))
        return base

    @property
    def input_hook(self) -> str:
        from monoroute.train.layerwise import input_hook

        return input_hook(self.layer, self.parallel)

    @property
    def target_hook(self) -> str:
        return f"blocks.{self.layer}.hook_mlp_out"

    def input_of(self, cache: dict) -> Tensor:
        resid = cache[self.input_hook]
        return self.ln(resid.reshape(-1, resid.shape[-1]).to(self.ln.weight.device))

    def reconstruct(self, x: Tensor) -> Tensor:
        return self.ffn(x.reshape(-1, self.d_model)) + self.b_out

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        with torch.no_grad():
            self.ffn(x.reshape(-1, self.d_model))
        acts = self.ffn.last_activations
        return acts.indices.reshape(-1, self.k), acts.values.reshape(-1, self.k).float()

    def config(self) -> dict:
        return dict(super().config(), d_model=self.d_model, ln_bias=getattr(self.ln, "bias", None) is not None,
                    ln_eps=self.ln.eps, norm=self.norm, parallel=self.parallel,
                    aux_coef=self.ffn.aux_coef, dead_window=self.ffn.dead_window, router="dense", activation="relu",
                    hook=self.input_hook, target_hook=self.target_hook)

    def tensors(self) -> dict[str, Tensor]:
        return dict(self.state_dict())

    @classmethod
    def from_saved(cls, config: dict, tensors: dict[str, Tensor]) -> "TranscoderBaseline":
        base = cls(config["layer"], config["d_model"], config["n_latents"], config["k"], config["ln_bias"],
                   config["ln_eps"], config["aux_coef"], config["dead_window"], config.get("norm", "layer"),
                   config.get("parallel", False))
        base.load_state_dict(tensors)
        return base


def init_transcoder(model, layer: int, n_units: int, k: int, seed: int = 0, device: str = "cpu") -> TranscoderBaseline:
    """The transcoder `train_transcoder` would train, at its initialisation (same seed): the matched
    random-init floor of the trained transcoder. Its latents (what metrics read) do not depend on the
    output scale the trainer folds in at the end, so none is folded here."""
    from monoroute.devices import resolve_device

    check_dense_layer(model, layer, "transcoder")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        base = TranscoderBaseline.for_model(model, layer, n_units, k).to(resolve_device(device))
    base.train_info = {"tokens": 0, "steps": 0, "seed": seed, "init_only": True}
    return base.eval()


def train_transcoder(model, store, layer: int, n_units: int, k: int, tokens: int = TRANSCODER_TOKENS,
                     batch_tokens: int = BATCH_TOKENS, lr: float = TRANSCODER_LR, seed: int = 0,
                     device: str = "cpu", progress: bool = True) -> TranscoderBaseline:
    """Our `RoutedFFN(d_model, n_units, k, router="dense", activation="relu")` trained post hoc on
    pairs (x = ln_2(resid_mid), y = mlp_out) of layer `layer` of a dense `model`, ~`tokens` pairs
    from the store's TRAIN windows. Returned in eval mode, on `device`.

    The fit is upcycling's stage 1 on one layer (`monoroute.train.layerwise.fit_layers`: standardised
    MSE plus the layer's dead-unit revival loss, Adam, linear decay over the last 20 % of steps, the
    target's mean and scale folded back at the end), with the transcoder's own output bias b_out."""
    from monoroute.devices import resolve_device
    from monoroute.train.layerwise import LayerFitter, fit_layers

    batch, steps = check_budget(tokens, batch_tokens, model.cfg.block_size)
    dev = resolve_device(device)
    start = time.perf_counter()
    base = init_transcoder(model, layer, n_units, k, seed, str(dev))
    fitter = LayerFitter([layer], [base.ffn], [base.ln], parallel=base.parallel).to(dev)
    windows = max(1, batch // model.cfg.block_size)
    batch_at = lambda step: store.batch(step, windows, model.cfg.block_size, seed, split="train")[0]  # noqa: E731
    last = fit_layers(fitter, model, batch_at, steps, lr, seed=seed, progress=progress, desc="train transcoder")
    fitter.fold()
    with torch.no_grad():
        base.b_out.copy_(fitter.biases[0])
    base.eval()
    base.train_info = {"tokens": steps * batch, "steps": steps, "batch_tokens": batch, "lr": lr, "seed": seed,
                       "target_scale": fitter.sigma[0].item(), "final_train_fvu": (last.get("fvu") or [None])[0],
                       "dead_fraction": base.ffn.dead_fraction(), "seconds": round(time.perf_counter() - start, 2),
                       "trainer": "monoroute.train.layerwise.fit_layers (torch.optim.Adam)"}
    return base


# --- evaluation -----------------------------------------------------------------------------------------
@torch.no_grad()
def explained_variance(baseline: Baseline, model, windows: Tensor, batch_windows: int = 16) -> dict:
    """Reconstruction quality of `baseline` on the dense `model` over token windows (n, T):

        EV = 1 − Σ_p ‖x_p − x̂_p‖² / Σ_p ‖x_p − x̄‖²

    summed over all positions p, with x̄ the per-dimension mean of x over those positions and x the
    baseline's target (the SAE's input mlp.hook_post; the transcoder's target mlp_out). Also:
    mse = mean_p ‖x_p − x̂_p‖², ev_l0 = mean number of firing latents per position, ev_dead_fraction =
    fraction of latents that never fire on these positions (prefixed so they do not overwrite the
    capture-wide `l0` / `dead_fraction` of a report). Sums in float64."""
    if windows.ndim != 2 or windows.shape[0] == 0:
        raise MonorouteError(f"explained_variance needs token windows (n, T) with n >= 1, got shape {tuple(windows.shape)}")
    dev = model_device(model)
    sse, sum_sq, n, l0 = 0.0, 0.0, 0, 0.0
    sum_x = None
    fired = torch.zeros(baseline.n_latents, dtype=torch.bool, device=baseline.device)
    for chunk in windows.split(batch_windows):
        cache = layer_cache(model, chunk.to(dev), baseline.hooks)
        x_in = baseline.input_of(cache).to(baseline.device)
        target = baseline.target_of(cache).to(baseline.device).double()
        indices, values = baseline.encode(x_in)
        recon = baseline.reconstruct(x_in).double()
        sse += (target - recon).pow(2).sum().item()
        sum_sq += target.pow(2).sum().item()
        sum_x = target.sum(0) if sum_x is None else sum_x + target.sum(0)
        n += target.shape[0]
        on = values != 0
        l0 += on.sum().item()
        fired[indices[on]] = True
    sst = sum_sq - sum_x.pow(2).sum().item() / n  # Σ‖x − x̄‖² = Σ‖x‖² − n‖x̄‖²
    return {"explained_variance": 1.0 - sse / sst if sst > 0 else float("nan"), "mse": sse / n,
            "ev_l0": l0 / n, "ev_dead_fraction": 1.0 - fired.float().mean().item(), "ev_positions": n}


class SplicedLoss(NamedTuple):
    """Validation losses with the baseline's output in place of the real activation, and the two ends."""

    clean: float  # the model as is
    spliced: float  # target_hook replaced by the baseline's reconstruction
    zero: float  # target_hook replaced by zeros

    @property
    def loss_recovered(self) -> float | None:
        """(zero − spliced) / (zero − clean): 1 = as good as the real activation, 0 = as bad as zeros."""
        return (self.zero - self.spliced) / (self.zero - self.clean) if self.zero != self.clean else None


@torch.no_grad()
def spliced_loss(model, baseline: Baseline, store, cfg=None, batches: int | None = None,
                 batch_size: int | None = None) -> SplicedLoss:
    """The LM's validation loss three ways over the same windows as `trainer.evaluate` (the val
    split's first `batches` batches of `batch_size` windows; defaults from `cfg.train` if given, else
    20 × 16): clean, with `baseline.target_hook` replaced by the baseline's reconstruction (SAE:
    mlp.hook_post -> SAE(mlp.hook_post); transcoder: hook_mlp_out -> transcoder(ln_2(resid_mid))),
    and with it replaced by zeros. Each is the mean of per-batch mean cross-entropies, in float32."""
    train_cfg = getattr(cfg, "train", None)
    batches = batches if batches is not None else (train_cfg.eval_batches if train_cfg else 20)
    batch_size = batch_size if batch_size is not None else (train_cfg.batch_size if train_cfg else 16)
    dev = model_device(model)
    was_training = model.training
    model.eval()
    sums = {"clean": 0.0, "spliced": 0.0, "zero": 0.0}
    count = 0
    try:
        for x, y in store.eval_batches(batch_size, model.cfg.block_size, batches, split="val"):
            x, y = x.to(dev), y.to(dev)
            sums["clean"] += model(x, y)[1].item()
            with model.hooks(baseline.splice_hooks("reconstruct")):
                sums["spliced"] += model(x, y)[1].item()
            with model.hooks(baseline.splice_hooks("zero")):
                sums["zero"] += model(x, y)[1].item()
            count += 1
    finally:
        model.train(was_training)
    if count == 0:
        raise MonorouteError("the validation split yields no batch; lower block_size or use a larger corpus")
    return SplicedLoss(sums["clean"] / count, sums["spliced"] / count, sums["zero"] / count)
