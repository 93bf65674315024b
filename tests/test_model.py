"""GPT: analytic FLOPs vs FlopCounterMode, hook points, caching and patching, sizes."""
import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from monoroute import GPT, GPTConfig, MonorouteError, SparseActivations

SMALL = dict(vocab_size=64, block_size=32, n_layer=2, n_head=2, d_model=32, n_units=256, k=4, impl="reference")


def model_for(**kw):
    return GPT(GPTConfig(**{**SMALL, **kw})).eval()


@pytest.mark.parametrize(
    "kw",
    [dict(ffn="dense"), dict(ffn="routed"), dict(ffn="routed", router="dense"), dict(ffn="dense,routed", d_key=16),
     dict(ffn="routed", router_heads=4), dict(ffn="routed", coupling="preact"),
     dict(ffn="routed", router="cluster", router_probes=3), dict(ffn="routed", coupling="rerank", router_candidates=40),
     dict(ffn="routed", router="factored", router_candidates=24),
     dict(ffn="routed", router="multi_pool", router_pools=4, coupling="preact", k=8),
     dict(ffn="routed", dense_beside=24), dict(ffn="dense,routed", dense_beside=8),
     dict(ffn="routed", coupling="rerank", router_candidates=40, router_heads=2, query_norm="batch", d_key=16)],
)
def test_analytic_flops_match_flop_counter(kw):
    model = model_for(**kw)
    tokens = torch.randint(0, 64, (2, 32))
    # The math backend lowers attention to matmuls the counter sees (the fused CPU kernel is not counted).
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        model(tokens)
    counted = counter.get_total_flops() / tokens.numel()
    analytic = model.flops_per_token()
    assert analytic["total"] == pytest.approx(counted, rel=0.10)
    assert analytic["total"] == sum(v for key, v in analytic.items() if key != "total")


def test_routed_flops_scale_with_k_and_sqrt_n_not_n():
    small, wide = (model_for(ffn="routed", n_units=n).flops_per_token() for n in (256, 65536))
    assert wide["active_units"] == small["active_units"]
    assert wide["router"] - small["router"] == 2 * 2 * (256 - 16) * 16  # 2 layers, d_key d/2: only sqrt(N) sub-key scoring grows


def test_hook_point_names():
    names = set(model_for(ffn="dense,routed").hook_points)
    for i in range(2):
        for hook in ("hook_resid_pre", "hook_attn_out", "hook_resid_mid", "mlp.hook_pre", "mlp.hook_post",
                     "hook_mlp_out", "hook_resid_post", "ln_1.hook_normalized", "ln_2.hook_normalized",
                     "attn.hook_q", "attn.hook_k", "attn.hook_v"):
            assert f"blocks.{i}.{hook}" in names
    assert {"hook_embed", "hook_pos_embed", "ln_f.hook_normalized"} <= names


def test_ln_and_qkv_hooks_see_what_the_block_computes():
    """ln_2.hook_normalized is the FFN's input and hook_q/k/v the projections, split before the heads."""
    model = model_for(ffn="dense")
    tokens = torch.randint(0, 64, (2, 16))
    _, cache = model.run_with_cache(tokens)
    block = model.blocks[0]
    ln2 = block.ln_2(cache["blocks.0.hook_resid_mid"])
    assert torch.allclose(cache["blocks.0.ln_2.hook_normalized"], ln2)
    q, k, v = block.attn.qkv(cache["blocks.0.ln_1.hook_normalized"]).split(model.cfg.d_model, dim=2)
    assert torch.allclose(cache["blocks.0.attn.hook_v"], v) and torch.allclose(cache["blocks.0.attn.hook_q"], q)
    # zeroing v zeroes attention's output before the projection: attn_out is the projection's bias alone
    with model.hooks([("blocks.0.attn.hook_v", lambda a, h: torch.zeros_like(a))]):
        _, c2 = model.run_with_cache(tokens, names_filter=["blocks.0.hook_attn_out"])
    assert torch.allclose(c2["blocks.0.hook_attn_out"], block.attn.proj.bias.expand(2, 16, -1))


def test_run_with_cache_shapes_and_sparse_record():
    model = model_for(ffn="dense,routed")
    tokens = torch.randint(0, 64, (2, 32))
    logits, cache = model.run_with_cache(tokens)
    assert torch.equal(logits, model(tokens)[0])
    assert cache["blocks.0.mlp.hook_post"].shape == (2, 32, 128)  # dense: (B, T, d_ff)
    routed = cache["blocks.1.mlp.hook_post"]
    assert isinstance(routed, SparseActivations) and routed.indices.shape == (2, 32, 4)
    assert cache["blocks.1.mlp.hook_pre"].shape == (2, 32, 4)
    torch.testing.assert_close(cache["blocks.1.hook_resid_post"], cache["blocks.1.hook_resid_mid"] + cache["blocks.1.hook_mlp_out"])
    _, only = model.run_with_cache(tokens, names_filter=lambda name: name.endswith("hook_resid_pre"))
    assert set(only) == {"blocks.0.hook_resid_pre", "blocks.1.hook_resid_pre"}


def test_activation_patching_transplants_a_run():
    model = model_for(ffn="routed")
    clean, corrupt = torch.randint(0, 64, (2, 1, 32))
    _, cache = model.run_with_cache(clean, names_filter="blocks.1.hook_resid_post")
    patched = model.run_with_hooks(corrupt, [("blocks.1.hook_resid_post", lambda act, hook: cache[hook.name])])
    torch.testing.assert_close(patched, model(clean)[0])
    assert not torch.allclose(model(corrupt)[0], model(clean)[0])


def test_unit_ablation_changes_only_through_that_unit():
    model = model_for(ffn="routed")
    tokens = torch.randint(0, 64, (1, 32))
    _, cache = model.run_with_cache(tokens, names_filter="blocks.1.mlp.hook_post")
    unit = int(cache["blocks.1.mlp.hook_post"].indices[0, -1, 0])
    ablated = model.run_with_hooks(tokens, [("blocks.1.mlp.hook_post", lambda acts, hook: acts.ablate([unit]))])
    acts = cache["blocks.1.mlp.hook_post"]
    used = ((acts.indices == unit) & (acts.values != 0)).any(-1)[0]  # (T,) positions where the unit fired
    changed = (ablated - model(tokens)[0]).abs().amax(-1)[0] > 0
    assert changed[used].all() and not changed[~used].any()


def test_hooks_are_removed_even_when_a_hook_fails():
    model = model_for()

    def boom(act, hook):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        model.run_with_hooks(torch.randint(0, 64, (1, 8)), [("blocks.0.hook_resid_pre", boom)])
    assert not any(point.fns for point in model.hook_points.values())
    with pytest.raises(KeyError, match="unknown hook point"):
        model.run_with_hooks(torch.randint(0, 64, (1, 8)), [("blocks.9.nope", boom)])


def test_active_params_skip_unselected_units():
    dense, routed = model_for(ffn="dense"), model_for(ffn="routed")
    assert dense.n_active_params() == dense.n_params()
    per_unit = 2 * 32 + 1
    assert routed.n_params() - routed.n_active_params() == 2 * (256 - 4) * per_unit


def test_per_layer_ffn_and_bad_config():
    model = model_for(ffn="dense,routed")
    assert [type(b.mlp).__name__ for b in model.blocks] == ["DenseMLP", "RoutedFFN"]
    with pytest.raises(MonorouteError, match="ffn lists 3 layers but n_layer=2"):
        model_for(ffn="dense,routed,dense")
    with pytest.raises(MonorouteError, match="unknown ffn 'moe'"):
        model_for(ffn="moe")
    with pytest.raises(MonorouteError, match="unknown model config key"):
        GPTConfig.from_dict({"n_units": 4, "n_unit": 4})


def test_aux_loss_only_in_training():
    model = model_for(ffn="routed")
    tokens = torch.randint(0, 64, (2, 32))
    model.train()
    model(tokens)
    assert model.aux_loss().requires_grad
    model.eval()
    model(tokens)
    assert model.aux_loss().item() == 0.0


def test_hybrid_block_adds_a_slim_dense_ffn_beside_the_routed_layer():
    model = model_for(ffn="dense,routed", dense_beside=8)
    assert model.blocks[0].mlp_dense is None and model.blocks[1].mlp_dense.up.out_features == 8
    assert {"blocks.1.mlp_dense.hook_pre", "blocks.1.mlp_dense.hook_post"} <= set(model.hook_points)
    tokens = torch.randint(0, 64, (2, 16))
    _, cache = model.run_with_cache(tokens)
    block = model.blocks[1]
    h = cache["blocks.1.ln_2.hook_normalized"]
    torch.testing.assert_close(cache["blocks.1.hook_mlp_out"], block.mlp(h) + block.mlp_dense(h))
    # Zeroing the slim FFN's output leaves exactly the routed layer's.
    with model.hooks([("blocks.1.mlp_dense.hook_post", lambda a, hook: torch.zeros_like(a))]):
        _, cache2 = model.run_with_cache(tokens, names_filter="blocks.1.hook_mlp_out")
    torch.testing.assert_close(cache2["blocks.1.hook_mlp_out"], block.mlp(h) + block.mlp_dense.down.bias)
    with pytest.raises(MonorouteError, match="dense_beside"):
        model_for(ffn="routed", dense_beside=-1)


LLAMA_SHAPE = dict(position="rotary", norm="rms", n_kv_head=1, ffn_gated=True, dense_activation="silu", bias=False)
NEOX_SHAPE = dict(position="rotary", rotary_dims=8, parallel_residual=True, tie_weights=False)


@pytest.mark.parametrize("ffn, extra", [("dense", {}), ("routed", {}), ("dense,routed", {}), ("dense", LLAMA_SHAPE),
                                        ("routed", NEOX_SHAPE)])
def test_kv_cache_decoding_equals_the_full_forward(ffn, extra):
    """Incremental decoding with a KV cache gives the full forward's logits (float64), prefill of
    several tokens onto a cache included, and greedy generation the same tokens with or without it,
    also past the context (where the cache gives way to the sliding window)."""
    from monoroute.models.gpt import KVCache, generate

    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=256, n_layer=2, n_head=2, d_model=32, block_size=24, ffn=ffn, n_units=256, k=8,
                    d_ff=64, **extra)
    model = GPT(cfg).double().eval()
    idx = torch.randint(0, 256, (3, 20))
    with torch.no_grad():
        full = model(idx)[0]
        cache = KVCache(cfg.n_layer)
        parts = [model(idx[:, :7], cache=cache)[0], model(idx[:, 7:12], cache=cache)[0]]  # prefill, then 5 more
        parts += [model(idx[:, t:t + 1], cache=cache)[0] for t in range(12, 20)]  # one token at a time
    assert cache.length == 20 and cache.nbytes() == 2 * 2 * 3 * cfg.kv_heads * 20 * 16 * 8
    assert torch.allclose(torch.cat(parts, 1), full, atol=1e-10)
    with pytest.raises(ValueError, match="exceeds block_size"):
        model(idx[:, :5], cache=cache)
    prompt = idx[:, :6]
    for new in (10, 30):  # 30: past the 24-token context
        a = generate(model, prompt, new, temperature=1e-6, top_k=1, use_cache=True)
        b = generate(model, prompt, new, temperature=1e-6, top_k=1, use_cache=False)
        assert torch.equal(a, b) and a.shape == (3, 6 + new)
