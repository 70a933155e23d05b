"""``edaformer predict`` / ``edaformer list``: which weights run, shipped models, the log line, --isr."""
from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from PIL import Image

import edaformer
from edaformer import pretrained
from edaformer.checkpoint import save_checkpoint
from edaformer.cli import main
from edaformer.engine.state import checkpoint_payload
from edaformer.inference import Segmenter, TestProtocol, load_image

from tests.helpers.stubs import ADE, rgb

pytestmark = pytest.mark.usefixtures("one_thread")

SHIPPED = pretrained.DEFAULT_NAME


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """A small 3-class checkpoint that stores its name, a small test scale and an ISR setting."""
    torch.manual_seed(0)
    model = edaformer.create_model(ADE, num_classes=3)
    meta = {"test_protocol": TestProtocol(scale=(64, 48), divisor=32).to_dict(), "isr": "2211-222"}
    return save_checkpoint(checkpoint_payload(model, meta, config={"model": {"name": ADE}}),
                           tmp_path_factory.mktemp("c") / "tiny.pth")


@pytest.fixture
def shipped(tiny_checkpoint, tmp_path, monkeypatch):
    """The tiny checkpoint shipped as the default model, in place of the package's weights."""
    pretrained.package_weights(tiny_checkpoint, SHIPPED, out=tmp_path / "weights")
    monkeypatch.setattr(pretrained, "weights_dir", lambda: tmp_path / "weights")
    return tmp_path / "weights" / f"{SHIPPED}.safetensors"


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "street.png"
    Image.fromarray(rgb(30, 44)).save(path)
    return path


def _error_lines(capsys) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if line.strip()]


def test_a_model_without_shipped_weights_is_one_error(shipped, image, tmp_path, capsys):
    assert main(["predict", str(image), "--model", "edaformer-t-cityscapes", "--out", str(tmp_path / "o")]) == 2
    (line,) = _error_lines(capsys)
    assert line == (f"edaformer predict: error: no weights ship for model edaformer-t-cityscapes (shipped: {SHIPPED}); "
                    "pass --checkpoint FILE with weights trained for it")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("argv", [[], ["--model", SHIPPED], ["--checkpoint", SHIPPED]])
def test_the_shipped_model_runs_by_default_or_by_name(argv, shipped, image, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="edaformer")
    assert main(["predict", str(image), "--out", str(tmp_path / "o"), "--device", "cpu", *argv]) == 0
    expected = Segmenter.pretrained(device="cpu")(load_image(image))
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "o" / "street_label.png")), expected)
    (line,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Segmenter(")]
    assert line.startswith(f"Segmenter(model={SHIPPED}, architecture={ADE}, classes=3, isr=2211-222 (avg), whole, "
                           "fit 64x48")


def test_the_log_line_names_the_checkpoint_file(tiny_checkpoint, image, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="edaformer")
    assert main(["predict", str(image), "--checkpoint", str(tiny_checkpoint), "--out", str(tmp_path / "o"),
                 "--isr", "1111-222", "--pool", "max"]) == 0
    (line,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Segmenter(")]
    assert line.startswith(f"Segmenter(model={tiny_checkpoint}, architecture={ADE}, classes=3, isr=1111-222 (max), ")


@pytest.mark.parametrize("spec,message", [
    ("9999-999", "ISR setting '9999-999': factor 9 is out of range; each factor is 1 to 8 (4 encoder and 3 decoder "
                 "factors, e.g. '2211-222')"),
    ("99-9", "ISR spec '99-9': the encoder needs 4 factors, got 2"),
])
def test_a_bad_isr_is_one_error(spec, message, tiny_checkpoint, image, tmp_path, capsys):
    assert main(["predict", str(image), "--checkpoint", str(tiny_checkpoint), "--out", str(tmp_path / "o"),
                 "--isr", spec]) == 2
    (line,) = _error_lines(capsys)
    assert line == f"edaformer predict: error: {message}"
    assert not (tmp_path / "o").exists()


def test_list_marks_the_shipped_models(shipped, capsys):
    assert main(["list"]) == 0
    rows = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()}
    assert rows[SHIPPED].split()[1:4] == ["classes=3", "test=whole", "weights=shipped"]
    assert f"(architecture {ADE}, isr 2211-222 avg)" in rows[SHIPPED]
    assert "weights=none" in rows["edaformer-t-cityscapes"] and "classes=19" in rows["edaformer-t-cityscapes"]
    assert sum("weights=shipped" in row for row in rows.values()) == 1
