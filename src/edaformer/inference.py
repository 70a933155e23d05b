"""Inference: image loading, the reference test-time resize, whole / sliding-window /
multi-scale inference, and :class:`Segmenter`, a small image-to-label-map API.

The test protocol follows the reference (mmsegmentation-style) one: images are resized,
keeping their aspect ratio, to fit a ``(long, short)`` box, normalized with :data:`MEAN` and
:data:`STD` (RGB, 0-255), run whole or with a sliding window, and the logits are resized
bilinearly back to the original size.
"""
from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from torch import nn

from .data.palettes import class_names, get_dataset_info, make_palette
from .data.transforms import fit_size as fit_box
from .utils import resolve_device, to_pair

__all__ = ["MEAN", "STD", "load_image", "test_size", "preprocess", "infer_logits", "infer_tta", "Segmenter",
           "colorize", "overlay", "ImageInput"]

MEAN = (123.675, 116.28, 103.53)
STD = (58.395, 57.12, 57.375)

ImageInput = Union[str, os.PathLike, Image.Image, np.ndarray, torch.Tensor]
Size = tuple[int, int]


# -- loading -----------------------------------------------------------------------------
def _to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB. 16/32-bit integer images are scaled from the
    16-bit range (65535 -> 255); float images in [0, 1] are scaled to 0-255. Alpha is dropped."""
    if img.mode == "RGB":
        return img
    if img.mode.startswith("I") or img.mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        if img.mode.startswith("I;16") or (img.mode == "I" and arr.size and arr.max() > 255):
            arr = arr / 257.0
        elif img.mode == "F" and arr.size and arr.max() <= 1.0:
            arr = arr * 255.0
        arr = np.clip(np.rint(arr), 0, 255).astype(np.uint8)
        return Image.fromarray(arr, mode="L").convert("RGB")
    try:
        return img.convert("RGB")
    except (ValueError, OSError) as e:
        raise ValueError(f"cannot convert a {img.mode!r} image to RGB: {e}") from e


def load_image(path: str | os.PathLike) -> Image.Image:
    """Read an image file as 8-bit RGB (grayscale, palette, RGBA, 16-bit... are converted).

    Pixels are kept in their stored layout (EXIF orientation is not applied), so that
    predictions line up with annotation files. Raises ``ValueError`` naming the file if it
    is missing or cannot be decoded.
    """
    path = Path(path)
    try:
        with Image.open(path) as img:
            img.load()
            return _to_rgb(img)
    except FileNotFoundError:
        raise ValueError(f"cannot read image {path}: no such file") from None
    except IsADirectoryError:
        raise ValueError(f"cannot read image {path}: is a directory") from None
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError, SyntaxError) as e:
        raise ValueError(f"cannot read image {path}: {e}") from e


# -- resizing ------------------------------------------------------------------------------
def _round_to(side: int, divisor: int) -> int:
    """Round ``side`` up to a multiple of ``divisor``, as the reference test pipeline does."""
    return -(-side // divisor) * divisor


def fit_size(h: int, w: int, scale: Size = (2048, 512)) -> Size:
    """Keep-ratio size of an ``h x w`` image fitted into the ``(long, short)`` box ``scale``.

    Scale factor ``min(long / max(h, w), short / min(h, w))``, sides ``int(side * factor + 0.5)``.
    """
    if h < 1 or w < 1:
        raise ValueError(f"image size must be positive, got {h}x{w}")
    if len(scale) != 2 or min(scale) < 1:
        raise ValueError(f"scale must be two positive sides (long, short), got {scale!r}")
    new_h, new_w = fit_box((h, w), scale)
    return max(1, new_h), max(1, new_w)


def test_size(h: int, w: int, scale: Size = (2048, 512), divisor: int | None = 32) -> Size:
    """The test-time input size of an ``h x w`` image: :func:`fit_size`, then both sides
    rounded up to a multiple of ``divisor`` (``None`` or 1 skips it). Returns ``(new_h, new_w)``.
    """
    new_h, new_w = fit_size(h, w, scale)
    if divisor is not None and divisor > 1:
        new_h, new_w = _round_to(new_h, divisor), _round_to(new_w, divisor)
    return new_h, new_w


test_size.__test__ = False  # a library function, not a pytest test when imported into one


def _as_chw(image: ImageInput) -> tuple[torch.Tensor, bool]:
    """An image as a float ``(3, H, W)`` tensor in 0-255, and whether it came as 8-bit."""
    if isinstance(image, (str, os.PathLike)):
        image = load_image(image)
    if isinstance(image, Image.Image):
        image = np.asarray(_to_rgb(image), dtype=np.uint8)
        return torch.from_numpy(image.astype(np.float32)).permute(2, 0, 1).contiguous(), True
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"expected an HxWx3 RGB array, got shape {image.shape}")
        if image.dtype != np.uint8:
            raise ValueError(f"expected a uint8 array, got dtype {image.dtype}")
        return torch.from_numpy(image.astype(np.float32)).permute(2, 0, 1).contiguous(), True
    if isinstance(image, torch.Tensor):
        if image.ndim != 3 or image.shape[0] != 3:
            raise ValueError(f"expected a (3, H, W) tensor, got shape {tuple(image.shape)}")
        if image.dtype == torch.uint8:
            return image.float(), True
        if not image.is_floating_point():
            raise ValueError(f"expected a uint8 or floating-point tensor, got {image.dtype}")
        return image.float(), False
    raise ValueError(f"unsupported image type {type(image).__name__}; "
                     "give a path, a PIL image, an HxWx3 uint8 array or a (3, H, W) tensor")


def _resize_image(x: torch.Tensor, size: Size, quantize: bool) -> torch.Tensor:
    """Bilinear resize of a ``(B, 3, H, W)`` 0-255 batch (no antialiasing, like OpenCV)."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
    return x.round().clamp_(0, 255) if quantize else x


def _test_resize(x: torch.Tensor, scale: Size, divisor: int | None, quantize: bool) -> torch.Tensor:
    """Two resizes, as the reference test pipeline: fit the box, then align the sides to ``divisor``."""
    x = _resize_image(x, fit_size(x.shape[-2], x.shape[-1], scale), quantize)
    return _resize_image(x, test_size(x.shape[-2], x.shape[-1], scale, divisor), quantize)


def _normalize(x: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(MEAN, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(STD, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


def preprocess(image: ImageInput, scale: Size | None, divisor: int | None = 32,
               device: torch.device | str | None = None) -> torch.Tensor:
    """Resize (see :func:`test_size`) and normalize one image into a ``(1, 3, h, w)`` float32 tensor.

    ``image``: a path, a PIL image (any mode, converted to RGB), an HxWx3 uint8 array or a
    ``(3, H, W)`` tensor, uint8 or float with values in 0-255. ``scale=None`` keeps the size.
    """
    x, is_uint8 = _as_chw(image)
    if device is not None:
        x = x.to(device)
    x = x.unsqueeze(0)
    if scale is not None:
        x = _test_resize(x, scale, divisor, quantize=is_uint8)
    return _normalize(x)


# -- inference -----------------------------------------------------------------------------
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
    bilinearly (``align_corners=False``) to ``out_size`` (default: the input size).
    Runs under ``torch.inference_mode()`` on the model's device; the caller sets ``eval()``.
    """
    if mode not in ("whole", "slide"):
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
    raw, is_uint8 = _as_chw(image)
    out_size = tuple(raw.shape[-2:]) if out_size is None else to_pair(tuple(out_size), "out_size")
    raw = raw.unsqueeze(0)
    probs, n = None, 0
    for ratio in scales:
        x = _normalize(_test_resize(raw, _tta_scale(base_scale, ratio), divisor, quantize=is_uint8))
        for flipped in ((False, True) if flip else (False,)):
            xi = x.flip(-1) if flipped else x
            p = infer_logits(model, xi, out_size, mode=mode, crop_size=crop_size, stride=stride).softmax(1)
            p = p.flip(-1) if flipped else p
            probs = p if probs is None else probs + p
            n += 1
    return probs / n


# -- visualization ---------------------------------------------------------------------------
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
    img = Image.fromarray(label.astype(np.uint8), mode="L").convert("P")
    img.putpalette(flat.reshape(-1).tolist())
    return img


def overlay(image: ImageInput, label: np.ndarray | torch.Tensor, palette: Sequence[Sequence[int]],
            alpha: float = 0.5) -> Image.Image:
    """RGB image: ``(1 - alpha) * image + alpha * colour(label)``; ids without a colour are left as is."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    rgb = _as_chw(image)[0].permute(1, 2, 0).cpu().numpy()
    label = _label_array(label)
    if label.shape != rgb.shape[:2]:
        raise ValueError(f"label {label.shape} and image {rgb.shape[:2]} sizes differ")
    pal = _palette_array(palette).astype(np.float64)
    known = (label >= 0) & (label < len(pal))
    out = rgb.astype(np.float64)
    colours = pal[label[known]]
    out[known] = (1.0 - alpha) * out[known] + alpha * colours
    return Image.fromarray(np.clip(np.rint(out), 0, 255).astype(np.uint8), mode="RGB")


# -- Segmenter ---------------------------------------------------------------------------------
def _checkpoint_num_classes(obj: dict[str, Any]) -> int | None:
    """The class count a checkpoint was trained for, from its classifier weight."""
    state = obj
    for key in ("state_dict", "model", "module"):
        if isinstance(obj.get(key), dict):
            state = obj[key]
            break
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            continue
        if key.endswith(("decoder.classifier.weight", "decode_head.linear_pred.weight")):
            return int(value.shape[0])
    return None


class Segmenter:
    """Image -> label map with a model and the reference test protocol of its dataset.

    ADE20K / COCO-Stuff models: whole-image inference at :func:`test_size` (fit (2048, 512),
    sides rounded to a multiple of 32). Cityscapes models: fit (2048, 1024), then sliding
    windows of 1024 every 768. The protocol comes from ``model.spec``; keyword arguments
    ``test_scale``, ``mode``, ``crop_size``, ``stride``, ``divisor`` override it.

    >>> seg = Segmenter.from_checkpoint("edaformer-t-ade20k", "edaformer_t_ade.pth", isr="2211-222")
    >>> label = seg("image.jpg")            # (H, W) class ids at the original size
    >>> overlay(load_image("image.jpg"), label, seg.palette).save("overlay.png")
    """

    def __init__(self, model: nn.Module, device: torch.device | str | None = None, isr: Any = None, *,
                 classes: Sequence[str] | None = None, palette: Sequence[Sequence[int]] | None = None,
                 test_scale: Size | None = None, mode: str | None = None, crop_size: Size | None = None,
                 stride: Size | None = None, divisor: int | None = None, flip: bool = False):
        self.device = resolve_device(device)
        self.model = model.to(self.device).eval()
        if isr is not None:
            model.set_isr(isr)
        spec = getattr(model, "spec", None)
        self.mode = mode or getattr(spec, "test_mode", "whole")
        if self.mode not in ("whole", "slide"):
            raise ValueError(f"mode must be 'whole' or 'slide', got {self.mode!r}")
        self.test_scale = tuple(test_scale or getattr(spec, "test_scale", (2048, 512)))
        self.crop_size = to_pair(tuple(crop_size or getattr(spec, "crop_size", (1024, 1024))), "crop_size")
        self.stride = to_pair(tuple(stride or getattr(spec, "slide_stride", (768, 768))), "stride")
        self.divisor = divisor if divisor is not None else (32 if self.mode == "whole" else None)
        self.flip = flip
        self.num_classes = int(getattr(model, "num_classes", 0) or 0)
        self.classes, self.palette = self._class_info(spec, classes, palette)

    def _class_info(self, spec, classes, palette) -> tuple[tuple[str, ...], tuple[tuple[int, int, int], ...]]:
        k = self.num_classes
        info = None
        if spec is not None:
            try:
                info = get_dataset_info(spec.dataset)
            except ValueError:
                info = None
        if info is not None and info.num_classes != k:
            info = None
        if classes is None or len(classes) != k:
            classes = info.classes if info else class_names(k)
        if palette is None or len(palette) != k:
            palette = info.palette if info else make_palette(k)
        return tuple(str(c) for c in classes), tuple(tuple(int(v) for v in c) for c in palette)

    @classmethod
    def from_checkpoint(cls, name: str, checkpoint_path: str | os.PathLike, device: torch.device | str | None = None,
                        isr: Any = None, num_classes: int | None = None, **kwargs) -> "Segmenter":
        """Build the named model, load a checkpoint (any supported format) and wrap it.

        Class names / palette come from the checkpoint's ``meta`` (``CLASSES``, ``PALETTE``)
        when present, else from the model's dataset. ``num_classes`` defaults to the
        checkpoint's classifier size.
        """
        from .checkpoint import load_checkpoint, read_checkpoint
        from .models import create_model

        device = resolve_device(device)
        obj = read_checkpoint(checkpoint_path)
        if num_classes is None:
            num_classes = _checkpoint_num_classes(obj)
        model = create_model(name, num_classes=num_classes)
        report = load_checkpoint(model, obj)
        meta = report.get("meta") or {}
        kwargs.setdefault("classes", _meta_sequence(meta.get("CLASSES")))
        kwargs.setdefault("palette", _meta_sequence(meta.get("PALETTE")))
        return cls(model, device=device, isr=isr, **kwargs)

    # prediction ------------------------------------------------------------------------------
    def _input_size(self, h: int, w: int) -> Size:
        return test_size(h, w, self.test_scale, self.divisor)

    def _run(self, batch: torch.Tensor, out_size: Size) -> torch.Tensor:
        return infer_logits(self.model, batch, out_size, mode=self.mode, crop_size=self.crop_size,
                            stride=self.stride, flip=self.flip)

    def logits(self, image: ImageInput) -> torch.Tensor:
        """Logits ``(1, K, H, W)`` at the original size of one image."""
        raw, is_uint8 = _as_chw(image)
        raw = raw.to(self.device).unsqueeze(0)
        size = self._input_size(*raw.shape[-2:])
        return self._run(_normalize(_resize_image(raw, size, is_uint8)), tuple(raw.shape[-2:]))

    def _labels(self, logits: torch.Tensor) -> np.ndarray:
        labels = logits.argmax(1).cpu().numpy()
        return labels.astype(np.uint8 if self.num_classes <= 256 else np.int64)

    def __call__(self, image: ImageInput) -> np.ndarray:
        """Label map ``(H, W)`` (uint8, or int64 beyond 256 classes) at the original size."""
        return self._labels(self.logits(image))[0]

    def predict_batch(self, images: Iterable[ImageInput], batch_size: int = 8) -> list[np.ndarray]:
        """Label maps for many images; images of the same size are run together in batches."""
        raws = [_as_chw(img) for img in images]
        out: list[np.ndarray | None] = [None] * len(raws)
        groups: dict[tuple[int, int, bool], list[int]] = {}
        for i, (raw, is_uint8) in enumerate(raws):
            groups.setdefault((raw.shape[-2], raw.shape[-1], is_uint8), []).append(i)
        for (h, w, is_uint8), idx in groups.items():
            size = self._input_size(h, w)
            for start in range(0, len(idx), max(1, batch_size)):
                chunk = idx[start:start + max(1, batch_size)]
                batch = torch.stack([raws[i][0] for i in chunk]).to(self.device)
                labels = self._labels(self._run(_normalize(_resize_image(batch, size, is_uint8)), (h, w)))
                for i, lab in zip(chunk, labels):
                    out[i] = lab
        return out  # type: ignore[return-value]

    def __repr__(self) -> str:
        name = getattr(self.model, "name", type(self.model).__name__)
        return (f"Segmenter({name}, classes={self.num_classes}, mode={self.mode}, scale={self.test_scale}, "
                f"device={self.device})")


def _meta_sequence(value: Any) -> tuple | None:
    return tuple(value) if isinstance(value, (list, tuple)) and value else None
