"""Image classification data for encoder pretraining, on timm's parts.

:func:`build_classification_dataset` is ``timm.data.create_dataset`` (so a class-folder tree, a
tar file, Hugging Face datasets and webdataset shards all work) whose map-style datasets name
an image that cannot be read (:class:`NamedImageDataset`). :func:`train_transform` /
:func:`eval_transform` are ``timm.data.create_transform`` from the ``data`` section of a
pretraining config, with the RandAugment posterize fix of :func:`fix_posterize`.
"""
from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

from PIL import Image, ImageOps
from torch.utils.data import Dataset, IterableDataset

from .datasets import DatasetError
from timm.data.auto_augment import AugmentOp
from timm.data import create_transform
from timm.data import create_dataset

__all__ = ["build_classification_dataset", "NamedImageDataset", "train_transform", "eval_transform",
           "fix_posterize", "posterize"]

log = logging.getLogger("edaformer")


# -- RandAugment's posterize at its strongest ---------------------------------------------------
def posterize(img: Image.Image, bits_to_keep: int, **_: Any) -> Image.Image:
    """Keep the ``bits_to_keep`` most significant bits of every channel; 0 bits keep none (a black
    image, as Pillow before 13 gave), 8 or more keep the image.

    timm's ``PosterizeIncreasing`` (the ``inc1`` RandAugment ops) maps magnitude 10 to 0 bits:
    ``4 - int(10 / 10 * 4)``. With ``mstd0.5`` the magnitude is drawn around 9 and clipped to
    [0, 10], so about 2 % of the draws reach 10, and Pillow 13's ``ImageOps.posterize`` refuses
    0 bits ("bits must be between or equal to 1 and 8"). The recipe's op is the 0-bit one, so that
    case is done here rather than avoided (capping the magnitude, ``mmax9``, would change every
    op's distribution, not only this one's).
    """
    if bits_to_keep >= 8:
        return img
    if bits_to_keep >= 1:
        return ImageOps.posterize(img, bits_to_keep)
    return img.point(lambda _: 0)


def fix_posterize(transform: Any) -> Any:
    """Point every posterize op of the RandAugment / AutoAugment transforms inside ``transform``
    (a torchvision ``Compose`` or one transform) at :func:`posterize`; returns ``transform``."""
    def visit(t: Any) -> None:
        if isinstance(t, AugmentOp):
            if t.name.startswith("Posterize"):
                t.aug_fn = posterize
        elif isinstance(t, (list, tuple)):  # AutoAugment's policy: a list of sub-policies
            for child in t:
                visit(child)
        else:  # Compose, RandAugment / AugMix, AutoAugment
            for attr in ("transforms", "ops", "policy"):
                if isinstance(getattr(t, attr, None), (list, tuple)):
                    visit(getattr(t, attr))

    visit(transform)
    return transform


# -- transforms --------------------------------------------------------------------------------
def train_transform(data_cfg: Mapping[str, Any], mean: Sequence[float], std: Sequence[float]) -> Any:
    """timm's ImageNet training transform: random-resized crop, flip, RandAugment (or colour jitter
    without it), normalisation, random erasing."""
    transform = create_transform(
        input_size=data_cfg["img_size"], is_training=True, scale=tuple(data_cfg["scale"]), hflip=data_cfg["hflip"],
        color_jitter=data_cfg["color_jitter"], auto_augment=data_cfg["auto_augment"],
        interpolation=data_cfg["interpolation"], mean=tuple(mean), std=tuple(std), re_prob=data_cfg["re_prob"],
        re_mode=data_cfg["re_mode"], re_count=data_cfg["re_count"])
    return fix_posterize(transform)


def eval_transform(data_cfg: Mapping[str, Any], mean: Sequence[float], std: Sequence[float]) -> Any:
    """Resize the short side to ``img_size / crop_pct``, centre crop ``img_size``, normalise."""
    interpolation = "bicubic" if data_cfg["interpolation"] == "random" else data_cfg["interpolation"]
    return create_transform(input_size=data_cfg["img_size"], is_training=False, interpolation=interpolation,
                            crop_pct=data_cfg["crop_pct"], mean=tuple(mean), std=tuple(std))


# -- datasets ----------------------------------------------------------------------------------
class NamedImageDataset(Dataset):
    """A timm map-style ``ImageDataset`` whose unreadable images are named: a
    :class:`~edaformer.data.DatasetError` with the file (``skip_bad=False``), or a warning naming
    it and the next readable sample (``skip_bad=True``, at most 10 in a row)."""

    def __init__(self, dataset: Any, transform: Any = None, skip_bad: bool = False, what: str = "image",
                 root: str | None = None):
        self.dataset, self.transform, self.skip_bad, self.what, self.root = dataset, transform, skip_bad, what, root
        self.reader = dataset.reader

    @property
    def class_to_idx(self) -> dict[str, int] | None:
        """Class name -> index (folder, tar and Hugging Face readers)."""
        return getattr(self.reader, "class_to_idx", None) or getattr(self.reader, "class_name_to_idx", None)

    def __len__(self) -> int:
        return len(self.reader)

    def filename(self, index: int) -> str:
        """The sample's file: a path, or ``archive:member`` for a tar file."""
        try:
            name = str(self.reader.filename(index, absolute=True))
        except Exception:  # noqa: BLE001 - a reader without file names
            return f"sample {index}" + (f" of {self.root}" if self.root else "")
        return name if name.startswith("/") or not self.root else f"{self.root}:{name}"

    def _load(self, index: int) -> tuple[Image.Image, int]:
        item = self.reader[index]
        img, target = item[0], item[1]
        if isinstance(img, Image.Image):
            return img.convert("RGB"), target
        try:
            with Image.open(img) as opened:
                return opened.convert("RGB"), target  # convert decodes every pixel
        finally:
            if hasattr(img, "close"):
                img.close()

    def __getitem__(self, index: int) -> tuple[Any, int]:
        for _ in range(10):
            try:
                img, target = self._load(index)
                break
            except Exception as e:  # noqa: BLE001 - re-raised or skipped with the file named
                message = f"cannot read {self.what} {self.filename(index)}: {type(e).__name__}: {e}"
                if not self.skip_bad:
                    raise DatasetError(f"{message} (remove or replace the file, or set data.skip_bad_images=true)"
                                       ) from None
                log.warning("%s; skipped", message)
                index = (index + 1) % len(self)
        else:
            raise DatasetError(f"10 unreadable {self.what}s in a row, the last {self.filename(index)}")
        if self.transform is not None:
            img = self.transform(img)
        return img, -1 if target is None else int(target)


def build_classification_dataset(data_cfg: Mapping[str, Any], split: str, transform: Any, *, is_training: bool,
                                 class_map: Any = None, seed: int = 0, batch_size: int = 1) -> Dataset:
    """``timm.data.create_dataset`` for ``data.train_split`` or ``data.val_split`` (``split``:
    ``train`` / ``val``) with ``transform``; map-style datasets come wrapped in
    :class:`NamedImageDataset`. ``class_map`` (a file or a dict) fixes the class indices, so
    that a validation folder with fewer classes keeps the training set's numbering."""
    root = data_cfg["root"] if split == "train" or not data_cfg.get("val_root") else data_cfg["val_root"]
    name = data_cfg.get("dataset") or ""
    kwargs: dict[str, Any] = dict(root=root, split=data_cfg["train_split" if split == "train" else "val_split"],
                                  is_training=is_training, batch_size=batch_size, seed=seed)
    if class_map:
        kwargs["class_map"] = class_map
    if data_cfg.get("num_samples") and split == "train":
        kwargs["num_samples"] = data_cfg["num_samples"]
    try:
        dataset = create_dataset(name, **kwargs)
    except (RuntimeError, AssertionError, FileNotFoundError) as e:
        raise DatasetError(f"cannot open the {split} set ({name or 'folder / tar'} at {root}, split "
                           f"{kwargs['split']!r}): {e}") from None
    if hasattr(dataset, "reader") and not isinstance(dataset, IterableDataset):
        return NamedImageDataset(dataset, transform, skip_bad=data_cfg.get("skip_bad_images", False),
                                 what=f"{split} image", root=str(root))
    dataset.transform = transform  # iterable (streaming) datasets and others: timm's own error handling
    return dataset
