"""Running a model under the test protocol: the one image-to-input function
(:func:`preprocess`), whole / sliding-window / flip logits, the multi-scale test, and label maps
(resized and reduced in bands, see :mod:`edaformer.bands`)."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from ..bands import labels_from_logits
from ..data.transforms import prepare_test_image
from ..models import TEST_MODES
from ..protocol import TestProtocol
from ..utils import to_pair
from .images import ImageInput, as_chw

__all__ = ["preprocess", "infer_logits", "infer_tta", "protocol_logits", "protocol_tta", "segment_input",
           "segment_image", "image_probabilities"]

Size = tuple[int, int]


def preprocess(image: ImageInput, scale: Size | None | TestProtocol, divisor: int | None = 32,
               device: torch.device | str | None = None) -> torch.Tensor:
    """One image as a normalized ``(1, 3, h, w)`` float32 model input at its test size (the
    dataset test pipeline calls the same :func:`~edaformer.data.transforms.prepare_test_image`).

    ``image``: a path (EXIF orientation applied), a PIL image (any mode), an HxWx3 uint8 array or a
    ``(3, H, W)`` tensor, uint8 or float in 0-255. ``scale``: a :class:`TestProtocol`, or the box
    with ``divisor`` (``scale=None`` keeps the size as it is).
    """
    if isinstance(scale, TestProtocol):
        scale, divisor = scale.scale, scale.size_divisor
    elif scale is None:
        divisor = None
    x = as_chw(image)
    if device is not None:
        x = x.to(device)
    return prepare_test_image(x[None], scale, divisor)


def _model_device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    p = next(model.parameters(), None)
    return (p.device, p.dtype) if p is not None else (torch.device("cpu"), torch.float32)


def _windows(size: int, crop: int, stride: int) -> list[tuple[int, int]]:
    """Window (start, end) along one axis: every ``stride``, the last one flush with the end."""
    n = max(size - crop + stride - 1, 0) // stride + 1
    out = []
    for i in range(n):
        end = min(i * stride + crop, size)
        out.append((max(end - crop, 0), end))
    return out


def _slide(model: nn.Module, x: torch.Tensor, crop: Size, stride: Size, pad: bool) -> torch.Tensor:
    """Sliding-window logits at the size of ``x``: overlapping windows are averaged."""
    h, w = x.shape[-2:]
    if pad and (h < crop[0] or w < crop[1]):
        x = F.pad(x, (0, max(crop[1] - w, 0), 0, max(crop[0] - h, 0)), value=0.0)
    ph, pw = x.shape[-2:]
    logits = count = None
    for y0, y1 in _windows(ph, crop[0], stride[0]):
        for x0, x1 in _windows(pw, crop[1], stride[1]):
            out = model(x[:, :, y0:y1, x0:x1])
            if logits is None:
                logits = out.new_zeros((x.shape[0], out.shape[1], ph, pw))
                count = out.new_zeros((1, 1, ph, pw))
            logits[:, :, y0:y1, x0:x1] += out
            count[:, :, y0:y1, x0:x1] += 1
    return (logits / count)[:, :, :h, :w]


def _forward(model: nn.Module, x: torch.Tensor, mode: str, crop: Size, stride: Size, pad: bool) -> torch.Tensor:
    return model(x) if mode == "whole" else _slide(model, x, crop, stride, pad)


def infer_logits(model: nn.Module, images: torch.Tensor, out_size: Size | None = None, mode: str = "whole",
                 crop_size: int | Size = (1024, 1024), stride: int | Size = (768, 768), flip: bool = False,
                 pad: bool = True) -> torch.Tensor:
    """Logits ``(B, K, *out_size)`` for a normalized batch ``images`` ``(B, 3, h, w)``.

    ``mode="whole"`` runs the model on the full input; ``mode="slide"`` runs it on
    ``crop_size`` windows every ``stride`` pixels (the last window of a row/column flush
    with the border) and averages the logits where windows overlap. With ``pad=True`` an
    input smaller than the window is first zero-padded at the bottom/right to the window
    size (``pad=False`` runs the smaller patch as is). ``flip=True`` averages with the
    prediction for the horizontally flipped input (flipped back). The logits are resized
    bilinearly (``align_corners=False``) to ``out_size`` (default: the input size): this
    allocates ``4 * K * H * W`` bytes; :func:`segment_input` gives label maps without that.
    Runs under ``torch.inference_mode()`` on the model's device; the caller sets ``eval()``.
    """
    if mode not in TEST_MODES:
        raise ValueError(f"mode must be 'whole' or 'slide', got {mode!r}")
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != 3:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"expected a normalized (B, 3, H, W) tensor, got {shape}")
    crop, step = to_pair(crop_size, "crop_size"), to_pair(stride, "stride")
    if mode == "slide" and (step[0] > crop[0] or step[1] > crop[1]):
        raise ValueError(f"stride {step} larger than crop_size {crop} would leave pixels unpredicted")
    out_size = tuple(images.shape[-2:]) if out_size is None else to_pair(tuple(out_size), "out_size")
    device, dtype = _model_device_dtype(model)
    with torch.inference_mode():
        x = images.to(device=device, dtype=dtype)
        logits = _forward(model, x, mode, crop, step, pad)
        if flip:
            logits = (logits + _forward(model, x.flip(-1), mode, crop, step, pad).flip(-1)) / 2
        if tuple(logits.shape[-2:]) != out_size:
            logits = F.interpolate(logits, size=out_size, mode="bilinear", align_corners=False)
    return logits


def _tta_scale(base: Size, ratio: float) -> Size:
    return int(base[0] * ratio), int(base[1] * ratio)


def infer_tta(model: nn.Module, image: torch.Tensor | Image.Image | np.ndarray, out_size: Size | None = None,
              scales: Sequence[float] = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75), flip: bool = True,
              base_scale: Size = (2048, 512), mode: str = "whole", crop_size: int | Size = (1024, 1024),
              stride: int | Size = (768, 768), divisor: int | None = 32) -> torch.Tensor:
    """Multi-scale (+ flip) test: softmax probabilities ``(1, K, *out_size)`` averaged over
    the scales ``base_scale * ratio`` (and their horizontal flips), each resized to ``out_size``
    (default: the image size) before averaging.

    ``image``: a raw (0-255, not normalized) ``(1, 3, H, W)`` or ``(3, H, W)`` tensor, a PIL
    image or an HxWx3 uint8 array. Use ``divisor=None`` for slide mode (no size rounding).
    """
    if isinstance(image, torch.Tensor) and image.ndim == 4:
        if image.shape[0] != 1:
            raise ValueError(f"infer_tta takes one image, got a batch of {image.shape[0]}")
        image = image[0]
    if not scales:
        raise ValueError("scales must not be empty")
    raw = as_chw(image)
    out_size = tuple(raw.shape[-2:]) if out_size is None else to_pair(tuple(out_size), "out_size")
    probs, n = None, 0
    for ratio in scales:
        x = prepare_test_image(raw[None], _tta_scale(base_scale, ratio), divisor)
        for flipped in ((False, True) if flip else (False,)):
            xi = x.flip(-1) if flipped else x
            p = infer_logits(model, xi, out_size, mode=mode, crop_size=crop_size, stride=stride).softmax(1)
            p = p.flip(-1) if flipped else p
            probs = p if probs is None else probs + p
            n += 1
    return probs / n


def segment_input(model: nn.Module, x: torch.Tensor, out_size: Size, protocol: TestProtocol,
                  confidence: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
    """Label maps ``(B, *out_size)`` (and, when ``confidence``, the probability of the chosen class,
    float32 in 0-1) for a normalized batch ``x`` at its test size, under ``protocol`` (mode,
    window, flip).

    Whole mode without flip runs the model up to its low-resolution logits (``model.decode``
    where the model has one) and resizes them, to the input size and then to ``out_size``, in
    bands; the full-resolution logits never exist. Slide mode and flip keep the logits at the
    input size (bounded by the resize box) and resize those to ``out_size`` in bands.
    """
    low, sizes = protocol_logits(model, x, protocol)
    out_size = to_pair(tuple(out_size), "out_size")
    if not sizes or sizes[-1] != out_size:
        sizes.append(out_size)
    return labels_from_logits(low, sizes, confidence)


def protocol_logits(model: nn.Module, x: torch.Tensor, protocol: TestProtocol) -> tuple[torch.Tensor, list[Size]]:
    """Logits of a normalized batch ``x`` under ``protocol`` (mode, window, flip) at the lowest
    resolution the model gives, and the sizes to resize them through before the output size:
    the decoder's logits and ``[input size]`` in whole mode without flip (``model.decode``
    where the model has one), else the logits at the input size and ``[]``."""
    device, dtype = _model_device_dtype(model)
    with torch.inference_mode():
        if protocol.mode == "whole" and not protocol.flip and hasattr(model, "decode"):
            return model.decode(x.to(device=device, dtype=dtype)), [tuple(x.shape[-2:])]
        return infer_logits(model, x, None, mode=protocol.mode, crop_size=protocol.crop_size,
                            stride=protocol.stride, flip=protocol.flip), []


def protocol_tta(model: nn.Module, raw: torch.Tensor, protocol: TestProtocol) -> torch.Tensor:
    """The multi-scale (+ flip) test of ``protocol`` on a raw ``(3, H, W)`` image: softmax
    probabilities ``(1, K, H, W)``."""
    out_size = tuple(raw.shape[-2:])
    return infer_tta(model, raw, out_size, scales=protocol.tta_scales, flip=protocol.flip,
                     base_scale=protocol.scale or out_size, mode=protocol.mode, crop_size=protocol.crop_size,
                     stride=protocol.stride, divisor=protocol.size_divisor)


def segment_image(model: nn.Module, image: ImageInput, protocol: TestProtocol,
                  confidence: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
    """Label map ``(H, W)`` of one raw image at its original size (and, when ``confidence``, the
    probability of the chosen class, float32 in 0-1): :func:`~.protocol.preprocess`, then
    :func:`segment_input`, or the multi-scale test when ``protocol.tta_scales``."""
    raw = as_chw(image)
    out_size = tuple(raw.shape[-2:])
    if protocol.tta_scales:
        probs = protocol_tta(model, raw, protocol)
        labels = probs.argmax(1)[0].cpu().numpy().astype(np.uint8 if probs.shape[1] <= 256 else np.int64)
        conf = probs.amax(1)[0].float().cpu().numpy() if confidence else None
        return labels, conf
    device, _ = _model_device_dtype(model)
    x = prepare_test_image(raw.to(device)[None], protocol.scale, protocol.size_divisor)
    labels, conf = segment_input(model, x, out_size, protocol, confidence)
    return labels[0], None if conf is None else conf[0]


def image_probabilities(model: nn.Module, image: ImageInput, protocol: TestProtocol) -> torch.Tensor:
    """Softmax probabilities ``(1, K, H, W)`` of one raw image at its original size under
    ``protocol`` (the multi-scale average when ``protocol.tta_scales``): the full-resolution
    distribution whose argmax :func:`segment_image` computes in bands."""
    raw = as_chw(image)
    if protocol.tta_scales:
        return protocol_tta(model, raw, protocol)
    device, _ = _model_device_dtype(model)
    x = prepare_test_image(raw.to(device)[None], protocol.scale, protocol.size_divisor)
    logits = infer_logits(model, x, tuple(raw.shape[-2:]), mode=protocol.mode, crop_size=protocol.crop_size,
                          stride=protocol.stride, flip=protocol.flip)
    return logits.float().softmax(1)
