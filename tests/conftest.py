import os

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch

# Without CUDA, Triton kernels run in its interpreter. Triton reads this when a kernel is decorated,
# i.e. when its module is first imported by any test, so it is set here, before every test module.
if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

# Tests start Ray workers and DeepSpeed ranks beside this process on a 2-core machine: one intra-op
# thread each, or OpenMP oversubscription makes small CPU steps orders of magnitude slower.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
