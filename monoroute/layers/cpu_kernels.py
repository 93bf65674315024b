"""CPU unit-compute kernels (impl "cpu", chosen by impl="auto" on CPU).

Dimensions: T tokens, d = d_model, N units, k units per token, U distinct units among the T·k.
None of the kernels materialises the (T, k, d) copies of the selected rows that the reference
builds; each is a single sparse-times-dense library call:

- dot (T, k): `torch.sparse.sampled_addmm` with the CSR pattern "row t holds columns idx[t]"
  evaluates only the T·k needed entries of x @ W^T (float32/float64 with k <= N; otherwise a
  gather and a batched matmul).
- gather_sum (T, d): `F.embedding_bag(idx, W, mode="sum", per_sample_weights=h)`, one bag of k
  rows per token.
- segment_rows (U, d) for weight gradients: the slots sorted by unit (`UnitOrder`, computed once
  per backward by compute.py) are bags over the token rows of src:
  `F.embedding_bag(token_of_slot, src, offsets, per_sample_weights=coef_of_slot)`.

The autograd Functions that use these kernels live in compute.py and are shared with Triton.
"""
from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import Tensor

from monoroute.layers.compute import UnitKernels, UnitOrder, kernel_impl, register_impl

_SAMPLED_ADDMM_DTYPES = (torch.float32, torch.float64)


def dot(x: Tensor, w: Tensor, idx: Tensor) -> Tensor:
    t, k = idx.shape
    n = w.shape[0]
    # sampled_addmm takes repeated columns in a row, but rejects more stored entries than the
    # (T, N) matrix has (k > N, e.g. steering hooks on a tiny layer); those and other dtypes gather.
    if x.dtype not in _SAMPLED_ADDMM_DTYPES or w.dtype != x.dtype or k > n:
        return torch.bmm(w[idx], x.unsqueeze(-1)).squeeze(-1)
    crow = torch.arange(0, t * k + 1, k, device=idx.device)  # row t holds slots t*k .. t*k+k-1
    with warnings.catch_warnings():  # PyTorch's one-off "CSR is in beta" notice
        warnings.simplefilter("ignore", UserWarning)
        pattern = torch.sparse_csr_tensor(crow, idx.flatten(), x.new_zeros(t * k), (t, n), check_invariants=False)
    # beta=0 still multiplies the pattern's values (0 * NaN = NaN), hence zeros, not empty.
    return torch.sparse.sampled_addmm(pattern, x, w.t(), beta=0.0).values().view(t, k)


def gather_sum(h: Tensor, idx: Tensor, w: Tensor) -> Tensor:
    return F.embedding_bag(idx, w, mode="sum", per_sample_weights=h.to(w.dtype))


def segment_rows(coef: Tensor, src: Tensor, order: UnitOrder) -> Tensor:
    tokens = order.perm // order.k  # (T·k,) token of each sorted slot
    weights = coef.flatten()[order.perm].to(src.dtype)
    return F.embedding_bag(tokens, src, order.offsets[:-1], mode="sum", per_sample_weights=weights)


register_impl(
    "cpu",
    kernel_impl(UnitKernels(dot, gather_sum, segment_rows), supports=lambda device: device.type == "cpu", priority=10),
)
