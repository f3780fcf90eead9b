import os

import pytest
import torch

# Tests share 2 cores with whatever else runs; one intra-op thread keeps timings sane and
# results identical between runs.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
