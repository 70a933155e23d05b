import pytest
import torch

import edaformer

from .helpers import ADE


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: fast on a shared machine and deterministic."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def ade_model():
    torch.manual_seed(0)
    return edaformer.create_model(ADE).eval()


@pytest.fixture(scope="module")
def ade_checkpoint(ade_model, tmp_path_factory):
    return edaformer.save_checkpoint(ade_model, tmp_path_factory.mktemp("ckpt") / "t_ade.pth")
