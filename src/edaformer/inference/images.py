"""Reading images and turning the accepted image inputs into ``(3, H, W)`` tensors."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Union

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

__all__ = ["ImageInput", "load_image", "to_rgb", "as_chw"]

ImageInput = Union[str, os.PathLike, Image.Image, np.ndarray, torch.Tensor]


def to_rgb(img: Image.Image) -> Image.Image:
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
    """Read an image file as 8-bit RGB (grayscale, palette, RGBA, 16-bit... are converted), turned
    upright by its EXIF orientation. Raises ``ValueError`` naming the file if it is missing or
    cannot be decoded."""
    path = Path(path)
    try:
        with Image.open(path) as img:
            img.load()
            upright = ImageOps.exif_transpose(img)
            return to_rgb(upright if upright is not None else img)
    except FileNotFoundError:
        raise ValueError(f"cannot read image {path}: no such file") from None
    except IsADirectoryError:
        raise ValueError(f"cannot read image {path}: is a directory") from None
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError, SyntaxError) as e:
        raise ValueError(f"cannot read image {path}: {e}") from e


def _rgb_array(image: np.ndarray) -> np.ndarray:
    """An ``(H, W)``, ``(H, W, 1)``, ``(H, W, 3)`` or ``(H, W, 4)`` array as ``(H, W, 3)``: gray is
    repeated, alpha dropped, as for image files."""
    if image.ndim == 2:
        image = image[:, :, None]
    if image.ndim != 3 or image.shape[2] not in (1, 3, 4):
        raise ValueError(f"expected an HxW gray, HxWx3 RGB or HxWx4 RGBA array, got shape {image.shape}")
    if image.shape[2] == 1:
        return np.repeat(image, 3, axis=2)
    return image[:, :, :3]


def _unit_to_255(image: torch.Tensor) -> torch.Tensor:
    """A floating-point image in [0, 1] (torchvision's convention) as float32 0-255."""
    if image.numel():
        low, high = float(image.min()), float(image.max())
        if low < -1e-3 or high > 1 + 1e-3:
            raise ValueError(f"a floating-point image must hold values in [0, 1] (torchvision's convention); this "
                             f"one spans [{low:g}, {high:g}]: divide 0-255 values by 255, or pass uint8")
    return image.float().mul(255.0).clamp_(0.0, 255.0)


def as_chw(image: ImageInput) -> torch.Tensor:
    """An image as a ``(3, H, W)`` tensor with values in 0-255: uint8 for files, PIL images and uint8
    arrays / tensors (no copy where possible), float32 for floating-point ones, which must hold values
    in [0, 1] as torchvision's do. Arrays may be ``(H, W)`` gray, ``(H, W, 3)`` RGB or ``(H, W, 4)``
    RGBA, tensors ``(1 | 3 | 4, H, W)``; gray is repeated and alpha dropped, as for files."""
    if isinstance(image, (str, os.PathLike)):
        image = load_image(image)
    if isinstance(image, Image.Image):
        image = np.asarray(to_rgb(image), dtype=np.uint8)
    if isinstance(image, np.ndarray):
        image = _rgb_array(image)
        if image.dtype.kind == "f":
            return _unit_to_255(torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1))
        if image.dtype != np.uint8:
            raise ValueError(f"expected a uint8 or floating-point array, got dtype {image.dtype}")
        if not image.flags.writeable:
            image = image.copy()
        return torch.from_numpy(image).permute(2, 0, 1)
    if isinstance(image, torch.Tensor):
        if image.ndim == 2:
            image = image[None]
        if image.ndim != 3 or image.shape[0] not in (1, 3, 4):
            raise ValueError(f"expected a (3, H, W) RGB, (1, H, W) gray or (4, H, W) RGBA tensor, "
                             f"got shape {tuple(image.shape)}")
        image = image[:3] if image.shape[0] != 1 else image.expand(3, -1, -1)
        if image.dtype == torch.uint8:
            return image
        if not image.is_floating_point():
            raise ValueError(f"expected a uint8 or floating-point tensor, got {image.dtype}")
        return _unit_to_255(image)
    raise ValueError(f"unsupported image type {type(image).__name__}; "
                     "give a path, a PIL image, an HxWx3 uint8 array or a (3, H, W) tensor")
