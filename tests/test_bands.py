"""Banded resize + argmax: equal to ``F.interpolate`` then ``argmax``, without the full logits."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from edaformer import bands
from edaformer.bands import labels_from_logits, resized_rows


def _reference(x: torch.Tensor, sizes) -> torch.Tensor:
    for size in sizes:
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
    return x


CASES = [
    ((8, 11), [(61, 97)]),                 # odd, neither ratio a power of two
    ((13, 17), [(5, 7)]),                  # downscale
    ((8, 11), [(64, 88), (61, 97)]),       # stride-8 logits -> test size -> original size
    ((7, 9), [(56, 72), (601, 53)]),       # tall output, narrow width
    ((16, 16), [(128, 128)]),              # 8x: the exact slice path
    ((5, 5), [(5, 9)]),                    # height unchanged
    ((3, 4), [(12, 4), (13, 3)]),
    ((64, 88), [(512, 704), (300, 400)]),  # an image smaller than the box: test size -> smaller original
]


@pytest.mark.parametrize("in_hw,sizes", CASES)
@pytest.mark.parametrize("band_bytes", [1, 3000, 1 << 30])
def test_banded_equals_interpolate_then_argmax(in_hw, sizes, band_bytes):
    g = torch.Generator().manual_seed(hash((in_hw, len(sizes))) % 2**31)
    x = torch.randn(2, 7, *in_hw, generator=g)
    ref = _reference(x, sizes)
    labels, conf = labels_from_logits(x, sizes, confidence=True, band_bytes=band_bytes)
    assert labels.dtype == np.uint8 and labels.shape == (2, *sizes[-1])
    np.testing.assert_array_equal(labels, ref.argmax(1).numpy())
    assert conf.dtype == np.float32 and conf.shape == labels.shape
    np.testing.assert_allclose(conf, ref.softmax(1).amax(1).numpy(), rtol=0, atol=1e-5)
    # the logits of every band are those of the whole resize (bit for bit for power-of-two ratios)
    h = sizes[-1][0]
    exact = all(bands._power_of_two_ratio(a[0], s[0]) for a, s in zip([in_hw] + sizes, sizes))
    for r0, r1 in ((0, 1), (h // 3, h // 3 + 5), (h - 2, h)):
        rows, expected = resized_rows(x, sizes, r0, min(r1, h)), ref[..., r0:min(r1, h), :]
        if exact:
            assert torch.equal(rows, expected)
        else:
            torch.testing.assert_close(rows, expected, rtol=0, atol=1e-6)


def test_band_does_not_touch_the_logits():
    x = torch.randn(1, 5, 16, 16)
    before = x.clone()
    labels_from_logits(x, [(16, 16)], confidence=True, band_bytes=1)
    assert torch.equal(x, before)


def test_channels_last_logits_and_many_classes():
    x = torch.randn(1, 300, 6, 5, generator=torch.Generator().manual_seed(1)).contiguous(
        memory_format=torch.channels_last)
    labels, conf = labels_from_logits(x, [(48, 40), (47, 41)], band_bytes=1)
    assert labels.dtype == np.int64 and conf is None
    # the 8x step runs in the logits' own layout, the other one on contiguous rows
    step = F.interpolate(x, size=(48, 40), mode="bilinear", align_corners=False)
    assert step.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(resized_rows(x, [(48, 40)], 5, 30), step[..., 5:30, :])
    np.testing.assert_array_equal(labels, _reference(step.contiguous(), [(47, 41)]).argmax(1).numpy())


def test_bands_bound_the_full_resolution_logits(monkeypatch):
    """Only bands of about band_bytes exist at full resolution, whatever the output size."""
    seen = []
    resize_band = bands._resize_band

    def spy(src, s0, in_h, size, r0, r1):
        out = resize_band(src, s0, in_h, size, r0, r1)
        if tuple(size) == (400, 300):
            seen.append(out.numel() * out.element_size())
        return out

    monkeypatch.setattr(bands, "_resize_band", spy)
    x = torch.randn(1, 150, 50, 38)
    labels_from_logits(x, [(400, 304), (400, 300)], band_bytes=1 << 20, top=None)
    assert len(seen) > 50 and max(seen) <= 1 << 20
    full = 4 * 150 * 400 * 300
    assert max(seen) * 50 < full


def test_errors():
    with pytest.raises(ValueError, match=r"\(B, K, h, w\)"):
        labels_from_logits(torch.zeros(3, 4, 5), [(4, 5)])


@pytest.mark.parametrize("classes", [19, 150, 600])
def test_band_memory_does_not_grow_with_the_class_count(monkeypatch, classes):
    """Decoder logits (stride 8) to a 512x512 label map: every band, halo included, stays near
    BAND_BYTES whatever the class count (the full logits would be 4 * K * 512 * 512 bytes)."""
    sizes = []
    resize_band = bands._resize_band

    def spy(src, s0, in_h, size, r0, r1):
        out = resize_band(src, s0, in_h, size, r0, r1)
        sizes.append(out._base.numel() * 4 if out._base is not None else out.numel() * 4)
        return out

    monkeypatch.setattr(bands, "_resize_band", spy)
    x = torch.randn(1, classes, 64, 64).contiguous(memory_format=torch.channels_last)
    labels, _ = labels_from_logits(x, [(512, 512)], top=None)
    assert labels.shape == (1, 512, 512) and len(sizes) > 1
    assert max(sizes) <= 1.3 * bands.BAND_BYTES
