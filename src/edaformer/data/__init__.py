"""Datasets, training / test pipelines, label converters and data loaders.

``build_dataset(cfg, split)`` takes the ``data`` section of a config:

=====================  ================================================================
key                    meaning [default]
=====================  ================================================================
type                   ``ade20k`` | ``cityscapes`` | ``cocostuff`` | ``folder``
root                   dataset root folder
classes, palette       folder only: class names (or a count) and RGB triples [generated]
ignore_index           folder only: label value in the files that means ignore [255]
reduce_zero_label      folder only: 0 -> ignore, 1.. -> 0.. [False]
img_suffix/seg_suffix  folder only: file endings [".jpg" / ".png"]
train_split/val_split  split folder name [per dataset: training/validation, train/val, ...]; a list for folder
train_filter           stem patterns (path below the split folder, no suffix) to keep; ``!p`` excludes [all]
val_filter             the same for the validation images [all]
scale                  resize box [(2048, 512); Cityscapes (2048, 1024)]
test_scale             resize box at test time [scale]
size_divisor           test image sides rounded up to a multiple of this [32; Cityscapes none]
ratio_range            random scale ratio range for training [(0.5, 2.0)]
crop_size              training crop (h, w) [(512, 512); Cityscapes (1024, 1024)]
cat_max_ratio          largest share one class may cover in a crop [0.75]
flip_prob              horizontal flip probability [0.5]
photometric            photometric distortion on/off [True]
=====================  ================================================================

The loader's keys (``batch_size``, ``workers``: :data:`LOADER_KEYS`) are left to the caller;
:func:`dataset_config` is the section without them, :func:`usable_workers` caps ``workers`` at the
CPU count. :func:`effective_data_config` fills in the values in brackets. Labels always come out
with ignore = 255.
"""
from __future__ import annotations

import logging
import os
import random
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, default_collate

from .color_labels import ColorConversion, colors_to_ids, convert_color_labels, ids_to_colors
from .converters import ConversionResult, convert_cityscapes, convert_cocostuff
from .datasets import (ADE20K, IGNORE_INDEX, COCOStuff, Cityscapes, DatasetError, FolderDataset, SegmentationDataset,
                       dataset_info)
from .palettes import DATASET_INFO, DatasetInfo, class_names, get_dataset_info, make_palette
from .transforms import (MEAN, STD, CategoryCappedRandomCrop, ImageOnly, PadToSize, PhotoMetricDistortion,
                         ResizeToFit, eval_transforms, train_transforms)

__all__ = ["build_dataset", "dataset_config", "effective_data_config", "usable_workers", "cpu_count", "LOADER_KEYS", "build_dataloader", "SkipBatches", "collate", "seed_worker", "SegmentationDataset", "ADE20K",
           "Cityscapes", "COCOStuff", "FolderDataset", "DatasetError", "IGNORE_INDEX", "DATASETS",
           "convert_cityscapes", "convert_cocostuff", "ConversionResult", "convert_color_labels", "colors_to_ids",
           "ids_to_colors", "ColorConversion", "train_transforms", "eval_transforms",
           "ResizeToFit", "CategoryCappedRandomCrop", "PhotoMetricDistortion", "PadToSize", "ImageOnly",
           "MEAN", "STD", "dataset_info", "DATASET_INFO", "DatasetInfo", "class_names",
           "get_dataset_info", "make_palette"]

DATASETS: dict[str, type[SegmentationDataset]] = {
    "ade20k": ADE20K, "cityscapes": Cityscapes, "cocostuff": COCOStuff, "folder": FolderDataset}

log = logging.getLogger("edaformer")

_DEFAULT_SPLITS = {"ade20k": ("training", "validation"), "cityscapes": ("train", "val"),
                   "cocostuff": ("train2017", "val2017"), "folder": ("train", "val")}
_DEFAULTS = dict(scale=(2048, 512), ratio_range=(0.5, 2.0), crop_size=(512, 512), cat_max_ratio=0.75,
                 flip_prob=0.5, photometric=True, size_divisor=32)
_TYPE_DEFAULTS = {"cityscapes": dict(scale=(2048, 1024), crop_size=(1024, 1024), size_divisor=None)}


# what a folder dataset takes for the folder-only keys a config leaves unset
_FOLDER_DEFAULTS = dict(reduce_zero_label=False, img_suffix=".jpg", seg_suffix=".png")


def _pipeline_options(cfg: Mapping[str, Any], kind: str) -> dict[str, Any]:
    opts = {**_DEFAULTS, **_TYPE_DEFAULTS.get(kind, {})}
    opts.update({k: cfg[k] for k in _DEFAULTS if cfg.get(k) is not None})
    return opts


def _check_named(cfg: Mapping[str, Any], cls: type[SegmentationDataset]) -> None:
    """Folder-only keys are ignored for the named datasets, unless they contradict them."""
    name = cls.name
    if cfg.get("ignore_index", IGNORE_INDEX) != IGNORE_INDEX:
        raise DatasetError(f"{name} labels use ignore index 255; got ignore_index={cfg['ignore_index']}")
    if "reduce_zero_label" in cfg and bool(cfg["reduce_zero_label"]) != (cls is ADE20K):
        raise DatasetError(f"{name} uses reduce_zero_label={cls is ADE20K}; got {cfg['reduce_zero_label']}")
    classes = cfg.get("classes")
    if classes is not None and (classes if isinstance(classes, int) else len(classes)) != cls.NUM_CLASSES:
        raise DatasetError(f"{name} has {cls.NUM_CLASSES} classes; the config declares {classes!r:.80}")


# keys of a config's ``data`` section that are the loader's, not the dataset's
LOADER_KEYS = ("batch_size", "workers")


def dataset_config(data_cfg: Mapping[str, Any]) -> dict[str, Any]:
    """A config's ``data`` section without the loader's keys (:data:`LOADER_KEYS`)."""
    return {k: v for k, v in data_cfg.items() if k not in LOADER_KEYS}


def build_dataset(cfg: Mapping[str, Any], split: str) -> SegmentationDataset:
    """The ``train`` or ``val`` dataset described by a config's ``data`` section, with the
    training pipeline (random resize / crop / flip / photometric, normalized, padded to
    ``crop_size``) or the test pipeline (image resized to ``test_scale`` and normalized, label at
    its original size)."""
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    kind = str(cfg.get("type", "")).lower()
    if kind not in DATASETS:
        raise DatasetError(f"unknown dataset type {cfg.get('type')!r}; expected one of {', '.join(DATASETS)}")
    if not cfg.get("root"):
        raise DatasetError("the data config needs a 'root' folder")
    if kind != "folder":
        _check_named(cfg, DATASETS[kind])

    opts = _pipeline_options(cfg, kind)
    if split == "train":
        transforms = train_transforms(opts["scale"], opts["ratio_range"], opts["crop_size"], opts["cat_max_ratio"],
                                      opts["flip_prob"], opts["photometric"])
    else:
        transforms = eval_transforms(cfg.get("test_scale") or opts["scale"], opts["size_divisor"])
    folder = cfg.get(f"{split}_split") or _DEFAULT_SPLITS[kind][split == "val"]
    include = cfg.get(f"{split}_filter")

    if kind != "folder":
        if not isinstance(folder, str):
            raise DatasetError(f"data.{split}_split: a list of split folders is for 'folder' datasets; "
                               f"{kind} takes one")
        return DATASETS[kind](cfg["root"], folder, transforms=transforms, include=include)
    if "classes" not in cfg:
        raise DatasetError("a 'folder' dataset needs 'classes' (a list of names or a count)")
    return FolderDataset(cfg["root"], folder, classes=cfg["classes"], palette=cfg.get("palette"),
                         ignore_value=cfg.get("ignore_index", IGNORE_INDEX),
                         reduce_zero_label=bool(cfg.get("reduce_zero_label", _FOLDER_DEFAULTS["reduce_zero_label"])),
                         img_suffix=cfg.get("img_suffix", _FOLDER_DEFAULTS["img_suffix"]),
                         seg_suffix=cfg.get("seg_suffix", _FOLDER_DEFAULTS["seg_suffix"]),
                         transforms=transforms, include=include)


def effective_data_config(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """A config's ``data`` section with every key it leaves unset (or null where null means "the
    default") filled in with the value :func:`build_dataset` uses: the dataset type's splits and
    pipeline options, the test resize box (``test_scale``: ``scale``), and for a folder dataset
    its suffixes, class names (a count becomes ``class_0 ..``) and palette (generated); a named
    dataset's own classes, palette, suffixes and ``reduce_zero_label``. An unknown type, or a
    folder dataset without classes, is left as it is (building the dataset says what is wrong)."""
    out = dict(cfg)
    kind = str(cfg.get("type", "")).lower()
    if kind not in DATASETS:
        return out
    opts = _pipeline_options(cfg, kind)
    for key in ("scale", "ratio_range", "crop_size", "cat_max_ratio", "flip_prob", "photometric", "size_divisor"):
        value = opts[key]
        out[key] = list(value) if isinstance(value, tuple) else value
    out["test_scale"] = list(cfg.get("test_scale") or opts["scale"])
    for i, split in enumerate(("train", "val")):
        out[f"{split}_split"] = cfg.get(f"{split}_split") or _DEFAULT_SPLITS[kind][i]
        out.setdefault(f"{split}_filter", None)
    if kind == "folder":
        for key, value in _FOLDER_DEFAULTS.items():
            out[key] = cfg.get(key, value)
        classes = cfg.get("classes")
        if classes is not None:
            out["classes"] = list(class_names(classes)) if isinstance(classes, int) else list(classes)
            palette = cfg.get("palette") or make_palette(len(out["classes"]))
            out["palette"] = [list(map(int, color)) for color in palette]
        return out
    cls = DATASETS[kind]
    names, palette = dataset_info(cls.name)
    out.update(classes=names, palette=[list(color) for color in palette], reduce_zero_label=cls is ADE20K,
               img_suffix=cls.IMG_SUFFIX, seg_suffix=cls.SEG_SUFFIX)
    return out


def collate(batch: Sequence[Any]) -> Any:
    """``default_collate`` when the items stack; for ``(image, label)`` items of different sizes
    (test items) a pair of lists instead."""
    first = batch[0]
    if isinstance(first, (tuple, list)) and all(isinstance(x, torch.Tensor) for x in first):
        for i in range(len(first)):
            if any(item[i].shape != first[i].shape for item in batch):
                return tuple(list(column) for column in zip(*batch))
    return default_collate(batch)


def seed_worker(worker_id: int) -> None:
    """Seed ``random`` and NumPy in a loader worker from its torch seed (set by the loader's generator)."""
    seed = torch.initial_seed() % 2**32
    random.seed(seed)
    np.random.seed(seed)


class SkipBatches:
    """A batch sampler without its first ``skip`` batches (to resume inside an epoch)."""

    def __init__(self, batch_sampler, skip: int):
        self.batch_sampler, self.skip = batch_sampler, skip

    def __iter__(self):
        for i, batch in enumerate(self.batch_sampler):
            if i >= self.skip:
                yield batch

    def __len__(self) -> int:
        return max(len(self.batch_sampler) - self.skip, 0)


def cpu_count() -> int:
    """The CPUs this process may run on (what torch's DataLoader compares its worker count with)."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except AttributeError:  # no affinity outside Linux
        return os.cpu_count() or 1


_WORKER_WARNINGS: set[tuple[str, int, int]] = set()


def usable_workers(requested: int, key: str = "data.workers") -> int:
    """``requested`` loader workers, at most :func:`cpu_count`; more are reduced to that, saying
    so once per key and value (torch would warn about them on every loader it starts)."""
    cpus = cpu_count()
    if requested <= cpus:
        return requested
    main_process = not (torch.distributed.is_available() and torch.distributed.is_initialized()
                        and torch.distributed.get_rank() != 0)
    if (key, requested, cpus) not in _WORKER_WARNINGS and main_process:  # one process says it for all
        _WORKER_WARNINGS.add((key, requested, cpus))
        plural = "s" if cpus > 1 else ""
        log.warning("%s is %d but this machine has %d CPU%s: using %d loader worker%s (set %s to at most %d)",
                    key, requested, cpus, plural, cpus, plural, key, cpus)
    return cpus


def build_dataloader(dataset: Dataset, batch_size: int, shuffle: bool = True, workers: int = 4,
                     distributed: bool = False, seed: int = 0, drop_last: bool = False, *,
                     pin_memory: bool | None = None, persistent_workers: bool | None = None) -> DataLoader:
    """A reproducible loader: the shuffle order and every worker's torch seed come from ``seed``
    (plus the rank when ``distributed``, which uses a :class:`DistributedSampler`; call
    ``loader.sampler.set_epoch(epoch)`` each epoch). With ``workers=0`` the augmentations draw
    from the main process's torch RNG, so seed it too."""
    sampler = None
    rank = 0
    if distributed:
        sampler = DistributedSampler(dataset, shuffle=shuffle, seed=seed, drop_last=drop_last)
        rank = sampler.rank
    generator = torch.Generator()
    generator.manual_seed(seed + rank)
    if pin_memory is None:
        pin_memory = torch.cuda.is_available()
    if persistent_workers is None:
        persistent_workers = workers > 0
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle and sampler is None, sampler=sampler,
                      num_workers=workers, collate_fn=collate, pin_memory=pin_memory, drop_last=drop_last,
                      generator=generator, worker_init_fn=seed_worker, persistent_workers=persistent_workers)
