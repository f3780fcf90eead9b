"""Shared fixtures of the stable tests."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    # many tiny tensors: one intra-op thread avoids spin-wait contention on a shared machine
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
