"""Fast unit-compute implementations against the plain-PyTorch reference.

Run normally, every test checks impl "cpu". `test_triton_interpreted` re-runs this file in a
subprocess with TRITON_INTERPRET=1 (which must be set before triton is imported), where the same
tests check impl "triton" on CPU tensors; that keeps the interpreter out of this process.
"""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest
import torch

from monoroute.layers import ProductKeyRouter, RoutedFFN
from monoroute.layers import compute
from monoroute.layers.compute import resolve_impl, sampled_dot, weighted_gather_sum

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
HAS_TRITON = importlib.util.find_spec("triton") is not None
IMPL = "triton" if INTERPRETED else "cpu"
# The CPU kernels are exact in float64; the Triton kernels accumulate in fp32 by design.
DTYPE = torch.float32 if INTERPRETED else torch.float64
TOL = dict(rtol=1e-5, atol=1e-5) if INTERPRETED else dict(rtol=1e-10, atol=1e-10)

# (T, N, d, k): duplicate units within and across tokens (k <= N, and k > N), k = 1, k = N,
# d not a power of two, d over one 128-wide tile, no tokens.
SHAPES = [(8, 4, 6, 4), (6, 3, 8, 5), (5, 9, 48, 1), (4, 7, 100, 7), (3, 20, 160, 4), (0, 5, 8, 2)]


def make_inputs(T, N, d, k, dtype=DTYPE, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, d, generator=g, dtype=dtype)
    w = torch.randn(N, d, generator=g, dtype=dtype)
    h = torch.randn(T, k, generator=g, dtype=dtype)
    idx = torch.randint(0, N, (T, k), generator=g)
    return x, w, h, idx


def assert_close_bf16(got, want):
    """bf16 keeps 8 significant bits: allow 2% of the largest reference value, in any element."""
    assert got.dtype == torch.bfloat16
    assert (got.float() - want).abs().max() <= 2e-2 * want.abs().max()


def primitive_outputs_and_grads(impl, x, w, h, idx, sparse_grad=False):
    """Outputs of both primitives and the gradients of a fixed random loss w.r.t. x, h and w."""
    x, w, h = (t.detach().clone().requires_grad_() for t in (x, w, h))
    dot = sampled_dot(x, w, idx, impl, sparse_grad)  # (T, k)
    gsum = weighted_gather_sum(h, idx, w, impl, sparse_grad)  # (T, d)
    g = torch.Generator().manual_seed(1)
    # Drawn in float64 then cast, so every dtype sees the same upstream gradient (up to rounding).
    loss = (dot * torch.randn(dot.shape, generator=g, dtype=torch.float64).to(dot.dtype)).sum() + (
        gsum * torch.randn(gsum.shape, generator=g, dtype=torch.float64).to(gsum.dtype)
    ).sum()
    loss.backward()
    return dot, gsum, x.grad, h.grad, w.grad


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "T{}-N{}-d{}-k{}".format(*s))
def test_primitives_match_reference(shape):
    inputs = make_inputs(*shape)
    for got, want in zip(primitive_outputs_and_grads(IMPL, *inputs), primitive_outputs_and_grads("reference", *inputs)):
        torch.testing.assert_close(got, want, **TOL)


def test_non_contiguous_inputs():
    T, N, d, k = 5, 8, 12, 3
    x, w, h, idx = make_inputs(T, N, d, k)
    # Same values, strided storage: transposed copies and every-other-column views.
    x_nc = x.t().contiguous().t()
    w_nc = w.t().contiguous().t()
    h_nc = torch.stack([h, h], -1)[..., 0]
    idx_nc = torch.stack([idx, idx], -1)[..., 1]
    assert not any(t.is_contiguous() for t in (x_nc, w_nc, h_nc, idx_nc))
    got = primitive_outputs_and_grads(IMPL, x_nc, w_nc, h_nc, idx_nc)
    want = primitive_outputs_and_grads("reference", x, w, h, idx)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, **TOL)


@pytest.mark.parametrize("impl", [IMPL, "reference"])
def test_sparse_grad_equals_dense_and_holds_only_touched_rows(impl):
    T, N, d, k = 6, 40, 10, 3
    inputs = make_inputs(T, N, d, k)
    idx = inputs[3]
    *_, dense_w_grad = primitive_outputs_and_grads(impl, *inputs, sparse_grad=False)
    *_, sparse_w_grad = primitive_outputs_and_grads(impl, *inputs, sparse_grad=True)
    assert dense_w_grad.layout == torch.strided and sparse_w_grad.layout == torch.sparse_coo
    torch.testing.assert_close(sparse_w_grad.to_dense(), dense_w_grad, **TOL)
    touched = idx.unique()
    assert torch.equal(sparse_w_grad.coalesce().indices()[0].sort().values, touched)
    untouched = torch.ones(N, dtype=torch.bool)
    untouched[touched] = False
    assert untouched.any() and torch.count_nonzero(dense_w_grad[untouched]) == 0  # exactly zero


def test_bf16_weights_match_fp32_reference():
    T, N, d, k = 4, 9, 100, 5
    x, w, h, idx = make_inputs(T, N, d, k, dtype=torch.float32)
    bf = [t.to(torch.bfloat16) for t in (x, w, h)]
    got = primitive_outputs_and_grads(IMPL, *bf, idx)
    want = primitive_outputs_and_grads("reference", *(t.float() for t in bf), idx)
    for a, b in zip(got, want):
        assert_close_bf16(a, b)


def unit_ffn_outputs_and_grads(impl, x, w_in, b_in, idx, gate, w_out, activation):
    """(y, h) of RoutedFFN's unit compute and the gradients of a fixed random loss w.r.t. all inputs."""
    leaves = [t.detach().clone().requires_grad_() for t in (x, w_in, b_in, gate, w_out)]
    x, w_in, b_in, gate, w_out = leaves
    y, h = compute.unit_ffn(x, w_in, b_in, idx, gate, w_out, activation, impl)
    g = torch.Generator().manual_seed(2)
    loss = (y * torch.randn(y.shape, generator=g, dtype=torch.float64).to(y.dtype)).sum() + (
        h * torch.randn(h.shape, generator=g, dtype=torch.float64).to(h.dtype)
    ).sum()
    loss.backward()
    return [y, h] + [t.grad for t in leaves]


@pytest.mark.parametrize("activation", ["relu", "gelu"])
def test_unit_ffn_bf16_matches_fp32_reference(activation):
    T, N, d, k = 5, 11, 48, 4
    x, w_in, gate, idx = make_inputs(T, N, d, k, dtype=torch.float32)
    g = torch.Generator().manual_seed(3)
    w_out, b_in = torch.randn(N, d, generator=g) / d**0.5, torch.randn(N, generator=g)
    bf = [t.to(torch.bfloat16) for t in (x, w_in, b_in, gate, w_out)]
    got = unit_ffn_outputs_and_grads(IMPL, bf[0], bf[1], bf[2], idx, bf[3], bf[4], activation)
    x32, w_in32, b_in32, gate32, w_out32 = (t.float() for t in bf)
    want = unit_ffn_outputs_and_grads("reference", x32, w_in32, b_in32, idx, gate32, w_out32, activation)
    for a, b in zip(got, want):
        assert_close_bf16(a, b)


@pytest.mark.skipif(not INTERPRETED, reason="Triton only")
def test_triton_composes_unfused_kernels_for_wide_rows(monkeypatch):
    from monoroute.layers import triton_kernels

    monkeypatch.setattr(triton_kernels, "MAX_FUSED_D", 16)  # d = 48 now counts as too wide to fuse
    calls = []
    monkeypatch.setattr(triton_kernels, "_ffn_forward_kernel", calls.append)  # must not be launched
    T, N, d, k = 4, 6, 48, 3
    x, w_in, gate, idx = make_inputs(T, N, d, k)
    w_out, b_in = torch.randn(N, d, dtype=DTYPE), torch.randn(N, dtype=DTYPE)
    got = unit_ffn_outputs_and_grads(IMPL, x, w_in, b_in, idx, gate, w_out, "silu")
    want = unit_ffn_outputs_and_grads("reference", x, w_in, b_in, idx, gate, w_out, "silu")
    assert not calls
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, **TOL)


@pytest.mark.skipif(INTERPRETED, reason="gradcheck needs float64 kernels; Triton accumulates in fp32")
def test_cpu_functions_pass_gradcheck():
    x, w, h, idx = make_inputs(3, 5, 4, 4)  # k = 4 of N = 5 units: duplicates likely
    x, w, h = (t.requires_grad_() for t in (x, w, h))
    cpu = resolve_impl("cpu", torch.device("cpu"))
    assert torch.autograd.gradcheck(lambda x, w: cpu.sampled_dot(x, w, idx), (x, w))
    assert torch.autograd.gradcheck(lambda h, w: cpu.weighted_gather_sum(h, idx, w), (h, w))
    b = torch.randn(5, dtype=torch.float64, requires_grad=True)
    gate = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    w_out = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    for activation in ("gelu", "silu"):  # smooth: finite differences are valid everywhere
        fn = lambda *a: cpu.unit_ffn(a[0], a[1], a[2], idx, a[3], a[4], activation)  # noqa: E731
        assert torch.autograd.gradcheck(fn, (x, w, b, gate, w_out))


def test_benchmark_unit_compute_reports_the_median_after_warmup(monkeypatch):
    """On a fake clock where the warm-up call takes 100 s and the timed ones 3, 1, 2 s (forward) and
    6, 4, 5 s (forward + backward), the benchmark reports the medians 2 and 5: the warm-up is dropped
    and every impl runs the real unit_ffn (the calls are counted)."""
    real = compute.unit_ffn
    for impl in (IMPL, "reference"):
        calls = []
        durations = iter([100.0, 3.0, 1.0, 2.0, 100.0, 6.0, 4.0, 5.0])
        clock = {"t": 0.0, "start": True}

        def fake_clock():
            if not clock["start"]:
                clock["t"] += next(durations)
            clock["start"] = not clock["start"]
            return clock["t"]

        def counted(*args, **kwargs):
            calls.append(args[7])  # the impl it was asked for
            return real(*args, **kwargs)

        monkeypatch.setattr(compute.time, "perf_counter", fake_clock)
        monkeypatch.setattr(compute, "unit_ffn", counted)
        result = compute.benchmark_unit_compute(impl, n_tokens=8, n_units=16, d=8, k=2, repeats=3, sparse_grad=True)
        monkeypatch.undo()
        assert result == {"forward_s": 2.0, "forward_backward_s": 5.0}
        assert calls == [impl] * 8  # (3 + 1 warm-up) forward, (3 + 1) forward + backward


def test_auto_picks_cpu_on_cpu_and_reference_stays_available():
    assert resolve_impl("auto", torch.device("cpu")) is compute._IMPLS["cpu"]
    assert compute._IMPLS["reference"].unit_ffn is None  # the reference is the two primitives, unfused


def routed_layer_grads(impl, router, activation, bias, sparse_grad, dtype=DTYPE, hook=None):
    torch.manual_seed(0)
    n_units = 16
    layer = RoutedFFN(
        12, n_units, 4, router=router, activation=activation, bias=bias, l1_coef=0.1, impl=impl, sparse_grad=sparse_grad
    ).to(dtype)
    if layer.b_in is not None:
        torch.nn.init.normal_(layer.b_in)  # nonzero, so the bias path is exercised
    if hook is not None:
        layer.hook_post.fns.append(hook)
    x = torch.randn(2, 5, 12, dtype=dtype, requires_grad=True)
    torch.manual_seed(1)  # the revival loss samples dead units
    y = layer(x)
    (y.square().sum() + layer.aux_loss).backward()
    grads = {name: p.grad.to_dense() for name, p in layer.named_parameters() if p.grad is not None}
    return y, x.grad, grads, layer


@pytest.mark.parametrize(
    "router,activation,bias",
    [
        ("product_key", "relu", True),
        ("product_key", "gelu", False),
        ("dense", "silu", True),
        ("dense", "identity", False),
    ],
)
@pytest.mark.parametrize("sparse_grad", [False, True])
def test_routed_ffn_matches_reference(router, activation, bias, sparse_grad):
    y, gx, grads, layer = routed_layer_grads(IMPL, router, activation, bias, sparse_grad)
    y_ref, gx_ref, grads_ref, _ = routed_layer_grads("reference", router, activation, bias, sparse_grad)
    torch.testing.assert_close(y, y_ref, **TOL)
    torch.testing.assert_close(gx, gx_ref, **TOL)
    assert grads.keys() == grads_ref.keys() and {"w_in", "w_out"} <= grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], grads_ref[name], **TOL, msg=name)
    if sparse_grad:
        assert layer.w_out.grad.layout == torch.sparse_coo


def test_routed_ffn_uses_fused_op_only_without_hooks(monkeypatch):
    calls = []
    fused = compute._UnitFFN.apply
    monkeypatch.setattr(compute._UnitFFN, "apply", lambda *a: calls.append(1) or fused(*a))
    routed_layer_grads(IMPL, "product_key", "relu", True, False)
    assert calls == [1]
    seen = []
    ablate_first = lambda acts, hook: seen.append(acts) or acts.ablate([0])  # noqa: E731
    y, gx, grads, _ = routed_layer_grads(IMPL, "product_key", "relu", True, False, hook=ablate_first)
    assert calls == [1] and len(seen) == 1  # the hook ran, so the primitives did the work
    y_ref, gx_ref, grads_ref, _ = routed_layer_grads("reference", "product_key", "relu", True, False, hook=ablate_first)
    torch.testing.assert_close(y, y_ref, **TOL)
    torch.testing.assert_close(gx, gx_ref, **TOL)
    for name in grads:
        torch.testing.assert_close(grads[name], grads_ref[name], **TOL, msg=name)


@pytest.mark.parametrize("n_units,k", [(64, 1), (64, 5), (64, 8), (16, 16), (256, 32)])
def test_product_key_candidates_are_the_exact_top_k(n_units, k):
    torch.manual_seed(0)
    router = ProductKeyRouter(8, n_units, k).double()
    x = torch.randn(50, 8, dtype=torch.float64, requires_grad=True)
    routing = router(x)
    all_scores = router.all_scores(x)  # (T, N) dense reference
    top = all_scores.topk(k, dim=-1)
    assert torch.equal(routing.indices.sort(-1).values, top.indices.sort(-1).values)
    torch.testing.assert_close(routing.scores, all_scores.gather(-1, routing.indices), rtol=0, atol=1e-12)
    # The selected scores carry the same gradient as the dense reference's.
    g = torch.randn(routing.scores.shape, dtype=torch.float64)
    got = torch.autograd.grad((routing.scores * g).sum(), [x, router.keys])
    want = torch.autograd.grad((all_scores.gather(-1, routing.indices) * g).sum(), [x, router.keys])
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.skipif(INTERPRETED or not HAS_TRITON, reason="runs only from the uninterpreted suite, with triton")
def test_triton_interpreted():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", __file__, "-q", "-p", "no:cacheprovider"],
        env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
