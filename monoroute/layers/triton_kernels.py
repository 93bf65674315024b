"""Triton unit-compute kernels (impl "triton", chosen by impl="auto" on CUDA when triton imports).

Dimensions: T tokens, d = D = d_model, N units, K = k units per token, U distinct units among the
T·k slots. Weights may be bf16 (or any float type); every kernel loads in the storage type and
accumulates in fp32. d need not be a power of two: d-tiles are masked at the tail.

Forward, token-major, one program per token:
- `_ffn_forward_kernel` (fused RoutedFFN forward): hold x[t] and an fp32 y accumulator of the full
  (padded) row in registers; per tile of BLOCK_K slots gather the w_in rows, dot with x, add bias,
  act × sigmoid(gate), store pre (needed by backward), gather the w_out rows and accumulate
  h · w_out into y. One pass over 2·k rows of d per token; nothing (T, k, d) touches memory.
Backward (and the unfused primitives):
- `_dot_kernel` (token-major): out[t, j] = a[t] · W[idx[t, j]]; gives dh = dy · w_out rows.
- `_gather_sum_kernel` (token-major): out[t] = sum_j c[t, j] W[idx[t, j]]; gives dx.
- `_segment_rows_kernel` (unit-major): one program per (distinct unit, d-tile) walks that unit's
  slots in the sorted order and sums coef[slot] · src[token]: dW_in and dW_out rows. Each row is
  written by exactly one program, so the result is deterministic and needs no atomics.
The autograd Functions around these kernels are compute.py's, shared with the CPU path.

Set TRITON_INTERPRET=1 before importing triton to run the kernels on CPU tensors (tests do this);
the impl then also accepts CPU tensors, at a priority below "cpu" so "auto" never picks it there.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch import Tensor

from monoroute.layers.compute import UnitKernels, UnitOrder, compose_unit_ffn, kernel_impl, register_impl

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
ACT_CODES = {"identity": 0, "relu": 1, "gelu": 2, "silu": 3}
MAX_BLOCK_D = 128  # d-tile of the unfused kernels
MAX_BLOCK_K = 16  # slot tile of the token-major kernels
BLOCK_S = 16  # slot tile of the unit-major kernel
FUSED_TILE = 8192  # BLOCK_K · BLOCK_D elements per gathered tile in the fused kernel
MAX_FUSED_D = 8192  # above this the fused kernel's register row would spill: compose instead


@triton.jit
def _activation(p, ACT: tl.constexpr):
    if ACT == 1:
        p = tl.maximum(p, 0.0)
    elif ACT == 2:
        p = 0.5 * p * (1.0 + tl.erf(p * 0.7071067811865476))  # exact (erf) GELU, as F.gelu
    elif ACT == 3:
        p = p * tl.sigmoid(p)
    return p


@triton.jit
def _ffn_forward_kernel(
    x, w_in, b_in, idx, gate, w_out, y, pre, K, D,
    HAS_BIAS: tl.constexpr, HAS_GATE: tl.constexpr, ACT: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    xv = tl.load(x + t * D + offs_d, mask=mask_d, other=0.0).to(tl.float32)  # (BLOCK_D,)
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        rows = tl.load(idx + t * K + offs_k, mask=mask_k, other=0)  # (BLOCK_K,) int64
        tile = rows[:, None] * D + offs_d[None, :]
        mask = mask_k[:, None] & mask_d[None, :]
        p = tl.sum(tl.load(w_in + tile, mask=mask, other=0.0).to(tl.float32) * xv[None, :], axis=1)
        if HAS_BIAS:
            p += tl.load(b_in + rows, mask=mask_k, other=0.0).to(tl.float32)
        tl.store(pre + t * K + offs_k, p.to(pre.dtype.element_ty), mask=mask_k)
        h = _activation(p, ACT)
        if HAS_GATE:
            h *= tl.sigmoid(tl.load(gate + t * K + offs_k, mask=mask_k, other=0.0).to(tl.float32))
        acc += tl.sum(h[:, None] * tl.load(w_out + tile, mask=mask, other=0.0).to(tl.float32), axis=0)
    tl.store(y + t * D + offs_d, acc.to(y.dtype.element_ty), mask=mask_d)


@triton.jit
def _dot_kernel(a, w, idx, out, K, D, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    mask_k = offs_k < K
    rows = tl.load(idx + t * K + offs_k, mask=mask_k, other=0)
    acc = tl.zeros([BLOCK_K], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        mask_d = offs_d < D
        av = tl.load(a + t * D + offs_d, mask=mask_d, other=0.0).to(tl.float32)
        wv = tl.load(w + rows[:, None] * D + offs_d[None, :], mask=mask_k[:, None] & mask_d[None, :], other=0.0)
        acc += tl.sum(wv.to(tl.float32) * av[None, :], axis=1)
    tl.store(out + t * K + offs_k, acc.to(out.dtype.element_ty), mask=mask_k)


@triton.jit
def _gather_sum_kernel(c, idx, w, out, K, D, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        rows = tl.load(idx + t * K + offs_k, mask=mask_k, other=0)
        cv = tl.load(c + t * K + offs_k, mask=mask_k, other=0.0).to(tl.float32)
        wv = tl.load(w + rows[:, None] * D + offs_d[None, :], mask=mask_k[:, None] & mask_d[None, :], other=0.0)
        acc += tl.sum(cv[:, None] * wv.to(tl.float32), axis=0)
    tl.store(out + t * D + offs_d, acc.to(out.dtype.element_ty), mask=mask_d)


@triton.jit
def _segment_rows_kernel(coef, src, perm, offsets, out, K, D, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
    u = tl.program_id(0).to(tl.int64)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    start = tl.load(offsets + u)
    end = tl.load(offsets + u + 1)
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for s0 in range(start, end, BLOCK_S):
        offs_s = s0 + tl.arange(0, BLOCK_S)
        mask_s = offs_s < end
        slot = tl.load(perm + offs_s, mask=mask_s, other=0)  # (BLOCK_S,) int64
        cv = tl.load(coef + slot, mask=mask_s, other=0.0).to(tl.float32)
        tokens = slot // K
        sv = tl.load(src + tokens[:, None] * D + offs_d[None, :], mask=mask_s[:, None] & mask_d[None, :], other=0.0)
        acc += tl.sum(cv[:, None] * sv.to(tl.float32), axis=0)
    tl.store(out + u * D + offs_d, acc.to(out.dtype.element_ty), mask=mask_d)


def _block(n: int, cap: int) -> int:
    return min(triton.next_power_of_2(max(n, 1)), cap)


def dot(a: Tensor, w: Tensor, idx: Tensor) -> Tensor:
    t, k = idx.shape
    d = w.shape[1]
    out = a.new_empty(t, k)
    if out.numel():
        block_k = _block(k, MAX_BLOCK_K)
        grid = (t, triton.cdiv(k, block_k))
        _dot_kernel[grid](a, w, idx, out, k, d, BLOCK_K=block_k, BLOCK_D=_block(d, MAX_BLOCK_D))
    return out


def gather_sum(c: Tensor, idx: Tensor, w: Tensor) -> Tensor:
    t, k = idx.shape
    d = w.shape[1]
    out = c.new_empty(t, d)
    if out.numel():
        block_d = _block(d, MAX_BLOCK_D)
        grid = (t, triton.cdiv(d, block_d))
        _gather_sum_kernel[grid](c, idx, w, out, k, d, BLOCK_K=_block(k, MAX_BLOCK_K), BLOCK_D=block_d)
    return out


def segment_rows(coef: Tensor, src: Tensor, order: UnitOrder) -> Tensor:
    n_rows, d = order.units.numel(), src.shape[1]
    out = src.new_empty(n_rows, d)  # fp32 sums, stored in the gradient's dtype
    if out.numel():
        block_d = _block(d, MAX_BLOCK_D)
        grid = (n_rows, triton.cdiv(d, block_d))
        _segment_rows_kernel[grid](
            coef, src, order.perm, order.offsets, out, order.k, d, BLOCK_S=BLOCK_S, BLOCK_D=block_d
        )
    return out


def ffn_forward(x, w_in, b_in, idx, gate_logits, w_out, activation):
    t, k = idx.shape
    d = x.shape[1]
    block_d = triton.next_power_of_2(d)
    if block_d > MAX_FUSED_D:
        return compose_unit_ffn(dot, gather_sum, x, w_in, b_in, idx, gate_logits, w_out, activation)[:2]
    y, pre = x.new_empty(t, d), x.new_empty(t, k)
    if t:
        # Null pointers are not allowed: pass `pre` where an absent input is never read (constexpr off).
        _ffn_forward_kernel[(t,)](
            x, w_in, pre if b_in is None else b_in, idx, pre if gate_logits is None else gate_logits.contiguous(),
            w_out, y, pre, k, d,
            HAS_BIAS=b_in is not None, HAS_GATE=gate_logits is not None, ACT=ACT_CODES[activation],
            BLOCK_K=_block(k, max(1, FUSED_TILE // block_d)), BLOCK_D=block_d,
        )
    return y, pre


UNIT_KERNELS = UnitKernels(dot, gather_sum, segment_rows, ffn_forward)


def _supports(device: torch.device) -> bool:
    return device.type == "cuda" or (INTERPRET and device.type == "cpu")


register_impl("triton", kernel_impl(UNIT_KERNELS, supports=_supports, priority=-1 if INTERPRET else 20))
