import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    """The convex solvers run many tiny ops; on a loaded 2-core machine one thread avoids
    intra-op synchronization costs that dominate them (restored afterwards)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
