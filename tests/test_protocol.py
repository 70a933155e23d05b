"""The test protocol object, test-time sizes, image loading and the one preprocessing function."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image

from edaformer.config import validate_config
from edaformer.data import build_dataset
from edaformer.data.transforms import MEAN, STD
from edaformer.inference import TestProtocol, load_image, preprocess, protocol_size
from edaformer.models import get_model_spec

from tests.helpers.stubs import ADE, rgb


# -- protocol_size ----------------------------------------------------------------------------------
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
    ((61, 97), None, 32, (64, 128)),               # no box: only the rounding
])
def test_test_size(hw, scale, divisor, expected):
    assert protocol_size(*hw, scale=scale, divisor=divisor) == expected


def test_test_size_errors():
    with pytest.raises(ValueError):
        protocol_size(0, 10)
    with pytest.raises(ValueError):
        protocol_size(10, 10, scale=(0, 10))


# -- the protocol object ----------------------------------------------------------------------------
def test_protocol_from_spec_and_dict_roundtrip():
    city = TestProtocol.from_spec(get_model_spec("edaformer-t-cityscapes"))
    assert (city.scale, city.mode, city.crop_size, city.stride, city.size_divisor) == \
        ((2048, 1024), "slide", (1024, 1024), (768, 768), None)
    ade = TestProtocol.from_spec(get_model_spec(ADE))
    assert (ade.scale, ade.mode, ade.size_divisor, ade.tta_scales, ade.flip) == ((2048, 512), "whole", 32, (), False)
    assert TestProtocol.from_spec(None) == TestProtocol()
    for p in (city, ade, TestProtocol(scale=None, tta_scales=(0.5, 1.0), flip=True)):
        assert TestProtocol.from_dict(p.to_dict()) == p
    assert ade.input_size(375, 500) == (512, 704) and city.input_size(360, 480) == (1024, 1365)


def _config(**data):
    return validate_config({"model": {"name": ADE}, "data": {"type": "folder", "root": "/x", **data},
                            "schedule": {"iters": 1}})


def test_protocol_from_config():
    p = TestProtocol.from_config(_config(scale=[480, 360], crop_size=[96, 96]))
    assert (p.scale, p.size_divisor, p.mode, p.crop_size, p.stride) == ((480, 360), 32, "whole", (96, 96), (64, 64))
    p = TestProtocol.from_config(_config(scale=[480, 360], test_scale=[200, 100], size_divisor=16))
    assert (p.scale, p.size_divisor) == ((200, 100), 16)
    cfg = _config()
    cfg["eval"].update(mode="slide", crop_size=[64, 64], stride=[40, 40], tta=True, tta_scales=[1.0, 1.5])
    p = TestProtocol.from_config(cfg)
    assert (p.scale, p.mode, p.crop_size, p.stride, p.size_divisor, p.tta_scales, p.flip) == \
        ((2048, 512), "slide", (64, 64), (40, 40), None, (1.0, 1.5), True)
    city = validate_config({"model": {"name": ADE}, "data": {"type": "cityscapes", "root": "/x"},
                            "schedule": {"iters": 1}})
    p = TestProtocol.from_config(city)
    assert (p.scale, p.divisor) == ((2048, 1024), None)  # the dataset type's defaults


def test_protocol_precedence():
    class Model:
        spec = get_model_spec(ADE)

    stored = {"test_protocol": TestProtocol(scale=(480, 360)).to_dict()}
    assert TestProtocol.resolve(Model()).scale == (2048, 512)                      # model spec
    assert TestProtocol.resolve(Model(), stored).scale == (480, 360)               # checkpoint meta
    explicit = TestProtocol.resolve(Model(), stored, scale=(96, 64), mode="slide")  # explicit argument
    assert (explicit.scale, explicit.mode, explicit.size_divisor) == ((96, 64), "slide", None)
    city = {"test_protocol": TestProtocol.from_spec(get_model_spec("edaformer-t-cityscapes")).to_dict()}
    assert TestProtocol.resolve(Model(), city, mode="whole").size_divisor == 32   # whole mode rounds


@pytest.mark.parametrize("kwargs,match", [
    (dict(mode="tiles"), "mode"), (dict(scale=(0, 5)), "scale"), (dict(crop_size=8, stride=9), "stride"),
    (dict(divisor=0), "divisor"), (dict(tta_scales=(0.0,)), "tta_scales"),
])
def test_protocol_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TestProtocol(**kwargs)
    with pytest.raises(ValueError, match="unknown test protocol key"):
        TestProtocol.from_dict({"scales": [1, 2]})


def test_protocol_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        TestProtocol().mode = "slide"


# -- loading and preprocessing ---------------------------------------------------------------------
def _roundtrip(tmp_path, img: Image.Image, name: str) -> Image.Image:
    path = tmp_path / name
    img.save(path)
    return load_image(path)


def test_load_image_converts_modes(tmp_path):
    gray = _roundtrip(tmp_path, Image.fromarray(np.full((4, 5), 77, np.uint8), mode="L"), "gray.png")
    assert gray.mode == "RGB" and gray.size == (5, 4) and np.all(np.asarray(gray) == 77)

    rgba = np.dstack([rgb(4, 5), np.full((4, 5), 10, np.uint8)])
    img = _roundtrip(tmp_path, Image.fromarray(rgba, mode="RGBA"), "rgba.png")
    assert img.mode == "RGB" and np.array_equal(np.asarray(img), rgba[..., :3])

    pal = Image.fromarray(np.array([[0, 1], [1, 0]], np.uint8), mode="L").convert("P")
    pal.putpalette([10, 20, 30, 200, 100, 50] + [0] * 762)
    img = _roundtrip(tmp_path, pal, "pal.png")
    assert img.mode == "RGB" and tuple(np.asarray(img)[0, 1]) == (200, 100, 50)

    deep = Image.fromarray(np.array([[0, 25700], [65535, 257]], np.uint16))
    img = _roundtrip(tmp_path, deep, "deep.png")
    assert img.mode == "RGB" and np.array_equal(np.asarray(img)[..., 0], [[0, 100], [255, 1]])


def test_load_image_applies_exif_orientation(tmp_path):
    arr = rgb(4, 6)
    exif = Image.Exif()
    exif[0x0112] = 6  # stored pixels must be turned 90 degrees clockwise to be upright
    Image.fromarray(arr).save(tmp_path / "rotated.jpg", exif=exif, quality=100, subsampling=0)
    img = load_image(tmp_path / "rotated.jpg")
    assert img.size == (4, 6)  # 6 rows x 4 columns once upright
    stored = np.asarray(Image.open(tmp_path / "rotated.jpg").convert("RGB"))
    np.testing.assert_array_equal(np.asarray(img), np.rot90(stored, k=-1))


def test_load_image_errors(tmp_path):
    with pytest.raises(ValueError, match="missing.png"):
        load_image(tmp_path / "missing.png")
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not an image")
    with pytest.raises(ValueError, match="broken.jpg"):
        load_image(bad)
    trunc = tmp_path / "trunc.png"
    Image.fromarray(rgb(32, 32)).save(trunc)
    trunc.write_bytes(trunc.read_bytes()[:60])
    with pytest.raises(ValueError, match="trunc.png"):
        load_image(trunc)


def test_preprocess_inputs_agree():
    arr = rgb(20, 30)
    ref = preprocess(arr, scale=None)
    assert ref.shape == (1, 3, 20, 30) and ref.dtype == torch.float32
    expected = (torch.from_numpy(arr).permute(2, 0, 1).float() - torch.tensor(MEAN).view(3, 1, 1)) \
        / torch.tensor(STD).view(3, 1, 1)
    torch.testing.assert_close(ref[0], expected)
    torch.testing.assert_close(preprocess(Image.fromarray(arr), None), ref)
    tensor = torch.from_numpy(arr).permute(2, 0, 1)
    torch.testing.assert_close(preprocess(tensor, None), ref)
    # floating-point images hold 0-1, as torchvision's do (to_dtype(..., scale=True))
    torch.testing.assert_close(preprocess(tensor.double() / 255, None), ref)
    torch.testing.assert_close(preprocess(arr.astype(np.float32) / 255, None), ref)
    with pytest.raises(ValueError, match=r"values in \[0, 1\] \(torchvision's convention\); this one spans \[.*, 2"):
        preprocess(tensor.float(), None)
    gray = Image.fromarray(arr[..., 0], mode="L")
    torch.testing.assert_close(preprocess(gray, None), preprocess(np.repeat(arr[..., :1], 3, 2), None))
    # gray and RGBA arrays / tensors load as the same content from a file would
    torch.testing.assert_close(preprocess(arr[..., 0], None), preprocess(gray, None))
    rgba = np.concatenate([arr, np.full_like(arr[..., :1], 7)], axis=2)
    torch.testing.assert_close(preprocess(rgba, None), ref)
    torch.testing.assert_close(preprocess(torch.from_numpy(rgba).permute(2, 0, 1), None), ref)
    torch.testing.assert_close(preprocess(torch.from_numpy(arr[..., 0]), None), preprocess(gray, None))
    with pytest.raises(ValueError, match=r"expected an HxW gray, HxWx3 RGB or HxWx4 RGBA array, got shape \(20, 30, 2\)"):
        preprocess(arr[..., :2], None)


def test_preprocess_resizes_twice_with_rounding():
    x = preprocess(rgb(61, 97), scale=(2048, 512))
    assert x.shape == (1, 3, 512, 832)
    assert preprocess(rgb(61, 97), scale=(128, 64), divisor=None).shape == (1, 3, 64, 102)
    assert preprocess(rgb(61, 97), TestProtocol(scale=(128, 64), mode="slide")).shape == (1, 3, 64, 102)
    # reference: fit the box, round to whole values, then align the sides to 32, round again
    img = torch.from_numpy(rgb(61, 97)).permute(2, 0, 1)[None].float()
    step = torch.nn.functional.interpolate(img, (64, 102), mode="bilinear", align_corners=False).round()
    step = torch.nn.functional.interpolate(step, (64, 128), mode="bilinear", align_corners=False).round()
    expected = (step - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    torch.testing.assert_close(preprocess(rgb(61, 97), (128, 64)), expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("bad,match", [
    (np.zeros((8, 8, 5), np.uint8), "HxWx3"),
    (np.zeros((8, 8, 3), np.int32), "uint8 or floating"),
    (torch.zeros(2, 8, 8), r"\(3, H, W\)"),
    (torch.zeros(1, 3, 8, 8), r"\(3, H, W\)"),
    (torch.zeros(3, 8, 8, dtype=torch.int64), "uint8 or floating"),
    ([[1, 2, 3]], "unsupported image type"),
])
def test_preprocess_errors(bad, match):
    with pytest.raises(ValueError, match=match):
        preprocess(bad, scale=None)


@pytest.mark.parametrize("scale,divisor", [((2048, 512), 32), ((120, 90), 32), ((120, 90), 1)])
def test_dataset_test_pipeline_equals_preprocess(tmp_path, scale, divisor):
    """Evaluation's dataset items and prediction's inputs come from the same function: equal bit for bit."""
    for split in ("train", "val"):
        (tmp_path / "images" / split).mkdir(parents=True, exist_ok=True)
        (tmp_path / "annotations" / split).mkdir(parents=True, exist_ok=True)
        Image.fromarray(rgb(61, 97)).save(tmp_path / "images" / split / "a.png")
        Image.fromarray(np.zeros((61, 97), np.uint8)).save(tmp_path / "annotations" / split / "a.png")
    ds = build_dataset(dict(type="folder", root=str(tmp_path), classes=["x", "y"], img_suffix=".png", scale=scale,
                            size_divisor=divisor), "val")
    image, label = ds[0]
    assert tuple(image.shape[-2:]) == protocol_size(61, 97, scale, divisor)
    assert tuple(label.shape) == (61, 97)
    assert torch.equal(image[None], preprocess(tmp_path / "images" / "val" / "a.png", scale, divisor))


def test_large_image_is_resized_in_bands(monkeypatch):
    """Above the band size a uint8 image is resized a band of rows at a time: the same input up
    to the rounding of exact ties."""
    from edaformer.data import transforms

    img = torch.from_numpy(rgb(300, 410, seed=5)).permute(2, 0, 1)
    plain = preprocess(img, (128, 96))
    monkeypatch.setattr(transforms, "_BAND_BYTES", 20_000)
    banded = preprocess(img, (128, 96))
    assert banded.shape == plain.shape == (1, 3, 96, 128)  # 300x410 fits (128, 96) as 94x128
    step = float(torch.tensor(STD).min())
    diff = (banded - plain).abs()
    assert diff.max() <= 1.01 / step and (diff > 0).float().mean() < 1e-3


def test_resolve_names_the_checkpoint_of_a_malformed_stored_protocol():
    with pytest.raises(ValueError, match=r"^run/best\.pth: invalid meta\['test_protocol'\]"):
        TestProtocol.resolve(None, {"test_protocol": {"mode": "sideways"}}, source="run/best.pth")
