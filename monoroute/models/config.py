"""GPTConfig: everything needed to rebuild a model, JSON-serialisable."""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from monoroute.errors import MonorouteError

FFN_KINDS = ("dense", "routed")
DENSE_ACTIVATIONS = ("gelu", "gelu_tanh", "silu")
UNIT_INITS = ("gpt", "fan_in")
QUERY_ROUTERS = ("product_key", "multi_pool")  # routers with a learned query (the recipe's detach / BatchNorm)


# The routed design upcycling was measured with (docs/upcycle.md): product keys with preact selection,
# full-width keys, a router reading the live residual stream. `monoroute upcycle` (from our runs or HF)
# builds it unless the user sets these keys; the native default below may differ.
UPCYCLE_ROUTING = dict(coupling="auto", rank_coef=1.0, d_key=None, router_detach=False, query_norm="none",
                       revival_target="score", aux_units=256, defaults_version=1, dense_beside=0)


POSITIONS = ("learned", "rotary")
NORMS = ("layer", "rms")


@dataclass
class GPTConfig:
    vocab_size: int = 256
    block_size: int = 256
    n_layer: int = 4
    n_head: int = 4
    d_model: int = 128
    dropout: float = 0.0
    bias: bool = True
    tie_weights: bool = True
    # FFN per block: "dense", "routed", or a comma list with one entry per layer ("dense,routed,...").
    ffn: str = "dense"
    d_ff: int | None = None  # dense FFN width; None = 4 * d_model
    # Dense FFN nonlinearity: "gelu" (exact erf) or "gelu_tanh" (GPT-2's "gelu_new"), and the LayerNorm
    # epsilon: both set by Hugging Face loading (models/hf.py) so a GPT-2 checkpoint computes what it did there.
    dense_activation: str = "gelu"
    ln_eps: float = 1e-5
    # RoutedFFN settings (used by routed blocks only)
    n_units: int = 16384
    k: int = 32
    router: str = "product_key"
    router_pools: int = 1  # router="multi_pool": independent pools of n_units / pools units, each picking k / pools
    # An output bias on routed layers (like a dense FFN's down-projection bias): upcycled layers need
    # it to reproduce the teacher FFN's output mean without spending units on it. Off for runs from scratch.
    out_bias: bool = False
    activation: str = "relu"
    d_key: int | None = None
    aux_coef: float = 0.1
    # L1 on unit activations: the frontier sweep (README) found 1e-3 better in val loss, coverage and
    # purity than 0 for every routed design it tried, so it is on by default.
    l1_coef: float = 1e-3
    dead_window: int = 200_000
    # Tokens before a never-fired unit may count as dead (None: dead_window, AuxK's grace window;
    # 0: dead from the start, so the revival loss also pulls never-tried units into selection).
    dead_grace: int | None = None
    impl: str = "auto"
    sparse_grad: bool = False  # row-sparse COO gradients for the unit tables (needs train.sparse_rows)
    router_heads: int = 1  # product-key query heads sharing the sub-keys (PEER); 1 = one query
    router_balance: bool = False  # standardise each half's sub-key scores per token (routing.balance_scores)
    # Making the router's choice agree with ReLU firing: "none", "agreement" (loss, weight agree_coef),
    # "preact" (keep the best-scoring firing units of the top 2k) or "rerank" (below). See RoutedFFN.
    # "auto" (the default) is "rerank" for product keys with ReLU (docs/routing.md, issue 29), "preact"
    # for multi-pool keys with ReLU, "none" elsewhere (defaults_version 1: "preact" for product keys too).
    coupling: str = "auto"
    agree_coef: float = 0.1
    # Candidate re-ranking (coupling="rerank", product keys): the keys propose router_candidates units,
    # the top k by exact pre-activation run, and a listwise ranking loss (weight rank_coef) teaches the keys.
    router_candidates: int | None = None
    # How the keys propose them: "exact" (the top C sums) or "grid" (each head's top ceil(sqrt(C/H)) sub-keys
    # per half crossed: PKM's candidate set, cheaper to search; ProductKeyRouter).
    router_proposals: str = "exact"
    rank_coef: float = 0.1  # 1.0 let the ranking loss dominate the LM loss early (docs/routing.md)
    # The ranking loss on at most rank_tokens tokens of each forward, drawn at random (None: all): an
    # unbiased estimate of the same loss at a fraction of its cost (docs/performance.md).
    rank_tokens: int | None = None
    # router="cluster": a balanced clustered index over the unit rows themselves (routing.ClusterRouter):
    # router_clusters groups (None: sqrt(n_units)), router_probes of them searched per token, the
    # assignment rebuilt every recluster_every training forwards, probing balanced at rate cluster_balance.
    router_clusters: int | None = None
    router_probes: int = 4
    recluster_every: int = 50
    cluster_balance: float = 0.01
    recluster_iters: int = 3  # Lloyd steps per reclustering (from the current clusters)
    revive_where_probed: bool = False  # revival only on tokens that probe the unit's cluster (fewer dead, worse loss)
    # The router recipe of the reference designs (issue 29, docs/routing.md):
    # router_detach: the router's query and the router-only losses (revival, ranking, agreement) read a
    # detached copy of the layer input, so they train the router and the revived rows, not the trunk
    # (XLM's mem_query_detach_input). None: on for the routers with their own query (product_key,
    # multi_pool), off for the others.
    router_detach: bool | None = None
    # query_norm "batch": BatchNorm without affine on the product-key query before the cosine (PEER).
    # "auto": "batch" for product_key / multi_pool, "none" for the routers without a query.
    query_norm: str = "auto"
    # What the revival loss pulls a dead unit to: "score" (the lowest selected score) or "selection"
    # (under re-ranking: the lowest proposed score and the k-th candidate pre-activation). "selection"
    # with aux_units 2048 halves the dead units but costs loss over longer training (docs/routing.md).
    revival_target: str = "score"
    aux_units: int = 256  # dead units the revival loss samples per forward
    # Initial w_in of routed units: "gpt" (normal, std 0.02, as every matrix) or "fan_in" (std d^-0.5,
    # the memory-layer references' scale).
    unit_init: str = "gpt"
    # A slim dense FFN of this width beside every routed layer (their outputs add; 0: none): the
    # hybrid of UltraMemV2 / memory layers. Its hooks are blocks.{i}.mlp_dense.hook_pre / hook_post.
    dense_beside: int = 0
    # Which generation of defaults "auto" / unset settings follow. 2: issue 29's recipe ("auto" coupling
    # is re-ranking for product keys with ReLU, an unset d_key is d_model / 2 when re-ranking). 1: what
    # runs saved before it were built with ("auto" is preact, d_key d_model); their configs load as 1.
    defaults_version: int = 2
    # Positions: "learned" (GPT-2: a wpe table) or "rotary" (GPT-NeoX / Llama: q and k rotated per head,
    # the first rotary_dims channels of each head, None = all, with frequencies base^(-2i/rotary_dims)).
    position: str = "learned"
    rotary_dims: int | None = None
    rotary_base: float = 10000.0
    # GPT-NeoX / Pythia: attention and FFN both read the block's input, x + attn(ln_1(x)) + mlp(ln_2(x)).
    parallel_residual: bool = False
    # Llama family: RMSNorm ("rms", no bias), grouped-query attention (n_kv_head key/value heads, each
    # shared by n_head / n_kv_head query heads; None = n_head), a gated dense FFN
    # down(act(gate(x)) * up(x)) (SwiGLU with dense_activation "silu"), and q/k/v biases on their own
    # (qkv_bias; None = bias: Qwen2 has them while its other layers have none). With ffn_gated a routed
    # layer's units are gated too (RoutedFFN gated=True: h = act(gate·x) * (w_in·x + b)).
    norm: str = "layer"
    n_kv_head: int | None = None
    ffn_gated: bool = False
    qkv_bias: bool | None = None

    @property
    def kv_heads(self) -> int:
        return self.n_head if self.n_kv_head is None else self.n_kv_head

    @property
    def layer_qkv_bias(self) -> bool:
        return self.bias if self.qkv_bias is None else bool(self.qkv_bias)

    @property
    def head_rotary_dims(self) -> int:
        return self.rotary_dims if self.rotary_dims is not None else self.d_model // self.n_head

    @property
    def layer_coupling(self) -> str:
        """The coupling a routed layer is built with ("auto" resolved)."""
        from monoroute.layers.routed_ffn import resolve_coupling

        return resolve_coupling(self.coupling, self.router, self.activation, self.defaults_version)

    @property
    def layer_d_key(self) -> int | None:
        """The key width a routed layer is built with (None: d_model). Re-ranking keys only propose
        candidates, so from defaults_version 2 they default to d_model / 2 (PEER, memory layers)."""
        if self.d_key is None and self.defaults_version >= 2 and self.layer_coupling == "rerank":  # product keys only
            return max(2, self.d_model // 4 * 2)  # even: the query splits in halves
        return self.d_key

    @property
    def layer_router_detach(self) -> bool:
        return self.router in QUERY_ROUTERS if self.router_detach is None else bool(self.router_detach)

    @property
    def layer_query_norm(self) -> str:
        if self.query_norm != "auto":
            return self.query_norm
        return "batch" if self.router in QUERY_ROUTERS else "none"

    @property
    def ffn_width(self) -> int:
        return self.d_ff or 4 * self.d_model

    def ffn_kinds(self) -> list[str]:
        kinds = [kind.strip() for kind in self.ffn.split(",")]
        if len(kinds) == 1:
            kinds = kinds * self.n_layer
        if len(kinds) != self.n_layer:
            raise MonorouteError(
                f"ffn lists {len(kinds)} layers but n_layer={self.n_layer}; give one kind or one per layer"
            )
        for kind in kinds:
            if kind not in FFN_KINDS:
                raise MonorouteError(f"unknown ffn {kind!r}; choose one of {', '.join(FFN_KINDS)} (or a comma list)")
        return kinds

    def validate(self) -> "GPTConfig":
        self.ffn_kinds()
        if self.dense_activation not in DENSE_ACTIVATIONS:
            raise MonorouteError(f"unknown dense_activation {self.dense_activation!r}; choose one of "
                                 f"{', '.join(DENSE_ACTIVATIONS)}")
        if self.unit_init not in UNIT_INITS:
            raise MonorouteError(f"unknown unit_init {self.unit_init!r}; choose one of {', '.join(UNIT_INITS)}")
        if isinstance(self.dense_beside, bool) or not isinstance(self.dense_beside, int) or self.dense_beside < 0:
            raise MonorouteError(f"dense_beside must be a whole number >= 0 (the width of a dense FFN beside each "
                                 f"routed layer; 0 for none), got {self.dense_beside!r}")
        if self.defaults_version not in (1, 2):
            raise MonorouteError(f"defaults_version must be 1 (runs saved before the router recipe) or 2, "
                                 f"got {self.defaults_version!r}")
        if self.router_detach is not None and not isinstance(self.router_detach, bool):
            raise MonorouteError(f"router_detach must be true, false or null (auto), got {self.router_detach!r}")
        if self.d_model % self.n_head:
            raise MonorouteError(f"d_model={self.d_model} must be divisible by n_head={self.n_head}")
        if self.norm not in NORMS:
            raise MonorouteError(f"unknown norm {self.norm!r}; choose one of {', '.join(NORMS)}")
        kv = self.kv_heads
        if isinstance(kv, bool) or not isinstance(kv, int) or kv < 1 or self.n_head % kv:
            raise MonorouteError(f"n_kv_head must be a whole number dividing n_head={self.n_head}, got {kv!r}")
        if self.position not in POSITIONS:
            raise MonorouteError(f"unknown position {self.position!r}; choose one of {', '.join(POSITIONS)}")
        if self.position == "rotary":
            dims, head = self.head_rotary_dims, self.d_model // self.n_head
            if isinstance(dims, bool) or not isinstance(dims, int) or not 2 <= dims <= head or dims % 2:
                raise MonorouteError(f"rotary_dims must be an even whole number from 2 to the head size {head}, "
                                     f"got {dims!r}")
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "d_model"):
            if getattr(self, name) < 1:
                raise MonorouteError(f"{name} must be at least 1, got {getattr(self, name)}")
        return self

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "GPTConfig":
        return cls(**check_keys(cls, values, "model config"))


def check_keys(cls, values: dict, what: str) -> dict:
    """Refuse unknown keys with the list of valid ones (a typo must not pass silently)."""
    valid = [f.name for f in fields(cls)]
    unknown = sorted(set(values) - set(valid))
    if unknown:
        raise MonorouteError(f"unknown {what} key(s) {', '.join(unknown)}; valid keys: {', '.join(valid)}")
    return values
