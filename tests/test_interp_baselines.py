"""Post-hoc baselines: SAE (sae-lens) and TopK transcoder on a tiny dense GPT, evaluation, save/load."""
from __future__ import annotations

import json

import pytest
import torch

from monoroute.data import DataConfig, prepare_data, split_of
from monoroute.errors import MonorouteError
from monoroute.interp import baselines as B
from monoroute.models import GPT
from monoroute.models.config import GPTConfig
from monoroute.train.config import RunConfig, TrainConfig

LAYER, N, K = 1, 128, 8
BLOCK = 32
TRAIN = dict(batch_tokens=8 * BLOCK, seed=0, progress=False)
STEPS = 40


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A byte-level store over a few generated .py files, with both splits longer than a few windows."""
    root = tmp_path_factory.mktemp("corpus")
    src = root / "src"
    src.mkdir()
    names = [f"mod_{i}.py" for i in range(12)]
    assert {split_of(n, 0.3) for n in names} == {"train", "val"}
    for i, name in enumerate(names):
        body = "".join(f"def f_{i}_{j}(x, y={j}):\n    return x * {i} + y  # {name}\n\n" for j in range(40))
        (src / name).write_text(body)
    return prepare_data(DataConfig(source=str(src), cache_dir=str(root / "cache"), val_fraction=0.3))


@pytest.fixture(scope="module")
def model(store):
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=store.vocab_size, block_size=BLOCK, n_layer=2, n_head=2, d_model=32, d_ff=64,
                    ffn="dense")
    return GPT(cfg).eval()


@pytest.fixture(scope="module")
def windows(store):
    x, _ = next(store.eval_batches(6, BLOCK, 1))
    return x  # (6, T) validation windows


class SplitSpy:
    """A store that records which split every training batch came from."""

    def __init__(self, store):
        self.store, self.splits = store, []

    def batch(self, *args, split="train", **kwargs):
        self.splits.append(split)
        return self.store.batch(*args, split=split, **kwargs)


def trained_pair(trainer, model, store):
    """(untrained, trained) baselines from the same seed: lr ~ 0 leaves the initialisation in place;
    the trained one must read only the train split."""
    spy = SplitSpy(store)
    trained = trainer(model, spy, LAYER, N, K, tokens=STEPS * 8 * BLOCK, lr=1e-2, **TRAIN)
    assert set(spy.splits) == {"train"}
    init = trainer(model, store, LAYER, N, K, tokens=8 * BLOCK, lr=1e-12, **TRAIN)
    return init, trained


@pytest.fixture(scope="module")
def sae_pair(model, store):
    return trained_pair(B.train_sae, model, store)


@pytest.fixture(scope="module")
def transcoder_pair(model, store):
    return trained_pair(B.train_transcoder, model, store)


def layer_inputs(base: B.Baseline, model, windows) -> tuple[torch.Tensor, torch.Tensor]:
    cache = B.layer_cache(model, windows, base.hooks)
    return base.input_of(cache), base.target_of(cache)


# --- training ------------------------------------------------------------------------------------------
def test_sae_training_reduces_reconstruction_error(sae_pair, model, windows):
    init, trained = sae_pair
    assert isinstance(trained, B.SAEBaseline) and not trained.training and trained.sae is not None
    assert (trained.layer, trained.n_latents, trained.k, trained.d_in) == (LAYER, N, K, 64)
    assert trained.input_hook == trained.target_hook == f"blocks.{LAYER}.mlp.hook_post"
    before = B.explained_variance(init, model, windows)
    after = B.explained_variance(trained, model, windows)
    assert after["mse"] < 0.7 * before["mse"], (before, after)
    assert after["explained_variance"] > before["explained_variance"] + 0.1
    assert trained.train_info["steps"] == STEPS and trained.train_info["tokens"] == STEPS * 8 * BLOCK


def test_transcoder_training_reduces_reconstruction_error(transcoder_pair, model, windows):
    init, trained = transcoder_pair
    assert isinstance(trained, B.TranscoderBaseline) and not trained.training
    assert trained.ffn.router_name == "dense" and trained.ffn.activation == "relu"
    assert (trained.ffn.d_model, trained.ffn.n_units, trained.ffn.k) == (32, N, K)
    assert (trained.input_hook, trained.target_hook) == (f"blocks.{LAYER}.hook_resid_mid", f"blocks.{LAYER}.hook_mlp_out")
    assert torch.equal(trained.ln.weight, model.blocks[LAYER].ln_2.weight)
    assert not any(p.requires_grad for p in trained.ln.parameters())
    before = B.explained_variance(init, model, windows)
    after = B.explained_variance(trained, model, windows)
    assert after["mse"] < 0.7 * before["mse"], (before, after)
    assert after["explained_variance"] > before["explained_variance"] + 0.1


def test_baselines_refuse_a_routed_layer_and_a_bad_layer(store):
    routed = GPT(GPTConfig(vocab_size=store.vocab_size, block_size=BLOCK, n_layer=2, n_head=2, d_model=32,
                           ffn="dense,routed", router="dense", n_units=64, k=4))
    with pytest.raises(MonorouteError, match="routed"):
        B.train_transcoder(routed, store, 1, N, K, tokens=BLOCK, progress=False)
    with pytest.raises(MonorouteError, match="out of range"):
        B.train_sae(routed, store, 5, N, K, tokens=BLOCK, progress=False)
    with pytest.raises(MonorouteError, match="k must be"):
        B.SAEBaseline(0, 64, 8, 16)


# --- explained variance ---------------------------------------------------------------------------------
class ExactSAE(B.SAEBaseline):
    def reconstruct(self, x):
        return x


class MeanSAE(B.SAEBaseline):
    mean: torch.Tensor

    def reconstruct(self, x):
        return self.mean.expand_as(x)


class FixedCodes(B.SAEBaseline):
    def encode(self, x):
        idx = torch.arange(self.k).expand(x.shape[0], -1)
        return idx, torch.ones(idx.shape)

    def reconstruct(self, x):
        return x


class TrueMLP(B.TranscoderBaseline):
    """The dense layer itself, as a 'transcoder' whose reconstruction is exact."""

    def __init__(self, model, layer):
        ln = model.blocks[layer].ln_2
        super().__init__(layer, model.cfg.d_model, N, K)
        self.ln.load_state_dict(ln.state_dict())
        self.mlp = model.blocks[layer].mlp

    def reconstruct(self, x):
        return self.mlp(x)


class Zeros(B.TranscoderBaseline):
    def reconstruct(self, x):
        return torch.zeros(x.shape[0], self.d_model)


def test_explained_variance_known_answers(model, windows):
    exact = B.explained_variance(ExactSAE(LAYER, 64, N, K), model, windows, batch_windows=4)
    assert exact["explained_variance"] == 1.0 and exact["mse"] == 0.0 and exact["ev_positions"] == 6 * BLOCK
    mean_base = MeanSAE(LAYER, 64, N, K)
    _, target = layer_inputs(mean_base, model, windows)
    mean_base.mean = target.double().mean(0).float()
    assert B.explained_variance(mean_base, model, windows)["explained_variance"] == pytest.approx(0.0, abs=1e-6)
    # EV is 1 - SSE / SST with SST around the per-dimension mean, checked against a direct computation
    half = MeanSAE(LAYER, 64, N, K)
    half.mean = torch.zeros(64)
    sse = target.double().pow(2).sum()
    sst = (target.double() - target.double().mean(0)).pow(2).sum()
    assert B.explained_variance(half, model, windows)["explained_variance"] == pytest.approx(1 - (sse / sst).item(), rel=1e-9)
    codes = B.explained_variance(FixedCodes(LAYER, 64, N, K), model, windows)
    assert codes["ev_l0"] == K and codes["ev_dead_fraction"] == pytest.approx(1 - K / N)
    assert B.explained_variance(TrueMLP(model, LAYER), model, windows)["explained_variance"] == pytest.approx(1.0, abs=1e-6)
    with pytest.raises(MonorouteError, match="windows"):
        B.explained_variance(ExactSAE(LAYER, 64, N, K), model, windows[0])


# --- spliced loss -----------------------------------------------------------------------------------------
def test_spliced_loss_identity_is_clean_and_zeros_is_zero_ablation(model, store):
    from monoroute.train.trainer import evaluate

    run = RunConfig(model=model.cfg, train=TrainConfig(batch_size=4, eval_batches=2, dtype="float32"))
    clean_eval = evaluate(model, store, run, torch.device("cpu"))
    same = B.spliced_loss(model, ExactSAE(LAYER, 64, N, K), store, run)
    assert same.clean == pytest.approx(clean_eval, abs=1e-6)
    assert abs(same.spliced - same.clean) < 1e-6
    assert same.loss_recovered == pytest.approx(1.0, abs=1e-4)
    zero_sae = MeanSAE(LAYER, 64, N, K)
    zero_sae.mean = torch.zeros(64)
    ablated = B.spliced_loss(model, zero_sae, store, batches=2, batch_size=4)
    assert abs(ablated.spliced - ablated.zero) < 1e-6 and abs(ablated.zero - same.zero) < 1e-6
    assert ablated.loss_recovered == pytest.approx(0.0, abs=1e-4)
    # transcoder kind: the true MLP on ln_2(resid_mid) in place of mlp_out changes nothing
    tc = B.spliced_loss(model, TrueMLP(model, LAYER), store, batches=2, batch_size=4)
    assert abs(tc.spliced - tc.clean) < 1e-6
    zeros = B.spliced_loss(model, Zeros(LAYER, 32, N, K), store, batches=2, batch_size=4)
    assert abs(zeros.spliced - zeros.zero) < 1e-6 and zeros.zero != zeros.clean
    assert isinstance(same, tuple) and len(same) == 3  # unpacks as (clean, spliced, zero)


def test_spliced_loss_with_trained_baselines_equals_a_hand_splice(model, store, sae_pair, transcoder_pair):
    """Each of the three losses equals the mean CE computed here by replacing the target activation by
    hand (reconstruction of the input the baseline reads, or zeros), and loss_recovered its formula."""
    import torch.nn.functional as F

    for base in (sae_pair[1], transcoder_pair[1]):
        result = B.spliced_loss(model, base, store, batches=2, batch_size=4)
        sums = {"clean": [], "spliced": [], "zero": []}
        with torch.no_grad():
            for x, y in store.eval_batches(4, model.cfg.block_size, 2, split="val"):
                _, cache = model.run_with_cache(x, names_filter=[base.input_hook])
                recon = base.reconstruct(base.input_of(cache))
                for name, fn in (("clean", None), ("spliced", lambda a, h: recon.view_as(a)),
                                 ("zero", lambda a, h: torch.zeros_like(a))):
                    logits = model.run_with_hooks(x, [] if fn is None else [(base.target_hook, fn)])
                    sums[name].append(F.cross_entropy(logits.flatten(0, 1).float(), y.flatten()).item())
        hand = {k: sum(v) / len(v) for k, v in sums.items()}
        assert result.clean == pytest.approx(hand["clean"], abs=1e-5)
        assert result.spliced == pytest.approx(hand["spliced"], abs=1e-5)
        assert result.zero == pytest.approx(hand["zero"], abs=1e-5)
        assert result.loss_recovered == pytest.approx((hand["zero"] - hand["spliced"]) / (hand["zero"] - hand["clean"]),
                                                      rel=1e-4)


# --- encode ---------------------------------------------------------------------------------------------
def check_topk(indices, values, k):
    assert indices.dtype == torch.int64 and values.dtype == torch.float32
    assert indices.shape == values.shape and indices.shape[-1] == k
    assert ((values != 0).sum(-1) <= k).all() and (values >= 0).all()


def dense(indices, values, n):
    return torch.zeros(indices.shape[0], n, dtype=values.dtype).scatter_add(-1, indices, values)


def test_sae_encode_matches_sae_lens(sae_pair, model, windows):
    base = sae_pair[1]
    x, _ = layer_inputs(base, model, windows)
    indices, values = base.encode(x)
    check_topk(indices, values, K)
    with torch.no_grad():
        reference = base.sae.encode(x)  # (T, N) dense, sae-lens's own arithmetic
        recon = base.sae.decode(reference)
    torch.testing.assert_close(dense(indices, values, N), reference, rtol=0, atol=1e-6)
    torch.testing.assert_close(base.reconstruct(x), recon, rtol=1e-5, atol=1e-5)
    # the capture extractor reads the same thing from a run_with_cache cache
    _, cache = model.run_with_cache(windows, names_filter=[base.hook])
    idx2, val2 = base.extractor()(cache)
    torch.testing.assert_close(dense(idx2, val2, N), dense(indices, values, N))


def test_transcoder_encode_matches_dense_topk_in_float64(transcoder_pair, model, windows):
    base = transcoder_pair[1]
    x, _ = layer_inputs(base, model, windows)
    indices, values = base.encode(x)
    check_topk(indices, values, K)
    ffn = base.ffn
    pre = x.double() @ ffn.w_in.double().t() + ffn.b_in.double()  # (T, N)
    top = pre.relu().topk(K, dim=-1)
    reference = dense(top.indices, top.values, N)
    torch.testing.assert_close(dense(indices, values, N).double(), reference, rtol=0, atol=1e-5)
    recon = reference @ ffn.w_out.double() + base.b_out.double()
    torch.testing.assert_close(base.reconstruct(x).double(), recon, rtol=1e-5, atol=1e-6)
    _, cache = model.run_with_cache(windows, names_filter=[base.hook])
    idx2, val2 = base.extractor()(cache)
    torch.testing.assert_close(dense(idx2, val2, N), dense(indices, values, N))


# --- save / load ------------------------------------------------------------------------------------------
def test_save_load_round_trip(sae_pair, transcoder_pair, model, windows, tmp_path):
    for base in (sae_pair[1], transcoder_pair[1]):
        folder = base.save(tmp_path / base.name)
        config = json.loads((folder / B.CONFIG_FILE).read_text())
        assert config["kind"] == base.name and config["layer"] == LAYER and config["train"]["steps"] == STEPS
        loaded = B.load_baseline(folder)
        assert type(loaded) is type(base) and not loaded.training and loaded.hooks == base.hooks
        x, _ = layer_inputs(base, model, windows)
        for a, b in zip(base.encode(x), loaded.encode(x)):
            assert torch.equal(a, b)
        assert torch.equal(base.reconstruct(x), loaded.reconstruct(x))
    # the SAE also in sae-lens's format, loadable by sae-lens itself
    import sae_lens

    sae = sae_lens.SAE.load_from_disk(tmp_path / "sae" / B.SAE_LENS_DIR)
    x, _ = layer_inputs(sae_pair[1], model, windows)
    with torch.no_grad():
        torch.testing.assert_close(sae.decode(sae.encode(x)), sae_pair[1].reconstruct(x), rtol=1e-4, atol=1e-5)


def test_load_refuses_missing_or_foreign_folders(tmp_path):
    with pytest.raises(MonorouteError, match="no saved baseline"):
        B.load_baseline(tmp_path)
    ExactSAE(0, 8, 16, 2).save(tmp_path / "a")
    (tmp_path / "a" / B.CONFIG_FILE).write_text(json.dumps({"format": 99, "kind": "sae"}))
    with pytest.raises(MonorouteError, match="format"):
        B.load_baseline(tmp_path / "a")
