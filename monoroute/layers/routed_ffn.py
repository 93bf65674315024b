"""RoutedFFN: a feed-forward layer with N hidden units of which at most k run per token.

Dimensions: T tokens (any leading shape is flattened), d = d_model, N = n_units, k active.

    idx, s = router(x)                                  # (T, k) unit ids, (T, k) routing scores
    pre_i  = w_in[i] · x + b_i          for i in idx    # (T, k)   -> hook_pre
    h_i    = gate(s_i) * act(pre_i)                     # (T, k)   -> hook_post (SparseActivations)
    y      = sum_i h_i * w_out[i]                       # (T, d)

How score and pre-activation combine, and why: the unit's own pre-activation decides *whether and
how strongly* it fires (with ReLU a selected unit may stay at zero, so k is a cap, not a quota:
forcing exactly k units on makes the extra activity noise and hurts monosemanticity); the router
score decides *which* units are candidates. For the product-key router the score also enters as a
per-unit sigmoid gate, which is how the router's keys and query get a gradient. We use a sigmoid
rather than PEER's softmax over the k scores so that a unit's activation depends on the input and
that unit alone, not on which competitors were picked, which keeps activations readable. The dense
router's score *is* the pre-activation, so it has no gate (gate="none": the "TopK MLP").

Coupling (`coupling`): at init the product-key score and the pre-activation are independent, so
about half the k selected units are silenced by ReLU, and a silenced unit sends its gate (hence the
router) no gradient. "agreement" adds a loss (weight `agree_coef`) pushing silenced units' scores
down to the token's selection threshold; "preact" selects, among the top 2k by score, the units
whose pre-activation is positive. "none" (default) is the plain layer. GELU/SiLU units are nonzero
almost everywhere, so every selected unit fires (L0 = k, k is a quota) and coupling does not apply.

Gated units (`gated=True`, for a SwiGLU teacher such as Llama's): each unit has a gate row too,
h_i = act(w_gate[i] · x) * (w_in[i] · x + b_i), as a gated FFN neuron is; the router selects on the
gate's pre-activation (what decides whether act(·) lets the unit through), and hook_pre holds it.
It runs on the same two primitives (three sampled dots' worth of work instead of two).

Sparse compute: only the two primitives of `compute.py` touch the unit tables, so activation
memory is O(T·k) and only the selected rows of w_in/w_out receive gradient.

Dead units: the layer records, per unit, the token count at which it last fired (h != 0) and
calls it dead when it has not fired in the last `dead_window` tokens (a unit that never fired
counts from token 0, so nothing is dead before `dead_window` training tokens). In training it adds a
revival loss (on by default): for up to `aux_units` dead units, on the token where each scores
highest, pull its routing score up to that token's selection threshold (and, for ReLU, its
pre-activation above zero). Like AuxK (Gao et al. 2024) it gives dead units gradient on the inputs
they are closest to, and it touches only the sampled units' rows.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.profiler import record_function

from monoroute.errors import MonorouteError
from monoroute.hooks import HookPoint, SparseActivations
from monoroute.layers.compute import (ACTIVATIONS, available_impls, compose_unit_ffn, impl_primitives, resolve_impl,
                                     unit_activation, unit_ffn)
from monoroute.layers.routing import Routing, build_router

SCOPE_ROUTER, SCOPE_UNITS, SCOPE_AUX = "monoroute::router", "monoroute::units", "monoroute::aux"

GATES = ("sigmoid", "none")
# How the router's choice is made to agree with the unit's firing (see `agreement_loss` and
# ProductKeyRouter(select="preact")); "none" is the plain layer.
COUPLINGS = ("auto", "none", "agreement", "preact", "rerank")
# What the revival loss pulls a dead unit's score (and pre-activation) up to: "score", the lowest
# selected score (and pre > 0); "selection", under re-ranking, what selection applies (RoutedFFN.revival_loss).
REVIVAL_TARGETS = ("score", "selection")
# Routers that score units by their own pre-activation: no gate, and the revival threshold is >= 0.
PREACT_ROUTERS = ("dense", "cluster", "factored")


def resolve_coupling(coupling: str, router: str, activation: str, defaults_version: int = 2) -> str:
    """"auto" is "rerank" for product keys with ReLU units (the router recipe of docs/routing.md,
    defaults_version 2), "preact" for multi-pool keys with ReLU (and for product keys in runs saved
    before it, defaults_version 1: the frontier sweep's best design) and "none" elsewhere; any other
    value is returned as given."""
    if coupling != "auto":
        return coupling
    if router == "product_key" and activation == "relu" and defaults_version >= 2:
        return "rerank"
    return "preact" if router in ("product_key", "multi_pool") and activation == "relu" else "none"


def check_choice(kind: str, value: str, choices) -> None:
    if value not in choices:
        raise MonorouteError(f"unknown {kind} {value!r}; choose one of {', '.join(choices)}")


class RoutedFFN(nn.Module):
    def __init__(
        self,
        d_model: int,
        n_units: int,
        k: int,
        router: str = "product_key",
        activation: str = "relu",
        bias: bool = True,
        gate: str | None = None,
        d_key: int | None = None,
        router_pools: int = 1,
        out_bias: bool = False,
        aux_coef: float = 0.1,
        aux_units: int = 256,
        l1_coef: float = 0.0,
        dead_window: int = 200_000,
        dead_grace: int | None = None,
        impl: str = "auto",
        sparse_grad: bool = False,
        router_heads: int = 1,
        router_balance: bool = False,
        coupling: str = "none",
        agree_coef: float = 0.1,
        router_candidates: int | None = None,
        rank_coef: float = 1.0,
        rank_tokens: int | None = None,
        router_clusters: int | None = None,
        router_probes: int = 4,
        recluster_every: int = 50,
        cluster_balance: float = 0.01,
        revive_where_probed: bool = False,
        recluster_iters: int = 3,
        router_detach: bool = False,
        query_norm: str = "none",
        revival_target: str = "score",
        gated: bool = False,
        router_proposals: str = "exact",
    ) -> None:
        super().__init__()
        if not 1 <= k <= n_units:
            raise MonorouteError(f"k must be between 1 and n_units={n_units}, got k={k}; lower k or raise n_units")
        if isinstance(dead_window, bool) or not isinstance(dead_window, int) or dead_window < 1:
            raise MonorouteError(f"dead_window must be a whole number of tokens >= 1, got {dead_window!r}; "
                                 f"use e.g. 200000 (a few thousand steps' worth of tokens)")
        if dead_grace is not None and (isinstance(dead_grace, bool) or not isinstance(dead_grace, int) or dead_grace < 0):
            raise MonorouteError(f"dead_grace must be a whole number of tokens >= 0 (or unset for dead_window), "
                                 f"got {dead_grace!r}")
        self.dead_grace = dead_window if dead_grace is None else dead_grace
        check_choice("activation", activation, ACTIVATIONS)
        # Routers whose own score is the pre-activation, and re-ranking (the pre-activation picks among
        # the proposals), run as a TopK MLP: no gate. The re-ranking keys learn from `rank_loss`.
        gate = gate or ("none" if router in PREACT_ROUTERS or coupling == "rerank" else "sigmoid")
        check_choice("gate", gate, GATES)
        check_choice("impl", impl, available_impls())
        check_choice("coupling", coupling, COUPLINGS)
        coupling = resolve_coupling(coupling, router, activation)
        if coupling == "agreement" and router == "multi_pool":
            raise MonorouteError("coupling='agreement' needs router='product_key' (one shared score scale); "
                                 "use coupling='preact' or 'none' with router='multi_pool'")
        if coupling == "rerank" and router != "product_key":
            raise MonorouteError(f"coupling='rerank' re-ranks a product-key router's proposals; it needs "
                                 f"router='product_key' (got {router!r}; router 'cluster' re-ranks by construction)")
        if coupling not in ("none", "rerank") and (router in PREACT_ROUTERS or activation != "relu"):
            raise MonorouteError(
                f"coupling={coupling!r} makes a product-key router agree with which ReLU units fire; it needs "
                f"router='product_key' and activation='relu' (got {router!r}, {activation!r}). The dense router's "
                f"score is the pre-activation already, and GELU/SiLU units fire whenever selected: use coupling='none'"
            )
        check_choice("revival_target", revival_target, REVIVAL_TARGETS)
        if router_detach and router == "factored":
            raise MonorouteError("router_detach needs a router with its own query (product_key, multi_pool); the "
                                 "factored router's search key is part of the pre-activation, which the LM loss trains")
        if isinstance(aux_units, bool) or not isinstance(aux_units, int) or aux_units < 1:
            raise MonorouteError(f"aux_units must be a whole number >= 1, got {aux_units!r}; e.g. 256")
        for name, value in (("agree_coef", agree_coef), ("rank_coef", rank_coef)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < math.inf:
                raise MonorouteError(f"{name} must be a finite number >= 0, got {value!r}; e.g. 0.1")
        self.d_model, self.n_units, self.k = d_model, n_units, k
        self.activation, self.gate, self.impl = activation, gate, impl
        # sparse_grad: w_in/w_out get row-sparse COO gradients (touched rows only), for a row-sparse optimizer.
        self.sparse_grad = sparse_grad
        self.aux_coef, self.aux_units, self.l1_coef, self.dead_window = aux_coef, aux_units, l1_coef, dead_window
        if rank_tokens is not None and (isinstance(rank_tokens, bool) or not isinstance(rank_tokens, int)
                                        or rank_tokens < 1):
            raise MonorouteError(f"rank_tokens must be a whole number >= 1 or null (every token), got {rank_tokens!r}; "
                                 f"e.g. 512")
        self.coupling, self.agree_coef, self.rank_coef = coupling, agree_coef, rank_coef
        self.rank_tokens = rank_tokens  # the ranking loss on at most this many tokens per forward (None: all)
        self.router_detach, self.revival_target = bool(router_detach), revival_target
        select = coupling if coupling in ("preact", "rerank") else "score"
        self.router = build_router(router, d_model, n_units, k, d_key, router_heads, select, impl, router_balance,
                                   router_pools, router_candidates, router_clusters, router_probes, recluster_every,
                                   cluster_balance, revive_where_probed, recluster_iters, query_norm,
                                   router_proposals)
        self.router_name = router
        self.w_in = nn.Parameter(torch.empty(n_units, d_model).uniform_(-1, 1) / math.sqrt(d_model))
        self.b_in = nn.Parameter(torch.zeros(n_units)) if bias else None
        self.w_gate = nn.Parameter(torch.empty(n_units, d_model).uniform_(-1, 1) / math.sqrt(d_model)) if gated \
            else None
        self.w_out = nn.Parameter(torch.randn(n_units, d_model) / math.sqrt(k * d_model))
        self.b_out = nn.Parameter(torch.zeros(d_model)) if out_bias else None
        self.hook_pre = HookPoint()
        self.hook_post = HookPoint()
        # Firing statistics: token count at each unit's last firing (-1: never), and total firings.
        self.register_buffer("last_fired", torch.full((n_units,), -1, dtype=torch.int64))
        self.register_buffer("fire_count", torch.zeros(n_units, dtype=torch.int64))
        self.register_buffer("tokens_seen", torch.zeros((), dtype=torch.int64))
        self.aux_loss: Tensor | None = None
        self.last_activations: SparseActivations | None = None

    def extra_repr(self) -> str:
        return (
            f"d_model={self.d_model}, n_units={self.n_units}, k={self.k}, router={self.router_name}, "
            f"activation={self.activation}, gate={self.gate}, coupling={self.coupling}, out_bias={self.b_out is not None}"
        )

    def forward(self, x: Tensor) -> Tensor:
        lead = x.shape[:-1]
        xt = x.reshape(-1, self.d_model)  # (T, d)
        fused = self.fused_inference(xt)
        if fused is not None:  # decoding and evaluation on the CPU: the whole layer in one compiled call
            y, idx, h = fused
            self.last_activations = SparseActivations(idx.view(*lead, -1), h.view(*lead, -1), self.n_units)
            self.aux_loss = None
            b_out = self._parameters.get("b_out")  # None: no output bias (a plain attribute)
            return (y if b_out is None else y + b_out).view(x.shape)
        # router_detach: the router and the router-only losses read a copy of the input without
        # gradient, so they train the router (and the revived units' rows), never the trunk below.
        xr = xt.detach() if self.router_detach else xt
        with record_function(SCOPE_ROUTER):  # named scopes: `monoroute bench train --profile` splits a step by them
            routing = self.router(xr, *self.select_tables())  # (T, k) ids and scores
        idx = routing.indices
        gate_logits = routing.scores if self.gate == "sigmoid" else None
        offset = routing.pre_offset  # (T, k) a factored router's share of the pre-activation, or None
        with record_function(SCOPE_UNITS):
            y, h, acts = self.unit_compute(xt, idx, gate_logits, offset, lead)
        self.last_activations = acts.detach()
        with record_function(SCOPE_AUX):
            if self.training:
                self.record_firing(idx, h)
                self.aux_loss = self.auxiliary_loss(xt, routing, h, xr)
            else:
                self.aux_loss = None
        if self.b_out is not None:
            y = y + self.b_out
        return y.view(*lead, self.d_model)

    def fused_inference(self, xt: Tensor):
        """(y, idx, h) from the router's fused inference kernel when nothing needs the op-by-op path
        (no training, no gradient, no hook, ReLU units without a gate, the default re-ranking router),
        else None. The same selection and output to rounding (tests/test_compiled.py)."""
        if (self.training or torch.is_grad_enabled() or self.coupling != "rerank" or self.activation != "relu"
                or self.gate != "none" or self.impl not in ("auto", "cpu")):
            return None
        # read from the module's dicts: decoding calls this per layer and token (see ProductKeyRouter.fused_layer)
        params, modules = self._parameters, self._modules
        router = modules["router"]
        if (params.get("w_gate") is not None or modules["hook_pre"].fns or modules["hook_post"].fns
                or not hasattr(router, "fused_layer")):
            return None
        return router.fused_layer(xt, params["w_in"], params.get("b_in"), params["w_out"])

    def select_tables(self) -> tuple[Tensor, Tensor | None]:
        """The rows whose pre-activation selection reads: the gate's for gated units, else w_in and b_in."""
        return (self.w_gate, None) if self.w_gate is not None else (self.w_in, self.b_in)

    def gated_compute(self, xt: Tensor, idx: Tensor, gate_logits, lead) -> tuple[Tensor, Tensor, SparseActivations]:
        """h = act(w_gate[i]·x) * (w_in[i]·x + b_i) [* sigmoid(score)], y = sum_i h_i w_out[i]."""
        impl = resolve_impl(self.impl, xt.device)
        g = impl.sampled_dot(xt, self.w_gate, idx, self.sparse_grad)  # (T, k) the gate's pre-activation
        g = self.hook_pre(g.view(*lead, self.k)).reshape(-1, self.k)
        u = impl.sampled_dot(xt, self.w_in, idx, self.sparse_grad)  # (T, k) the linear part
        if self.b_in is not None:
            u = u + self.b_in[idx]
        h = unit_activation(g, gate_logits, self.activation) * u
        acts = self.hook_post(SparseActivations(idx.view(*lead, self.k), h.view(*lead, self.k), self.n_units))
        kk = acts.indices.shape[-1]
        y = impl.weighted_gather_sum(acts.values.reshape(-1, kk), acts.indices.reshape(-1, kk), self.w_out,
                                     self.sparse_grad)
        return y, acts.values.reshape(-1, kk), acts

    def unit_compute(self, xt: Tensor, idx: Tensor, gate_logits, offset, lead) -> tuple[Tensor, Tensor, SparseActivations]:
        """The selected units' output (T, d), their activations h (T, k) and the hooked activations."""
        if self.w_gate is not None:
            return self.gated_compute(xt, idx, gate_logits, lead)
        if offset is None and not (self.hook_pre.active or self.hook_post.active):
            # No hook needs to see or change pre/h: the impl's fused op where it has one, whose
            # backward sorts idx once for both tables.
            y, h = unit_ffn(
                xt, self.w_in, self.b_in, idx, gate_logits, self.w_out, self.activation, self.impl, self.sparse_grad
            )  # (T, d), (T, k)
            acts = SparseActivations(idx.view(*lead, self.k), h.view(*lead, self.k), self.n_units)
        else:
            # The same unit compute from the two primitives, with the hooks between its steps.
            def pre_hook(pre: Tensor) -> Tensor:
                if offset is not None:
                    pre = pre + offset
                return self.hook_pre(pre.view(*lead, self.k)).reshape(-1, self.k)

            def post_hook(idx: Tensor, h: Tensor) -> SparseActivations:
                return self.hook_post(SparseActivations(idx.view(*lead, self.k), h.view(*lead, self.k), self.n_units))

            primitives = impl_primitives(resolve_impl(self.impl, xt.device), self.sparse_grad)
            y, _, h, acts = compose_unit_ffn(*primitives, xt, self.w_in, self.b_in, idx, gate_logits, self.w_out,
                                             self.activation, pre_hook, post_hook)  # (T, d), _, (T, k), hooked
        return y, h, acts

    def set_k(self, k: int) -> None:
        """Change the cap k in place (the k schedule of train/config.py shrinks it during training).
        Weights and firing statistics are untouched; only the router's search changes."""
        if not 1 <= k <= self.n_units:
            raise MonorouteError(f"k must be between 1 and n_units={self.n_units}, got k={k}")
        self.router.set_k(k)
        self.k = k

    @torch.no_grad()
    def record_firing(self, idx: Tensor, h: Tensor) -> None:
        fired = idx[h != 0]
        self.tokens_seen += idx.shape[0]
        self.last_fired[fired] = self.tokens_seen
        self.fire_count.index_add_(0, fired, torch.ones_like(fired))

    def dead_mask(self) -> Tensor:
        """(N,) True for units with no firing in the last `dead_window` tokens.

        A unit that never fired counts as dead only once `dead_grace` tokens were seen (default
        `dead_window`: AuxK's grace window, so nothing is dead before that many tokens). Without it,
        after one step almost every unit of a large layer is "dead" merely for not having been tried
        yet, and the revival loss spends itself on them; `dead_grace=0` keeps that behaviour, in
        which revival doubles as a pull of untried units into selection (see the README's frontier
        for what each costs)."""
        never = self.last_fired < 0
        stale = ~never & (self.last_fired <= self.tokens_seen - self.dead_window)
        return stale | (never & (self.tokens_seen >= self.dead_grace))

    def dead_fraction(self) -> float:
        return self.dead_mask().float().mean().item()

    def auxiliary_loss(self, xt: Tensor, routing: Routing, h: Tensor, xr: Tensor | None = None) -> Tensor:
        """Dead-unit revival (weighted by aux_coef), an L1 pressure on unit activations, and with
        coupling="agreement" the agreement loss (weighted by agree_coef). `xr` is the input the router
        read (detached under router_detach): the router-only losses read it, the L1 term reads h."""
        xr = xt if xr is None else xr
        loss = self.l1_coef * h.abs().sum(-1).mean()
        if self.aux_coef > 0:
            loss = loss + self.aux_coef * self.revival_loss(xr, routing)
        if self.coupling == "agreement" and self.agree_coef > 0:
            loss = loss + self.agree_coef * self.agreement_loss(routing, h)
        if self.coupling == "rerank" and self.rank_coef > 0:
            loss = loss + self.rank_coef * self.rank_loss(routing)
        return loss

    def rank_loss(self, routing: Routing) -> Tensor:
        """Teach the proposer (the product keys) to rank its C candidates as their pre-activations do.

        Listwise distillation (ListNet): per token, KL(softmax(pre / std(pre)) || softmax(score)) over
        the C candidates, the target detached. Raising the candidates whose pre-activation is high
        raises their sub-keys, which every unit sharing a sub-key inherits, so units outside the
        candidates are reached too; the score's temperature is the router's learned scale."""
        pre = routing.candidate_pre.detach()  # (T, C)
        if pre.numel() == 0:
            return pre.new_zeros(())
        s1, s2 = routing.halves
        candidates, repeat = routing.candidates, routing.candidate_repeat
        if self.rank_tokens is not None and pre.shape[0] > self.rank_tokens:
            # A uniform sample of the tokens: the loss is a mean over tokens, so its expectation (and
            # its gradient's) is the full loss's, at rank_tokens / T of the cost.
            rows = torch.randperm(pre.shape[0], device=pre.device)[: self.rank_tokens]
            pre, s1, s2, candidates = pre[rows], s1[rows], s2[rows], candidates[rows]
            repeat = None if repeat is None else repeat[rows]
        scores = self.router.unit_scores(s1, s2, candidates)  # (T, C), with gradient to keys and query
        if repeat is None:
            # Standardised per token (unbiased std, as Tensor.std), in two passes: torch.std_mean's
            # Welford reduction is 14x slower on the CPU at (2,048, 256).
            centred = pre - pre.mean(-1, keepdim=True)
            std = (centred.square().sum(-1, keepdim=True) / max(pre.shape[-1] - 1, 1)).sqrt()
            # The target as log-probabilities: the same KL without an element-wise log of the target.
            log_target = F.log_softmax(centred / (std + 1e-6), dim=-1)
            return F.kl_div(F.log_softmax(scores, dim=-1), log_target, reduction="batchmean", log_target=True)
        # A unit proposed by two heads counts once: its repeats get no target mass and no score mass.
        keep = (~repeat).to(pre.dtype)
        n = keep.sum(-1, keepdim=True)
        mean = (pre * keep).sum(-1, keepdim=True) / n
        std = (((pre - mean) * keep).square().sum(-1, keepdim=True) / (n - 1).clamp(min=1)).sqrt()
        target = F.softmax(((pre - mean) / (std + 1e-6)).masked_fill(repeat, float("-inf")), dim=-1)
        log_p = F.log_softmax(scores.masked_fill(repeat, float("-inf")), dim=-1).masked_fill(repeat, 0.0)
        return (target * (target.clamp(min=1e-30).log() - log_p)).sum() / pre.shape[0]

    def agreement_loss(self, routing: Routing, h: Tensor) -> Tensor:
        """Mean over the T·k slots of relu(score - threshold) / scale on the selected units ReLU silences.

        A silenced unit (pre <= 0, so h = 0) gives its gate, hence the router, no gradient: the
        router never learns that picking it was wasted, and at init about half the k slots are
        (score and pre-activation are uncorrelated). This pushes such a unit's score down to the
        token's selection threshold (its k-th selected score, detached) so that units which fire
        take its place; units that fire are not touched, so the pre-activations and L0 are left to
        the main loss."""
        silent = h.detach() <= 0  # ReLU: h = sigmoid(s)·relu(pre) is 0 exactly when pre <= 0
        # On the cosines (scores over the router's scale; threshold detached, the token's k-th
        # selected one): else the cheapest way down is to shrink the shared scale, which flattens
        # every gate and changes no choice.
        cosines = routing.scores / self.router.log_scale.exp()  # (T, k); no gradient to the scale
        threshold = cosines.detach().min(-1, keepdim=True).values  # (T, 1)
        margin = cosines - threshold
        return (F.relu(margin) * silent).sum() / max(1, h.numel())

    def selection_threshold(self, routing: Routing, units: Tensor) -> Tensor:
        """(T, U) the score each of `units` must reach on each token to be selected: the token's lowest
        selected score, within the unit's own pool for the multi-pool router (each pool picks its own
        k / P, so another pool's lower scores do not make this unit selectable)."""
        scores = routing.scores.detach()  # (T, k)
        pools = getattr(self.router, "pools", 1)
        if pools == 1:
            return scores.min(-1, keepdim=True).values.expand(-1, units.numel())
        per_pool = scores.view(scores.shape[0], pools, -1).min(-1).values  # (T, P): pools' picks are concatenated
        return per_pool[:, units // self.router.pool_size]

    def revival_loss(self, xt: Tensor, routing: Routing) -> Tensor:
        """For up to aux_units dead units: pull the score up to the selection threshold on the token
        where it is highest (and, for ReLU under a router with its own scores, the pre-activation
        above 0). `routing` is this forward's, whose half scores the product-key router reuses.

        Under re-ranking with revival_target="selection", the two thresholds are the ones selection
        actually applies: the score must reach the token's lowest *proposed* score (to be among its C
        candidates) and the pre-activation the token's k-th largest candidate pre-activation (and 0,
        for ReLU), instead of the lowest selected score, which the pre-activation picked."""
        dead = self.dead_mask().nonzero().squeeze(1)
        if dead.numel() == 0 or xt.shape[0] == 0:
            return xt.new_zeros(())
        units = dead[torch.randperm(dead.numel(), device=dead.device)[: self.aux_units]]  # (U,)
        w_sel, b_sel = self.select_tables()
        scores = self.router.score_units(xt, units, w_sel, b_sel, self.sparse_grad, routing)  # (T, U)
        best_token = scores.detach().argmax(0)  # (U,) where each dead unit is closest to selection
        best_score = scores.gather(0, best_token.unsqueeze(0)).squeeze(0)  # (U,)
        rerank_exact = self.revival_target == "selection" and routing.candidate_pre is not None and \
            self.coupling == "rerank"
        if rerank_exact:
            threshold = self.proposal_threshold(routing)[best_token]  # (U,)
        else:
            threshold = self.selection_threshold(routing, units)[best_token, torch.arange(units.numel())]  # (U,)
        by_preact = self.router_name in PREACT_ROUTERS
        if self.activation == "relu" and by_preact:
            threshold = threshold.clamp(min=0)  # selected but not positive is still not firing
        loss = F.relu(threshold - best_score).mean()
        if not by_preact and (self.activation == "relu" or rerank_exact):
            pre = (xt[best_token] * F.embedding(units, w_sel, sparse=self.sparse_grad)).sum(-1)
            if b_sel is not None:
                pre = pre + b_sel[units]
            floor = routing.candidate_pre.detach().topk(self.k, dim=-1).values[:, -1][best_token] if rerank_exact \
                else torch.zeros_like(pre)
            if self.activation == "relu":
                floor = floor.clamp(min=0)
            loss = loss + F.relu(floor - pre).mean()
        return loss

    def proposal_threshold(self, routing: Routing) -> Tensor:
        """(T,) the lowest score among each token's proposed candidates: what a unit's score must reach
        to be proposed (re-ranking), read from the same half scores as the units' own."""
        s1, s2 = routing.halves
        with torch.no_grad():
            return self.router.unit_scores(s1, s2, routing.candidates).min(-1).values
