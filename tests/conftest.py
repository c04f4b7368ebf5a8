import os

import pytest
import torch

# Without a GPU, Triton kernels run under the interpreter; it must be chosen before anything
# imports triton (vLLM does, early). A GPU run sets TRITON_INTERPRET=0 itself (gpu_check.sh).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Codebooks solved for unusual head sizes are cached here, not in the user's home.
os.environ.setdefault("VLLM_TURBOQUANT_CACHE", os.path.join(os.path.dirname(__file__), "..", ".pytest_cache", "tq"))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
