"""Fixtures shared by the whole suite."""
import pytest
import torch


@pytest.fixture
def one_thread():
    """One intra-op thread: fast on a shared machine and the same math in every process."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
