"""A pre-LN decoder-only transformer (nanoGPT-shaped) whose FFN is dense or routed per block.

Dimensions: B batch, T context, d = d_model, V vocab, H heads, N routed units, k active units.
Every activation passes through a named HookPoint (TransformerLens names), so caching,
patching, ablation and steering need no surgery:

    hook_embed, hook_pos_embed                        (B, T, d)
    blocks.{i}.hook_resid_pre / hook_attn_out / hook_resid_mid / hook_mlp_out / hook_resid_post  (B, T, d)
    blocks.{i}.mlp.hook_pre    dense: (B, T, d_ff) pre-activations; routed: (B, T, k) selected pre-activations
    blocks.{i}.mlp.hook_post   dense: (B, T, d_ff) activations;     routed: SparseActivations (B, T, k)
    blocks.{i}.ln_1.hook_normalized, blocks.{i}.ln_2.hook_normalized, ln_f.hook_normalized   (B, T, d)
                               what attention, the FFN and the unembedding read (after the LayerNorm)
    blocks.{i}.attn.hook_q / hook_k / hook_v   (B, T, d) before the split into heads (head h: channels h*dh..)
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from monoroute.hooks import HookFn, HookPoint, name_hook_points
from monoroute.layers import RoutedFFN
from monoroute.models.config import GPTConfig
from monoroute.models.flops import flops_per_token


class HookedLayerNorm(nn.LayerNorm):
    """nn.LayerNorm whose output passes through `hook_normalized` (same parameters and state dict):
    the residual channels a block reads are nodes a circuit search can mask."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.hook_normalized = HookPoint()

    def forward(self, x: Tensor) -> Tensor:
        return self.hook_normalized(super().forward(x))


class HookedRMSNorm(nn.RMSNorm):
    """nn.RMSNorm (Llama: no centring, no bias; computed in float32) with `hook_normalized`."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.hook_normalized = HookPoint()

    def forward(self, x: Tensor) -> Tensor:
        y = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        return self.hook_normalized(self.weight * y.to(x.dtype))


def build_norm(cfg: GPTConfig) -> nn.Module:
    if cfg.norm == "rms":
        return HookedRMSNorm(cfg.d_model, eps=cfg.ln_eps)
    return HookedLayerNorm(cfg.d_model, eps=cfg.ln_eps, bias=cfg.bias)


def rotate(x: Tensor, positions: Tensor, dims: int, base: float) -> Tensor:
    """GPT-NeoX / Llama rotary embedding of (B, H, T, dh) at `positions` (T,): the first `dims` channels
    of each head, as two halves (x1, x2) rotated by angle position * base^(-2i / dims)."""
    inv = 1.0 / (base ** (torch.arange(0, dims, 2, device=x.device, dtype=torch.float32) / dims))  # (dims/2,)
    angle = positions.to(torch.float32)[:, None] * inv[None]  # (T, dims/2), float32 as transformers computes it
    emb = torch.cat([angle, angle], dim=-1)
    cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)  # (T, dims)
    xr, rest = x[..., :dims], x[..., dims:]
    half = dims // 2
    turned = torch.cat([-xr[..., half:], xr[..., :half]], dim=-1)
    return torch.cat([xr * cos + turned * sin, rest], dim=-1)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.n_head, self.n_kv, self.dropout = cfg.n_head, cfg.kv_heads, cfg.dropout
        self.kv_dim = cfg.d_model // cfg.n_head * cfg.kv_heads  # grouped-query attention: fewer k/v heads
        self.qkv = nn.Linear(cfg.d_model, cfg.d_model + 2 * self.kv_dim, bias=cfg.layer_qkv_bias)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=cfg.bias)
        self.hook_q, self.hook_k, self.hook_v = HookPoint(), HookPoint(), HookPoint()
        self.rotary = (cfg.head_rotary_dims, cfg.rotary_base) if cfg.position == "rotary" else None

    def forward(self, x: Tensor, cache: "LayerCache | None" = None) -> Tensor:
        B, T, d = x.shape
        dh = d // self.n_head
        q, k, v = self.qkv(x).split([d, self.kv_dim, self.kv_dim], dim=2)  # (B, T, d), (B, T, kv_dim) x 2
        q, k, v = self.hook_q(q), self.hook_k(k), self.hook_v(v)
        q = q.view(B, T, self.n_head, dh).transpose(1, 2)  # (B, H, T, dh)
        k, v = (t.view(B, T, self.n_kv, dh).transpose(1, 2) for t in (k, v))  # (B, H_kv, T, dh)
        if self.rotary is not None:
            past = 0 if cache is None else cache.length
            positions = torch.arange(past, past + T, device=x.device)
            q, k = rotate(q, positions, *self.rotary), rotate(k, positions, *self.rotary)
        p = self.dropout if self.training else 0.0
        mask, causal = None, True
        if cache is not None:
            past = cache.length
            k, v = cache.extend(k, v)  # (B, H_kv, past + T, dh): the cache holds the shared heads once
            if past:  # T new queries at positions past..past+T-1 over every cached key and their own
                causal = False
                mask = None if T == 1 else torch.ones(T, past + T, dtype=torch.bool, device=x.device).tril(past)
        if self.n_kv != self.n_head:  # each k/v head serves n_head / n_kv query heads
            k, v = (t.repeat_interleave(self.n_head // self.n_kv, dim=1) for t in (k, v))
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, dropout_p=p)  # (B, H, T, dh)
        return self.proj(y.transpose(1, 2).reshape(B, T, d))


class LayerCache:
    """One attention layer's keys and values so far, (B, H, length, dh) each."""

    def __init__(self) -> None:
        self.k: Tensor | None = None
        self.v: Tensor | None = None

    @property
    def length(self) -> int:
        return 0 if self.k is None else self.k.shape[2]

    def extend(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        self.k = k if self.k is None else torch.cat([self.k, k], dim=2)
        self.v = v if self.v is None else torch.cat([self.v, v], dim=2)
        return self.k, self.v


class KVCache:
    """Keys and values of every layer for incremental decoding: `model(new_ids, cache=cache)` reads
    only the new tokens (at positions cache.length on) and attends over everything cached. Every
    hook point fires on the new tokens only. The FFNs (dense or routed) act per token, so a cached
    pass equals the full pass on the same context up to float summation order."""

    def __init__(self, n_layer: int) -> None:
        self.layers = [LayerCache() for _ in range(n_layer)]

    @property
    def length(self) -> int:
        return self.layers[0].length

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for c in self.layers for t in (c.k, c.v) if t is not None)


class DenseMLP(nn.Module):
    """The standard transformer FFN: d -> d_ff -> GELU -> d; gated (Llama's SwiGLU, `ffn_gated`):
    down(act(gate(x)) * up(x)), with hook_pre on the gate's pre-activation and hook_pre_linear on up(x)
    (TransformerLens' names)."""

    def __init__(self, cfg: GPTConfig, width: int | None = None) -> None:
        super().__init__()
        width = width or cfg.ffn_width
        self.gate = nn.Linear(cfg.d_model, width, bias=cfg.bias) if cfg.ffn_gated else None
        self.up = nn.Linear(cfg.d_model, width, bias=cfg.bias)
        self.down = nn.Linear(width, cfg.d_model, bias=cfg.bias)
        self.activation = cfg.dense_activation
        self.hook_pre, self.hook_post = HookPoint(), HookPoint()
        self.hook_pre_linear = HookPoint() if cfg.ffn_gated else None

    def act(self, pre: Tensor) -> Tensor:
        if self.activation == "silu":
            return F.silu(pre)
        return F.gelu(pre, approximate="tanh" if self.activation == "gelu_tanh" else "none")

    def forward(self, x: Tensor) -> Tensor:
        if self.gate is not None:
            pre = self.hook_pre(self.gate(x))  # (B, T, d_ff)
            return self.down(self.hook_post(self.act(pre) * self.hook_pre_linear(self.up(x))))
        pre = self.hook_pre(self.up(x))  # (B, T, d_ff)
        return self.down(self.hook_post(self.act(pre)))


def build_ffn(cfg: GPTConfig, kind: str) -> nn.Module:
    if kind == "dense":
        return DenseMLP(cfg)
    return RoutedFFN(
        cfg.d_model, cfg.n_units, cfg.k, router=cfg.router, activation=cfg.activation, bias=cfg.bias,
        d_key=cfg.layer_d_key, router_pools=cfg.router_pools, out_bias=cfg.out_bias, aux_coef=cfg.aux_coef, l1_coef=cfg.l1_coef, dead_window=cfg.dead_window,
        dead_grace=cfg.dead_grace, impl=cfg.impl,
        sparse_grad=cfg.sparse_grad, router_heads=cfg.router_heads, router_balance=cfg.router_balance, coupling=cfg.layer_coupling, agree_coef=cfg.agree_coef,
        router_candidates=cfg.router_candidates, rank_coef=cfg.rank_coef, rank_tokens=cfg.rank_tokens,
        router_clusters=cfg.router_clusters,
        router_probes=cfg.router_probes, recluster_every=cfg.recluster_every, cluster_balance=cfg.cluster_balance,
        revive_where_probed=cfg.revive_where_probed, recluster_iters=cfg.recluster_iters,
        router_detach=cfg.layer_router_detach, query_norm=cfg.layer_query_norm, revival_target=cfg.revival_target,
        aux_units=cfg.aux_units, gated=cfg.ffn_gated, router_proposals=cfg.router_proposals,
    )


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig, ffn_kind: str) -> None:
        super().__init__()
        self.ln_1, self.ln_2 = build_norm(cfg), build_norm(cfg)
        self.attn = CausalSelfAttention(cfg)
        self.mlp = build_ffn(cfg, ffn_kind)
        # Hybrid: a slim dense FFN beside the routed layer, reading the same input; their outputs add.
        self.mlp_dense = DenseMLP(cfg, cfg.dense_beside) if ffn_kind == "routed" and cfg.dense_beside else None
        self.drop = nn.Dropout(cfg.dropout)
        self.parallel = cfg.parallel_residual
        self.hook_resid_pre, self.hook_attn_out, self.hook_resid_mid = HookPoint(), HookPoint(), HookPoint()
        self.hook_mlp_out, self.hook_resid_post = HookPoint(), HookPoint()

    def forward(self, x: Tensor, cache: LayerCache | None = None) -> Tensor:
        x = self.hook_resid_pre(x)
        mid = self.hook_resid_mid(x + self.hook_attn_out(self.drop(self.attn(self.ln_1(x), cache))))
        # parallel residual (GPT-NeoX): the FFN reads the block's input, not the attention's output
        h = self.ln_2(x if self.parallel else mid)
        out = self.mlp(h) if self.mlp_dense is None else self.mlp(h) + self.mlp_dense(h)
        return self.hook_resid_post(mid + self.hook_mlp_out(self.drop(out)))


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.cfg = cfg.validate()
        self.wte = nn.Embedding(cfg.vocab_size, cfg.d_model)
        # rotary positions need no table: wpe is None and hook_pos_embed never fires
        self.wpe = nn.Embedding(cfg.block_size, cfg.d_model) if cfg.position == "learned" else None
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg, kind) for kind in cfg.ffn_kinds())
        self.ln_f = build_norm(cfg)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_weights:
            self.lm_head.weight = self.wte.weight
        self.hook_embed, self.hook_pos_embed = HookPoint(), HookPoint()
        self.apply(self._init_weights)
        self._init_residual_projections()
        self.hook_points = name_hook_points(self)

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def _init_residual_projections(self) -> None:
        # GPT-2: layers writing into the residual stream get std 0.02/sqrt(2L) so its variance
        # does not grow with depth. A routed unit's w_in reads like a dense FFN's up-projection.
        std = 0.02 / math.sqrt(2 * self.cfg.n_layer)
        for block in self.blocks:
            nn.init.normal_(block.attn.proj.weight, std=std)
            if isinstance(block.mlp, RoutedFFN):
                w_in_std = 0.02 if self.cfg.unit_init == "gpt" else self.cfg.d_model ** -0.5
                nn.init.normal_(block.mlp.w_in, std=w_in_std)
                nn.init.normal_(block.mlp.w_out, std=std)
            else:
                nn.init.normal_(block.mlp.down.weight, std=std)
            if block.mlp_dense is not None:
                nn.init.normal_(block.mlp_dense.down.weight, std=std)

    # --- forward ---------------------------------------------------------------------------
    def forward(self, idx: Tensor, targets: Tensor | None = None,
                cache: KVCache | None = None) -> tuple[Tensor, Tensor | None]:
        """idx (B, T) token ids -> logits (B, T, V), and the mean cross-entropy if targets are given.
        With a KVCache, idx are the tokens after the cached ones (incremental decoding).

        The routed layers' auxiliary losses are not included: see `aux_loss()`."""
        B, T = idx.shape
        past = 0 if cache is None else cache.length
        if past + T > self.cfg.block_size:
            raise ValueError(f"sequence length {past + T} exceeds block_size {self.cfg.block_size}")
        x = self.hook_embed(self.wte(idx))  # (B, T, d)
        if self.wpe is not None:
            x = x + self.hook_pos_embed(self.wpe(torch.arange(past, past + T, device=idx.device)))
        x = self.drop(x)
        for i, block in enumerate(self.blocks):
            x = block(x, None if cache is None else cache.layers[i])
        logits = self.lm_head(self.ln_f(x))  # (B, T, V)
        loss = None if targets is None else F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
        return logits, loss

    def routed_layers(self) -> list[RoutedFFN]:
        return [block.mlp for block in self.blocks if isinstance(block.mlp, RoutedFFN)]

    def aux_loss(self) -> Tensor:
        """Sum of the routed layers' auxiliary losses from the last training forward pass."""
        zero = self.wte.weight.new_zeros(())
        return sum((layer.aux_loss for layer in self.routed_layers() if layer.aux_loss is not None), zero)

    def dead_fraction(self) -> float | None:
        layers = self.routed_layers()
        if not layers:
            return None
        return sum(layer.dead_mask().sum().item() for layer in layers) / sum(layer.n_units for layer in layers)

    # --- sizes -----------------------------------------------------------------------------
    def n_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def n_active_params(self) -> int:
        """Parameters a token actually uses: all, minus the rows of the N - k routed units it skips."""
        skipped = 0
        for layer in self.routed_layers():
            per_unit = 2 * layer.d_model + (layer.b_in is not None)
            skipped += (layer.n_units - layer.k) * per_unit
        return self.n_params() - skipped

    def flops_per_token(self) -> dict[str, int]:
        return flops_per_token(self.cfg)

    # --- hooks -----------------------------------------------------------------------------
    @contextmanager
    def hooks(self, fwd_hooks: Iterable[tuple[str, HookFn]]):
        """Attach (name, fn) hooks for the duration of the block; always removes them."""
        attached = []
        try:
            for name, fn in fwd_hooks:
                if name not in self.hook_points:
                    raise KeyError(f"unknown hook point {name!r}; see model.hook_points for valid names")
                self.hook_points[name].fns.append(fn)
                attached.append((self.hook_points[name], fn))
            yield self
        finally:
            for point, fn in attached:
                point.fns.remove(fn)

    def run_with_hooks(self, tokens: Tensor, fwd_hooks: Iterable[tuple[str, HookFn]] = ()) -> Tensor:
        with self.hooks(fwd_hooks):
            return self(tokens)[0]

    def run_with_cache(
        self, tokens: Tensor, names_filter: str | list[str] | Callable[[str], bool] | None = None
    ) -> tuple[Tensor, dict]:
        """Logits and a dict of detached activations by hook name (routed hook_post: SparseActivations)."""
        keep = _name_predicate(names_filter)
        cache: dict = {}

        def store(activation, hook: HookPoint):
            cache[hook.name] = activation.detach()

        names = [name for name in self.hook_points if keep(name)]
        logits = self.run_with_hooks(tokens, [(name, store) for name in names])
        return logits, cache


def _name_predicate(names_filter) -> Callable[[str], bool]:
    if names_filter is None:
        return lambda name: True
    if isinstance(names_filter, str):
        return lambda name: name == names_filter
    if callable(names_filter):
        return names_filter
    wanted = set(names_filter)
    return lambda name: name in wanted


@torch.no_grad()
def generate(model: GPT, idx: Tensor, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
             generator: torch.Generator | None = None, use_cache: bool = True) -> Tensor:
    """Sample continuations of idx (B, T) autoregressively; returns (B, T + max_new_tokens).

    With `use_cache`, a KV cache makes each new token one position's work while the whole sequence fits
    the context; once it would not, the context slides (the last block_size tokens) and each step
    reads it whole, as without a cache."""
    cache = KVCache(len(model.blocks)) if use_cache else None
    fresh = idx  # the tokens the next forward reads
    for _ in range(max_new_tokens):
        if cache is not None and cache.length + fresh.shape[1] > model.cfg.block_size:
            cache = None  # past the context: slide, uncached
        if cache is None:
            fresh = idx[:, -model.cfg.block_size:]
        logits = model(fresh, cache=cache)[0][:, -1, :] / max(temperature, 1e-6)  # (B, V)
        if top_k is not None:
            kth = logits.topk(min(top_k, logits.shape[-1])).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        next_token = torch.multinomial(logits.softmax(-1), 1, generator=generator)  # (B, 1)
        idx = torch.cat([idx, next_token], dim=1)
        fresh = next_token
    return idx
