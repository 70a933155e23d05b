"""Fixtures shared by the whole suite."""
import os

import pytest
import torch


def pytest_configure(config):
    """Under pytest-xdist, split the cores between the workers instead of each taking them all."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))
    if workers > 1:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))


@pytest.fixture
def one_thread():
    """One intra-op thread: fast on a shared machine and the same math in every process."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def shipped_camvid_onnx(tmp_path_factory):
    """The shipped edaformer-t-camvid exported by ``edaformer export`` without a model name, fixed at
    384x480 (the test size of a 960x720 CamVid frame); shared by the export and ONNX Runtime tests."""
    for module in ("onnx", "onnxruntime", "onnxscript"):
        pytest.importorskip(module)
    from edaformer.cli import main

    out = tmp_path_factory.mktemp("shipped_onnx") / "camvid.onnx"
    assert main(["export", "--checkpoint", "edaformer-t-camvid", "--size", "384", "480", "--out", str(out)]) == 0
    return out
