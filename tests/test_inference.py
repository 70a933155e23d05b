"""Inference: palettes, test-time resize, whole / slide / flip / multi-scale inference,
the Segmenter API and the ``predict`` command."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

import edaformer
from edaformer import cli
from edaformer.inference import (MEAN, STD, Segmenter, colorize, infer_logits, infer_tta, load_image, overlay,
                                 preprocess, test_size)
from edaformer.models import MODEL_SPECS, get_model_spec
from edaformer.data.palettes import DATASET_INFO, DatasetInfo, get_dataset_info, make_palette

ADE = "edaformer-t-ade20k"


# -- helpers ----------------------------------------------------------------------------------
class Stub(nn.Module):
    """Logits at the input size that depend on the window contents (1x1 conv + window mean)."""

    def __init__(self, num_classes: int = 4, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.conv = nn.Conv2d(3, num_classes, 1)
        self.num_classes = num_classes
        self.calls: list[tuple[int, ...]] = []

    def forward(self, x):
        self.calls.append(tuple(x.shape))
        return self.conv(x) + x.mean((1, 2, 3)).view(-1, 1, 1, 1)


class Conv1x1(Stub):
    """A flip- and translation-equivariant stub: a plain 1x1 conv."""

    def forward(self, x):
        self.calls.append(tuple(x.shape))
        return self.conv(x)


class Asymmetric(Stub):
    """Output depends on the column position, so it is not flip-equivariant."""

    def forward(self, x):
        ramp = torch.linspace(0, 1, x.shape[-1], dtype=x.dtype, device=x.device)
        return self.conv(x) + ramp


def _rgb(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def ade_model():
    torch.manual_seed(0)
    return edaformer.create_model(ADE).eval()


@pytest.fixture(scope="module")
def ade_checkpoint(ade_model, tmp_path_factory):
    return edaformer.save_checkpoint(ade_model, tmp_path_factory.mktemp("ckpt") / "t_ade.pth")


# -- palettes ---------------------------------------------------------------------------------
@pytest.mark.parametrize("name,n", [("ade20k", 150), ("cityscapes", 19), ("cocostuff", 171), ("camvid", 11)])
def test_dataset_info_sizes(name, n):
    info = get_dataset_info(name)
    assert isinstance(info, DatasetInfo)
    assert len(info.classes) == len(info.palette) == n
    assert all(len(c) == 3 and all(0 <= v <= 255 for v in c) for c in info.palette)
    assert len(set(info.classes)) == n


def test_dataset_info_values():
    assert DATASET_INFO["cityscapes"].classes[0] == "road"
    assert DATASET_INFO["cityscapes"].palette[0] == (128, 64, 128)
    assert DATASET_INFO["ade20k"].classes[:3] == ("wall", "building", "sky")
    assert DATASET_INFO["ade20k"].palette[0] == (120, 120, 120)
    assert DATASET_INFO["cocostuff"].classes[0] == "person" and DATASET_INFO["cocostuff"].classes[-1] == "wood"
    assert DATASET_INFO["camvid"].classes == ("Sky", "Building", "Pole", "Road", "Pavement", "Tree", "SignSymbol",
                                              "Fence", "Car", "Pedestrian", "Bicyclist")
    for spec in MODEL_SPECS.values():  # every model's dataset is known, with its class count
        assert len(get_dataset_info(spec.dataset).classes) == spec.num_classes


def test_dataset_info_unknown_and_frozen():
    with pytest.raises(ValueError, match="unknown dataset 'voc'"):
        get_dataset_info("voc")
    with pytest.raises(dataclasses.FrozenInstanceError):
        DATASET_INFO["camvid"].classes = ()


def test_make_palette():
    pal = make_palette(300)
    assert len(pal) == 300 and len(set(pal)) == 300
    assert pal == make_palette(300) and pal[:5] == make_palette(5)
    assert make_palette(0) == ()
    with pytest.raises(ValueError):
        make_palette(-1)


# -- test_size ----------------------------------------------------------------------------------
@pytest.mark.parametrize("hw,scale,divisor,expected", [
    ((512, 683), (2048, 512), 32, (512, 704)),     # 683 / 32 = 21.3 -> rounded up to 22 * 32
    ((375, 500), (2048, 512), 32, (512, 704)),     # rescaled to 512 x 683 first
    ((61, 97), (2048, 512), 32, (512, 832)),       # 97 * 512 / 61 = 814.2 -> 814 -> 832
    ((100, 1000), (2048, 512), 32, (224, 2048)),   # long side limits: 205 x 2048 -> 224 x 2048
    ((48, 48), (48, 48), 32, (64, 64)),
    ((10, 10), (10, 10), 32, (32, 32)),            # at least one divisor
    ((1024, 2048), (2048, 1024), 32, (1024, 2048)),
    ((360, 480), (2048, 1024), None, (1024, 1365)),  # no rounding: 480 * 1024 / 360 = 1365.3
    ((512, 683), (512, 2048), 32, (512, 704)),     # the box is (long, short) in any order
])
def test_test_size(hw, scale, divisor, expected):
    assert test_size(*hw, scale=scale, divisor=divisor) == expected


def test_test_size_errors():
    with pytest.raises(ValueError):
        test_size(0, 10)
    with pytest.raises(ValueError):
        test_size(10, 10, scale=(0, 10))


# -- loading and preprocessing ---------------------------------------------------------------------
def _roundtrip(tmp_path, img: Image.Image, name: str) -> Image.Image:
    path = tmp_path / name
    img.save(path)
    return load_image(path)


def test_load_image_converts_modes(tmp_path):
    gray = _roundtrip(tmp_path, Image.fromarray(np.full((4, 5), 77, np.uint8), mode="L"), "gray.png")
    assert gray.mode == "RGB" and gray.size == (5, 4) and np.all(np.asarray(gray) == 77)

    rgba = np.dstack([_rgb(4, 5), np.full((4, 5), 10, np.uint8)])
    img = _roundtrip(tmp_path, Image.fromarray(rgba, mode="RGBA"), "rgba.png")
    assert img.mode == "RGB" and np.array_equal(np.asarray(img), rgba[..., :3])

    pal = Image.fromarray(np.array([[0, 1], [1, 0]], np.uint8), mode="L").convert("P")
    pal.putpalette([10, 20, 30, 200, 100, 50] + [0] * 762)
    img = _roundtrip(tmp_path, pal, "pal.png")
    assert img.mode == "RGB" and tuple(np.asarray(img)[0, 1]) == (200, 100, 50)

    deep = Image.fromarray(np.array([[0, 25700], [65535, 257]], np.uint16))
    img = _roundtrip(tmp_path, deep, "deep.png")
    assert img.mode == "RGB" and np.array_equal(np.asarray(img)[..., 0], [[0, 100], [255, 1]])


def test_load_image_errors(tmp_path):
    with pytest.raises(ValueError, match="missing.png"):
        load_image(tmp_path / "missing.png")
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not an image")
    with pytest.raises(ValueError, match="broken.jpg"):
        load_image(bad)
    trunc = tmp_path / "trunc.png"
    Image.fromarray(_rgb(32, 32)).save(trunc)
    trunc.write_bytes(trunc.read_bytes()[:60])
    with pytest.raises(ValueError, match="trunc.png"):
        load_image(trunc)


def test_preprocess_inputs_agree():
    arr = _rgb(20, 30)
    ref = preprocess(arr, scale=None)
    assert ref.shape == (1, 3, 20, 30) and ref.dtype == torch.float32
    expected = (torch.from_numpy(arr).permute(2, 0, 1).float() - torch.tensor(MEAN).view(3, 1, 1)) \
        / torch.tensor(STD).view(3, 1, 1)
    torch.testing.assert_close(ref[0], expected)
    torch.testing.assert_close(preprocess(Image.fromarray(arr), None), ref)
    tensor = torch.from_numpy(arr).permute(2, 0, 1)
    torch.testing.assert_close(preprocess(tensor, None), ref)
    torch.testing.assert_close(preprocess(tensor.double(), None), ref)
    gray = Image.fromarray(arr[..., 0], mode="L")
    torch.testing.assert_close(preprocess(gray, None), preprocess(np.repeat(arr[..., :1], 3, 2), None))


def test_preprocess_resizes():
    x = preprocess(_rgb(61, 97), scale=(2048, 512))
    assert x.shape == (1, 3, 512, 832)
    x = preprocess(_rgb(61, 97), scale=(128, 64), divisor=None)
    assert x.shape == (1, 3, 64, 102)


@pytest.mark.parametrize("bad,match", [
    (np.zeros((8, 8, 4), np.uint8), "HxWx3"),
    (np.zeros((8, 8), np.uint8), "HxWx3"),
    (np.zeros((8, 8, 3), np.float32), "uint8"),
    (torch.zeros(4, 8, 8), r"\(3, H, W\)"),
    (torch.zeros(1, 3, 8, 8), r"\(3, H, W\)"),
    (torch.zeros(3, 8, 8, dtype=torch.int64), "uint8 or floating"),
    ([[1, 2, 3]], "unsupported image type"),
])
def test_preprocess_errors(bad, match):
    with pytest.raises(ValueError, match=match):
        preprocess(bad, scale=None)


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
    # resized to out_size afterwards
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
    img = torch.from_numpy(_rgb(20, 30)).permute(2, 0, 1)[None]
    probs = infer_tta(model, img, (20, 30), scales=(0.5, 1.0), flip=True, base_scale=(64, 32))
    assert probs.shape == (1, 5, 20, 30)
    torch.testing.assert_close(probs.sum(1), torch.ones(1, 20, 30))
    expected = 0
    for ratio in (0.5, 1.0):
        x = preprocess(img[0], (int(64 * ratio), int(32 * ratio)))
        expected = expected + infer_logits(model, x, (20, 30)).softmax(1)
        expected = expected + infer_logits(model, x.flip(-1), (20, 30)).softmax(1).flip(-1)
    torch.testing.assert_close(probs, expected / 4)
    single = infer_tta(model, Image.fromarray(_rgb(20, 30)), None, scales=(1.0,), flip=False, base_scale=(64, 32))
    torch.testing.assert_close(single, infer_logits(model, preprocess(img[0], (64, 32)), (20, 30)).softmax(1))


# -- Segmenter -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode,inputs", [("whole", [(64, 128)]), ("slide", [(64, 64)] * 2)])
def test_segmenter_odd_sizes(ade_model, mode, inputs):
    seg = Segmenter(ade_model, device="cpu", test_scale=(128, 64), mode=mode, crop_size=(64, 64), stride=(48, 48))
    shapes = []
    hook = ade_model.register_forward_pre_hook(lambda m, args: shapes.append(tuple(args[0].shape[-2:])))
    try:
        logits = seg.logits(_rgb(61, 97))
    finally:
        hook.remove()
    # whole: 61x97 -> 64x102 -> 64x128 (rounded up to multiples of 32); slide: 64x102 (no rounding), two 64x64 windows
    assert shapes == inputs
    assert logits.shape == (1, 150, 61, 97)
    label = seg._labels(logits)[0]
    assert label.shape == (61, 97) and label.dtype == np.uint8 and label.max() < 150
    assert seg.classes == DATASET_INFO["ade20k"].classes and seg.palette == DATASET_INFO["ade20k"].palette


def test_segmenter_protocol_from_spec():
    model = Conv1x1(num_classes=19)
    model.spec = get_model_spec("edaformer-t-cityscapes")
    seg = Segmenter(model, device="cpu")
    assert (seg.mode, seg.test_scale, seg.crop_size, seg.stride, seg.divisor) == \
        ("slide", (2048, 1024), (1024, 1024), (768, 768), None)
    assert seg.palette == DATASET_INFO["cityscapes"].palette
    model.calls.clear()
    label = seg(torch.from_numpy(_rgb(61, 97)).permute(2, 0, 1))
    assert label.shape == (61, 97)
    assert model.calls == [(1, 3, 1024, 1024)] * 2  # fit to 1024 x 1628: two windows
    model.spec = get_model_spec(ADE)
    seg = Segmenter(model, device="cpu")
    assert (seg.mode, seg.test_scale, seg.divisor) == ("whole", (2048, 512), 32)
    assert seg.palette == make_palette(19)  # 19 classes do not match ADE20K's 150


def test_segmenter_predict_batch(tmp_path):
    model = Stub(num_classes=3)
    seg = Segmenter(model, device="cpu", test_scale=(40, 20))
    Image.fromarray(_rgb(15, 21, 2)).save(tmp_path / "a.png")
    images = [_rgb(15, 21, 0), _rgb(9, 30, 1), tmp_path / "a.png", _rgb(15, 21, 3)]
    labels = seg.predict_batch(images, batch_size=2)
    assert [lab.shape for lab in labels] == [(15, 21), (9, 30), (15, 21), (15, 21)]
    for img, lab in zip(images, labels):
        np.testing.assert_array_equal(lab, seg(img))
    assert seg.palette == make_palette(3) and seg.classes == ("class_0", "class_1", "class_2")


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
    img = _rgb(40, 50)
    with edaformer.isr(ade_model, "2211-222"):
        expected = Segmenter(ade_model, device="cpu", test_scale=(96, 64))(img)
    np.testing.assert_array_equal(seg(img), expected)


def test_colorize_and_overlay():
    label = np.array([[0, 1], [2, 255]], np.uint8)
    pal = [(255, 0, 0), (0, 255, 0), (0, 0, 255)]
    img = colorize(label, pal)
    assert img.mode == "P" and np.array_equal(np.asarray(img), label)
    assert img.getpalette()[:9] == [255, 0, 0, 0, 255, 0, 0, 0, 255]
    assert np.array_equal(np.asarray(img.convert("RGB"))[1, 1], [0, 0, 0])
    base = np.full((2, 2, 3), 100, np.uint8)
    out = np.asarray(overlay(base, label, pal, alpha=0.5))
    assert out[0, 0].tolist() == [178, 50, 50] and out[1, 1].tolist() == [100, 100, 100]
    with pytest.raises(ValueError, match="sizes differ"):
        overlay(base, np.zeros((3, 3), np.uint8), pal)


# -- predict command -------------------------------------------------------------------------------------
@pytest.fixture
def small_ade_spec(monkeypatch):
    """Make the ADE20K model's test scale small so that the command runs fast."""
    monkeypatch.setitem(MODEL_SPECS, ADE, dataclasses.replace(MODEL_SPECS[ADE], test_scale=(96, 64)))


def test_predict_command(ade_model, ade_checkpoint, small_ade_spec, tmp_path, capsys):
    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.fromarray(_rgb(61, 97, 1)).save(folder / "street.png")
    Image.fromarray(_rgb(40, 33, 2)[..., 0], mode="L").save(folder / "gray.jpg")
    (folder / "notes.txt").write_text("not an image")
    (folder / "broken.png").write_bytes(b"\x89PNG garbage")
    single = tmp_path / "single.bmp"
    Image.fromarray(_rgb(20, 31, 3)).save(single)
    out = tmp_path / "out"

    rc = cli.main(["predict", str(folder), str(single), "--model", ADE, "--checkpoint", str(ade_checkpoint),
                   "--out", str(out), "--device", "cpu"])
    err = capsys.readouterr().err
    assert rc == 1
    assert "broken.png" in err
    assert sorted(p.name for p in out.iterdir()) == sorted(
        f"{s}_{k}.png" for s in ("street", "gray", "single") for k in ("label", "overlay"))

    seg = Segmenter(ade_model, device="cpu", test_scale=(96, 64))
    ade_palette = [v for c in DATASET_INFO["ade20k"].palette for v in c]
    for stem, src, size in (("street", folder / "street.png", (97, 61)), ("gray", folder / "gray.jpg", (33, 40)),
                            ("single", single, (31, 20))):
        label = Image.open(out / f"{stem}_label.png")
        assert label.mode == "P" and label.size == size
        assert label.getpalette()[:450] == ade_palette
        np.testing.assert_array_equal(np.asarray(label), seg(load_image(src)))
        over = Image.open(out / f"{stem}_overlay.png")
        assert over.mode == "RGB" and over.size == size


def test_predict_command_all_good(ade_checkpoint, small_ade_spec, tmp_path):
    img = tmp_path / "a.jpeg"
    Image.fromarray(_rgb(30, 40)).save(img)
    rc = cli.main(["predict", str(img), "--model", ADE, "--checkpoint", str(ade_checkpoint),
                   "--out", str(tmp_path / "o"), "--isr", "2211-222"])
    assert rc == 0 and (tmp_path / "o" / "a_label.png").is_file() and (tmp_path / "o" / "a_overlay.png").is_file()


def test_predict_command_errors(tmp_path, capsys):
    img = tmp_path / "a.png"
    Image.fromarray(_rgb(8, 8)).save(img)
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    args = ["predict", str(img), "--model", ADE, "--out", str(tmp_path / "o")]
    assert cli.main(args + ["--checkpoint", str(bad)]) == 2
    assert "bad.pth" in capsys.readouterr().err
    assert cli.main(args + ["--checkpoint", str(tmp_path / "missing.pth")]) == 2
    assert "missing.pth" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert cli.main(["predict", str(tmp_path / "empty"), "--model", ADE, "--checkpoint", str(bad),
                     "--out", str(tmp_path / "o")]) == 2
    assert "no images" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert cli.main(args + ["--checkpoint", str(bad), "--device", "cuda"]) == 2
        assert "CUDA" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_eval_pipeline_and_inference_agree_on_test_size(tmp_path):
    from edaformer.data import build_dataset
    for split in ("train", "val"):
        (tmp_path / "images" / split).mkdir(parents=True)
        (tmp_path / "annotations" / split).mkdir(parents=True)
        Image.fromarray(_rgb(61, 97)).save(tmp_path / "images" / split / "a.jpg")
        Image.fromarray(np.zeros((61, 97), np.uint8)).save(tmp_path / "annotations" / split / "a.png")
    ds = build_dataset(dict(type="folder", root=str(tmp_path), classes=["x", "y"], scale=(2048, 512)), "val")
    image, label = ds[0]
    assert tuple(image.shape[-2:]) == test_size(61, 97, (2048, 512)) == (512, 832)
    assert tuple(label.shape) == (61, 97)
    torch.testing.assert_close(image[None], preprocess(tmp_path / "images" / "val" / "a.jpg", (2048, 512)),
                               atol=2e-2, rtol=0)
