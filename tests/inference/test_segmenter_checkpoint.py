"""Segmenter.from_checkpoint with a path alone, what ``repr`` names, the ISR check, probabilities."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import edaformer
from edaformer import pretrained
from edaformer.checkpoint import save_checkpoint
from edaformer.engine.state import checkpoint_payload
from edaformer.inference import Segmenter, TestProtocol

from tests.helpers.stubs import ADE, Asymmetric, rgb

PROTOCOL = TestProtocol(scale=(64, 48), divisor=32)
CLASSES = ["a", "b", "c"]


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    """A 3-class model with its own architecture options and a checkpoint that stores its name,
    config, classes, test protocol, ISR setting and pool kind."""
    torch.manual_seed(0)
    model = edaformer.create_model(ADE, num_classes=3, decoder_depths=(1, 2, 1)).eval()
    meta = {"CLASSES": CLASSES, "PALETTE": [[1, 2, 3], [4, 5, 6], [7, 8, 9]], "test_protocol": PROTOCOL.to_dict(),
            "isr": "2211-222", "isr_pool": "max"}
    config = {"model": {"name": ADE, "decoder_depths": [1, 2, 1]}}
    path = save_checkpoint(checkpoint_payload(model, meta, config=config), tmp_path_factory.mktemp("c") / "run.pth")
    return model, path


def _expected(model, image):
    with edaformer.isr(model, "2211-222", pool="max"):
        return Segmenter(model, device="cpu", protocol=PROTOCOL)(image)


def _check_settings(seg: Segmenter):
    assert seg.model.name == ADE and tuple(seg.model.decoder_depths) == (1, 2, 1)
    assert (str(seg.model.isr), seg.model.isr_pool) == ("2211-222", "max")
    assert seg.protocol == PROTOCOL and seg.classes == tuple(CLASSES) and seg.palette[2] == (7, 8, 9)


def test_from_checkpoint_takes_a_native_file_alone(tuned):
    model, path = tuned
    seg = Segmenter.from_checkpoint(path, device="cpu")
    _check_settings(seg)
    np.testing.assert_array_equal(seg(rgb(40, 50)), _expected(model, rgb(40, 50)))
    assert Segmenter.from_checkpoint(str(path), device="cpu").source == str(path)
    legacy = Segmenter.from_checkpoint(ADE, path, device="cpu")  # the model name first, as before
    np.testing.assert_array_equal(legacy(rgb(40, 50)), seg(rgb(40, 50)))
    with pytest.raises(TypeError, match="model name is given twice"):
        Segmenter.from_checkpoint(ADE, path, model=ADE)


def test_from_checkpoint_takes_safetensors_and_shipped_names_alone(tuned, tmp_path, monkeypatch):
    model, path = tuned
    packed = pretrained.package_weights(path, "tiny-three", out=tmp_path / "w").path
    seg = Segmenter.from_checkpoint(packed, device="cpu")
    _check_settings(seg)
    # float16 weights: labels as the float32 model's but where two classes nearly tie
    assert (seg(rgb(40, 50)) == _expected(model, rgb(40, 50))).mean() > 0.99
    monkeypatch.setattr(pretrained, "weights_dir", lambda: tmp_path / "w")
    named = Segmenter.from_checkpoint("tiny-three", device="cpu")
    _check_settings(named)
    np.testing.assert_array_equal(named(rgb(40, 50)), seg(rgb(40, 50)))
    with pytest.raises(FileNotFoundError, match="nor a shipped model: tiny-three"):
        Segmenter.from_checkpoint("no-such-model", device="cpu")


def test_from_checkpoint_model_names_a_checkpoint_without_one(tmp_path):
    torch.manual_seed(0)
    model = edaformer.create_model(ADE, num_classes=3)
    ref = edaformer.export_reference(model, tmp_path / "ref.pth", meta={"test_protocol": PROTOCOL.to_dict()})
    with pytest.raises(ValueError, match=r"ref.pth stores no model name"):
        Segmenter.from_checkpoint(ref, device="cpu")
    seg = Segmenter.from_checkpoint(ref, model=ADE, device="cpu")
    assert seg.model.name == ADE and seg.num_classes == 3 and seg.protocol == PROTOCOL


def test_repr_names_the_weights_the_architecture_and_the_isr(tuned, tmp_path, monkeypatch):
    model, path = tuned
    seg = Segmenter.from_checkpoint(path, device="cpu")
    assert repr(seg) == (f"Segmenter(model={path}, architecture={ADE}, classes=3, isr=2211-222 (max), "
                         f"{PROTOCOL.describe()}, device=cpu)")
    pretrained.package_weights(path, pretrained.DEFAULT_NAME, out=tmp_path / "w")
    monkeypatch.setattr(pretrained, "weights_dir", lambda: tmp_path / "w")
    shipped = Segmenter.pretrained(device="cpu", isr="1111-222")
    assert repr(shipped).startswith(f"Segmenter(model={pretrained.DEFAULT_NAME}, architecture={ADE}, classes=3, "
                                    "isr=1111-222 (avg), ")
    plain = Segmenter(model, device="cpu")
    assert repr(plain).startswith(f"Segmenter(model={ADE}, classes=3, isr=")
    assert repr(Segmenter(Asymmetric(3), device="cpu")).startswith("Segmenter(model=Asymmetric, classes=3, whole")


@pytest.mark.parametrize("spec,match", [
    ("9999-999", r"^ISR setting '9999-999': factor 9 is out of range; each factor is 1 to 8 \(4 encoder and 3 "
                 r"decoder factors, e.g. '2211-222'\)$"),
    ("1,1,16,1-1,1,1", "factor 16 is out of range; each factor is 1 to 8"),
    ("22a1-222", r"ISR spec '22a1-222': expected 4 encoder digits, '-', 3 decoder digits, e.g. '2211-222'"),
    ("2211-22", "ISR spec '2211-22': the decoder needs 3 factors, got 2"),
])
def test_isr_is_checked_and_a_bad_one_changes_nothing(tuned, spec, match):
    model, path = tuned
    before = (str(model.isr), model.isr_pool)
    with pytest.raises(ValueError, match=match):
        Segmenter(model, device="cpu", isr=spec)
    assert (str(model.isr), model.isr_pool) == before
    with pytest.raises(ValueError, match=match):
        Segmenter.from_checkpoint(path, device="cpu", isr=spec)
    assert str(Segmenter.from_checkpoint(path, device="cpu", isr="8888-888").model.isr) == "8888-888"


@pytest.mark.parametrize("protocol", [
    PROTOCOL, TestProtocol(scale=(64, 48), mode="slide", crop_size=32, stride=24),
    TestProtocol(scale=(64, 48), divisor=32, flip=True), TestProtocol(scale=(64, 48), tta_scales=(0.75, 1.0))])
def test_probabilities_match_labels_and_confidence(tuned, protocol):
    model, _ = tuned
    seg = Segmenter(model, device="cpu", protocol=protocol)
    image = rgb(37, 53, 4)
    probs = seg.probabilities(image)
    labels, conf = seg.predict(image, confidence=True)
    assert probs.shape == (3, 37, 53) and probs.dtype == np.float32
    np.testing.assert_allclose(probs.sum(0), 1, atol=1e-5)
    np.testing.assert_array_equal(probs.argmax(0), labels)
    assert conf.dtype == np.float32 and conf.shape == (37, 53) and 1 / 3 - 1e-6 <= conf.min() and conf.max() <= 1
    np.testing.assert_allclose(probs.max(0), conf, rtol=0, atol=1e-5)
    np.testing.assert_allclose(np.take_along_axis(probs, labels[None].astype(np.int64), 0)[0], conf, atol=1e-5)
