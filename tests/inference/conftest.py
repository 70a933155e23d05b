import pytest
import torch

import edaformer

from tests.helpers.stubs import ADE


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Every inference test runs on one intra-op thread."""


@pytest.fixture(scope="module")
def ade_model():
    torch.manual_seed(0)
    return edaformer.create_model(ADE).eval()


@pytest.fixture(scope="module")
def ade_checkpoint(ade_model, tmp_path_factory):
    return edaformer.save_checkpoint(ade_model, tmp_path_factory.mktemp("ckpt") / "t_ade.pth")
