"""A balanced clustered index over the unit rows themselves (IVF for maximum inner product search)."""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from monoroute.errors import MonorouteError
from monoroute.layers.routing.base import Routing, unit_preacts
from monoroute.layers.routing.diagnostics import search_diagnostics


class ClusterRouter(nn.Module):
    """A two-level clustered index over the unit table itself (IVF for maximum inner product search).

    The N units are split into `clusters` = G groups of equal size N / G (a balanced k-means of the
    rows [w_in[i], b_i], kept in the `members` buffer). A cluster's centroid is the mean of its
    members' rows, so its score mu_g·x + mean(b) is the *mean pre-activation* of its members on x.
    Per token: score the G centroids (O(G·d)), probe the best `probes` = c clusters, compute the
    exact pre-activations of their c·N/G members (O(c·N/G·d)), and keep the top k: a TopK MLP over
    c·N/G candidates. With G = sqrt(N) both terms are O(sqrt(N)·d), as product keys are.

    Why this proposer and not a better-trained product-key score: a product-key score is the sum of
    two sub-key scores, which cannot express an arbitrary unit's input direction, and it has to be
    taught what the pre-activations would pick. Here the index is built *from* the pre-activation
    weights, so there is no second score to keep in agreement and nothing to learn: a unit is missed
    only when its cluster's mean pre-activation ranks below c others. Training keeps the index true
    (centroids are read from the current rows at every forward; the balanced assignment is redone
    every `recluster_every` training forwards by a few Lloyd steps from the current centroids) and
    the clusters in use: an additive per-cluster bias, used for probing only and never in a unit's
    activation, rises for clusters probed less than average and falls for the others (auxiliary-
    loss-free balancing, Wang et al. 2024), so no cluster of units is left unreachable.
    Selection has no gradient; the chosen units' pre-activations are recomputed with gradient by the
    layer (gate "none", as the dense router)."""

    def __init__(self, n_units: int, k: int, d_model: int, clusters: int | None = None, probes: int = 4,
                 recluster_every: int = 50, balance_rate: float = 0.01, impl: str = "auto",
                 revive_where_probed: bool = False, recluster_iters: int = 3) -> None:
        super().__init__()
        clusters = clusters or math.isqrt(n_units)
        if isinstance(recluster_iters, bool) or not isinstance(recluster_iters, int) or recluster_iters < 1:
            raise MonorouteError(f"recluster_iters must be a whole number >= 1, got {recluster_iters!r}; e.g. 3")
        self.recluster_iters = recluster_iters
        self.revive_where_probed = bool(revive_where_probed)
        for name, value in (("router_clusters", clusters), ("router_probes", probes),
                            ("recluster_every", recluster_every)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise MonorouteError(f"{name} must be a whole number >= 1, got {value!r}")
        if n_units % clusters:
            raise MonorouteError(f"router 'cluster' splits n_units={n_units} into router_clusters={clusters} equal "
                                 f"clusters; pick a divisor (e.g. {math.isqrt(n_units)} when n_units is a square)")
        if probes > clusters:
            raise MonorouteError(f"router_probes={probes} exceeds router_clusters={clusters}; probe at most all")
        if isinstance(balance_rate, bool) or not isinstance(balance_rate, (int, float)) or \
                not 0 <= balance_rate < math.inf:
            raise MonorouteError(f"cluster_balance must be a finite number >= 0, got {balance_rate!r}; e.g. 0.01")
        self.n_units, self.clusters, self.size = n_units, clusters, n_units // clusters
        self.probes, self.recluster_every, self.balance_rate, self.impl = probes, recluster_every, balance_rate, impl
        self.candidates = probes * self.size
        if k > self.candidates:
            raise MonorouteError(f"k={k} exceeds the router_probes x cluster size = {self.candidates} candidates; "
                                 f"raise router_probes or lower k")
        self.k = k
        # A random balanced assignment until the first reclustering (the rows are random then too).
        self.register_buffer("members", torch.randperm(n_units).view(clusters, self.size))  # (G, N/G) unit ids
        self.register_buffer("probe_bias", torch.zeros(clusters))  # (G,) balancing bias, probing only
        self.register_buffer("calls", torch.zeros((), dtype=torch.int64))  # training forwards so far
        self.diagnose = False  # set by the trainer / eval: record `diagnostics` at the next forward
        self.diagnostics: dict | None = None

    def set_k(self, k: int) -> None:
        if k > self.candidates:
            raise MonorouteError(f"k={k} exceeds the {self.candidates} candidates of router 'cluster'")
        self.k = k

    def score_units(self, x: Tensor, units: Tensor, w_in: Tensor, b_in: Tensor | None, sparse_grad: bool = False,
                    routing: Routing | None = None) -> Tensor:
        """(T, d), (U,) -> (T, U) pre-activations of the given units (the revival loss's score). Given
        this forward's `routing` and `revive_where_probed`, a unit on a token that does not probe its
        cluster scores 1e4 lower (a constant: the gradient is the pre-activation's), so revival pulls a
        dead unit up where it can be selected, not where its cluster is never searched. Off by default:
        it cut dead units from 61 % to 9 % but ended 0.1-0.2 nats worse (docs/routing.md)."""
        pre = unit_preacts(x, units, w_in, b_in, sparse_grad)
        if not self.revive_where_probed or routing is None or routing.candidates is None:
            return pre
        cluster_of = torch.empty_like(self.members.flatten())
        cluster_of[self.members.flatten()] = torch.arange(self.clusters, device=units.device).repeat_interleave(self.size)
        probed = cluster_of[routing.candidates[:, :: self.size]]  # (T, c) the clusters each token searched
        visible = (cluster_of[units].view(1, -1, 1) == probed.unsqueeze(1)).any(-1)  # (T, U)
        return pre - 1e4 * (~visible).to(pre.dtype)

    def centroids(self, w_in: Tensor, b_in: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """(G, d) mean row of each cluster and (G,) mean bias: the centroid score is the members' mean pre."""
        mu = w_in.detach()[self.members.flatten()].view(self.clusters, self.size, -1).mean(1)
        return mu, None if b_in is None else b_in.detach()[self.members].mean(1)

    @torch.no_grad()
    def probe(self, x: Tensor, w_in: Tensor, b_in: Tensor | None, centroids=None) -> Tensor:
        """(T, d) -> (T, c) the clusters each token probes (by centroid score plus the balancing bias);
        `centroids` = this forward's `self.centroids(w_in, b_in)`, computed here when not given."""
        mu, mb = centroids if centroids is not None else self.centroids(w_in, b_in)
        scores = x @ mu.t()  # (T, G)
        if mb is not None:
            scores = scores + mb
        return (scores + self.probe_bias).topk(self.probes, dim=-1, sorted=False).indices

    @torch.no_grad()
    def forward(self, x: Tensor, w_in: Tensor, b_in: Tensor | None) -> Routing:
        centroids = self.centroids(w_in, b_in)  # once per forward: probing and balancing share it
        probed = self.probe(x, w_in, b_in, centroids)  # (T, c)
        cand, pre = cluster_preacts(x, w_in, b_in, self.members, probed)  # (T, c·N/G) ids and exact pre
        top = pre.topk(self.k, dim=-1, sorted=False)
        if self.training:
            self.maintain(probed, w_in, b_in, centroids[0])
        chosen = cand.gather(-1, top.indices)
        if self.diagnose:
            self.diagnostics, self.diagnose = search_diagnostics(cand, chosen, self.n_units), False
        return Routing(chosen, top.values, None, cand, pre)

    @torch.no_grad()
    def maintain(self, probed: Tensor, w_in: Tensor, b_in: Tensor | None, mu: Tensor) -> None:
        """Balance the probing (sign of each cluster's deviation from the mean load, scaled by the
        spread of the centroid scores) and rebuild the assignment every recluster_every calls."""
        load = torch.bincount(probed.flatten(), minlength=self.clusters).to(self.probe_bias.dtype)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(load)  # every rank keeps the same bias
        if self.balance_rate > 0:
            spread = mu.norm(dim=-1).mean()  # a centroid score's typical size on a unit-norm-ish input
            self.probe_bias += self.balance_rate * spread * torch.sign(load.mean() - load)
        self.calls += 1
        if int(self.calls) % self.recluster_every == 0:
            self.recluster(w_in, b_in)

    @torch.no_grad()
    def recluster(self, w_in: Tensor, b_in: Tensor | None, iterations: int | None = None) -> None:
        iterations = iterations or self.recluster_iters
        rows = w_in.detach() if b_in is None else torch.cat([w_in.detach(), b_in.detach().unsqueeze(1)], 1)
        self.members.copy_(balanced_kmeans(rows.float(), self.members, iterations))


def cluster_preacts(x: Tensor, w_in: Tensor, b_in: Tensor | None, members: Tensor, probed: Tensor
                    ) -> tuple[Tensor, Tensor]:
    """(T, d) tokens, (G, S) cluster members, (T, c) probed clusters -> (T, c·S) candidate ids and
    their exact pre-activations, no gradient. Grouped by cluster: every (token, probe) pair of one
    cluster is one dense (n_g, d) x (d, S) product, so the work is T·c·S·d multiply-adds in G
    matrix products, no (T, c·S, d) gather (`preacts` over the same ids is the reference)."""
    T, c = probed.shape
    G, S = members.shape
    flat = probed.flatten()  # (T·c,) pair p = t*c + j
    order = flat.argsort()
    counts = torch.bincount(flat, minlength=G).tolist()
    tokens = order // c
    out = x.new_empty(T * c, S)
    w = w_in.detach()
    start = 0
    for g, n in enumerate(counts):
        if n:
            pairs = order[start:start + n]
            rows = members[g]
            block = x[tokens[start:start + n]] @ w[rows].t()  # (n, S)
            if b_in is not None:
                block = block + b_in.detach()[rows]
            out[pairs] = block
            start += n
    cand = members[probed].view(T, c * S)
    return cand, out.view(T, c * S)


def balanced_kmeans(rows: Tensor, members: Tensor, iterations: int = 3) -> Tensor:
    """(N, e) rows, (G, S) current assignment -> (G, S) a new balanced assignment: a few Lloyd steps
    from the current clusters' centroids, each assigning every row to its nearest centroid that still
    has room (`capacity_assign`)."""
    G, S = members.shape
    assign = members
    for _ in range(iterations):
        mu = rows[assign.flatten()].view(G, S, -1).mean(1)  # (G, e)
        # Nearest centroid = largest r·mu - |mu|^2 / 2 (the |r|^2 term is the same for every centroid).
        affinity = rows @ mu.t() - 0.5 * (mu * mu).sum(-1)  # (N, G)
        assign = capacity_assign(affinity, S)
    return assign


def capacity_assign(affinity: Tensor, capacity: int) -> Tensor:
    """(N, G) affinities -> (G, capacity) unit ids: every unit in exactly one group, every group full.

    Rounds of proposals: each unassigned unit proposes to its best group with room; a group accepts
    its best proposers up to its remaining room and rejects the rest, who then never propose to it
    again. Each round fills at least one group or places every proposer, so it ends in <= G rounds."""
    N, G = affinity.shape
    aff = affinity.clone()
    group = torch.full((N,), -1, dtype=torch.int64, device=aff.device)
    room = torch.full((G,), capacity, dtype=torch.int64, device=aff.device)
    for _ in range(G + 1):
        free = (group < 0).nonzero().squeeze(1)
        if free.numel() == 0:
            break
        aff[:, room == 0] = float("-inf")
        choice = aff[free].argmax(1)  # (F,)
        value = aff[free, choice]
        # Rank the proposals within each group, best first: sort by value, then stably by group.
        by_value = value.argsort(descending=True)
        by_group = choice[by_value].argsort(stable=True)
        order = by_value[by_group]
        ch = choice[order]
        first = torch.searchsorted(ch, ch, right=False)  # index of each group's first proposal in `order`
        rank = torch.arange(ch.numel(), device=aff.device) - first
        accept = rank < room[ch]
        group[free[order[accept]]] = ch[accept]
        room -= torch.bincount(ch[accept], minlength=G)
        rejected = order[~accept]
        aff[free[rejected], choice[rejected]] = float("-inf")
    members = group.argsort(stable=True).view(G, capacity)  # units grouped by their group, ascending
    return members
