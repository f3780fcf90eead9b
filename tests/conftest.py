import os

# Before torch loads OpenMP: idle threads sleep instead of spinning (see proxnets.cli).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402

# Most tests are many small tensor operations; on a shared 2-core machine intra-op parallelism costs
# more in synchronization than it gains, and one thread keeps results identical between runs.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
