import os

import pytest
import torch

# Tests share one token cache so the stdlib corpus is tokenised once per session.
os.environ.setdefault("MONOROUTE_CACHE", os.path.join(os.path.dirname(__file__), "..", ".pytest_cache", "monoroute"))
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
