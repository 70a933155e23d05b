"""Training and test pipelines on ``torchvision.transforms.v2``, equivalent to the reference
(mmsegmentation 0.x) recipe.

Samples are ``(tv_tensors.Image, tv_tensors.Mask)`` pairs; every transform moves image and label
together. All randomness comes from the torch RNG, so ``torch.manual_seed`` (or a seeded
``DataLoader`` worker) fixes the augmentations.

Train: :class:`ResizeToFit` with a random ratio -> :class:`CategoryCappedRandomCrop` ->
horizontal flip -> :class:`PhotoMetricDistortion` -> normalize -> :class:`PadToSize`.
Test: :func:`prepare_test_image` (fit the box, round the sides up to a divisor, normalize) on the
image only; the label keeps its original size.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_unflatten
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from ..bands import band_rows_of
from ..utils import to_pair
from .datasets import IGNORE_INDEX

__all__ = ["MEAN", "STD", "ResizeToFit", "CategoryCappedRandomCrop", "PhotoMetricDistortion", "PadToSize",
           "ImageOnly", "EvalImage", "fit_size", "eval_input_size", "resize_test_image", "normalize",
           "prepare_test_image", "train_transforms", "eval_transforms"]

MEAN = (123.675, 116.28, 103.53)  # RGB, on 0..255 values
STD = (58.395, 57.12, 57.375)


def fit_size(size: tuple[int, int], scale: Sequence[int], ratio: float = 1.0) -> tuple[int, int]:
    """``(h, w)`` after a keep-aspect resize that fits ``size`` into the box ``scale * ratio``
    (the box's long side bounds the long side, its short side the short side; mmcv ``imrescale``)."""
    h, w = size
    box = (int(scale[0] * ratio), int(scale[1] * ratio))
    factor = min(max(box) / max(h, w), min(box) / min(h, w))
    return int(h * factor + 0.5), int(w * factor + 0.5)


class ResizeToFit(v2.Transform):
    """Resize keeping the aspect ratio so that the sample fits the box ``scale`` (any order, e.g.
    ``(2048, 512)``), times a ratio drawn uniformly from ``ratio_range`` when given.

    Images are resized bilinearly without antialiasing (as the reference's OpenCV resize), masks
    with nearest neighbour.
    """

    def __init__(self, scale: Sequence[int], ratio_range: Sequence[float] | None = None,
                 antialias: bool = False) -> None:
        super().__init__()
        self.scale = to_pair(scale, "scale")
        self.ratio_range = None if ratio_range is None else (float(ratio_range[0]), float(ratio_range[1]))
        if self.ratio_range is not None and not 0 < self.ratio_range[0] <= self.ratio_range[1]:
            raise ValueError(f"ratio_range must be (low, high) with 0 < low <= high, got {ratio_range}")
        self.antialias = antialias

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        ratio = 1.0
        if self.ratio_range is not None:
            low, high = self.ratio_range
            ratio = low + (high - low) * torch.rand(()).item()
        return dict(size=fit_size(v2.query_size(flat_inputs), self.scale, ratio))

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        return self._call_kernel(F.resize, inpt, list(params["size"]), interpolation=v2.InterpolationMode.BILINEAR,
                                 antialias=self.antialias)


class CategoryCappedRandomCrop(v2.Transform):
    """Random crop of ``size = (h, w)`` (clipped to the sample) redrawn up to ``max_tries`` times
    until the mask shows more than one class and no class covers ``cat_max_ratio`` or more of the
    labelled pixels (``ignore_index`` not counted). After ``max_tries`` rejections the last draw is
    kept (mmseg ``RandomCrop(cat_max_ratio)``). Without a mask it is a plain random crop."""

    def __init__(self, size: int | Sequence[int], cat_max_ratio: float = 0.75, ignore_index: int = IGNORE_INDEX,
                 max_tries: int = 10) -> None:
        super().__init__()
        self.size = to_pair(size, "crop_size")
        self.cat_max_ratio = float(cat_max_ratio)
        self.ignore_index = ignore_index
        self.max_tries = max_tries

    def _draw(self, h: int, w: int, ch: int, cw: int) -> tuple[int, int]:
        top = int(torch.randint(0, h - ch + 1, ()).item())
        left = int(torch.randint(0, w - cw + 1, ()).item())
        return top, left

    def accepts(self, crop: torch.Tensor) -> bool:
        """Whether a label crop passes the category cap."""
        counts = torch.bincount(crop.flatten().long())
        if self.ignore_index < counts.numel():
            counts[self.ignore_index] = 0
        counts = counts[counts > 0]
        return counts.numel() > 1 and counts.max().item() / counts.sum().item() < self.cat_max_ratio

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        h, w = v2.query_size(flat_inputs)
        ch, cw = min(self.size[0], h), min(self.size[1], w)
        mask = next((x for x in flat_inputs if isinstance(x, tv_tensors.Mask)), None)
        top, left = self._draw(h, w, ch, cw)
        if mask is not None and self.cat_max_ratio < 1.0:
            for _ in range(self.max_tries):
                if self.accepts(mask[..., top:top + ch, left:left + cw]):
                    break
                top, left = self._draw(h, w, ch, cw)
        return dict(top=top, left=left, height=ch, width=cw)

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        return self._call_kernel(F.crop, inpt, **params)


class PhotoMetricDistortion(v2.Transform):
    """mmseg's photometric distortion on RGB images with values in 0..255, each step with p=0.5:
    brightness (add a delta in ``[-brightness_delta, brightness_delta]``), contrast (multiply by a
    factor in ``contrast_range``; before saturation or at the end, chosen at random), saturation
    (scale HSV saturation by a factor in ``saturation_range``) and hue (rotate by up to
    ``hue_delta`` OpenCV hue units of 2 degrees). Values are clamped to 0..255 after each step.
    Returns float32 images; masks pass through."""

    def __init__(self, brightness_delta: float = 32, contrast_range: Sequence[float] = (0.5, 1.5),
                 saturation_range: Sequence[float] = (0.5, 1.5), hue_delta: int = 18, p: float = 0.5) -> None:
        super().__init__()
        self.brightness_delta = float(brightness_delta)
        self.contrast_range = (float(contrast_range[0]), float(contrast_range[1]))
        self.saturation_range = (float(saturation_range[0]), float(saturation_range[1]))
        self.hue_delta = int(hue_delta)
        self.p = p

    @staticmethod
    def _uniform(low: float, high: float) -> float:
        return low + (high - low) * torch.rand(()).item()

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        apply = (torch.rand(4) < self.p).tolist()
        return dict(
            brightness=self._uniform(-self.brightness_delta, self.brightness_delta) if apply[0] else None,
            contrast_first=bool(torch.rand(()) < 0.5),
            contrast=self._uniform(*self.contrast_range) if apply[1] else None,
            saturation=self._uniform(*self.saturation_range) if apply[2] else None,
            hue=int(torch.randint(-self.hue_delta, self.hue_delta + 1, ()).item()) if apply[3] else None,
        )

    @staticmethod
    def scale_saturation(img: torch.Tensor, factor: float) -> torch.Tensor:
        """Multiply the HSV saturation by ``factor`` (clipped to 1), keeping hue and value."""
        r, g, b = img.unbind(-3)
        value = torch.maximum(torch.maximum(r, g), b).unsqueeze(-3)
        chroma = value - torch.minimum(torch.minimum(r, g), b).unsqueeze(-3)
        # channel = value - chroma * f(hue) and saturation = chroma / value, so scaling the
        # saturation by k scales (value - channel) by k; k stops where the saturation reaches 1
        k = (value / chroma.clamp_min(1e-6)).clamp_(max=factor)
        return torch.addcmul(value, k, img - value)

    @staticmethod
    def rotate_hue(img: torch.Tensor, shift: float) -> torch.Tensor:
        """Rotate the HSV hue by ``shift`` turns, keeping saturation and value."""
        r, g, b = img.unbind(-3)
        value = torch.maximum(torch.maximum(r, g), b)
        chroma = value - torch.minimum(torch.minimum(r, g), b)
        c = chroma.clamp_min(1e-6)
        hue = torch.where(value == r, (g - b) / c, torch.where(value == g, (b - r) / c + 2, (r - g) / c + 4))
        hue = torch.remainder(hue + 6 * shift, 6)  # in sextants, 0..6
        out = []
        for n in (5, 3, 1):  # R, G, B
            k = torch.remainder(hue + n, 6)
            out.append(value - chroma * torch.minimum(k, 4 - k).clamp_(0, 1))
        return torch.stack(out, dim=-3)

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        if isinstance(inpt, tv_tensors.TVTensor) and not isinstance(inpt, tv_tensors.Image):
            return inpt
        img = inpt.as_subclass(torch.Tensor).float()
        if params["brightness"] is not None:
            img = (img + params["brightness"]).clamp_(0, 255)
        if params["contrast_first"] and params["contrast"] is not None:
            img = (img * params["contrast"]).clamp_(0, 255)
        if params["saturation"] is not None:
            img = self.scale_saturation(img, params["saturation"]).clamp_(0, 255)
        if params["hue"]:
            img = self.rotate_hue(img, params["hue"] / 180.0).clamp_(0, 255)
        if not params["contrast_first"] and params["contrast"] is not None:
            img = (img * params["contrast"]).clamp_(0, 255)
        return tv_tensors.wrap(img, like=inpt) if isinstance(inpt, tv_tensors.Image) else img


class PadToSize(v2.Transform):
    """Pad bottom and right up to ``size = (h, w)``: images with ``fill``, masks with ``seg_fill``.
    Larger samples are left as they are."""

    def __init__(self, size: int | Sequence[int], fill: float = 0, seg_fill: int = IGNORE_INDEX) -> None:
        super().__init__()
        self.size = to_pair(size)
        self.fill = fill
        self.seg_fill = seg_fill

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        h, w = v2.query_size(flat_inputs)
        return dict(padding=[0, 0, max(self.size[1] - w, 0), max(self.size[0] - h, 0)])

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        if not any(params["padding"]):
            return inpt
        fill = self.seg_fill if isinstance(inpt, tv_tensors.Mask) else self.fill
        return self._call_kernel(F.pad, inpt, params["padding"], fill=fill)


class ImageOnly(nn.Module):
    """Apply ``transform`` to the images of a sample (jointly); labels and the rest pass through."""

    def __init__(self, transform: nn.Module) -> None:
        super().__init__()
        self.transform = transform

    def forward(self, *inputs: Any) -> Any:
        flat, spec = tree_flatten(inputs if len(inputs) > 1 else inputs[0])
        idx = [i for i, x in enumerate(flat) if isinstance(x, tv_tensors.Image)]
        if not idx:
            return inputs if len(inputs) > 1 else inputs[0]
        out = self.transform(*[flat[i] for i in idx])
        for i, o in zip(idx, out if len(idx) > 1 else [out]):
            flat[i] = o
        return tree_unflatten(flat, spec)


_TO_TENSORS = dict(dtype={tv_tensors.Image: torch.float32, tv_tensors.Mask: torch.int64, "others": None},
                   scale=False)


def train_transforms(scale: Sequence[int] = (2048, 512), ratio_range: Sequence[float] | None = (0.5, 2.0),
                     crop_size: int | Sequence[int] = (512, 512), cat_max_ratio: float = 0.75,
                     flip_prob: float = 0.5, photometric: bool = True, mean: Sequence[float] = MEAN,
                     std: Sequence[float] = STD, ignore_index: int = IGNORE_INDEX) -> v2.Compose:
    """The reference training pipeline; returns ``(image float32 (3, h, w), label int64 (h, w))``
    with ``(h, w) = crop_size``, the label padded with ``ignore_index``."""
    steps: list[nn.Module] = [
        ResizeToFit(scale, ratio_range),
        CategoryCappedRandomCrop(crop_size, cat_max_ratio, ignore_index=ignore_index),
        v2.RandomHorizontalFlip(flip_prob),
        v2.ToDtype(**_TO_TENSORS),
    ]
    if photometric:
        steps.append(PhotoMetricDistortion())
    steps += [v2.Normalize(list(mean), list(std)), PadToSize(crop_size, fill=0, seg_fill=ignore_index),
              v2.ToPureTensor()]
    return v2.Compose(steps)


def eval_input_size(size: Sequence[int], scale: Sequence[int] | None, divisor: int | None = None) -> tuple[int, int]:
    """``(h, w)`` an ``size = (h, w)`` image is run at: :func:`fit_size` into the box ``scale``
    (``None`` keeps the size), then both sides rounded up to a multiple of ``divisor`` (``None``
    or 1: no rounding)."""
    h, w = int(size[0]), int(size[1])
    if h < 1 or w < 1:
        raise ValueError(f"image size must be positive, got {h}x{w}")
    if scale is not None:
        h, w = fit_size((h, w), to_pair(tuple(scale), "scale"))
        h, w = max(h, 1), max(w, 1)
    if divisor is not None and divisor > 1:
        h, w = -(-h // divisor) * divisor, -(-w // divisor) * divisor
    return h, w


_BAND_BYTES = 32 << 20  # float32 rows of a large 8-bit image converted at once


def _bilinear(x: torch.Tensor, size: tuple[int, int], quantize: bool) -> torch.Tensor:
    """Bilinear resize (no antialias) of a ``(B, C, H, W)`` batch to float32, rounded to whole
    values when ``quantize``. A large uint8 image is resized a band of rows at a time (see
    :mod:`edaformer.bands`), so it is never converted to float32 as a whole."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x.float()
    if x.dtype == torch.float32 or 4 * x.numel() <= _BAND_BYTES:
        x = torch.nn.functional.interpolate(x.float(), size=size, mode="bilinear", align_corners=False)
        return x.round_().clamp_(0, 255) if quantize else x
    out = torch.empty((*x.shape[:2], *size), dtype=torch.float32, device=x.device)
    for r0, r1, rows in band_rows_of(x, size, 4 * x.shape[0] * x.shape[1] * max(x.shape[-1], size[1]),
                                     _BAND_BYTES):
        out[..., r0:r1, :] = rows.round_().clamp_(0, 255) if quantize else rows
    return out


def resize_test_image(image: torch.Tensor, scale: Sequence[int] | None, divisor: int | None = None) -> torch.Tensor:
    """The reference test-time resize of an RGB image ``(3, H, W)`` or batch ``(B, 3, H, W)``
    with values in 0..255 (uint8 or float); returns float32 values in 0..255.

    Two bilinear resizes without antialiasing (as OpenCV's): to fit the box ``scale``, then to
    sides rounded up to a multiple of ``divisor`` (see :func:`eval_input_size`). A uint8 image is
    rounded to whole values after each resize, as an 8-bit image would be.
    """
    quantize = image.dtype == torch.uint8
    x = image if quantize else image.to(torch.float32)
    squeeze = x.ndim == 3
    x = x[None] if squeeze else x
    size = tuple(x.shape[-2:])
    if scale is not None:
        x = _bilinear(x, eval_input_size(size, scale), quantize)
    x = _bilinear(x, eval_input_size(tuple(x.shape[-2:]), None, divisor), quantize)
    return x[0] if squeeze else x


def normalize(x: torch.Tensor, mean: Sequence[float] = MEAN, std: Sequence[float] = STD) -> torch.Tensor:
    """``(x - mean) / std`` per RGB channel of a ``(..., 3, H, W)`` float tensor."""
    shape = (3, 1, 1)
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(shape)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(shape)
    return (x - m) / s


def prepare_test_image(image: torch.Tensor, scale: Sequence[int] | None, divisor: int | None = None,
                       mean: Sequence[float] = MEAN, std: Sequence[float] = STD) -> torch.Tensor:
    """The model input of one test image (or batch): :func:`resize_test_image`, then :func:`normalize`.
    Prediction and evaluation both go through this function."""
    return normalize(resize_test_image(image, scale, divisor), mean, std)


class EvalImage(v2.Transform):
    """:func:`prepare_test_image` as a transform: images are resized and normalized, masks pass."""

    def __init__(self, scale: Sequence[int] | None, divisor: int | None = None, mean: Sequence[float] = MEAN,
                 std: Sequence[float] = STD) -> None:
        super().__init__()
        self.scale = None if scale is None else to_pair(tuple(scale), "scale")
        self.divisor = divisor
        self.mean, self.std = tuple(mean), tuple(std)

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        if not isinstance(inpt, tv_tensors.Image):
            return inpt
        out = prepare_test_image(inpt.as_subclass(torch.Tensor), self.scale, self.divisor, self.mean, self.std)
        return tv_tensors.wrap(out, like=inpt)


def eval_transforms(scale: Sequence[int] | None = (2048, 512), size_divisor: int | None = 32,
                    mean: Sequence[float] = MEAN, std: Sequence[float] = STD) -> v2.Compose:
    """The reference test pipeline: the image through :func:`prepare_test_image` (fit ``scale``,
    sides rounded up to ``size_divisor``, normalized, float32); the label (int64) keeps its
    original size for scoring."""
    return v2.Compose([EvalImage(scale, size_divisor, mean, std), v2.ToDtype(**_TO_TENSORS), v2.ToPureTensor()])
