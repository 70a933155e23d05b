import pytest


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Every engine test runs on one intra-op thread."""
