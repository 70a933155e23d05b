"""Label maps from low-resolution logits, resized and reduced in bands of rows.

Turning ``(B, K, h, w)`` logits into an ``H x W`` label map the plain way allocates the
full-resolution logits, ``4 * K * H * W`` bytes (28.8 GB for a 150-class model on an
8000x6000 photo). :func:`labels_from_logits` computes the same labels a band of output rows at
a time, so at most about :data:`BAND_BYTES` of full-resolution logits exist at once.

A band holds what ``F.interpolate(x, size, mode="bilinear", align_corners=False)`` gives for
those rows, and its argmax is taken at once:

* outputs that fit in one band are ``F.interpolate`` itself;
* when the output height is ``2**k`` times the input height (the stride-8 decoder logits of a
  whole-mode input whose sides are multiples of 8), a band is ``F.interpolate`` on the source
  rows it needs, in the layout of ``x`` (the decoder's channels-last logits stay so). The source
  position of every output row is exact in floating point, so the band is bit for bit the rows
  of the whole resize;
* otherwise (contiguous layout) the width is resized by ``F.interpolate`` on the needed source
  rows (height unchanged) and the rows are blended with the kernel's source rows and weights,
  ``row0 * w0 + row1 * w1`` as one fused multiply-add (``torch.addcmul``). This is bit for bit
  the kernel's result for most shapes; for some the CPU kernel rounds differently, and values
  differ in the last bit (the label only where two classes tie to within that).

Without ``confidence``, a model with many classes (at least twice as many as the candidates a
block gives, e.g. 150) skips the full resize: :mod:`edaformer.candidates` takes the argmax from
the top classes of each source block, with the same labels.

Prediction, evaluation and training validation all take their labels from here, so they agree
with each other exactly.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .candidates import TOP, candidate_labels
from .candidates import row_weights as _row_weights

__all__ = ["BAND_BYTES", "labels_from_logits", "resized_rows", "band_rows_of"]

BAND_BYTES = 16 << 20  # full-resolution logits computed at once (per band), in bytes
Size = tuple[int, int]


def _power_of_two_ratio(in_size: int, out_size: int) -> int | None:
    k, rem = divmod(out_size, in_size)
    return k if rem == 0 and k & (k - 1) == 0 else None


def _source_rows(in_size: int, out_size: int, r0: int, r1: int) -> tuple[int, int]:
    """Input rows ``[s0, s1)`` that output rows ``[r0, r1)`` are computed from."""
    i0, i1, _, _ = _row_weights(in_size, out_size)
    return int(i0[r0]), int(i1[r1 - 1]) + 1


def _resize_band(src: torch.Tensor, s0: int, in_h: int, size: Size, r0: int, r1: int) -> torch.Tensor:
    """Rows ``[r0, r1)`` of ``F.interpolate(x, size)`` from ``src = x[..., s0:s0 + len, :]``."""
    out_h, out_w = size
    k = _power_of_two_ratio(in_h, out_h)
    if k is not None:  # every source position is exact: a slice sees the weights of the whole
        up = src if k == 1 and src.shape[-1] == out_w else F.interpolate(
            src, size=(src.shape[-2] * k, out_w), mode="bilinear", align_corners=False)
        return up[..., r0 - s0 * k:r1 - s0 * k, :]
    return _blend(_widen(src, out_w), s0, in_h, out_h, r0, r1)


def _widen(src: torch.Tensor, out_w: int) -> torch.Tensor:
    """The width step of the resize: rows keep their values' height (exact for any row subset)."""
    src = src.contiguous()
    return src if src.shape[-1] == out_w else F.interpolate(
        src, size=(src.shape[-2], out_w), mode="bilinear", align_corners=False)


def _blend(wide: torch.Tensor, s0: int, in_h: int, out_h: int, r0: int, r1: int) -> torch.Tensor:
    """The height step: output rows ``[r0, r1)`` from width-resized source rows starting at ``s0``."""
    i0, i1, w0, w1 = (t[r0:r1] for t in _row_weights(in_h, out_h))
    dev = wide.device
    top = wide.index_select(-2, (i0 - s0).to(dev))
    bottom = wide.index_select(-2, (i1 - s0).to(dev))
    w0, w1 = w0.to(dev, wide.dtype).view(-1, 1), w1.to(dev, wide.dtype).view(-1, 1)
    return bottom.mul_(w1).addcmul_(top, w0)


class _Rows:
    """Rows of ``x`` resized through ``sizes``; an intermediate size keeps its last block of
    ``block_bytes`` rows, as consecutive bands of the next size need overlapping rows of it."""

    def __init__(self, x: torch.Tensor, sizes: Sequence[Size], block_bytes: int | None = None):
        *before, self.size = [tuple(s) for s in sizes]
        self.x = x
        self.prev = _Rows(x, before, block_bytes) if before else None
        self.in_h = before[-1][0] if before else x.shape[-2]
        per_row = 4 * x.shape[0] * x.shape[1] * self.size[1]
        self.block = None if block_bytes is None else max(1, block_bytes // per_row)
        self.cache, self.c0, self.c1 = None, 0, 0
        self.wide, self.w0, self.w1 = None, 0, 0
        self.exact = _power_of_two_ratio(self.in_h, self.size[0]) is not None

    def _source(self, s0: int, s1: int) -> torch.Tensor:
        return self.prev.rows(s0, s1) if self.prev else self.x[..., s0:s1, :]

    def _wide_rows(self, s0: int, s1: int) -> torch.Tensor:
        """Width-resized source rows, classes last, kept in blocks: consecutive bands share them."""
        if not (self.w0 <= s0 and s1 <= self.w1):
            self.w0, self.w1 = s0, min(max(s1, s0 + self.block), self.in_h)
            self.wide = None
            self.wide = _widen(self._source(self.w0, self.w1), self.size[1]).permute(0, 2, 3, 1).contiguous()
        return self.wide[:, s0 - self.w0:s1 - self.w0]

    def compute(self, r0: int, r1: int) -> torch.Tensor:
        s0, s1 = _source_rows(self.in_h, self.size[0], r0, r1)
        if self.exact or self.block is None:
            return _resize_band(self._source(s0, s1), s0, self.in_h, self.size, r0, r1)
        # the same blend with classes last: the band comes out channels-last, ready for the argmax
        i0, i1, w0, w1 = (t[r0:r1] for t in _row_weights(self.in_h, self.size[0]))
        wide = self._wide_rows(s0, s1)
        dev = wide.device
        top = wide.index_select(1, (i0 - s0).to(dev))
        bottom = wide.index_select(1, (i1 - s0).to(dev))
        w0, w1 = w0.to(dev, wide.dtype).view(-1, 1, 1), w1.to(dev, wide.dtype).view(-1, 1, 1)
        return bottom.mul_(w1).addcmul_(top, w0).permute(0, 3, 1, 2)

    def rows(self, r0: int, r1: int) -> torch.Tensor:
        if self.block is None:
            return self.compute(r0, r1)
        if not (self.c0 <= r0 and r1 <= self.c1):
            self.c0, self.c1 = r0, min(max(r1, r0 + self.block), self.size[0])
            self.cache = None
            self.cache = self.compute(self.c0, self.c1)
        return self.cache[..., r0 - self.c0:r1 - self.c0, :]


def resized_rows(x: torch.Tensor, sizes: Sequence[Size], r0: int, r1: int) -> torch.Tensor:
    """Rows ``[r0, r1)`` of ``x`` resized bilinearly to each size of ``sizes`` in turn (the last
    one is the output), computed from only the rows each step needs."""
    return _Rows(x, sizes).compute(r0, r1)


def band_rows_of(x: torch.Tensor, size: Size, row_bytes: int, band_bytes: int):
    """``(r0, r1, rows)`` for consecutive bands of ``x`` resized to ``size``, ``rows`` in float32;
    the source rows of each band are converted to float32 only when needed."""
    in_h = x.shape[-2]
    src_rows = max(1, round(size[0] / in_h * max(1, band_bytes // max(1, row_bytes))))
    step = max(1, min(size[0], src_rows))
    for r0 in range(0, size[0], step):
        r1 = min(r0 + step, size[0])
        s0, s1 = _source_rows(in_h, size[0], r0, r1)
        yield r0, r1, _resize_band(x[..., s0:s1, :].float(), s0, in_h, size, r0, r1)


def _band_starts(out_h: int, rows: int, k: int | None) -> list[int]:
    """Band boundaries for bands of about ``rows`` rows. With a power-of-two ratio ``k`` a band
    computes ``k`` rows more than it keeps (its source rows' whole cells): it keeps ``rows - k``
    rounded down to a multiple of ``k`` (at least ``k``), and the boundaries sit half-way between
    the output rows of two source rows, where the waste is smallest."""
    if not k or k == 1:
        return list(range(0, out_h, rows))
    rows = max(k, (rows - k) // k * k)
    return [0] + list(range(k // 2 + rows, out_h, rows))


def _band_rows(channels: int, width: int, budget: int) -> int:
    return max(1, budget // max(1, 4 * channels * width))


def labels_from_logits(logits: torch.Tensor, sizes: Sequence[Size], confidence: bool = False,
                       band_bytes: int = BAND_BYTES, top: int | None = TOP) -> tuple[np.ndarray, np.ndarray | None]:
    """Label maps ``(B, H, W)`` of ``logits (B, K, h, w)`` resized through ``sizes`` (the last is
    ``(H, W)``), equal to ``F.interpolate`` (each size in turn) followed by ``argmax(1)``.

    Labels are uint8 for up to 256 classes, else int64. With ``confidence`` also the largest
    softmax probability per pixel (that of the chosen class), float32 in 0-1, else None.
    Without ``confidence``, many classes are reduced from ``top`` candidates per source pixel
    (:mod:`edaformer.candidates`); ``top=None`` resizes every class.
    """
    if logits.ndim != 4:
        raise ValueError(f"expected logits (B, K, h, w), got shape {tuple(logits.shape)}")
    sizes = [tuple(int(v) for v in s) for s in sizes] or [tuple(logits.shape[-2:])]
    x = logits.float()
    if not (x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last)):
        x = x.contiguous()
    if top and not confidence:
        labels = candidate_labels(x, sizes, band_bytes, top)
        if labels is not None:
            return labels, None
    b, k = x.shape[:2]
    out_h, out_w = sizes[-1]
    labels = np.empty((b, out_h, out_w), np.uint8 if k <= 256 else np.int64)
    conf = np.empty((b, out_h, out_w), np.float32) if confidence else None
    step = _band_rows(k, out_w, band_bytes)
    largest = max(h * w for h, w in [tuple(x.shape[-2:])] + sizes)
    with torch.inference_mode():
        full = None
        if 4 * b * k * largest <= band_bytes:  # small: the plain resize, one band
            full, step = x, out_h
            for size in sizes:
                full = F.interpolate(full, size=size, mode="bilinear", align_corners=False)
        source = _Rows(x, sizes, band_bytes)
        starts = [0] if full is not None else _band_starts(out_h, step, _power_of_two_ratio(source.in_h, out_h))
        for r0, r1 in zip(starts, starts[1:] + [out_h]):
            band = full if full is not None else source.compute(r0, r1)
            # classes last (a view for channels-last logits): the reductions run over contiguous memory
            band = band.permute(0, 2, 3, 1).contiguous()
            labels[:, r0:r1] = band.argmax(-1).cpu().numpy()
            if conf is not None:
                top = band.amax(-1, keepdim=True)
                p = (band - top).exp_().sum(-1).reciprocal_()
                conf[:, r0:r1] = p.cpu().numpy()
    return labels, conf
