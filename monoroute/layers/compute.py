"""The unit compute of a routed layer, behind two primitives that kernels can replace.

Dimensions: T tokens, d = d_model, N units, k units per token, U distinct units among the T·k.

A routed layer touches only k rows of its (N, d) unit tables per token. Everything it does
with those rows is one of two operations, each the other's adjoint:

    sampled_dot(x, W, idx)[t, j]       = x[t] · W[idx[t, j]]                   # (T, k)
    weighted_gather_sum(h, idx, W)[t]  = sum_j h[t, j] * W[idx[t, j]]          # (T, d)

Forward of the FFN is `pre = sampled_dot(x, w_in, idx)`, `y = weighted_gather_sum(h, idx, w_out)`;
backward of each is the other one plus a row scatter into the weight gradient. No primitive ever
builds a (T, N) tensor. Implementations register under a name; `impl="auto"` picks the fastest
one available for the tensors' device, and `impl="reference"` is the plain-PyTorch definition
every fast path is tested against.

Fast implementations supply `UnitKernels` (forward-only kernels) and get their autograd from the
Functions below, so CPU and GPU share one backward algorithm:

- weight gradients are unit-major: the T·k slots are sorted by unit once (`UnitOrder`) and each
  unit's row is a segment sum over its slots, dW[u] = sum_{(t,j): idx[t,j]=u} c[t,j] src[t].
  That is deterministic, needs no atomics and no (T, N) or (T, k, d) tensor. A dense gradient
  gives every unit a segment (empty ones sum to 0), so it is written once with no separate zero
  fill; with `sparse_grad=True` only the U touched units have one, and the gradient is a
  row-sparse `torch.sparse_coo_tensor` (as `nn.Embedding(sparse=True)` gives): no (N, d) tensor.
- `unit_ffn` runs the whole unit compute of RoutedFFN (pre-activation, activation × gate, output
  sum) as one op, so the backward sorts once for both tables and a kernel may fuse the forward.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from monoroute.errors import MonorouteError

ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu, "identity": lambda t: t}


def unit_activation(pre: Tensor, gate_logits: Tensor | None, activation: str) -> Tensor:
    """h = act(pre) * sigmoid(gate_logits), elementwise on (T, k); no gate when gate_logits is None."""
    h = ACTIVATIONS[activation](pre)
    return h if gate_logits is None else h * torch.sigmoid(gate_logits)


class UnitOrder(NamedTuple):
    """The T·k slots of idx (flattened, slot = t*k + j) grouped by unit."""

    perm: Tensor  # (T·k,) slots sorted by unit
    units: Tensor  # (U,) the units with a segment, ascending
    offsets: Tensor  # (U + 1,) slots of units[u] are perm[offsets[u]:offsets[u + 1]]
    k: int


def unit_order(idx: Tensor, n_units: int | None = None) -> UnitOrder:
    """Sort the slots by unit. Segments for the distinct units only, or, given n_units, for every
    unit 0..N-1 (empty ones included) so that segment sums fill a dense (N, d) gradient directly."""
    flat = idx.flatten()
    sorted_units, perm = flat.sort()
    if n_units is None:
        units, counts = torch.unique_consecutive(sorted_units, return_counts=True)
    else:
        units, counts = torch.arange(n_units, device=idx.device), torch.bincount(flat, minlength=n_units)
    offsets = torch.zeros(units.numel() + 1, dtype=torch.int64, device=idx.device)
    torch.cumsum(counts, 0, out=offsets[1:])
    return UnitOrder(perm, units, offsets, idx.shape[1])


def grad_order(idx: Tensor, n_units: int, sparse: bool) -> UnitOrder:
    """The order a weight gradient needs: distinct units for row-sparse, all units for dense."""
    return unit_order(idx, None if sparse else n_units)


@dataclass(frozen=True)
class UnitKernels:
    """Forward-only kernels of one implementation; inputs are contiguous, idx is int64.

    dot(x (T, d), w (N, d), idx (T, k)) -> (T, k); gather_sum(h (T, k), idx (T, k), w (N, d)) -> (T, d);
    segment_rows(coef (T, k), src (T, d), order) -> (U, d) with row u = sum over the slots s of
    unit u of coef[s] * src[s // k]. Optional ffn_forward(x, w_in, b_in, idx, gate_logits, w_out,
    activation) -> (y (T, d), pre (T, k)) fuses the layer's forward; without it the forward composes
    dot, unit_activation and gather_sum.
    """

    dot: Callable[[Tensor, Tensor, Tensor], Tensor]
    gather_sum: Callable[[Tensor, Tensor, Tensor], Tensor]
    segment_rows: Callable[[Tensor, Tensor, UnitOrder], Tensor]
    ffn_forward: Callable[..., tuple[Tensor, Tensor]] | None = None


def weight_grad(kernels: UnitKernels, coef: Tensor, src: Tensor, order: UnitOrder, w: Tensor, sparse: bool) -> Tensor:
    """dW (N, d) with dW[u] = sum over the slots of u of coef * src[token], given grad_order(idx, N, sparse):
    row-sparse COO over the touched units if `sparse`, else dense (untouched rows: empty segments, 0)."""
    rows = kernels.segment_rows(coef, src, order).to(w.dtype)  # (U, d), or (N, d) for a dense order
    if not sparse:
        return rows
    return torch.sparse_coo_tensor(order.units.unsqueeze(0), rows, w.shape, is_coalesced=True, check_invariants=False)


class _SampledDot(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, w: Tensor, idx: Tensor, kernels: UnitKernels, sparse_grad: bool) -> Tensor:
        x, w, idx = x.contiguous(), w.contiguous(), idx.contiguous()
        ctx.save_for_backward(x, w, idx)
        ctx.kernels, ctx.sparse_grad = kernels, sparse_grad
        return kernels.dot(x, w, idx)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):
        x, w, idx = ctx.saved_tensors
        grad = grad.contiguous()
        gx = ctx.kernels.gather_sum(grad, idx, w) if ctx.needs_input_grad[0] else None
        gw = None
        if ctx.needs_input_grad[1]:
            order = grad_order(idx, w.shape[0], ctx.sparse_grad)
            gw = weight_grad(ctx.kernels, grad, x, order, w, ctx.sparse_grad)
        return gx, gw, None, None, None


class _WeightedGatherSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h: Tensor, idx: Tensor, w: Tensor, kernels: UnitKernels, sparse_grad: bool) -> Tensor:
        h, idx, w = h.contiguous(), idx.contiguous(), w.contiguous()
        ctx.save_for_backward(h, idx, w)
        ctx.kernels, ctx.sparse_grad = kernels, sparse_grad
        return kernels.gather_sum(h, idx, w)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):
        h, idx, w = ctx.saved_tensors
        grad = grad.contiguous()
        gh = ctx.kernels.dot(grad, w, idx) if ctx.needs_input_grad[0] else None
        gw = None
        if ctx.needs_input_grad[2]:
            order = grad_order(idx, w.shape[0], ctx.sparse_grad)
            gw = weight_grad(ctx.kernels, h, grad, order, w, ctx.sparse_grad)
        return gh, None, gw, None, None


def compose_unit_ffn(dot, gather_sum, x, w_in, b_in, idx, gate_logits, w_out, activation,
                     pre_hook=None, post_hook=None):
    """The unit compute, written once for every caller that does not use a fused kernel:

        pre = dot(x, w_in, idx) + b_in[idx]        (T, k)   -> pre_hook(pre) may replace it
        h   = act(pre) * sigmoid(gate_logits)      (T, k)   -> post_hook(idx, h) may replace both
        y   = gather_sum(h', idx', w_out)          (T, d)

    `dot(x, w, idx)` and `gather_sum(h, idx, w)` are one implementation's primitives. `post_hook`
    returns an object with `.indices` / `.values` of (T, k') (a hook may add units, as steering
    does). Returns (y, pre, h, post): h is the layer's own activation, before `post_hook`, and post
    is what `post_hook` returned (None without one)."""
    pre = dot(x, w_in, idx)  # (T, k)
    if b_in is not None:
        pre = pre + b_in[idx]
    if pre_hook is not None:
        pre = pre_hook(pre)
    h = unit_activation(pre, gate_logits, activation)
    post = None
    out_idx, out_h = idx, h
    if post_hook is not None:
        post = post_hook(idx, h)
        out_idx, out_h = post.indices.reshape(x.shape[0], -1), post.values.reshape(x.shape[0], -1)
    return gather_sum(out_h, out_idx, w_out), pre, h, post


class _UnitFFN(torch.autograd.Function):
    """(y, h) of RoutedFFN's unit compute; saves only (T, k) tensors besides the inputs."""

    @staticmethod
    def forward(ctx, x, w_in, b_in, idx, gate_logits, w_out, activation, kernels, sparse_grad):
        x, w_in, idx, w_out = x.contiguous(), w_in.contiguous(), idx.contiguous(), w_out.contiguous()
        if kernels.ffn_forward is None:
            y, pre, h, _ = compose_unit_ffn(kernels.dot, kernels.gather_sum, x, w_in, b_in, idx, gate_logits, w_out,
                                            activation)
        else:
            y, pre = kernels.ffn_forward(x, w_in, b_in, idx, gate_logits, w_out, activation)
            h = unit_activation(pre, gate_logits, activation)  # (T, k), as the kernel computed it
        ctx.save_for_backward(x, w_in, b_in, idx, gate_logits, w_out, pre, h)
        ctx.activation, ctx.kernels, ctx.sparse_grad = activation, kernels, sparse_grad
        return y, h

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y: Tensor, grad_h: Tensor):
        x, w_in, b_in, idx, gate_logits, w_out, pre, h = ctx.saved_tensors
        kernels, need = ctx.kernels, ctx.needs_input_grad
        grad_y = grad_y.contiguous()
        order = grad_order(idx, w_in.shape[0], ctx.sparse_grad)  # sorted once, for both tables
        dh = kernels.dot(grad_y, w_out, idx) + grad_h  # (T, k)
        d_pre, d_gate = _activation_grads(pre, gate_logits, ctx.activation, dh)
        dx = kernels.gather_sum(d_pre, idx, w_in) if need[0] else None
        dw_in = weight_grad(kernels, d_pre, x, order, w_in, ctx.sparse_grad) if need[1] else None
        db = None
        if need[2]:  # the bias is (N,): a dense gradient costs no more than the optimizer's pass over it
            db = torch.zeros_like(b_in).index_add_(0, idx.flatten(), d_pre.flatten().to(b_in.dtype))
        dw_out = weight_grad(kernels, h, grad_y, order, w_out, ctx.sparse_grad) if need[5] else None
        return dx, dw_in, db, None, d_gate, dw_out, None, None, None


def _activation_grads(pre: Tensor, gate_logits: Tensor | None, activation: str, dh: Tensor):
    """Gradients of h = act(pre) * sigmoid(gate) w.r.t. pre and gate: (T, k) elementwise, by autograd."""
    with torch.enable_grad():
        leaves = [pre.detach().requires_grad_()]
        if gate_logits is not None:
            leaves.append(gate_logits.detach().requires_grad_())
        h = unit_activation(leaves[0], leaves[1] if gate_logits is not None else None, activation)
        grads = torch.autograd.grad(h, leaves, dh)
    return grads[0], (grads[1] if gate_logits is not None else None)


@dataclass(frozen=True)
class UnitComputeImpl:
    """One implementation of the two primitives, and the devices it runs on.

    sampled_dot(x, w, idx, sparse_grad) and weighted_gather_sum(h, idx, w, sparse_grad) as in the
    module docstring; unit_ffn(x, w_in, b_in, idx, gate_logits, w_out, activation, sparse_grad)
    -> (y, h), when present, is RoutedFFN's whole unit compute in one op (used when no hook needs
    to see pre or h).
    """

    sampled_dot: Callable[[Tensor, Tensor, Tensor, bool], Tensor]
    weighted_gather_sum: Callable[[Tensor, Tensor, Tensor, bool], Tensor]
    supports: Callable[[torch.device], bool]
    priority: int  # higher wins under impl="auto"
    unit_ffn: Callable[..., tuple[Tensor, Tensor]] | None = None


def kernel_impl(kernels: UnitKernels, supports: Callable[[torch.device], bool], priority: int) -> UnitComputeImpl:
    """An implementation whose forward runs `kernels` and whose backward is the shared one above."""
    return UnitComputeImpl(
        sampled_dot=lambda x, w, idx, sparse_grad=False: _SampledDot.apply(x, w, idx, kernels, sparse_grad),
        weighted_gather_sum=lambda h, idx, w, sparse_grad=False: _WeightedGatherSum.apply(
            h, idx, w, kernels, sparse_grad
        ),
        supports=supports,
        priority=priority,
        unit_ffn=lambda x, w_in, b_in, idx, gate_logits, w_out, activation, sparse_grad=False: _UnitFFN.apply(
            x, w_in, b_in, idx, gate_logits, w_out, activation, kernels, sparse_grad
        ),
    )


def _rows_reference(w: Tensor, idx: Tensor, sparse_grad: bool) -> Tensor:
    # (T, k, d) copies of the selected rows; autograd scatters back into w, into a dense (N, d)
    # gradient whose unselected rows are exactly zero, or a row-sparse one with sparse_grad.
    return F.embedding(idx, w, sparse=sparse_grad)


def _sampled_dot_reference(x: Tensor, w: Tensor, idx: Tensor, sparse_grad: bool = False) -> Tensor:
    # (T, k, d) @ (T, d, 1) -> (T, k)
    return torch.bmm(_rows_reference(w, idx, sparse_grad), x.unsqueeze(-1)).squeeze(-1)


def _weighted_gather_sum_reference(h: Tensor, idx: Tensor, w: Tensor, sparse_grad: bool = False) -> Tensor:
    # (T, 1, k) @ (T, k, d) -> (T, d)
    return torch.bmm(h.unsqueeze(1), _rows_reference(w, idx, sparse_grad)).squeeze(1)


_IMPLS: dict[str, UnitComputeImpl] = {
    "reference": UnitComputeImpl(
        _sampled_dot_reference, _weighted_gather_sum_reference, supports=lambda device: True, priority=0
    )
}


def register_impl(name: str, impl: UnitComputeImpl) -> None:
    """Make an implementation selectable by name (and by "auto" where it is supported)."""
    _IMPLS[name] = impl


def available_impls() -> list[str]:
    return ["auto", *sorted(_IMPLS)]


def resolve_impl(name: str, device: torch.device) -> UnitComputeImpl:
    """The implementation `name` stands for on `device`; "auto" takes the highest priority."""
    if name == "auto":
        usable = [impl for impl in _IMPLS.values() if impl.supports(device)]
        return max(usable, key=lambda impl: impl.priority)
    if name not in _IMPLS:
        raise MonorouteError(f"unknown impl {name!r}; choose one of {', '.join(available_impls())}")
    impl = _IMPLS[name]
    if not impl.supports(device):
        raise MonorouteError(f"impl {name!r} does not run on device {device}; use impl='auto' or 'reference'")
    return impl


def unit_ffn(
    x: Tensor, w_in: Tensor, b_in: Tensor | None, idx: Tensor, gate_logits: Tensor | None, w_out: Tensor,
    activation: str, impl: str = "auto", sparse_grad: bool = False,
) -> tuple[Tensor, Tensor]:
    """RoutedFFN's unit compute without hooks: (y (T, d), h (T, k)) with
        pre = sampled_dot(x, w_in, idx) + b_in[idx]
        h   = act(pre) * sigmoid(gate_logits)
        y   = weighted_gather_sum(h, idx, w_out)
    Uses the implementation's fused op where it has one, else the two primitives."""
    chosen = resolve_impl(impl, x.device)
    if chosen.unit_ffn is not None:
        return chosen.unit_ffn(x, w_in, b_in, idx, gate_logits, w_out, activation, sparse_grad)
    y, _, h, _ = compose_unit_ffn(*impl_primitives(chosen, sparse_grad), x, w_in, b_in, idx, gate_logits, w_out,
                                  activation)
    return y, h


def impl_primitives(chosen: UnitComputeImpl, sparse_grad: bool):
    """(dot(x, w, idx), gather_sum(h, idx, w)) of an implementation, for `compose_unit_ffn`."""
    return (lambda x, w, idx: chosen.sampled_dot(x, w, idx, sparse_grad),
            lambda h, idx, w: chosen.weighted_gather_sum(h, idx, w, sparse_grad))


def benchmark_unit_compute(
    impl: str, n_tokens: int, n_units: int, d: int, k: int, device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32, sparse_grad: bool = False, repeats: int = 5, seed: int = 0,
) -> dict[str, float]:
    """Median seconds of `unit_ffn` forward and forward+backward on random routing (relu, gated, bias):
    the unit compute alone, to compare implementations (e.g. "reference" vs "cpu") in one run."""
    device = torch.device(device)
    g = torch.Generator().manual_seed(seed)
    x, gate = torch.randn(n_tokens, d, generator=g), torch.randn(n_tokens, k, generator=g)
    w_in, w_out = torch.randn(n_units, d, generator=g) / d**0.5, torch.randn(n_units, d, generator=g) / d**0.5
    b_in, grad_y = torch.randn(n_units, generator=g), torch.randn(n_tokens, d, generator=g)
    idx = torch.randint(0, n_units, (n_tokens, k), generator=g).to(device)
    leaves = [t.to(device, dtype).requires_grad_() for t in (x, w_in, b_in, gate, w_out)]
    grad_y = grad_y.to(device, dtype)

    def step(backward: bool) -> None:
        x, w_in, b_in, gate, w_out = leaves
        y, _ = unit_ffn(x, w_in, b_in, idx, gate, w_out, "relu", impl, sparse_grad)
        if backward:
            torch.autograd.grad(y, leaves, grad_y)

    def median_seconds(backward: bool) -> float:
        times = []
        for _ in range(repeats + 1):  # the first run warms up (allocator, kernel compilation)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            step(backward)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - start)
        return statistics.median(times[1:])

    return {"forward_s": median_seconds(False), "forward_backward_s": median_seconds(True)}


def sampled_dot(x: Tensor, w: Tensor, idx: Tensor, impl: str = "auto", sparse_grad: bool = False) -> Tensor:
    """x (T, d), w (N, d), idx (T, k) int64 -> (T, k) with out[t, j] = x[t] · w[idx[t, j]].

    sparse_grad=True makes w's gradient a row-sparse COO tensor holding only the touched rows.
    """
    return resolve_impl(impl, x.device).sampled_dot(x, w, idx, sparse_grad)


def weighted_gather_sum(h: Tensor, idx: Tensor, w: Tensor, impl: str = "auto", sparse_grad: bool = False) -> Tensor:
    """h (T, k), idx (T, k) int64, w (N, d) -> (T, d) with out[t] = sum_j h[t, j] * w[idx[t, j]].

    sparse_grad=True makes w's gradient a row-sparse COO tensor holding only the touched rows.
    """
    return resolve_impl(impl, h.device).weighted_gather_sum(h, idx, w, sparse_grad)
