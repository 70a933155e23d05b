"""Semantic-segmentation datasets: images and single-channel label PNGs paired by file stem.

Every dataset returns labels with its ignore value already mapped to 255, so everything
downstream (losses, metrics) uses ``ignore_index=255``. Items are ``(image, label)`` as
``tv_tensors.Image`` (uint8, ``(3, H, W)``) and ``tv_tensors.Mask`` (uint8, ``(H, W)``), or
whatever ``transforms(image, label)`` returns.
"""
from __future__ import annotations

import fnmatch
import logging
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import tv_tensors
from tqdm import tqdm

from .palettes import class_names, get_dataset_info, make_palette

__all__ = ["SegmentationDataset", "ADE20K", "Cityscapes", "COCOStuff", "FolderDataset", "DatasetError",
           "IGNORE_INDEX", "dataset_info", "matches_filter"]

log = logging.getLogger("edaformer")

IGNORE_INDEX = 255
_MAX_LISTED = 5  # how many offending files an error message names


class DatasetError(ValueError):
    """A dataset's folders, pairing or file contents are not what the dataset expects."""


def dataset_info(name: str) -> tuple[list[str], list[tuple[int, int, int]]]:
    """Class names and palette of a named dataset (see :mod:`edaformer.data.palettes`)."""
    info = get_dataset_info(name)
    return list(info.classes), [tuple(int(v) for v in c) for c in info.palette]


def _list_files(folder: Path, suffix: str) -> list[Path]:
    return sorted(p for p in folder.rglob(f"*{suffix}") if p.is_file())


def _names(paths: Sequence[Any]) -> str:
    shown = ", ".join(str(p) for p in paths[:_MAX_LISTED])
    return shown + (f", ... ({len(paths) - _MAX_LISTED} more)" if len(paths) > _MAX_LISTED else "")


def matches_filter(stem: str, patterns: Sequence[str] | None) -> bool:
    """Whether an image's stem (its path below the split folder, without the suffix, ``/``
    separated) passes ``patterns``: shell-style patterns (``0006R0_*``), those starting with ``!``
    excluding. A stem passes when it matches some plain pattern (or there is none) and no
    ``!`` pattern. A list of exact stems is a split file's worth of patterns."""
    if not patterns:
        return True
    keep = [p for p in patterns if not p.startswith("!")]
    drop = [p[1:] for p in patterns if p.startswith("!")]
    return ((not keep or any(fnmatch.fnmatchcase(stem, p) for p in keep))
            and not any(fnmatch.fnmatchcase(stem, p) for p in drop))


def read_image(path: str | Path) -> tv_tensors.Image:
    """An RGB image file as a uint8 ``(3, H, W)`` ``tv_tensors.Image``; an unreadable file raises
    :class:`DatasetError` naming it."""
    try:
        with Image.open(path) as im:
            arr = np.array(im.convert("RGB"))
    except (OSError, SyntaxError, ValueError) as e:
        raise DatasetError(f"cannot read image {path}: {e}") from e
    return tv_tensors.Image(torch.from_numpy(arr).permute(2, 0, 1).contiguous())


def read_label(path: str | Path) -> np.ndarray:
    """A single-channel label file as a 2-D array of non-negative integers; an unreadable file
    raises :class:`DatasetError` naming it."""
    try:
        with Image.open(path) as im:
            mode = im.mode
            arr = np.array(im)
    except (OSError, SyntaxError, ValueError) as e:
        raise DatasetError(f"cannot read label {path}: {e}") from e
    if arr.ndim != 2:
        raise DatasetError(f"label {path} is not single-channel (shape {arr.shape}, mode {mode}); "
                           "labels must hold one class id per pixel")
    if arr.dtype == bool:
        arr = arr.astype(np.uint8)
    if arr.dtype.kind == "i":
        if arr.size and arr.min() < 0:
            raise DatasetError(f"label {path} has negative values {sorted(set(arr[arr < 0].tolist()))[:10]}")
        arr = arr.astype(np.int64)
    elif arr.dtype.kind != "u":
        raise DatasetError(f"label {path} has non-integer pixels ({arr.dtype})")
    return arr


class SegmentationDataset(Dataset):
    """Images under ``img_dir`` paired with labels under ``ann_dir`` by relative path and stem:
    ``img_dir/a/b<img_suffix>`` goes with ``ann_dir/a/b<seg_suffix>``.

    Args:
        img_dir, ann_dir: image and label folders (searched recursively), or equally long lists of
            them (e.g. the train and val splits together).
        classes: class names (``num_classes = len(classes)``, at most 255).
        palette: one RGB triple per class; generated when None.
        img_suffix, seg_suffix: file name endings that identify images and labels.
        ignore_value: label value in the files that means "ignore"; mapped to 255. The file value
            255 is always ignored.
        reduce_zero_label: map 0 to ignore and 1.. to 0.. (ADE20K convention).
        transforms: called as ``transforms(image, label)``; its result is the item.
        include: keep only the images whose stem passes these patterns (:func:`matches_filter`),
            e.g. ``["0006R0_*"]`` for one drive or ``["!0006R0_*"]`` for all others.
    """

    ignore_index: int = IGNORE_INDEX
    missing_label_hint: str = ""

    def __init__(self, img_dir: str | Path | Sequence[str | Path], ann_dir: str | Path | Sequence[str | Path], *,
                 classes: Sequence[str], palette: Sequence[Sequence[int]] | None = None, img_suffix: str = ".jpg",
                 seg_suffix: str = ".png", ignore_value: int | None = None, reduce_zero_label: bool = False,
                 transforms: Callable | None = None, include: Sequence[str] | None = None) -> None:
        self.classes = list(classes)
        self.num_classes = len(self.classes)
        if not 0 < self.num_classes <= 255:
            raise DatasetError(f"a dataset needs 1 to 255 classes (255 is the ignore value), got {self.num_classes}")
        palette = list(make_palette(self.num_classes)) if palette is None else [tuple(int(v) for v in c) for c in palette]
        if len(palette) != self.num_classes or any(len(c) != 3 for c in palette):
            raise DatasetError(f"the palette (data.palette) must hold one RGB triple per class: {self.num_classes} "
                               f"classes (data.classes) but {len(palette)} palette entries")
        self.palette = palette
        self.img_dirs, self.ann_dirs = _paths(img_dir), _paths(ann_dir)
        if len(self.img_dirs) != len(self.ann_dirs) or not self.img_dirs:
            raise DatasetError(f"{len(self.img_dirs)} image folder(s) but {len(self.ann_dirs)} label folder(s)")
        self.img_dir, self.ann_dir = self.img_dirs[0], self.ann_dirs[0]
        self.img_suffix, self.seg_suffix = img_suffix, seg_suffix
        self.include = list(include) if include else None
        self.ignore_value = ignore_value
        self.reduce_zero_label = reduce_zero_label
        self.transforms = transforms
        self._lut, self._valid = self._value_tables(256)
        self.samples = [s for img_dir, ann_dir in zip(self.img_dirs, self.ann_dirs) for s in self._pair(img_dir, ann_dir)]
        if not self.samples:
            folders = ", ".join(str(d) for d in self.img_dirs)
            raise DatasetError(f"empty dataset: no image in {folders} passes the filter {self.include}")

    # -- construction -------------------------------------------------------------------
    def _pair(self, img_dir: Path, ann_dir: Path) -> list[tuple[Path, Path]]:
        for what, folder in (("image", img_dir), ("label", ann_dir)):
            if not folder.is_dir():
                raise DatasetError(f"{what} folder does not exist: {folder}")
        images, others = _split_by_suffix(img_dir, self.img_suffix)
        counts = {ext: len(paths) for ext, paths in others.items()}
        if not images:
            hint = f" (it holds {_counted(counts)}: set data.img_suffix)" if others else ""
            raise DatasetError(f"empty dataset: no '*{self.img_suffix}' images in {img_dir}{hint}")
        labels = {p.relative_to(ann_dir) for p in _list_files(ann_dir, self.seg_suffix)}
        if others and (img_dir, self.img_suffix) not in _SKIP_WARNINGS:
            _SKIP_WARNINGS.add((img_dir, self.img_suffix))
            log.warning("%s: %d '*%s' images used, %s beside them left out (%s; data.img_suffix selects the images)",
                        img_dir, len(images), self.img_suffix, _counted(counts),
                        _labelled(others, img_dir, labels, self.seg_suffix))
        stems = {img: img.relative_to(img_dir).as_posix()[: -len(self.img_suffix)] for img in images}
        images = [img for img in images if matches_filter(stems[img], self.include)]
        samples, missing = [], []
        for img in images:
            ann = Path(stems[img] + self.seg_suffix)
            if ann in labels:
                samples.append((img, ann_dir / ann))
            else:
                missing.append((img, ann_dir / ann))
        if missing:
            raise DatasetError(
                f"{len(missing)} of {len(images)} images in {img_dir} have no label: "
                f"{_names([p for p, _ in missing])} (expected e.g. {missing[0][1]}){self.missing_label_hint}")
        return samples

    def _value_tables(self, size: int) -> tuple[np.ndarray, np.ndarray]:
        """Lookup tables from a file value to the output value, and whether that value is allowed."""
        values = np.arange(size, dtype=np.int64)
        out = values.copy()
        if self.reduce_zero_label:
            out = np.where(values == 0, IGNORE_INDEX, values - 1)
            out[values == IGNORE_INDEX] = IGNORE_INDEX
        if self.ignore_value is not None:
            out[values == self.ignore_value] = IGNORE_INDEX
        valid = (out < self.num_classes) | (out == IGNORE_INDEX)
        return np.where(valid, out, IGNORE_INDEX).astype(np.uint8), valid

    # -- loading ------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.samples)

    def map_label(self, raw: np.ndarray, path: str | Path = "<array>") -> np.ndarray:
        """File values -> class ids with ignore = 255 (uint8); raises on values that are neither."""
        present = np.flatnonzero(np.bincount(raw.ravel(), minlength=1))
        if present.size and present[-1] >= self._lut.size:
            lut, valid = self._value_tables(int(present[-1]) + 1)
        else:
            lut, valid = self._lut, self._valid
        bad = present[~valid[present]]
        if bad.size:
            rule = ", after reduce_zero_label" if self.reduce_zero_label else ""
            ignore = "255" if self.ignore_value in (None, IGNORE_INDEX) else f"{self.ignore_value} or 255"
            raise DatasetError(f"label {path} has values {bad.tolist()[:20]} outside [0, {self.num_classes})"
                               f"{rule} that are not the ignore value ({ignore})")
        return lut[raw]

    def load(self, index: int) -> tuple[tv_tensors.Image, tv_tensors.Mask]:
        """The untransformed item: uint8 image ``(3, H, W)`` and uint8 label ``(H, W)``."""
        img_path, ann_path = self.samples[index]
        image = read_image(img_path)
        raw = read_label(ann_path)
        if tuple(image.shape[-2:]) != raw.shape:
            raise DatasetError(f"size mismatch: image {img_path} is {image.shape[-2]}x{image.shape[-1]} but "
                               f"label {ann_path} is {raw.shape[0]}x{raw.shape[1]} (HxW)")
        return image, tv_tensors.Mask(torch.from_numpy(self.map_label(raw, ann_path)))

    def __getitem__(self, index: int) -> Any:
        image, label = self.load(index)
        if self.transforms is not None:
            return self.transforms(image, label)
        return image, label

    def _check_sample(self, img_path: Path, ann_path: Path, full: bool) -> str | None:
        """The problem with one sample, or None."""
        try:
            if full:
                h, w = read_image(img_path).shape[-2:]
            else:
                try:
                    with Image.open(img_path) as im:
                        w, h = im.size
                except (OSError, SyntaxError, ValueError) as e:
                    raise DatasetError(f"cannot read image {img_path}: {e}") from e
            raw = read_label(ann_path)
            if raw.shape != (h, w):
                return (f"size mismatch: image {img_path} is {h}x{w} but label {ann_path} is "
                        f"{raw.shape[0]}x{raw.shape[1]} (HxW)")
            self.map_label(raw, ann_path)
        except DatasetError as e:
            return str(e)
        return None

    def verify(self, raise_error: bool = True, progress: bool = False, *, full: bool = False,
               threads: int = 4) -> list[str]:
        """Check every sample: the image header (with ``full``, the whole image is decoded, which
        finds truncated files), the label's decoding, size and value range. Returns, or raises as
        one :class:`DatasetError`, all problems found, each naming its file."""
        with ThreadPoolExecutor(max(threads, 1)) as pool:
            results = pool.map(lambda s: self._check_sample(s[0], s[1], full), self.samples)
            if progress:
                results = tqdm(results, total=len(self), desc="verify", unit="img")
            problems = [p for p in results if p is not None]
        if problems and raise_error:
            raise DatasetError(f"{len(problems)} problem(s) in {len(self)} samples of {self.img_dir}: "
                               + "; ".join(problems[:_MAX_LISTED])
                               + (f"; ... ({len(problems) - _MAX_LISTED} more)" if len(problems) > _MAX_LISTED else ""))
        return problems

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(samples={len(self)}, classes={self.num_classes}, "
                f"img_dir={str(self.img_dir)!r}, ann_dir={str(self.ann_dir)!r})")


_IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


def _split_by_suffix(folder: Path, suffix: str) -> tuple[list[Path], dict[str, list[Path]]]:
    """The files under ``folder`` ending in ``suffix`` (sorted), and the other image files
    there by extension."""
    images, others = [], {}
    for p in folder.rglob("*"):
        if p.name.endswith(suffix):
            if p.is_file():
                images.append(p)
        elif p.suffix.lower() in _IMAGE_EXTENSIONS and p.is_file():
            others.setdefault(p.suffix, []).append(p)
    return sorted(images), others


# (image folder, suffix) pairs whose left-out files were reported: once per process
_SKIP_WARNINGS: set[tuple[Path, str]] = set()


def _labelled(others: dict[str, list[Path]], img_dir: Path, labels: set[Path], seg_suffix: str) -> str:
    """Whether the left-out images have labels: none (the usual extra files), else how many per
    ending, with the setting that would take them."""
    found = {ext: sum(Path(p.relative_to(img_dir).as_posix()[: -len(ext)] + seg_suffix) in labels for p in paths)
             for ext, paths in others.items()}
    if not any(found.values()):
        return "none has a label"
    return "; ".join(f"{n} of the '*{ext}' files have a label: data.img_suffix: '{ext}' takes them"
                     for ext, n in sorted(found.items()) if n)


def _counted(counts: dict[str, int]) -> str:
    return ", ".join(f"{n} '*{ext}' file{'s' if n > 1 else ''}" for ext, n in sorted(counts.items()))


def _paths(folders: str | Path | Sequence[str | Path]) -> list[Path]:
    return [Path(folders)] if isinstance(folders, (str, Path)) else [Path(f) for f in folders]


def _check_root(root: str | Path) -> Path:
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"dataset root does not exist: {root}")
    return root


def _split_dir(split: str, aliases: dict[str, str]) -> str:
    return aliases.get(split, split)


class ADE20K(SegmentationDataset):
    """ADE20K (SceneParsing, 150 classes): ``images/{training,validation}/*.jpg`` and
    ``annotations/<split>/*.png``; 0 ("other") is ignored and 1..150 become 0..149."""

    name = "ade20k"
    NUM_CLASSES = 150
    IMG_SUFFIX, SEG_SUFFIX = ".jpg", ".png"
    SPLITS = {"train": "training", "val": "validation"}

    def __init__(self, root: str | Path, split: str = "training", transforms: Callable | None = None,
                 include: Sequence[str] | None = None) -> None:
        root, split = _check_root(root), _split_dir(split, self.SPLITS)
        classes, palette = dataset_info(self.name)
        super().__init__(root / "images" / split, root / "annotations" / split, classes=classes, palette=palette,
                         img_suffix=self.IMG_SUFFIX, seg_suffix=self.SEG_SUFFIX, reduce_zero_label=True,
                         transforms=transforms, include=include)


class Cityscapes(SegmentationDataset):
    """Cityscapes (19 classes): ``leftImg8bit/<split>/<city>/*_leftImg8bit.png`` and
    ``gtFine/<split>/<city>/*_gtFine_labelTrainIds.png`` (see :func:`convert_cityscapes`)."""

    name = "cityscapes"
    NUM_CLASSES = 19
    IMG_SUFFIX, SEG_SUFFIX = "_leftImg8bit.png", "_gtFine_labelTrainIds.png"
    SPLITS: dict[str, str] = {}
    missing_label_hint = "; write the *_labelTrainIds.png files with `edaformer convert cityscapes ROOT`"

    def __init__(self, root: str | Path, split: str = "train", transforms: Callable | None = None,
                 include: Sequence[str] | None = None) -> None:
        root, split = _check_root(root), _split_dir(split, self.SPLITS)
        classes, palette = dataset_info(self.name)
        super().__init__(root / "leftImg8bit" / split, root / "gtFine" / split, classes=classes, palette=palette,
                         img_suffix=self.IMG_SUFFIX, seg_suffix=self.SEG_SUFFIX,
                         transforms=transforms, include=include)


class COCOStuff(SegmentationDataset):
    """COCO-Stuff-164k (171 classes): ``images/{train2017,val2017}/*.jpg`` and
    ``annotations/<split>/*_labelTrainIds.png`` (see :func:`convert_cocostuff`)."""

    name = "cocostuff"
    NUM_CLASSES = 171
    IMG_SUFFIX, SEG_SUFFIX = ".jpg", "_labelTrainIds.png"
    SPLITS = {"train": "train2017", "val": "val2017"}
    missing_label_hint = "; write the *_labelTrainIds.png files with `edaformer convert cocostuff ROOT`"

    def __init__(self, root: str | Path, split: str = "train2017", transforms: Callable | None = None,
                 include: Sequence[str] | None = None) -> None:
        root, split = _check_root(root), _split_dir(split, self.SPLITS)
        classes, palette = dataset_info(self.name)
        super().__init__(root / "images" / split, root / "annotations" / split, classes=classes, palette=palette,
                         img_suffix=self.IMG_SUFFIX, seg_suffix=self.SEG_SUFFIX, transforms=transforms,
                         include=include)


class FolderDataset(SegmentationDataset):
    """A custom dataset: ``images/<split>/*<img_suffix>`` and ``annotations/<split>/*<seg_suffix>``.

    ``split`` is a folder name or a list of them (``["train", "val"]`` trains on both);
    ``include`` keeps the images whose stem passes its patterns (:func:`matches_filter`).
    ``classes`` is a list of names or a class count (names ``class0..`` then). ``ignore_value`` is
    the label value in the files that means "ignore" (e.g. 11 for CamVid's void)."""

    name = "folder"

    def __init__(self, root: str | Path, split: str | Sequence[str] = "train", *, classes: Sequence[str] | int,
                 palette: Sequence[Sequence[int]] | None = None, ignore_value: int | None = IGNORE_INDEX,
                 reduce_zero_label: bool = False, img_suffix: str = ".jpg", seg_suffix: str = ".png",
                 transforms: Callable | None = None, include: Sequence[str] | None = None) -> None:
        root = _check_root(root)
        if isinstance(classes, int):
            classes = list(class_names(classes))
        splits = [split] if isinstance(split, str) else list(split)
        super().__init__([root / "images" / s for s in splits], [root / "annotations" / s for s in splits],
                         classes=classes, palette=palette, img_suffix=img_suffix, seg_suffix=seg_suffix,
                         ignore_value=ignore_value, reduce_zero_label=reduce_zero_label, transforms=transforms,
                         include=include)
