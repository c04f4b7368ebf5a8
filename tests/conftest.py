import os

import pytest
import torch

# Codebooks solved for unusual head sizes are cached here, not in the user's home.
os.environ.setdefault("VLLM_TURBOQUANT_CACHE", os.path.join(os.path.dirname(__file__), "..", ".pytest_cache", "tq"))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
