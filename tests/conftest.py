import os
import sys
from pathlib import Path

import pytest
import torch

# `import support` (the shared helpers) from every test folder
sys.path.insert(0, str(Path(__file__).resolve().parent))

# Without a GPU, Triton kernels run under the interpreter; it must be chosen before anything
# imports triton (vLLM does, early). A GPU run sets TRITON_INTERPRET=0 itself (gpu_check.sh).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# The engine tests check the backend against references built from the registry it loaded, so
# they run with the data-oblivious codebooks and skip the start-up calibration (tens of seconds
# per tiny model); tests/test_calibrate.py turns the default ("auto") back on where it tests it.
os.environ.setdefault("VLLM_TURBOQUANT_CALIBRATION", "none")



@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
