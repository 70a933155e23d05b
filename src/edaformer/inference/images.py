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


def as_chw(image: ImageInput) -> torch.Tensor:
    """An image as a ``(3, H, W)`` tensor with values in 0-255: uint8 for files, PIL images, uint8
    arrays and uint8 tensors (no copy where possible), float32 for floating-point tensors."""
    if isinstance(image, (str, os.PathLike)):
        image = load_image(image)
    if isinstance(image, Image.Image):
        image = np.asarray(to_rgb(image), dtype=np.uint8)
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"expected an HxWx3 RGB array, got shape {image.shape}")
        if image.dtype != np.uint8:
            raise ValueError(f"expected a uint8 array, got dtype {image.dtype}")
        if not image.flags.writeable:
            image = image.copy()
        return torch.from_numpy(image).permute(2, 0, 1)
    if isinstance(image, torch.Tensor):
        if image.ndim != 3 or image.shape[0] != 3:
            raise ValueError(f"expected a (3, H, W) tensor, got shape {tuple(image.shape)}")
        if image.dtype == torch.uint8:
            return image
        if not image.is_floating_point():
            raise ValueError(f"expected a uint8 or floating-point tensor, got {image.dtype}")
        return image.float()
    raise ValueError(f"unsupported image type {type(image).__name__}; "
                     "give a path, a PIL image, an HxWx3 uint8 array or a (3, H, W) tensor")
