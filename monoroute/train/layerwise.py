"""Layer-local training: routed layers fitted to reproduce a frozen dense model's FFNs.

One trainer serves both places that need it:

- stage 1 of upcycling (`train/upcycle.py`, and the in-place switch of the `dense_fraction`
  schedule in `trainer.py`): every dense FFN of the teacher gets a `RoutedFFN` student, all layers
  fitted together from one teacher forward per batch;
- the post-hoc transcoder baseline of `monoroute analyze --transcoder` (`interp/baselines.py`):
  one layer, the dense router.

For layer L the student maps the FFN's own input x = ln_2(resid_mid) (the teacher's ln_2, frozen;
resid_pre under GPT-NeoX's parallel residual) to its output y = hook_mlp_out. Activations are streamed: each step runs the teacher on one batch
of TRAIN windows (`store.batch(step, ...)`, so the stream is a pure function of the seed and the
step, and a resumed fit reads the batches it would have read), stopping the forward after the last
fitted layer; nothing is dumped to memory or disk.

Loss per layer: mean squared error against the target standardised by its mean μ and overall RMS σ
(estimated on the first NORM_BATCHES batches, so it is about the fraction of variance unexplained,
FVU, and layers with large outputs do not dominate), plus the layer's own auxiliary losses (L1,
dead-unit revival). μ and σ are folded into w_out and the output bias at the end, so the fitted
layer maps raw inputs to raw outputs and can be spliced in as it is. Adam, constant learning rate
with a linear decay to zero over the last DECAY_FRACTION of steps.

Initialisation (`init`): "random" is the layer's own init; "data" (product-key routers only) is a
product quantisation of the layer's inputs: each half's sub-keys are k-means centroids of the
halves of normalised inputs x, the query projection is the identity, and unit (a, b)'s input
weights are the concatenation of its two keys. Then the router's score of a unit is (up to the
per-half normalisation) the unit's own pre-activation direction, so the router starts out choosing
the units that fire most, instead of learning agreement from scratch. Which is better is measured,
not assumed (docs/upcycle.md).
"""
from __future__ import annotations

import math
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from monoroute.errors import MonorouteError
from monoroute.layers import RoutedFFN
from monoroute.layers.routing import ProductKeyRouter

NORM_BATCHES = 4  # batches used to estimate each target's mean and scale before training
DECAY_FRACTION = 0.2  # the learning rate decays linearly to zero over the last 20 % of steps
INITS = ("random", "data")
KMEANS_ITERS = 10


class _Stop(Exception):
    """Raised by a hook once every wanted activation is stored, to skip the rest of the forward."""


@torch.no_grad()
def layer_cache(model, idx: Tensor, names: list[str]) -> dict[str, Tensor]:
    """{name: activation} for the given hook points of one forward pass over idx (B, T), stopping
    the forward as soon as all of them have been seen (the later blocks and the LM head are skipped)."""
    wanted = set(names)
    cache: dict[str, Tensor] = {}

    def store(activation, hook) -> None:
        cache[hook.name] = activation.detach()
        if wanted <= cache.keys():
            raise _Stop

    was_training = model.training
    model.eval()
    try:
        model.run_with_hooks(idx, [(name, store) for name in wanted])
    except _Stop:
        pass
    finally:
        model.train(was_training)
    if not wanted <= cache.keys():
        raise MonorouteError(f"hook point(s) {', '.join(sorted(wanted - cache.keys()))} produced no activation")
    return cache


def input_hook(layer: int, parallel: bool = False) -> str:
    """Where the FFN's input comes from before ln_2: the attention's output added (resid_mid), or, with
    GPT-NeoX's parallel residual, the block's own input (resid_pre), as `Block.forward` reads it."""
    return f"blocks.{layer}.hook_resid_pre" if parallel else f"blocks.{layer}.hook_resid_mid"


def target_hook(layer: int) -> str:
    return f"blocks.{layer}.hook_mlp_out"


class LayerFitter(nn.Module):
    """The students being fitted, one per layer, with each target's mean μ (L, d) and scale σ (L,).

    `ffns[i]` fits layer `layers[i]`; `biases[i]` is an extra output bias for a student without
    its own (`RoutedFFN(out_bias=False)`, as the transcoder baseline), else unused. Everything that
    changes during a fit is a parameter or buffer, so a fit is checkpointed as one module."""

    def __init__(self, layers: list[int], ffns: list[RoutedFFN], lns: list[nn.Module], parallel: bool = False) -> None:
        super().__init__()
        self.parallel = parallel  # the teacher's parallel residual: x = ln_2(resid_pre)
        if not layers or len(layers) != len(ffns) or len(ffns) != len(lns):
            raise MonorouteError("a layer fit needs one student and one ln_2 per layer")
        self.layers = list(layers)
        self.ffns = nn.ModuleList(ffns)
        self.lns = nn.ModuleList(lns)
        self.lns.requires_grad_(False)
        d = ffns[0].d_model
        self.biases = nn.ParameterList(
            [nn.Parameter(torch.zeros(d)) if ffn.b_out is None else nn.Parameter(torch.zeros(0)) for ffn in ffns])
        self.register_buffer("mu", torch.zeros(len(layers), d))
        self.register_buffer("sigma", torch.ones(len(layers)))
        self.register_buffer("scaled", torch.zeros((), dtype=torch.bool))  # μ, σ estimated
        self.register_buffer("folded", torch.zeros((), dtype=torch.bool))  # μ, σ folded into the weights

    @property
    def hooks(self) -> list[str]:
        return [h for layer in self.layers for h in (input_hook(layer, self.parallel), target_hook(layer))]

    def pairs(self, cache: dict) -> list[tuple[Tensor, Tensor]]:
        """[(x (T, d), y (T, d))] per layer from a teacher cache: x = ln_2(resid_mid) (resid_pre with the
        parallel residual), y = mlp_out."""
        out = []
        for layer, ln in zip(self.layers, self.lns):
            resid, y = cache[input_hook(layer, self.parallel)], cache[target_hook(layer)]
            out.append((ln(resid.reshape(-1, resid.shape[-1])), y.reshape(-1, y.shape[-1]).float()))
        return out

    def predict(self, i: int, x: Tensor) -> Tensor:
        y = self.ffns[i](x)
        return y if self.ffns[i].b_out is not None else y + self.biases[i]

    @torch.no_grad()
    def estimate_scale(self, batches: list[list[tuple[Tensor, Tensor]]]) -> None:
        for i in range(len(self.layers)):
            ys = torch.cat([pairs[i][1] for pairs in batches])
            self.mu[i] = ys.mean(0)
            self.sigma[i] = (ys - self.mu[i]).pow(2).mean().sqrt().clamp(min=1e-12)  # RMS around the mean
        self.scaled.fill_(True)

    def loss(self, pairs: list[tuple[Tensor, Tensor]]) -> tuple[Tensor, list[float]]:
        """Sum over layers of standardised MSE + the layer's aux loss; and each layer's FVU-like MSE."""
        total, per_layer = None, []
        for i, (x, y) in enumerate(pairs):
            y_std = (y - self.mu[i]) / self.sigma[i]
            mse = (self.predict(i, x) - y_std).pow(2).mean()
            aux = self.ffns[i].aux_loss
            term = mse + (aux if aux is not None else 0.0)
            total = term if total is None else total + term
            per_layer.append(mse.item())
        return total, per_layer

    @torch.no_grad()
    def fold(self) -> None:
        """Back to raw units: predict(x)·σ + μ, folded into w_out and the output bias (once)."""
        if bool(self.folded):
            return
        for i, ffn in enumerate(self.ffns):
            ffn.w_out.mul_(self.sigma[i])
            bias = ffn.b_out if ffn.b_out is not None else self.biases[i]
            bias.copy_(bias * self.sigma[i] + self.mu[i])
        self.folded.fill_(True)

    def output_bias(self, i: int) -> Tensor:
        return self.ffns[i].b_out if self.ffns[i].b_out is not None else self.biases[i]


# --- initialisation ------------------------------------------------------------------------------------
@torch.no_grad()
def kmeans(x: Tensor, n: int, iters: int = KMEANS_ITERS, generator: torch.Generator | None = None) -> Tensor:
    """(M, D) unit-norm points -> (n, D) unit-norm centroids (spherical k-means, Lloyd's iterations,
    started from n distinct points; a centroid left without points is re-seeded from a random point)."""
    start = torch.randperm(x.shape[0], generator=generator)[:n]
    if start.numel() < n:  # fewer points than centroids: repeat them, with a small jitter
        start = start.repeat(math.ceil(n / max(1, start.numel())))[:n]
    c = x[start] + 1e-3 * torch.randn(n, x.shape[1], generator=generator)
    c = F.normalize(c, dim=-1)
    for _ in range(iters):
        assign = (x @ c.t()).argmax(-1)  # (M,)
        sums = torch.zeros_like(c).index_add_(0, assign, x)
        empty = torch.bincount(assign, minlength=n) == 0
        if empty.any():
            sums[empty] = x[torch.randint(0, x.shape[0], (int(empty.sum()),), generator=generator)]
        c = F.normalize(sums, dim=-1)
    return c


@torch.no_grad()
def init_from_data(ffn: RoutedFFN, x: Tensor, seed: int = 0) -> None:
    """Product-quantisation init of a product-key routed layer from inputs x (M, d): see the module doc."""
    router = ffn.router
    if not isinstance(router, ProductKeyRouter):
        raise MonorouteError("init='data' needs router='product_key' (its keys are built from the inputs' halves); "
                             "use init='random' for the dense or multi-pool router")
    d, half = ffn.d_model, router.d_half
    if 2 * half != d:
        raise MonorouteError(f"init='data' needs d_key = d_model (got d_key {2 * half}, d_model {d}); unset d_key "
                             f"or use init='random'")
    g = torch.Generator().manual_seed(seed)
    x = x.float().cpu()
    k1 = kmeans(F.normalize(x[:, :half], dim=-1), router.n_sub, generator=g)  # (n_sub, d/2)
    k2 = kmeans(F.normalize(x[:, half:], dim=-1), router.n_sub, generator=g)
    device = router.keys.device
    router.keys.copy_(torch.stack([k1, k2]).to(device))
    eye = torch.eye(d, device=device)
    router.query.weight.copy_(eye.repeat(router.heads, 1) +
                              (0.0 if router.heads == 1 else 0.01 * torch.randn(router.heads * d, d, generator=g).to(device)))
    # Unit (a, b) = a·n_sub + b reads the direction of its two keys; the row norm matches the default init's.
    rows = torch.cat([k1.repeat_interleave(router.n_sub, 0), k2.repeat(router.n_sub, 1)], dim=1)  # (N, d)
    norm = ffn.w_in.norm(dim=1).mean()
    ffn.w_in.copy_((F.normalize(rows, dim=-1) * norm).to(device))
    if ffn.w_gate is not None:  # gated units: the gate (what selection reads) starts on the same directions
        ffn.w_gate.copy_(ffn.w_in)
    if ffn.b_in is not None:
        ffn.b_in.zero_()


# --- the fit ---------------------------------------------------------------------------------------------
def lr_at(step: int, steps: int, lr: float) -> float:
    decay = max(1, int(steps * DECAY_FRACTION))
    return lr * min(1.0, (steps - step) / decay)


def fit_layers(fitter: LayerFitter, teacher, batch_at: Callable[[int], Tensor], steps: int, lr: float,
               start: int = 0, optimizer_state: dict | None = None, init: str = "random", seed: int = 0,
               progress: bool = True, desc: str = "stage 1: fit routed layers",
               on_step: Callable[[int, torch.optim.Optimizer, dict], None] | None = None) -> dict:
    """Fit `fitter`'s students to `teacher`'s FFNs for `steps` batches (`batch_at(step)` -> idx (B, T)),
    from step `start` (with the saved `optimizer_state` when resuming). Returns the last step's
    per-layer standardised MSE, unfolded: call `fitter.fold()` once the fit is complete.

    `on_step(step, optimizer, record)` runs after each step (checkpointing). `init` applies only to
    a fresh fit (start = 0), after μ and σ are estimated, on the same NORM_BATCHES batches."""
    from tqdm import tqdm

    if init not in INITS:
        raise MonorouteError(f"unknown init {init!r}; choose one of {', '.join(INITS)}")
    device = next(fitter.parameters()).device
    teacher.eval()
    read = lambda step: fitter.pairs(layer_cache(teacher, batch_at(step).to(device), fitter.hooks))  # noqa: E731
    warm: dict[int, list] = {}
    if not bool(fitter.scaled):
        warm = {s: read(s) for s in range(min(NORM_BATCHES, steps))}
        fitter.estimate_scale(list(warm.values()))
        if init == "data" and start == 0:
            for i, ffn in enumerate(fitter.ffns):
                init_from_data(ffn, torch.cat([pairs[i][0] for pairs in warm.values()]), seed + i)
    # Dense gradients for the fit (plain Adam); a row-sparse student gets its setting back afterwards.
    sparse = [ffn.sparse_grad for ffn in fitter.ffns]
    for ffn in fitter.ffns:
        ffn.sparse_grad = False
    params = [p for p in fitter.parameters() if p.requires_grad and p.numel()]
    optimizer = torch.optim.Adam(params, lr=lr)
    if optimizer_state is not None:
        optimizer.load_state_dict(optimizer_state)
    fitter.train()
    bar = tqdm(total=steps, initial=start, desc=desc, unit="step", disable=not progress, dynamic_ncols=True)
    record: dict = {}
    try:
        for step in range(start, steps):
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, steps, lr)
            pairs = warm.pop(step) if step in warm else read(step)
            loss, per_layer = fitter.loss(pairs)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            record = {"step": step + 1, "fvu": per_layer, "loss": loss.item()}
            bar.update(1)
            bar.set_postfix(fvu=f"{sum(per_layer) / len(per_layer):.3f}")
            if on_step is not None:
                on_step(step + 1, optimizer, record)
    finally:
        bar.close()
        for ffn, flag in zip(fitter.ffns, sparse):
            ffn.sparse_grad = flag
    fitter.eval()
    return record


def stream(store, windows: int, block_size: int, seed: int, rank: int = 0, world: int = 1) -> Callable[[int], Tensor]:
    """batch_at(step) over the store's TRAIN split: the windows `store.batch` gives step `step`."""
    return lambda step: store.batch(step, windows, block_size, seed, rank, world, split="train")[0]
