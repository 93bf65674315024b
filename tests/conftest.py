import os

import pytest
import torch

# Tests share one token cache so the stdlib corpus is tokenised once per session.
os.environ.setdefault("MONOROUTE_CACHE", os.path.join(os.path.dirname(__file__), "..", ".pytest_cache", "monoroute"))
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


FAST_TRAIN = ["--no-progress", "--device", "cpu", "--steps", "20", "--log-every", "5", "--eval-every", "10",
              "--eval-batches", "1", "--ckpt-every", "10", "--batch-size", "8"]
FAST_ANALYZE = ["--tokens", "4096", "--no-progress", "--interventions", "2", "--dashboards", "2"]


@pytest.fixture(scope="session")
def analysed_runs(tmp_path_factory):
    """Two analysed tiny runs for the browser and export tests: routed (product keys), and dense with
    its SAE and transcoder. Returns (routed_dir, dense_dir)."""
    from monoroute.cli import main

    root = tmp_path_factory.mktemp("analysed")
    routed, dense = root / "routed", root / "dense"
    assert main(["train", "--preset", "tiny", "--out", str(routed), *FAST_TRAIN]) == 0
    assert main(["train", "--preset", "tiny", "--ffn", "dense", "--d-ff", "64", "--out", str(dense), *FAST_TRAIN]) == 0
    assert main(["analyze", str(routed), *FAST_ANALYZE]) == 0
    assert main(["analyze", str(dense), *FAST_ANALYZE, "--sae", "--transcoder", "--baseline-tokens", "4096"]) == 0
    return routed, dense
