"""Labels from a few candidate classes per pixel: those of resize + argmax over every class."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from edaformer import candidates
from edaformer.bands import labels_from_logits
from edaformer.candidates import axis_taps, candidate_labels


def _reference(x: torch.Tensor, sizes) -> np.ndarray:
    for size in sizes:
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
    return x.argmax(1).numpy()


@pytest.mark.parametrize("in_size,out_sizes", [(8, [64]), (8, [64, 61]), (13, [5]), (64, [512, 300]),
                                               (3, [12, 13]), (5, [5]), (7, [56, 601])])
def test_axis_taps_are_the_chain_of_resizes(in_size, out_sizes):
    start, weights = axis_taps(in_size, out_sizes)
    x = torch.randn(1, 1, in_size, 1, generator=torch.Generator().manual_seed(in_size))
    y = x
    for size in out_sizes:
        y = F.interpolate(y, size=(size, 1), mode="bilinear", align_corners=False)
    taps = weights.shape[1]
    assert int((start + taps).max()) <= in_size and (weights >= 0).all()
    got = sum(weights[:, j] * x[0, 0, start + j, 0] for j in range(taps))
    torch.testing.assert_close(got, y[0, 0, :, 0], rtol=0, atol=1e-6)


CASES = [
    ((2, 150, 8, 11), [(61, 97)]),                 # odd sizes, one step
    ((1, 150, 16, 16), [(128, 128)]),              # 8x, one step
    ((1, 150, 16, 16), [(128, 128), (121, 133)]),  # stride-8 logits -> test size -> original size
    ((2, 300, 13, 17), [(5, 7)]),                  # downscale, int64 labels
    ((1, 171, 16, 22), [(128, 176), (75, 100)]),   # an image smaller than the box
]


@pytest.mark.parametrize("shape,sizes", CASES)
@pytest.mark.parametrize("band_bytes", [1, 3000, 1 << 30])
def test_candidate_labels_equal_resize_then_argmax(shape, sizes, band_bytes):
    # Gaussian logits: flat, many near-ties, so the every-class fallback runs too
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(shape[1] + len(sizes)))
    labels = candidate_labels(x, sizes, band_bytes)
    assert labels is not None and labels.shape == (shape[0], *sizes[-1])
    assert labels.dtype == (np.uint8 if shape[1] <= 256 else np.int64)
    np.testing.assert_array_equal(labels, _reference(x, sizes))
    via_bands, conf = labels_from_logits(x, sizes, band_bytes=band_bytes)
    np.testing.assert_array_equal(via_bands, labels)
    assert conf is None


def test_peaked_logits_and_the_fallback():
    """Trained-like logits (one class well ahead) decide every pixel from the candidates; equal
    logits decide none, and the every-class fallback picks the first class as argmax does."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 64, 12, 12, generator=g)
    x[:, :, :6] += 8 * F.one_hot(torch.tensor(3), 64).view(1, -1, 1, 1)
    x[:, :, 6:] += 8 * F.one_hot(torch.tensor(40), 64).view(1, -1, 1, 1)
    np.testing.assert_array_equal(candidate_labels(x, [(96, 96)], 1 << 20), _reference(x, [(96, 96)]))
    flat = torch.zeros(1, 64, 4, 4)
    assert (candidate_labels(flat, [(32, 32)], 1 << 20) == 0).all()
    thin = torch.randn(1, 150, 1, 8, generator=g)             # one source row: one-tap blocks
    np.testing.assert_array_equal(candidate_labels(thin, [(8, 64)], 1 << 20), _reference(thin, [(8, 64)]))


def test_when_candidates_do_not_pay():
    x = torch.randn(1, 19, 8, 8)                             # 19 classes: fewer than twice 4 x 4 candidates
    assert candidate_labels(x, [(64, 64)], 1 << 20) is None
    labels, _ = labels_from_logits(x, [(64, 64)])            # the caller resizes every class
    np.testing.assert_array_equal(labels, _reference(x, [(64, 64)]))


def test_confidence_and_top_none_resize_every_class(monkeypatch):
    calls = []
    monkeypatch.setattr("edaformer.bands.candidate_labels", lambda *a, **k: calls.append(1))
    x = torch.randn(1, 150, 8, 8)
    labels_from_logits(x, [(64, 64)], confidence=True)
    labels_from_logits(x, [(64, 64)], top=None)
    assert calls == []
    assert candidates.TOP == 4
