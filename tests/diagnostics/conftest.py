"""Diagnostics tests mostly work on tiny tensors: one intra-op thread avoids OpenMP
oversubscription on a busy 2-core machine."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _single_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
