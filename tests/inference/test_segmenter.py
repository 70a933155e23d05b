"""Whole / slide / flip / multi-scale inference and the Segmenter API."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import edaformer
from edaformer.data.palettes import DATASET_INFO, make_palette
from edaformer.inference import (Segmenter, TestProtocol, infer_logits, infer_tta, preprocess, segment_input)
from edaformer.models import get_model_spec

from tests.helpers.stubs import ADE, Asymmetric, Conv1x1, Stub, rgb


# -- infer_logits ------------------------------------------------------------------------------------
def _manual_slide(model, x, windows):
    """Average of the model's logits over explicit (y0, y1, x0, x1) windows."""
    k = model.conv.out_channels
    acc = torch.zeros(x.shape[0], k, *x.shape[-2:])
    cnt = torch.zeros(1, 1, *x.shape[-2:])
    for y0, y1, x0, x1 in windows:
        acc[..., y0:y1, x0:x1] += model(x[..., y0:y1, x0:x1])
        cnt[..., y0:y1, x0:x1] += 1
    assert cnt.min() > 0
    return acc / cnt


def test_slide_matches_manual_windows():
    model = Stub()
    x = torch.randn(2, 3, 11, 13)
    # rows: 0-6, 4-10, 5-11 (last flush with the border); cols: 0-8, 5-13
    windows = [(y0, y0 + 6, x0, x0 + 8) for y0 in (0, 4, 5) for x0 in (0, 5)]
    with torch.no_grad():
        expected = _manual_slide(model, x, windows)
    model.calls.clear()
    out = infer_logits(model, x, None, mode="slide", crop_size=(6, 8), stride=(4, 5))
    assert len(model.calls) == 6 and all(c == (2, 3, 6, 8) for c in model.calls)
    torch.testing.assert_close(out, expected)
    resized = infer_logits(model, x, (20, 7), mode="slide", crop_size=(6, 8), stride=(4, 5))
    torch.testing.assert_close(resized, F.interpolate(expected, (20, 7), mode="bilinear", align_corners=False))


def test_slide_pads_small_inputs():
    model = Stub()
    x = torch.randn(1, 3, 5, 7)
    model.calls.clear()
    out = infer_logits(model, x, None, mode="slide", crop_size=8, stride=6)
    assert model.calls == [(1, 3, 8, 8)]
    with torch.no_grad():
        torch.testing.assert_close(out, model(F.pad(x, (0, 1, 0, 3)))[..., :5, :7])
    model.calls.clear()
    unpadded = infer_logits(model, x, None, mode="slide", crop_size=8, stride=6, pad=False)
    assert model.calls == [(1, 3, 5, 7)]
    torch.testing.assert_close(unpadded, infer_logits(model, x, None, mode="whole"))


def test_slide_equals_whole_when_window_covers_image(ade_model):
    x = torch.randn(1, 3, 64, 96)
    whole = infer_logits(ade_model, x, (61, 97), mode="whole")
    slide = infer_logits(ade_model, x, (61, 97), mode="slide", crop_size=(64, 96), stride=(32, 32))
    assert whole.shape == (1, 150, 61, 97)
    torch.testing.assert_close(slide, whole)


def test_flip_averaging():
    model = Asymmetric()
    x = torch.randn(1, 3, 9, 12)
    with torch.no_grad():
        expected = (model(x) + model(x.flip(-1)).flip(-1)) / 2
    out = infer_logits(model, x, None, flip=True)
    torch.testing.assert_close(out, expected)
    assert not torch.allclose(out, infer_logits(model, x, None))
    sym = Conv1x1()  # flip-equivariant: flipping changes nothing
    torch.testing.assert_close(infer_logits(sym, x, None, flip=True), infer_logits(sym, x, None))
    slide = infer_logits(model, x, None, mode="slide", crop_size=6, stride=4, flip=True)
    with torch.no_grad():
        windows = [(y0, y0 + 6, x0, x0 + 6) for y0 in (0, 3) for x0 in (0, 4, 6)]
        manual = (_manual_slide(model, x, windows) + _manual_slide(model, x.flip(-1), windows).flip(-1)) / 2
    torch.testing.assert_close(slide, manual)


def test_infer_logits_batch_and_errors():
    model = Stub()
    x = torch.randn(3, 3, 10, 10)
    batched = infer_logits(model, x, (5, 5), mode="slide", crop_size=6, stride=4)
    assert batched.shape == (3, 4, 5, 5) and not batched.requires_grad
    torch.testing.assert_close(infer_logits(model, x, np.array([5, 5]), mode="slide", crop_size=6, stride=4), batched)
    for i in range(3):
        torch.testing.assert_close(infer_logits(model, x[i:i + 1], (5, 5), mode="slide", crop_size=6, stride=4),
                                   batched[i:i + 1])
    with pytest.raises(ValueError, match="mode"):
        infer_logits(model, x, None, mode="tiles")
    with pytest.raises(ValueError, match="stride"):
        infer_logits(model, x, None, mode="slide", crop_size=4, stride=6)
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        infer_logits(model, x[0], None)


def test_infer_tta():
    model = Asymmetric(num_classes=5)
    img = torch.from_numpy(rgb(20, 30)).permute(2, 0, 1)[None]
    probs = infer_tta(model, img, (20, 30), scales=(0.5, 1.0), flip=True, base_scale=(64, 32))
    assert probs.shape == (1, 5, 20, 30)
    torch.testing.assert_close(probs.sum(1), torch.ones(1, 20, 30))
    expected = 0
    for ratio in (0.5, 1.0):
        x = preprocess(img[0], (int(64 * ratio), int(32 * ratio)))
        expected = expected + infer_logits(model, x, (20, 30)).softmax(1)
        expected = expected + infer_logits(model, x.flip(-1), (20, 30)).softmax(1).flip(-1)
    torch.testing.assert_close(probs, expected / 4)
    single = infer_tta(model, Image.fromarray(rgb(20, 30)), None, scales=(1.0,), flip=False, base_scale=(64, 32))
    torch.testing.assert_close(single, infer_logits(model, preprocess(img[0], (64, 32)), (20, 30)).softmax(1))


# -- label maps ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("protocol", [TestProtocol(scale=(128, 64)), TestProtocol(scale=(128, 64), flip=True),
                                      TestProtocol(scale=(128, 64), mode="slide", crop_size=64, stride=48)])
def test_segment_input_equals_logits_argmax(ade_model, protocol):
    """Labels straight from the stride-8 logits, in bands, are the argmax of the resized logits."""
    x = preprocess(rgb(61, 97), protocol)
    labels, conf = segment_input(ade_model, x, (61, 97), protocol, confidence=True)
    if protocol.mode == "whole" and not protocol.flip:  # decoder logits -> input size -> original size
        with torch.no_grad():
            logits = F.interpolate(ade_model.decode(x), x.shape[-2:], mode="bilinear", align_corners=False)
        logits = F.interpolate(logits, (61, 97), mode="bilinear", align_corners=False)
    else:
        logits = infer_logits(ade_model, x, (61, 97), mode=protocol.mode, crop_size=protocol.crop_size,
                              stride=protocol.stride, flip=protocol.flip)
    np.testing.assert_array_equal(labels[0], logits.argmax(1)[0].numpy())
    assert conf.dtype == np.float32
    np.testing.assert_allclose(conf[0], logits.softmax(1).amax(1)[0].numpy(), rtol=0, atol=1e-5)


@pytest.mark.parametrize("mode,inputs", [("whole", [(64, 128)]), ("slide", [(64, 64)] * 2)])
def test_segmenter_odd_sizes(ade_model, mode, inputs):
    seg = Segmenter(ade_model, device="cpu", test_scale=(128, 64), mode=mode, crop_size=(64, 64), stride=(48, 48))
    shapes = []
    hook = ade_model.encoder.stages[0].downsample.register_forward_pre_hook(
        lambda m, args: shapes.append(tuple(args[0].shape[-2:])))
    try:
        label = seg(rgb(61, 97))
    finally:
        hook.remove()
    # whole: 61x97 -> 64x102 -> 64x128 (rounded up to multiples of 32); slide: 64x102 (no rounding), two windows
    assert shapes == inputs
    assert label.shape == (61, 97) and label.dtype == np.uint8 and label.max() < 150
    np.testing.assert_array_equal(label, seg.logits(rgb(61, 97)).argmax(1)[0].numpy())
    assert seg.classes == DATASET_INFO["ade20k"].classes and seg.palette == DATASET_INFO["ade20k"].palette


def test_segmenter_protocol_from_spec():
    model = Conv1x1(num_classes=19)
    model.spec = get_model_spec("edaformer-t-cityscapes")
    seg = Segmenter(model, device="cpu")
    p = seg.protocol
    assert (p.mode, p.scale, p.crop_size, p.stride, p.size_divisor) == \
        ("slide", (2048, 1024), (1024, 1024), (768, 768), None)
    assert seg.protocol == TestProtocol.from_spec(model.spec)
    assert seg.palette == DATASET_INFO["cityscapes"].palette
    model.calls.clear()
    label = seg(torch.from_numpy(rgb(61, 97)).permute(2, 0, 1))
    assert label.shape == (61, 97)
    assert model.calls == [(1, 3, 1024, 1024)] * 2  # fit to 1024 x 1628: two windows
    model.spec = get_model_spec(ADE)
    seg = Segmenter(model, device="cpu")
    assert (seg.protocol.mode, seg.protocol.scale, seg.protocol.size_divisor) == ("whole", (2048, 512), 32)
    assert not any(hasattr(seg, old) for old in ("mode", "test_scale", "crop_size", "stride", "divisor", "flip"))
    assert seg.palette == make_palette(19)  # 19 classes do not match ADE20K's 150


def test_segmenter_predict_batch(tmp_path):
    model = Stub(num_classes=3)
    seg = Segmenter(model, device="cpu", test_scale=(40, 20))
    Image.fromarray(rgb(15, 21, 2)).save(tmp_path / "a.png")
    images = [rgb(15, 21, 0), rgb(9, 30, 1), tmp_path / "a.png", rgb(15, 21, 3)]
    labels = seg.predict_batch(images, batch_size=2)
    assert [lab.shape for lab in labels] == [(15, 21), (9, 30), (15, 21), (15, 21)]
    for img, lab in zip(images, labels):
        np.testing.assert_array_equal(lab, seg(img))
    assert seg.palette == make_palette(3) and seg.classes == ("class_0", "class_1", "class_2")


def test_segmenter_tta_and_confidence():
    model = Asymmetric(num_classes=5)
    seg = Segmenter(model, device="cpu", protocol=TestProtocol(scale=(64, 32), tta_scales=(0.5, 1.0), flip=True))
    label, conf = seg.predict(rgb(20, 30), confidence=True)
    probs = infer_tta(model, rgb(20, 30), None, scales=(0.5, 1.0), flip=True, base_scale=(64, 32))
    np.testing.assert_array_equal(label, probs.argmax(1)[0].numpy())
    assert conf.dtype == np.float32
    np.testing.assert_array_equal(conf, probs.amax(1)[0].numpy())


def test_segmenter_device_errors():
    if torch.cuda.is_available():
        pytest.skip("CUDA is available")
    with pytest.raises(ValueError, match="CUDA"):
        Segmenter(Stub(), device="cuda")


def test_segmenter_from_checkpoint_meta(ade_model, tmp_path):
    classes = [f"thing{i}" for i in range(150)]
    palette = [[i, 255 - i, 7] for i in range(150)]
    path = edaformer.export_reference(ade_model, tmp_path / "ref.pth", meta={"CLASSES": classes, "PALETTE": palette})
    seg = Segmenter.from_checkpoint(ADE, path, device="cpu", isr="2211-222", test_scale=(96, 64))
    assert seg.classes == tuple(classes) and seg.palette == tuple(map(tuple, palette))
    assert str(seg.model.isr) == "2211-222"
    img = rgb(40, 50)
    with edaformer.isr(ade_model, "2211-222"):
        expected = Segmenter(ade_model, device="cpu", test_scale=(96, 64))(img)
    np.testing.assert_array_equal(seg(img), expected)


def test_segmenter_reads_the_protocol_from_checkpoint_meta(ade_model, tmp_path):
    """A checkpoint trained at another scale than the model spec's is run at that scale."""
    stored = TestProtocol(scale=(96, 64), divisor=32)
    path = edaformer.export_reference(ade_model, tmp_path / "ref.pth", meta={"test_protocol": stored.to_dict()})
    seg = Segmenter.from_checkpoint(ADE, path, device="cpu")
    assert seg.protocol == stored  # not the spec's (2048, 512)
    assert Segmenter.from_checkpoint(ADE, path, device="cpu", mode="slide").protocol.mode == "slide"
    assert Segmenter.from_checkpoint(ADE, path, device="cpu", test_scale=(64, 48)).protocol.scale == (64, 48)
    bad = edaformer.export_reference(ade_model, tmp_path / "bad.pth", meta={"test_protocol": {"mode": "tiles"}})
    with pytest.raises(ValueError, match="bad.pth.*test_protocol"):
        Segmenter.from_checkpoint(ADE, bad, device="cpu")


def test_from_checkpoint_uses_stored_isr_pool_and_architecture(tmp_path):
    from edaformer.checkpoint import save_checkpoint
    from edaformer.engine.state import checkpoint_payload

    torch.manual_seed(0)
    model = edaformer.create_model("edaformer-t-ade20k", num_classes=3, decoder_depths=(1, 2, 1))
    config = {"model": {"name": "edaformer-t-ade20k", "decoder_depths": [1, 2, 1], "decoder_op": None}}
    path = save_checkpoint(checkpoint_payload(model, {"isr": "2211-222", "isr_pool": "max"}, config=config),
                           tmp_path / "tuned.pth")
    seg = Segmenter.from_checkpoint("edaformer-t-ade20k", path, device="cpu")
    assert (str(seg.model.isr), seg.model.isr_pool) == ("2211-222", "max")
    assert tuple(seg.model.decoder_depths) == (1, 2, 1)
    explicit = Segmenter.from_checkpoint("edaformer-t-ade20k", path, device="cpu", isr="1111-222")
    assert (str(explicit.model.isr), explicit.model.isr_pool) == ("1111-222", "avg")   # an explicit --isr wins
    pooled = Segmenter.from_checkpoint("edaformer-t-ade20k", path, device="cpu", isr="1111-222", pool="overlap")
    assert pooled.model.isr_pool == "overlap"


def test_from_checkpoint_takes_the_model_name_the_checkpoint_stores(tmp_path):
    from edaformer.checkpoint import save_checkpoint

    torch.manual_seed(0)
    model = edaformer.create_model("edaformer-t-cityscapes", num_classes=3)
    named = save_checkpoint(model, tmp_path / "named.pth")
    seg = Segmenter.from_checkpoint(None, named, device="cpu")
    assert seg.model.name == "edaformer-t-cityscapes" and seg.protocol.mode == "slide"
    bare = save_checkpoint({"state_dict": model.state_dict()}, tmp_path / "bare.pth")
    with pytest.raises(ValueError, match=r"checkpoint .*bare.pth stores no model name; give one \(--model"):
        Segmenter.from_checkpoint(None, bare, device="cpu")


def test_segmenter_pretrained_uses_the_shipped_settings(tmp_path, monkeypatch):
    """Shipped weights: architecture from the stored config, protocol, classes, palette, ISR and pool."""
    from edaformer import pretrained
    from edaformer.checkpoint import save_checkpoint
    from edaformer.engine.state import checkpoint_payload

    torch.manual_seed(0)
    model = edaformer.create_model(ADE, num_classes=3, decoder_depths=(1, 2, 1))
    stored = TestProtocol(scale=(64, 48), divisor=32)
    meta = {"CLASSES": ["a", "b", "c"], "PALETTE": [[1, 2, 3], [4, 5, 6], [7, 8, 9]], "test_protocol": stored.to_dict()}
    config = {"model": {"name": ADE, "decoder_depths": [1, 2, 1]}}
    source = save_checkpoint(checkpoint_payload(model, meta, config=config), tmp_path / "run.pth")
    pretrained.package_weights(source, pretrained.DEFAULT_NAME, isr="2211-222", pool="max", out=tmp_path / "w")
    monkeypatch.setattr(pretrained, "weights_dir", lambda: tmp_path / "w")
    seg = Segmenter.pretrained(device="cpu")
    assert tuple(seg.model.decoder_depths) == (1, 2, 1)
    assert (str(seg.model.isr), seg.model.isr_pool) == ("2211-222", "max")
    assert seg.protocol == stored and seg.classes == ("a", "b", "c") and seg.palette[2] == (7, 8, 9)
    img = rgb(40, 50)
    np.testing.assert_array_equal(seg(img), Segmenter.from_checkpoint(None, pretrained.DEFAULT_NAME, device="cpu")(img))
    explicit = Segmenter.pretrained(pretrained.DEFAULT_NAME, device="cpu", isr="1111-222", test_scale=(96, 64))
    assert (str(explicit.model.isr), explicit.model.isr_pool) == ("1111-222", "avg")  # an explicit isr wins
    assert explicit.protocol.scale == (96, 64)
    with pytest.raises(pretrained.UnknownPretrainedError, match=rf"available: {pretrained.DEFAULT_NAME}$"):
        Segmenter.pretrained("edaformer-b-camvid")
