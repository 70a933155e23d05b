"""Showing label maps: palette PNGs, overlays on the image, a legend of the classes present."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from .images import ImageInput, as_chw

__all__ = ["colorize", "overlay", "add_legend", "confidence_image"]

_OVERLAY_BAND_PIXELS = 1 << 20  # pixels blended at once


def _palette_array(palette: Sequence[Sequence[int]]) -> np.ndarray:
    pal = np.asarray(palette, dtype=np.int64).reshape(-1, 3) if len(palette) else np.zeros((0, 3), np.int64)
    if pal.size and (pal.min() < 0 or pal.max() > 255):
        raise ValueError("palette colours must be in 0-255")
    return pal.astype(np.uint8)


def _label_array(label: np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(label, torch.Tensor):
        label = label.detach().cpu().numpy()
    label = np.asarray(label)
    if label.ndim != 2 or not np.issubdtype(label.dtype, np.integer):
        raise ValueError(f"expected an (H, W) integer label map, got {label.dtype} {label.shape}")
    return label


def colorize(label: np.ndarray | torch.Tensor, palette: Sequence[Sequence[int]]) -> Image.Image:
    """A palette-mode (``'P'``) image: pixel value = class id, shown in the class colours.

    Ids without a colour (e.g. 255 = ignore) are shown black. ``.convert("RGB")`` gives colours.
    """
    label = _label_array(label)
    if label.size and (label.min() < 0 or label.max() > 255):
        raise ValueError(f"label ids must be in 0-255 for a palette image, got {label.min()}..{label.max()}")
    pal = _palette_array(palette)[:256]
    flat = np.zeros((256, 3), np.uint8)
    flat[: len(pal)] = pal
    img = Image.fromarray(label.astype(np.uint8, copy=False), mode="L").convert("P")
    img.putpalette(flat.reshape(-1).tolist())
    return img


def overlay(image: ImageInput, label: np.ndarray | torch.Tensor, palette: Sequence[Sequence[int]],
            alpha: float = 0.5) -> Image.Image:
    """RGB image: ``(1 - alpha) * image + alpha * colour(label)``, rounded; ids without a colour are
    left as is. Blended in bands of rows, so memory stays near the size of the image itself."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    chw = as_chw(image)
    label = _label_array(label)
    if label.shape != tuple(chw.shape[-2:]):
        raise ValueError(f"label {label.shape} and image {tuple(chw.shape[-2:])} sizes differ")
    rgb = chw.permute(1, 2, 0).cpu().numpy()
    pal = _palette_array(palette).astype(np.float32)
    out = np.empty(rgb.shape, np.uint8)
    h, w = label.shape
    step = max(1, _OVERLAY_BAND_PIXELS // max(w, 1))
    for r0 in range(0, h, step):
        src = rgb[r0:r0 + step].astype(np.float32)
        lab = label[r0:r0 + step]
        known = (lab >= 0) & (lab < len(pal))
        src[known] = (1.0 - alpha) * src[known] + alpha * pal[lab[known]]
        out[r0:r0 + step] = np.clip(np.rint(src), 0, 255).astype(np.uint8)
    return Image.fromarray(out, mode="RGB")


def add_legend(image: Image.Image, label: np.ndarray | torch.Tensor, classes: Sequence[str],
               palette: Sequence[Sequence[int]]) -> Image.Image:
    """``image`` with a panel on its right listing the classes present in ``label`` (most pixels
    first) with their colours and shares of the image."""
    label = _label_array(label)
    counts = np.bincount(label.ravel().astype(np.int64), minlength=len(classes)) if label.size else np.zeros(0)
    present = [int(c) for c in np.argsort(-counts, kind="stable") if counts[c] > 0 and c < len(classes)]
    font = ImageFont.load_default()
    row = 14
    rows = [f"{classes[c]} {100 * counts[c] / label.size:.1f}%" for c in present]
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    text_w = max((int(probe.textlength(t, font=font)) for t in rows), default=0)
    panel_w = 8 + 12 + 6 + text_w + 8
    canvas = Image.new("RGB", (image.width + panel_w, max(image.height, 8 + row * len(rows))), (255, 255, 255))
    canvas.paste(image.convert("RGB"), (0, 0))
    draw = ImageDraw.Draw(canvas)
    pal = _palette_array(palette)
    for i, (c, text) in enumerate(zip(present, rows)):
        y = 4 + i * row
        x = image.width + 8
        colour = tuple(int(v) for v in pal[c]) if c < len(pal) else (0, 0, 0)
        draw.rectangle((x, y + 1, x + 11, y + 11), fill=colour, outline=(0, 0, 0))
        draw.text((x + 18, y), text, fill=(0, 0, 0), font=font)
    return canvas


def confidence_image(confidence: np.ndarray) -> Image.Image:
    """An 8-bit grayscale image of a per-pixel confidence map: probabilities in 0-1 (float, as
    :meth:`Segmenter.predict` gives them) are written as ``round(255 * p)``; uint8 values as they are."""
    conf = np.asarray(confidence)
    if conf.ndim != 2 or not (conf.dtype == np.uint8 or np.issubdtype(conf.dtype, np.floating)):
        raise ValueError(f"expected an (H, W) confidence map of probabilities (float, 0-1) or uint8, "
                         f"got {conf.dtype} {conf.shape}")
    if conf.dtype != np.uint8:
        if conf.size and not (conf.min() >= 0 and conf.max() <= 1 + 1e-6):
            raise ValueError(f"confidence values must be probabilities in [0, 1], got {conf.min():g} to "
                             f"{conf.max():g}")
        conf = np.rint(np.clip(conf, 0, 1) * 255).astype(np.uint8)
    return Image.fromarray(conf, mode="L")
