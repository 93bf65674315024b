"""The compiled CPU search kernel (layers/compiled.py, csrc/product_topk.cpp) against the torch form
and a float64 brute force, ties included, and its fallback where it cannot build."""
import warnings

import pytest
import torch

from monoroute.errors import MonorouteError
from monoroute.layers import compiled
from monoroute.layers.routing.product_key import pair_pattern, product_topk, rerank_topk

needs_kernel = pytest.mark.skipif(compiled.cpu_kernels() is None, reason="no C++ compiler / ninja here")


def brute_top(s1, s2, k):
    """Brute force over all n^2 sums, in the scores' own dtype (each sum the same rounded add the search
    does; float64 for the float64 cases): (..., k) values, sorted decreasing."""
    every = (s1.unsqueeze(-1) + s2.unsqueeze(-2)).flatten(-2)
    return every.topk(k, dim=-1).values


def check_exact(units, values, s1, s2, k):
    n = s1.shape[-1]
    assert units.shape == values.shape == (*s1.shape[:-1], k) and units.dtype == torch.int64
    # each unit id is a pair (a, b) whose sum is the value returned, computed as the torch form does
    a, b = units // n, units % n
    assert torch.equal(values, s1.gather(-1, a) + s2.gather(-1, b))
    # no unit twice in a row, and the k values are the k largest of all n^2 sums
    assert torch.equal(units.sort(-1).values.diff(dim=-1).gt(0), torch.ones_like(units[..., 1:], dtype=torch.bool))
    assert torch.equal(values.sort(-1, descending=True).values, brute_top(s1, s2, k))


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("k, n", [(256, 128), (32, 128), (1, 4), (5, 4), (16, 4), (300, 20), (9, 3)])
def test_compiled_search_is_the_exact_top_k_and_matches_the_torch_form(dtype, k, n):
    torch.manual_seed(k * 7 + n)
    s1, s2 = torch.randn(70, 2, n, dtype=dtype), torch.randn(70, 2, n, dtype=dtype)  # (T, heads, n)
    cand_i, cand_j = pair_pattern(k, n)
    units, values = product_topk(s1, s2, k, cand_i, cand_j, impl="compiled")
    check_exact(units, values, s1, s2, k)
    ref_units, ref_values = product_topk(s1, s2, k, cand_i, cand_j, impl="torch")
    assert torch.equal(units.sort(-1).values, ref_units.sort(-1).values)
    assert torch.equal(values.sort(-1).values, ref_values.sort(-1).values)
    # one token at a time (decoding) gives the same set as the batch
    one_units, _ = product_topk(s1[:1], s2[:1], k, cand_i, cand_j, impl="compiled")
    assert torch.equal(one_units.sort(-1).values, units[:1].sort(-1).values)


@needs_kernel
def test_compiled_search_with_ties_returns_k_distinct_units_at_the_exact_top_values():
    # scores in {0, 1, 2}: many sums tie at the k-th value, so which tied units are taken is free,
    # but the k values (as a multiset) and the distinctness are not
    torch.manual_seed(0)
    s1, s2 = torch.randint(0, 3, (64, 16)).float(), torch.randint(0, 3, (64, 16)).float()
    cand_i, cand_j = pair_pattern(40, 16)
    units, values = product_topk(s1, s2, 40, cand_i, cand_j, impl="compiled")
    check_exact(units, values, s1, s2, 40)
    # negative control: a wrong answer (the k-th unit swapped for a unit outside the top) fails the check
    bad = units.clone()
    worst = (s1.unsqueeze(-1) + s2.unsqueeze(-2)).flatten(-2).argmin(-1)
    bad[:, -1] = worst
    with pytest.raises(AssertionError):
        check_exact(bad, s1.gather(-1, bad // 16) + s2.gather(-1, bad % 16), s1, s2, 40)


@needs_kernel
def test_a_router_selects_the_same_units_with_the_kernel_and_the_torch_search(monkeypatch):
    from monoroute.layers.routed_ffn import RoutedFFN

    torch.manual_seed(0)
    lay = RoutedFFN(16, 256, 4, coupling="rerank", d_key=8, router_candidates=32, query_norm="batch").double()
    x = torch.randn(50, 16, dtype=torch.double)
    with torch.no_grad():
        chosen = lay.router(x, lay.w_in, lay.b_in)
        monkeypatch.setenv(compiled.ENV, "0")  # the torch form
        again = lay.router(x, lay.w_in, lay.b_in)
    assert torch.equal(chosen.candidates.sort(-1).values, again.candidates.sort(-1).values)
    assert torch.equal(chosen.indices.sort(-1).values, again.indices.sort(-1).values)


def test_search_falls_back_to_torch_with_one_warning_when_the_kernel_cannot_build(monkeypatch, tmp_path):
    from torch.utils import cpp_extension

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))  # the failed build leaves nothing in the user's cache

    monkeypatch.setattr(compiled, "_module", None)
    monkeypatch.setattr(compiled, "_tried", False)
    monkeypatch.setattr(compiled, "extension_name", lambda: "monoroute_cpu_kernels_never_built")

    def no_compiler(*args, **kwargs):
        raise RuntimeError("Ninja is required to load C++ extensions\nmore detail")

    monkeypatch.setattr(cpp_extension, "load", no_compiler)
    s1, s2 = torch.randn(5, 16), torch.randn(5, 16)
    cand_i, cand_j = pair_pattern(20, 16)
    with pytest.warns(RuntimeWarning, match="could not be built \\(Ninja is required"):
        units, values = product_topk(s1, s2, 20, cand_i, cand_j)
    check_exact(units, values, s1, s2, 20)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once: the second search neither retries the build nor warns
        product_topk(s1, s2, 20, cand_i, cand_j)
    with pytest.raises(MonorouteError, match="compiled CPU routing kernels are unavailable"):
        product_topk(s1, s2, 20, cand_i, cand_j, impl="compiled")


def test_the_kernel_can_be_switched_off_and_a_bad_impl_is_named(monkeypatch):
    monkeypatch.setenv(compiled.ENV, "0")
    assert compiled.cpu_kernels() is None
    s1, s2 = torch.randn(3, 8), torch.randn(3, 8)
    cand_i, cand_j = pair_pattern(6, 8)
    check_exact(*product_topk(s1, s2, 6, cand_i, cand_j), s1, s2, 6)  # the torch form
    with pytest.raises(MonorouteError, match="unknown search impl 'fast'"):
        product_topk(s1, s2, 6, cand_i, cand_j, impl="fast")


@needs_kernel
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("d", [24, 300])  # short rows one at a time, long rows (>= 256) four at a time
def test_compiled_rerank_gives_the_candidates_pre_activations_and_their_top_k(dtype, bias, d):
    torch.manual_seed(1)
    t, c, n, k = 60, 47, 500, 7  # C not a multiple of four: the four-row path's remainder runs too
    x, w = torch.randn(t, d, dtype=dtype), torch.randn(n, d, dtype=dtype) / 5
    b = torch.randn(n, dtype=dtype) if bias else None
    cand = torch.rand(t, n).argsort(-1)[:, :c]  # distinct ids per row (a repeated id would tie with itself)
    pre, pick = rerank_topk(x, w, b, cand, k, impl="compiled")
    ref = (x.double().unsqueeze(1) * w.double()[cand]).sum(-1) + (b.double()[cand] if bias else 0)  # float64
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(pre.double(), ref, rtol=0, atol=tol)
    assert pick.shape == (t, k) and (pick.sort(-1).values.diff(dim=-1) > 0).all()  # k distinct positions
    chosen = ref.gather(-1, pick)
    others = ref.masked_fill(torch.zeros_like(ref, dtype=torch.bool).scatter(-1, pick, True), float("-inf"))
    assert (chosen.min(-1).values >= others.max(-1).values - 2 * tol).all()  # the k largest (to rounding)
    torch_pre, torch_pick = rerank_topk(x, w, b, cand, k, impl="torch")
    torch.testing.assert_close(pre, torch_pre, rtol=0, atol=tol)
    if dtype == torch.float64:
        assert torch.equal(pick.sort(-1).values, torch_pick.sort(-1).values)
    # negative control: the k smallest are not the k largest
    low = ref.topk(k, dim=-1, largest=False).values
    assert not (low.min(-1).values >= others.max(-1).values - 2 * tol).all()


def crafted_values(case: str, c: int) -> torch.Tensor:
    """float32 values that stress the radix select: shared leading bytes, ties, signs, one value."""
    g = torch.Generator().manual_seed(5)
    if case == "all_equal":
        return torch.full((c,), 0.375)
    if case == "last_byte_only":  # 1.0 plus 0..c-1 ulps: every key shares its top three bytes
        return torch.nextafter(torch.ones(1), torch.full((1,), 2.0)).sub(1).mul(torch.randperm(c, generator=g)).add(1)
    if case == "signs_and_zeros":  # negatives, +0 and -0, and a wide spread of exponents
        v = torch.randn(c, generator=g) * torch.logspace(-20, 20, c)[torch.randperm(c, generator=g)]
        v[:8] = torch.tensor([0.0, -0.0, 0.0, -0.0, -1e-30, 1e-30, -3.0, 3.0])
        return v
    if case == "ties_at_the_kth":  # a few distinct values, many copies of each
        return torch.randint(0, 4, (c,), generator=g).float() - 1.5
    raise ValueError(case)


@needs_kernel
@pytest.mark.parametrize("case", ["all_equal", "last_byte_only", "signs_and_zeros", "ties_at_the_kth"])
@pytest.mark.parametrize("c, k", [(256, 32), (300, 1), (40, 40), (1000, 257)])
def test_compiled_selection_takes_the_k_largest_of_crafted_float32_values(case, c, k):
    # d 1, x = 1, no bias: each candidate's pre-activation is its value exactly, so the pick must hold
    # the k largest values (as a multiset; which of tied values is free) at k distinct positions
    v = crafted_values(case, c)
    w = v.unsqueeze(1)
    cand = torch.arange(c).unsqueeze(0)
    pre, pick = rerank_topk(torch.ones(1, 1), w, None, cand, k, impl="compiled")
    assert torch.equal(pre[0], v)
    assert pick.shape == (1, k) and pick[0].unique().numel() == k
    assert torch.equal(v[pick[0]].sort().values, v.topk(k).values.sort().values)
    if case != "all_equal" and k < c:  # negative control: the k smallest are a different multiset
        assert not torch.equal(v.topk(k, largest=False).values.sort().values, v.topk(k).values.sort().values)


@needs_kernel
@pytest.mark.parametrize("case", ["all_equal", "last_byte_only", "signs_and_zeros", "ties_at_the_kth"])
@pytest.mark.parametrize("k, n", [(256, 128), (40, 16)])
def test_compiled_search_on_crafted_float32_scores(case, k, n):
    # The search keeps only pair sums above a bound it raises by bisection, then selects among them: with
    # sums that share their leading bytes, tie in blocks, span 40 decades or are all one value, the k it
    # returns must still be k distinct units holding the k largest of all n^2 sums.
    g = torch.Generator().manual_seed(n)
    base = crafted_values(case, n)
    s1 = torch.stack([base[torch.randperm(n, generator=g)] for _ in range(6)])
    s2 = torch.stack([base[torch.randperm(n, generator=g)] * 0.5 for _ in range(6)])
    cand_i, cand_j = pair_pattern(k, n)
    check_exact(*product_topk(s1, s2, k, cand_i, cand_j, impl="compiled"), s1, s2, k)


@needs_kernel
def test_compiled_rerank_refuses_a_candidate_outside_the_table():
    x, w = torch.randn(3, 4), torch.randn(10, 4)
    cand = torch.tensor([[0, 1, 2], [3, 4, 10], [5, 6, 7]])
    with pytest.raises(RuntimeError, match="outside the table"):
        rerank_topk(x, w, None, cand, 2, impl="compiled")


def trained_eval_layer(dtype, **kw):
    """A small re-ranking layer in eval mode whose query BatchNorm holds non-trivial running statistics."""
    from monoroute.layers.routed_ffn import RoutedFFN

    torch.manual_seed(3)
    lay = RoutedFFN(16, 256, 4, coupling="rerank", d_key=8, router_candidates=24, **kw).to(dtype)
    lay.train()
    for _ in range(3):
        lay(torch.randn(64, 16, dtype=dtype) * 2 + 1)
    return lay.eval()


@needs_kernel
@pytest.mark.parametrize("kw", [dict(query_norm="batch"), dict(query_norm="none", bias=False, out_bias=True)])
def test_fused_inference_layer_matches_the_op_by_op_layer(kw):
    lay = trained_eval_layer(torch.float64, **kw)
    x = torch.randn(2, 30, 16, dtype=torch.float64)
    with torch.no_grad():
        assert lay.fused_inference(x.reshape(-1, 16)) is not None  # the fused path applies here
        y = lay(x)
        fused = lay.last_activations
        lay.hook_post.fns.append(lambda acts, hook: None)  # an (inert) hook: the op-by-op path
        assert lay.fused_inference(x.reshape(-1, 16)) is None
        y_ref = lay(x)
        ref = lay.last_activations
        lay.hook_post.fns.clear()
    torch.testing.assert_close(y, y_ref, rtol=0, atol=1e-12)
    order, order_ref = fused.indices.argsort(-1), ref.indices.argsort(-1)
    assert torch.equal(fused.indices.gather(-1, order), ref.indices.gather(-1, order_ref))
    torch.testing.assert_close(fused.values.gather(-1, order), ref.values.gather(-1, order_ref), rtol=0, atol=1e-12)
    assert (fused.values >= 0).all() and (fused.values > 0).any()
    if lay.b_in is not None:  # every candidate silenced: k is a cap, the selected units stay at 0, as op by op
        with torch.no_grad():
            lay.b_in -= 100.0
            silent = lay(x)
            assert (lay.last_activations.values == 0).all()
            lay.hook_post.fns.append(lambda acts, hook: None)
            torch.testing.assert_close(silent, lay(x), rtol=0, atol=1e-12)


@needs_kernel
def test_fused_inference_in_float32_agrees_to_rounding():
    lay = trained_eval_layer(torch.float32, query_norm="batch")
    x = torch.randn(200, 16)
    with torch.no_grad():
        y = lay(x)
        units = lay.last_activations.indices.sort(-1).values
        lay.hook_post.fns.append(lambda acts, hook: None)
        y_ref = lay(x)
        units_ref = lay.last_activations.indices.sort(-1).values
    same = (units == units_ref).all(-1)
    assert same.float().mean() > 0.95  # a near-tie in float32 may swap a unit
    torch.testing.assert_close(y[same], y_ref[same], rtol=1e-4, atol=1e-5)


def test_fused_inference_applies_only_where_nothing_needs_the_op_by_op_path():
    from monoroute.layers.routed_ffn import RoutedFFN

    lay = trained_eval_layer(torch.float32, query_norm="batch")
    x = torch.randn(5, 16)
    with torch.no_grad():
        lay.train()
        assert lay.fused_inference(x) is None  # training: aux losses, firing statistics, BatchNorm's batch
        lay.eval()
        lay.hook_pre.fns.append(lambda pre, hook: None)
        assert lay.fused_inference(x) is None  # a hook reads or edits the pre-activations
        lay.hook_pre.fns.clear()
    assert lay.fused_inference(x) is None  # gradient enabled
    torch.manual_seed(0)
    two_heads = RoutedFFN(16, 256, 4, coupling="rerank", d_key=8, router_candidates=24, router_heads=2).eval()
    preact = RoutedFFN(16, 256, 4, coupling="preact").eval()
    with torch.no_grad():
        assert two_heads.fused_inference(x) is None and preact.fused_inference(x) is None


def test_the_build_name_follows_the_sources_and_the_cpu(monkeypatch, tmp_path):
    (tmp_path / "a.cpp").write_text("int a;")
    (tmp_path / "a.h").write_text("// header")
    monkeypatch.setattr(compiled, "CSRC", tmp_path)
    first = compiled.extension_name()
    assert first == compiled.extension_name() and first.startswith("monoroute_cpu_kernels_")
    (tmp_path / "a.h").write_text("// header, changed")  # a header alone changes the name: a rebuild
    assert compiled.extension_name() != first
    monkeypatch.setattr(compiled, "cpu_signature", lambda: "0000beef")  # another CPU: another build
    assert "_0000beef_" in compiled.extension_name()
    same_torch = compiled.extension_name()
    monkeypatch.setattr(torch, "__version__", "0.0.1")  # another torch: another build (its ABI)
    assert compiled.extension_name() != same_torch


def test_a_stale_lock_file_is_removed_and_a_fresh_one_kept(tmp_path):
    import os
    import time

    lock = tmp_path / "lock"
    assert not compiled.clear_stale_lock(tmp_path)  # no lock: nothing to do
    lock.touch()
    assert not compiled.clear_stale_lock(tmp_path) and lock.exists()  # a build may be running: wait for it
    old = time.time() - compiled.STALE_LOCK_S - 60
    os.utime(lock, (old, old))
    with pytest.warns(RuntimeWarning, match="stale lock"):
        assert compiled.clear_stale_lock(tmp_path)
    assert not lock.exists()


def test_a_build_waits_for_another_builds_lock_and_not_for_a_stale_one(tmp_path, capsys):
    import os
    import threading
    import time

    lock = tmp_path / "lock"
    lock.touch()  # another process is building: its lock goes when it finishes
    threading.Timer(0.3, lock.unlink).start()
    start = time.monotonic()
    compiled.wait_for_lock(tmp_path, poll_s=0.05)
    assert 0.25 < time.monotonic() - start < 10 and "waiting for another process" in capsys.readouterr().err
    lock.touch()  # a killed process's lock: old, so removed at once instead of waited on forever
    old = time.time() - compiled.STALE_LOCK_S - 1
    os.utime(lock, (old, old))
    with pytest.warns(RuntimeWarning, match="stale lock"):
        compiled.wait_for_lock(tmp_path, poll_s=0.05)
    assert not lock.exists()
    compiled.wait_for_lock(tmp_path)  # no lock: returns


@needs_kernel
def test_an_existing_build_loads_without_waiting_on_a_lock_left_behind(monkeypatch, tmp_path):
    # A process killed while torch's loader held the build directory's lock left the lock file behind;
    # torch's loader then waits for it forever. The build exists, so it is imported without the lock.
    import shutil
    import threading

    name = compiled.extension_name()
    built = compiled.cpu_kernels().__file__
    (tmp_path / name).mkdir()
    shutil.copy(built, tmp_path / name / f"{name}.so")
    (tmp_path / name / "lock").touch()  # fresh: not old enough to be removed
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.setattr(compiled, "_module", None)
    monkeypatch.setattr(compiled, "_tried", False)
    from torch.utils import cpp_extension

    def torch_loader(*args, **kwargs):  # would take the lock (and wait on it)
        raise AssertionError("torch's loader ran")

    monkeypatch.setattr(cpp_extension, "load", torch_loader)
    got = {}
    worker = threading.Thread(target=lambda: got.setdefault("module", compiled.cpu_kernels()), daemon=True)
    worker.start()
    worker.join(timeout=60)
    assert not worker.is_alive(), "cpu_kernels() waited on the lock file"
    assert got["module"] is not None and hasattr(got["module"], "rerank_infer")
    assert (tmp_path / name / "lock").exists()  # a fresh lock is not touched
    # negative control: a file that is not the extension does not import, so the loader would build
    (tmp_path / "junk.so").write_bytes(b"not a library")
    assert compiled.import_built(name, tmp_path / "junk.so") is None
