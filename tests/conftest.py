import os

import pytest
import torch

# Without a GPU, Triton kernels run under the interpreter; it must be chosen before anything
# imports triton (vLLM does, early). A GPU run sets TRITON_INTERPRET=0 itself (gpu_check.sh).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")



@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
