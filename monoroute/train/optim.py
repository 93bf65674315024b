"""Optimizers for routed models: AdamW, plus a lazy row-wise AdamW for the RoutedFFN unit tables.

Why a row-wise AdamW: a RoutedFFN touches at most T·k of its N rows per step, but torch AdamW
reads and writes every row of the (N, d) table, its gradient and both moments each step, so the
optimizer alone costs O(N·d) per step and dominates once N ≫ T·k. `RowSparseAdamW` updates only the
touched rows, so its cost is O(rows touched · d).

Semantics of `RowSparseAdamW`, for a touched row r (untouched rows are left bit-identical: value
and both moments):

    step    += 1                                        # the parameter's step: steps with a gradient
    p[r]    *= 1 - lr * weight_decay                    # decoupled decay, on touched rows only
    m[r]     = lerp(m[r], g[r], 1 - beta1)
    v[r]     = beta2 * v[r] + (1 - beta2) * g[r]^2
    p[r]    -= lr / (1 - beta1^step) * m[r] / (sqrt(v[r]) / sqrt(1 - beta2^step) + eps)

This is "lazy Adam" as torch's SparseAdam and TensorFlow's LazyAdam define it: a row's moments do
not decay on the steps it is not touched, weight decay is applied only when the row is updated (so
a rarely used unit is shrunk by its own use count rather than by wall-clock steps), and the bias
correction uses the parameter's step count. A row first touched late therefore starts with a
smaller step (its moments still hold few gradients): 0.45 lr on its first touch at betas (0.9,
0.95), near lr after ~20 touches. The update of the gathered rows is torch's fused AdamW kernel
(one pass), so the optimizer costs three row gathers, one fused pass and three row scatters; an
earlier version counted steps per row, which no fused kernel does, and was 4-20x slower (`bench
layer`). When every row is touched on every step it is exactly torch AdamW(fused=True) (tested in
float64).

Which rows are touched: a sparse COO gradient (what `RoutedFFN(sparse_grad=True)` produces)
names them itself, at no extra cost. For a dense gradient the touched rows are its nonzero rows,
found by one O(N·d) read of the gradient; that scan is still much cheaper than dense AdamW (which
reads and writes ~7 N·d tensors), but a touched row whose gradient is exactly zero is then treated
as untouched.

Weight decay groups (`build_optimizer`): matrices of Linear layers and the unit tables w_in/w_out
decay; biases, norm weights (every tensor with fewer than 2 dims), embeddings (nn.Embedding, so a
tied output head too) and product-key sub-keys do not, since shrinking a lookup table or a gain
only rescales what it looks up.
"""
from __future__ import annotations

from typing import Iterable

import torch
from torch import Tensor, nn
from torch.distributed.tensor import DTensor
from torch.optim.adamw import adamw

from monoroute.errors import MonorouteError
from monoroute.layers import ProductKeyRouter, RoutedFFN

UNIT_TABLES = ("w_in", "w_out", "b_in", "w_gate")
# RowSparseAdamW updates the whole table in place (saving and restoring the untouched rows) from this
# touched fraction up: the crossover measured at (16,384, 128) on the 2-core CPU was ~0.6.
SNAPSHOT_FROM = 0.6


def evaluate_closure(closure):
    """The loss from an optimizer's optional closure (re-evaluated with gradients on), or None."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()


class RowSparseAdamW(torch.optim.Optimizer):
    """AdamW that updates only the rows (first-dim slices) present in each parameter's gradient.

    Parameters are (N, ...) tables; gradients may be dense or sparse COO. State per parameter:
    exp_avg and exp_avg_sq (like the parameter) and step, a float32 scalar tensor as torch AdamW's.
    """

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
    ) -> None:
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        loss = evaluate_closure(closure)
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    # Under FSDP2 a parameter is a DTensor: update this rank's shard, whose rows
                    # are whole rows of the table when it is column-sharded.
                    rows, grad_rows = touched_rows(local(p.grad))
                    if rows.numel():
                        self._update_rows(self.state[p], local(p), rows, grad_rows, group)
        return loss

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        for state in self.state.values():  # a checkpoint of the per-row-step version holds (N,) counts
            if "step" in state and state["step"].dim():
                state["step"] = state["step"].max().to(torch.float32)

    def _update_rows(self, state: dict, p: Tensor, rows: Tensor, g: Tensor, group: dict) -> None:
        """rows (R,) unique int64, g (R, ...) their gradient: the AdamW update of those rows."""
        if not state:
            state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        beta1, beta2 = group["betas"]
        n_rows = p.shape[0]
        every_row = rows.numel() == n_rows  # rows are unique: then they are all of them, in order
        g = g.to(p.dtype).contiguous()
        # Three ways to the same update (AdamW is elementwise, so a row's result does not depend on
        # which other rows run beside it):
        # - every row touched: the tensors in place;
        # - most rows touched (>= SNAPSHOT_FROM, as at cpu-small where 76-89 % are): the whole table in
        #   place with a zero gradient on the untouched rows, whose value and moments are saved before
        #   and put back after (one (16,384, 128) table, 89 % touched: 2.5 vs 6.6 ms; a cpu-small
        #   step's optimizer 23 -> 21 ms);
        # - few touched: the touched rows gathered into (R, ...) copies (advanced indexing: faster than
        #   index_select here), updated and copied back.
        snapshot = not every_row and rows.numel() >= SNAPSHOT_FROM * n_rows
        if every_row or snapshot:
            param, exp_avg, exp_avg_sq = p, state["exp_avg"], state["exp_avg_sq"]
            if snapshot:
                untouched = torch.ones(n_rows, dtype=torch.bool, device=p.device)
                untouched[rows] = False
                untouched = untouched.nonzero().squeeze(1)
                saved = [t[untouched] for t in (param, exp_avg, exp_avg_sq)]
                g = torch.zeros_like(p).index_copy_(0, rows, g)
        else:
            param, exp_avg, exp_avg_sq = p[rows], state["exp_avg"][rows], state["exp_avg_sq"][rows]
        adamw([param], [g], [exp_avg], [exp_avg_sq], [], [state["step"]], fused=True,
              amsgrad=False, beta1=beta1, beta2=beta2, lr=group["lr"], weight_decay=group["weight_decay"],
              eps=group["eps"], maximize=False)  # increments step
        if snapshot:
            for t, rows_before in zip((p, state["exp_avg"], state["exp_avg_sq"]), saved):
                t.index_copy_(0, untouched, rows_before)
        elif not every_row:
            p.index_copy_(0, rows, param)
            state["exp_avg"].index_copy_(0, rows, exp_avg)
            state["exp_avg_sq"].index_copy_(0, rows, exp_avg_sq)


def local(t: Tensor) -> Tensor:
    """This rank's shard of a DTensor (an alias, under no_grad); a plain tensor as it is."""
    return t.to_local() if isinstance(t, DTensor) else t


def touched_rows(grad: Tensor) -> tuple[Tensor, Tensor]:
    """The rows a gradient touches and their values: (R,) unique int64 ids, (R, ...) rows.

    Sparse COO: the rows of its (coalesced) indices, O(nnz). Dense: the rows with any nonzero
    entry, one O(N·d) scan.
    """
    if grad.is_sparse:
        grad = coalesced(grad)
        indices, values = grad.indices(), grad.values()  # (sparse_dim, nnz), (nnz, *dense_dims)
        if grad.sparse_dim() == 1:
            return indices[0], values
        # Element-sparse: regroup entries by row into dense rows.
        rows, row_of_entry = indices[0].unique(return_inverse=True)
        dense_rows = values.new_zeros(rows.numel(), *grad.shape[1:])
        dense_rows[(row_of_entry, *indices[1:])] = values
        return rows, dense_rows
    nonzero = grad.reshape(grad.shape[0], -1).ne(0).any(1) if grad.dim() > 1 else grad.ne(0)
    rows = nonzero.nonzero().squeeze(1)
    return rows, grad[rows]


def coalesced(grad: Tensor) -> Tensor:
    """A sparse COO gradient, coalesced. Autograd drops the coalesced flag when it stores a
    gradient, even one built coalesced (RoutedFFN's segment sums are one row per unit, sorted), and
    coalescing again sorts and copies every row: so row-sparse indices already strictly increasing
    are only re-marked, an O(nnz) check on the indices."""
    if grad.is_coalesced():
        return grad
    rows = grad._indices()
    if grad.sparse_dim() == 1 and bool((rows[0, 1:] > rows[0, :-1]).all()):
        return torch.sparse_coo_tensor(rows, grad._values(), grad.shape, is_coalesced=True, check_invariants=False)
    return grad.coalesce()


class CombinedOptimizer(torch.optim.Optimizer):
    """Several optimizers over disjoint parameters, driven as one.

    `param_groups` is the concatenation of the parts' groups (the same dict objects), so setting a
    group's lr (by hand or by an lr_scheduler) reaches the part that owns it.
    """

    def __init__(self, optimizers: list[torch.optim.Optimizer]) -> None:
        self.optimizers = optimizers
        super().__init__([g for opt in optimizers for g in opt.param_groups], defaults={})

    @torch.no_grad()
    def step(self, closure=None):
        loss = evaluate_closure(closure)
        for opt in self.optimizers:
            opt.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return {"optimizers": [opt.state_dict() for opt in self.optimizers]}

    def load_state_dict(self, state_dict: dict) -> None:
        parts = state_dict.get("optimizers")
        if parts is None or len(parts) != len(self.optimizers):
            raise MonorouteError(
                "optimizer state does not match this optimizer (sparse_rows differs from the saved run?); "
                "resume with the same sparse_rows setting"
            )
        for opt, part in zip(self.optimizers, parts):
            opt.load_state_dict(part)
        # Optimizer.load_state_dict builds new group dicts: share them again.
        self.param_groups = [g for opt in self.optimizers for g in opt.param_groups]


def build_optimizer(
    model: nn.Module,
    lr: float,
    weight_decay: float,
    betas: tuple[float, float] = (0.9, 0.95),
    sparse_rows: bool = False,
    table_lr_mult: float = 1.0,
    router_lr_mult: float = 1.0,
    router_warmup: int = 0,
) -> torch.optim.Optimizer:
    """AdamW over `model` with no-decay groups; with sparse_rows, RowSparseAdamW for unit tables.

    Returns one optimizer: torch AdamW, or (sparse_rows=True) a CombinedOptimizer of torch AdamW
    and RowSparseAdamW. Every group has an "lr" the trainer may set and an "lr_mult" it multiplies
    that lr by (`table_lr_mult` for the routed unit tables, `router_lr_mult` for the product-key
    routers' query, sub-keys and scale, else 1), and a "warmup" (steps of an extra linear warmup:
    `router_warmup` for the router groups, else 0); group names are in "name".
    The tables and routers get groups of their own only when they need them (sparse rows, a
    multiplier or a warmup), so the optimizer state of a plain run keeps the two-group layout older
    checkpoints have.
    """
    decay, no_decay, tables_decay, tables_no_decay, router_decay, router_no_decay = [], [], [], [], [], []
    table_ids = {id(p) for p in table_parameters(model)}
    router_ids = {id(p) for p in router_parameters(model)} if router_lr_mult != 1.0 or router_warmup else set()
    no_decay_ids = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    no_decay_ids |= {id(m.keys) for m in model.modules() if isinstance(m, ProductKeyRouter)}
    for m in model.modules():
        if isinstance(m, RoutedFFN) and getattr(m, "sparse_grad", False) and not sparse_rows:
            raise MonorouteError("RoutedFFN(sparse_grad=True) needs build_optimizer(..., sparse_rows=True)")
    for _, p in model.named_parameters():  # deduplicated, so tied weights appear once
        if not p.requires_grad:
            continue
        decays = p.dim() >= 2 and id(p) not in no_decay_ids
        if (sparse_rows or table_lr_mult != 1.0) and id(p) in table_ids:
            (tables_decay if decays else tables_no_decay).append(p)
        elif id(p) in router_ids:
            (router_decay if decays else router_no_decay).append(p)
        else:
            (decay if decays else no_decay).append(p)
    table_groups = groups(("tables_decay", tables_decay, weight_decay, table_lr_mult),
                          ("tables_no_decay", tables_no_decay, 0.0, table_lr_mult))
    dense_groups = groups(("decay", decay, weight_decay), ("no_decay", no_decay, 0.0))
    if router_decay or router_no_decay:
        dense_groups += groups(("router_decay", router_decay, weight_decay, router_lr_mult, router_warmup),
                               ("router_no_decay", router_no_decay, 0.0, router_lr_mult, router_warmup))
    if not sparse_rows and (tables_decay or tables_no_decay):
        dense_groups += table_groups
    for g in dense_groups + table_groups:
        g["lr"] = lr * g["lr_mult"]
    dense = torch.optim.AdamW(
        dense_groups, lr=lr, betas=betas, weight_decay=0.0,
        fused=True,  # one pass over each tensor instead of ~7 foreach passes: the unit tables are large
    )
    if not sparse_rows:
        return dense
    rows = RowSparseAdamW(table_groups, lr=lr, betas=betas, weight_decay=0.0)
    return CombinedOptimizer([dense, rows])


def groups(*specs: tuple) -> list[dict]:
    """Param groups from (name, params, weight_decay[, lr_mult[, warmup]]), dropping empty ones (an
    empty optimizer is an error in torch, so at least one group is always kept)."""
    out = [{"name": s[0], "params": s[1], "weight_decay": s[2], "lr_mult": s[3] if len(s) > 3 else 1.0,
            "warmup": s[4] if len(s) > 4 else 0}
           for s in specs if s[1]]
    return out or [{"name": specs[0][0], "params": [], "weight_decay": specs[0][2], "lr_mult": 1.0, "warmup": 0}]


def group_lr(lr: float, group: dict, step: int) -> float:
    """A group's learning rate at `step` (0-based) given the schedule's `lr`: times its lr_mult, and
    ramped linearly over its own warmup steps (a group without one keeps lr · lr_mult)."""
    warmup = group.get("warmup", 0)
    ramp = min(1.0, (step + 1) / warmup) if warmup else 1.0
    return lr * group.get("lr_mult", 1.0) * ramp


def table_parameters(model: nn.Module) -> list[Tensor]:
    """The routed layers' unit tables (w_in, b_in, w_out), each once."""
    return [p for m in model.modules() if isinstance(m, RoutedFFN) for n in UNIT_TABLES
            if (p := getattr(m, n)) is not None]


def router_parameters(model: nn.Module) -> list[Tensor]:
    """The product-key routers' own parameters (query, sub-keys, scale), each once."""
    return [p for m in model.modules() if isinstance(m, ProductKeyRouter) for p in m.parameters()]


def build_optimizer_for(model: nn.Module, tc) -> torch.optim.Optimizer:
    """`build_optimizer` with a TrainConfig's settings (what the trainer and upcycle stage 2 use)."""
    return build_optimizer(model, lr=tc.lr, weight_decay=tc.weight_decay, betas=(tc.beta1, tc.beta2),
                           sparse_rows=tc.sparse_rows, table_lr_mult=tc.table_lr_mult,
                           router_lr_mult=tc.router_lr_mult, router_warmup=tc.router_warmup)


@torch.no_grad()
def clip_grads(model: nn.Module, grad_clip: float, table_grad_clip: float = 0.0) -> tuple[float, float | None]:
    """Clip gradients before the step: all together by grad_clip (0: no clipping), or, with
    table_grad_clip > 0, the unit tables by their own joint norm and the rest by grad_clip.
    Returns the norm before clipping of what grad_clip clips (NaN when it is 0) and of the tables
    (None unless they are clipped apart)."""
    if table_grad_clip <= 0:
        return (clip_grad_norm_(model.parameters(), grad_clip).item() if grad_clip > 0 else float("nan")), None
    tables = table_parameters(model)
    ids = {id(p) for p in tables}
    rest = [p for p in model.parameters() if id(p) not in ids]
    table_norm = clip_grad_norm_(tables, table_grad_clip).item()
    norm = clip_grad_norm_(rest, grad_clip).item() if grad_clip > 0 else float("nan")
    return norm, table_norm


@torch.no_grad()
def clip_grad_norm_(params: Iterable[Tensor], max_norm: float) -> Tensor:
    """Scale all gradients so their joint L2 norm is at most max_norm; return the norm before.

    Works for any mix of dense and sparse COO gradients. A sparse gradient is coalesced first
    (and stored back coalesced), since duplicate entries add up before they are squared.
    """
    params = [p for p in params if p.grad is not None]
    if not params:
        return torch.zeros(())
    squares = []
    for p in params:
        if p.grad.is_sparse:
            p.grad = coalesced(p.grad)
        values = p.grad.values() if p.grad.is_sparse else p.grad
        # Per-tensor norms accumulate in at least fp32; their squares are summed in fp64.
        norm = torch.linalg.vector_norm(values, dtype=torch.promote_types(values.dtype, torch.float32))
        if isinstance(norm, DTensor):  # FSDP2 shard: the norm over all ranks
            norm = norm.full_tensor()
        squares.append(norm.double().square().to(params[0].grad.device))
    total = torch.stack(squares).sum().sqrt()
    coef = min(1.0, max_norm / (total.item() + 1e-6))
    if coef < 1.0:  # x * 1.0 == x: an unclipped step skips a read and write of every gradient (17M at cpu-small)
        for p in params:
            p.grad.mul_(coef)
    return total
