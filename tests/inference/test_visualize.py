"""Palette PNGs, overlays, legends and confidence images."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from edaformer.inference import add_legend, colorize, confidence_image, overlay


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
    with pytest.raises(ValueError, match="alpha"):
        overlay(base, label, pal, alpha=2)


def test_overlay_in_bands_equals_the_whole(monkeypatch):
    from edaformer.inference import visualize

    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (37, 23, 3), dtype=np.uint8)
    label = rng.integers(0, 6, (37, 23)).astype(np.uint8)
    pal = [tuple(int(v) for v in rng.integers(0, 256, 3)) for _ in range(5)]  # id 5 has no colour
    whole = np.asarray(overlay(image, label, pal, alpha=0.3))
    monkeypatch.setattr(visualize, "_OVERLAY_BAND_PIXELS", 50)
    np.testing.assert_array_equal(np.asarray(overlay(image, label, pal, alpha=0.3)), whole)
    expected = image.astype(np.float64)
    known = label < 5
    expected[known] = 0.7 * expected[known] + 0.3 * np.asarray(pal, np.float64)[label[known]]
    assert np.abs(whole.astype(np.float64) - expected).max() <= 0.5 + 1e-6


def test_legend_lists_the_classes_present():
    label = np.array([[0, 0, 2], [0, 2, 2], [0, 0, 0]], np.uint8)
    image = Image.new("RGB", (3, 3), (9, 9, 9))
    out = add_legend(image, label, ["road", "sky", "car"], [(255, 0, 0), (0, 255, 0), (0, 0, 255)])
    assert out.height >= 2 * 12 and out.width > 3
    arr = np.asarray(out)
    assert (arr[:3, :3] == 9).all()                        # the image itself is unchanged
    assert ((arr == [255, 0, 0]).all(-1)).any() and ((arr == [0, 0, 255]).all(-1)).any()
    assert not ((arr == [0, 255, 0]).all(-1)).any()         # "sky" is absent


def test_confidence_image():
    conf = np.array([[0, 128], [255, 7]], np.uint8)
    img = confidence_image(conf)
    assert img.mode == "L" and np.array_equal(np.asarray(img), conf)
    probs = np.array([[0.0, 0.5], [1.0, 0.0275]], np.float32)  # probabilities are written as round(255 p)
    assert np.array_equal(np.asarray(confidence_image(probs)), conf)
    with pytest.raises(ValueError, match=r"probabilities in \[0, 1\], got 0 to 255"):
        confidence_image(conf.astype(np.float32))
    with pytest.raises(ValueError, match="float, 0-1"):
        confidence_image(conf.astype(np.int32))
