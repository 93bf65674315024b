"""Find the smallest set of nodes that still does a task (Gao et al. 2025's pruning, our code).

    1. learn masks on the task's training pairs:  loss = task loss + lam * (nodes kept), AdamW on tau
       (hard 0/1 forward, sigmoid surrogate backward; masks.py)
    2. rank live nodes by tau and bisect on K: the smallest top-K circuit whose task loss on the
       held-out pairs is <= the target (everything else ablated)
    3. checks on a third split of pairs that neither learned the masks nor chose K (so the reported
       circuit loss is not <= the target by construction): necessity (ablate only the circuit: the
       loss should rise to about chance, ln 2) and a random control of the same size and composition
       (same count per hook point, drawn from its live nodes): kept alone, and ablated alone.
    4. unit-level checks, each with a threshold a circuit must pass to count (`unit_checks`):
       - unit necessity: ablate only the circuit's *units*, every other node kept: the loss must rise
         at least UNIT_NECESSITY_SHARE of the way from the full model's loss to chance;
       - unit control: the circuit with its units swapped for as many units drawn from those active
         on the task's prompts (routed: selected and firing there): the swapped circuit must miss the
         target. Residual bottleneck channels alone flip the answer, and random routed units are
         rarely selected on the prompts, so the whole-circuit checks above cannot tell whether the
         units matter; these can.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor

from monoroute.circuits.masks import CircuitMask
from monoroute.circuits.nodes import KINDS, NodeGroup
from monoroute.circuits.tasks import Pair
from monoroute.hooks import SparseActivations

CHANCE = math.log(2)
UNIT_NECESSITY_SHARE = 0.5  # ablating the circuit's units alone must take the loss this share of the way to chance


@dataclass
class TaskBatch:
    tokens: Tensor  # (B, T) right-padded prompts (causal attention: padding never reaches a prompt's last position)
    last: Tensor    # (B,) index of each prompt's last byte
    cand: Tensor    # (B, 2) the two candidate bytes: [target, alternative]
    label: Tensor   # (B,) which candidate is right: 0 for the pair's A member, 1 for B


def make_batch(pairs: list[Pair], tokenizer) -> TaskBatch:
    prompts, cands, labels = [], [], []
    for p in pairs:
        cand = tokenizer.encode(p.a.answer) + tokenizer.encode(p.b.answer)
        for label, ex in enumerate((p.a, p.b)):
            prompts.append(tokenizer.encode(ex.prompt))
            cands.append(cand)
            labels.append(label)
    T = max(len(p) for p in prompts)
    tokens = torch.zeros(len(prompts), T, dtype=torch.long)
    for i, p in enumerate(prompts):
        tokens[i, :len(p)] = torch.tensor(p)
    return TaskBatch(tokens, torch.tensor([len(p) - 1 for p in prompts]), torch.tensor(cands), torch.tensor(labels))


def task_loss(model, batch: TaskBatch) -> Tensor:
    """Binary cross-entropy over the two candidate bytes at each prompt's last position (mean, nats)."""
    logits, _ = model(batch.tokens)  # (B, T, V)
    last = logits[torch.arange(len(batch.last)), batch.last]  # (B, V)
    two = last.gather(1, batch.cand).float()  # (B, 2)
    return F.cross_entropy(two, batch.label)


@dataclass
class SearchOptions:
    steps: int = 100
    lam: float = 1e-3     # per kept node, not normalised by the node count (Gao et al.); then steered
    lr: float = 0.1
    init: float = 1.0
    init_noise: float = 0.25  # the search seed's N(0, init_noise) jitter of the initial mask logits
    target_loss: float = 0.15
    seed: int = 0


def learn_masks(model, groups: list[NodeGroup], batch: TaskBatch, opts: SearchOptions) -> tuple[CircuitMask, list]:
    """AdamW on the mask logits for `opts.steps` steps. The penalty's weight starts at `opts.lam` and
    is steered toward the target every 10 steps (halved while the task loss is above it, x1.25 while
    below): a fixed weight either barely prunes or collapses the task, depending on the model."""
    mask = CircuitMask(model, groups, init=opts.init)
    gen = torch.Generator().manual_seed(opts.seed)
    with torch.no_grad():  # the search seed: where each node's logit starts, so ties break differently
        for t in mask.tau:
            t.add_(opts.init_noise * torch.randn(t.shape, generator=gen))
    opt = torch.optim.AdamW(mask.tau.parameters(), lr=opts.lr, weight_decay=0.0)
    trace, lam, recent = [], opts.lam, []
    with model.hooks(mask.hooks()):
        for step in range(opts.steps):
            loss = task_loss(model, batch)
            kept = mask.n_kept()
            opt.zero_grad(set_to_none=True)
            (loss + lam * kept).backward()
            opt.step()
            recent.append(loss.item())
            if (step + 1) % 10 == 0:
                lam = lam * 0.5 if sum(recent) / len(recent) > opts.target_loss else min(lam * 1.25, 1.0)
                recent = []
            if step % 25 == 0 or step == opts.steps - 1:
                trace.append({"step": step, "task_loss": round(loss.item(), 4), "kept": int(kept.item()),
                              "lam": float(f"{lam:.3g}")})
    return mask, trace


@torch.no_grad()
def loss_with(model, mask: CircuitMask, keep: list[Tensor], batch: TaskBatch) -> float:
    mask.set_fixed(keep)
    try:
        with model.hooks(mask.hooks()):
            return task_loss(model, batch).item()
    finally:
        mask.set_fixed(None)


def top_k_keep(scores: list[Tensor], k: int) -> list[Tensor]:
    """Per group 0/1 masks keeping the k highest-scoring live nodes overall (ties by position)."""
    flat = torch.cat(scores)
    keep = torch.zeros_like(flat)
    if k > 0:
        keep[torch.argsort(flat, descending=True, stable=True)[:k]] = 1.0
    return list(keep.split([len(s) for s in scores]))


def bisect_circuit(model, mask: CircuitMask, batch: TaskBatch, target: float) -> tuple[list[Tensor], float, int, bool]:
    """The smallest K whose top-K circuit reaches `target` on `batch`; returns (keep, loss, evaluations,
    reached). When no K up to every live node reaches it, reached is False and keep holds every live node.

    The search runs over K <= the learned mask's size when that mask reaches the target; else K grows
    from it by doubling along the ranking until it does (nodes the masks pruned may be ones whose
    *mean* helps, so far down the ranking the loss is not monotone in K). Within the range the
    bisection assumes the loss falls with K, as Gao et al.'s does."""
    scores = mask.scores()
    n_live = int(sum(g.live.sum() for g in mask.groups))
    n_learned = int(sum(((t.detach() > 0) & g.live).sum() for t, g in zip(mask.tau, mask.groups)))
    lo, hi, evals = 0, n_live, 0
    cache: dict[int, float] = {}

    def at(k: int) -> float:
        nonlocal evals
        if k not in cache:
            cache[k] = loss_with(model, mask, top_k_keep(scores, k), batch)
            evals += 1
        return cache[k]

    if at(n_learned) <= target:
        hi = n_learned
    else:  # the learned set misses the target on held-out pairs: grow it along the ranking until it reaches it
        lo, k = n_learned + 1, max(2 * n_learned, 1)
        while k < n_live and at(k) > target:
            lo, k = k + 1, 2 * k
        hi = min(k, n_live)
    while lo < hi:
        mid = (lo + hi) // 2
        if at(mid) <= target:
            hi = mid
        else:
            lo = mid + 1
    return top_k_keep(scores, lo), at(lo), evals, at(lo) <= target


def counts_by_kind(groups: list[NodeGroup], keep: list[Tensor]) -> dict[str, int]:
    out = {kind: 0 for kind in KINDS}
    for g, k in zip(groups, keep):
        out[g.kind] += int((k * g.live).sum().item())
    out["total"] = sum(out[kind] for kind in KINDS)
    return out


def random_like(groups: list[NodeGroup], keep: list[Tensor], generator: torch.Generator) -> list[Tensor]:
    """A random set with the same number of live nodes at every hook point as `keep`."""
    out = []
    for g, k in zip(groups, keep):
        n = int((k * g.live).sum().item())
        live = torch.nonzero(g.live).flatten()
        r = torch.zeros(g.size)
        if n:
            r[live[torch.randperm(len(live), generator=generator)[:n]]] = 1.0
        out.append(r)
    return out


def circuit_nodes(groups: list[NodeGroup], keep: list[Tensor]) -> dict[str, list[int]]:
    """{hook: [channel or unit ids]} of the kept live nodes."""
    return {g.hook: torch.nonzero(k * g.live).flatten().tolist() for g, k in zip(groups, keep) if (k * g.live).any()}


@torch.no_grad()
def task_activity(model, groups: list[NodeGroup], batches: list[TaskBatch]) -> list[Tensor]:
    """Per group (size,) bool: which units fire (> 0; routed: selected and > 0) at some position of the
    task's prompts, up to each prompt's last byte (right padding is not the task). Other groups: all False."""
    by_hook = {g.hook: i for i, g in enumerate(groups) if g.kind == "units"}
    active = [torch.zeros(g.size, dtype=torch.bool) for g in groups]
    valid: list[Tensor] = []

    def observe(act, hook):
        i = by_hook[hook.name]
        v = valid[0]
        if isinstance(act, SparseActivations):
            fired = (act.values > 0) & v.unsqueeze(-1)
            active[i][act.indices[fired].unique().cpu()] = True
        else:
            fired = ((act > 0) & v.unsqueeze(-1)).reshape(-1, act.shape[-1]).any(0)
            active[i] |= fired.cpu()
        return None

    was_training = model.training
    model.eval()
    with model.hooks([(h, observe) for h in by_hook]):
        for b in batches:
            valid[:] = [torch.arange(b.tokens.shape[1]).unsqueeze(0) <= b.last.unsqueeze(1)]
            model(b.tokens)
    model.train(was_training)
    return active


def with_task_live(groups: list[NodeGroup], active: list[Tensor]) -> list[NodeGroup]:
    """The groups for one task: a routed unit live on the task's prompts is maskable even if it never fired
    in the means pass (its ablation value is then what that pass measured: 0). Dense groups are as they were."""
    return [replace(g, live=g.live | a) if g.routed else g for g, a in zip(groups, active)]


def swap_units(groups: list[NodeGroup], keep: list[Tensor], active: list[Tensor],
               generator: torch.Generator) -> list[Tensor]:
    """`keep` with each unit group's kept units replaced by as many drawn at random from the live units
    active on the task's prompts, the circuit's own excluded (fewer when fewer exist); other groups as kept."""
    out = []
    for g, k, a in zip(groups, keep, active):
        if g.kind != "units":
            out.append(k)
            continue
        own = (k * g.live) > 0
        pool = torch.nonzero(a & g.live & ~own).flatten()
        r = torch.zeros(g.size)
        r[pool[torch.randperm(len(pool), generator=generator)[:int(own.sum())]]] = 1.0
        out.append(r)
    return out


def unit_checks(model, mask: CircuitMask, keep: list[Tensor], active: list[Tensor], batch: TaskBatch,
                full_loss: float, target: float, generator: torch.Generator) -> dict:
    """The circuit's units alone ablated (all else kept), and the circuit with its units swapped for as
    many task-active units; pass = necessity rises UNIT_NECESSITY_SHARE of the way to chance and the
    swapped circuit misses the target. A circuit with no units has nothing to check (units_checked False)."""
    groups = mask.groups
    if counts_by_kind(groups, keep)["units"] == 0:
        return {"units_checked": False, "passes": True, "unit_necessity_loss": None, "unit_control_loss": None,
                "unit_control_drawn": 0}
    without = [torch.ones(g.size) if g.kind != "units" else 1 - k * g.live.float() for g, k in zip(groups, keep)]
    swapped = swap_units(groups, keep, active, generator)
    drawn = sum(int(k.sum()) for g, k in zip(groups, swapped) if g.kind == "units")
    necessity = loss_with(model, mask, without, batch)
    control = loss_with(model, mask, swapped, batch)
    need = full_loss + UNIT_NECESSITY_SHARE * (CHANCE - full_loss)
    return {"units_checked": True, "unit_necessity_loss": necessity, "unit_necessity_threshold": need,
            "unit_control_loss": control, "unit_control_drawn": drawn,
            "passes_unit_necessity": necessity >= need, "passes_unit_control": control > target,
            "passes": necessity >= need and control > target}


def find_circuit(model, groups: list[NodeGroup], learn: TaskBatch, choose: TaskBatch, report: TaskBatch,
                 opts: SearchOptions, active: list[Tensor] | None = None, full_loss: float | None = None) -> dict:
    """One search seed's circuit for one task: masks learned on `learn`, K chosen on `choose`, every
    loss reported on `report` (those named _choose excepted). `active`: task-active units per group
    (task_activity) for the unit control; by default every live unit. `full_loss`: the model's loss on
    `report`, when the caller has it (one search per seed shares it)."""
    t0 = time.perf_counter()
    grads = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():  # only the masks learn; the caller's model is left as it was
        p.requires_grad_(False)
    try:
        mask, trace = learn_masks(model, groups, learn, opts)
    finally:
        for p, g in zip(model.parameters(), grads):
            p.requires_grad_(g)
    keep, loss_choose, evals, reached = bisect_circuit(model, mask, choose, opts.target_loss)
    ones = [torch.ones(g.size) for g in groups]
    complement = [1 - k for k in keep]
    gen = torch.Generator().manual_seed(opts.seed)
    control = random_like(groups, keep, gen)
    learned = [(t.detach() > 0).float() for t in mask.tau]
    if full_loss is None:
        with torch.no_grad():
            full_loss = task_loss(model, report).item()
    active = active if active is not None else [g.live.clone() for g in groups]
    return {
        "seed": opts.seed,
        "reached": reached,
        "nodes": counts_by_kind(groups, keep),
        "live": counts_by_kind(groups, ones),
        "learned_mask_nodes": counts_by_kind(groups, learned)["total"],
        "circuit_loss": loss_with(model, mask, keep, report),
        "circuit_loss_choose": loss_choose,
        "circuit_loss_learn": loss_with(model, mask, keep, learn),
        "necessity_loss": loss_with(model, mask, complement, report),
        "control_keep_loss": loss_with(model, mask, control, report),
        "control_ablate_loss": loss_with(model, mask, [1 - c for c in control], report),
        "all_ablated_loss": loss_with(model, mask, [torch.zeros(g.size) for g in groups], report),
        **unit_checks(model, mask, keep, active, report, full_loss, opts.target_loss, gen),
        "bisection_evals": evals,
        "trace": trace,
        "circuit": circuit_nodes(groups, keep),
        "seconds": round(time.perf_counter() - t0, 1),
    }


def geomean(values: list[float]) -> float | None:
    """Geometric mean with each value floored at 1 (a circuit with no units counts as one)."""
    if not values:
        return None
    return math.exp(sum(math.log(max(v, 1)) for v in values) / len(values))
