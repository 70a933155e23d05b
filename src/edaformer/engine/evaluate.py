"""Evaluation on a segmentation dataset (mIoU etc.) and the ISR sweep.

:func:`evaluate` runs the test protocol of :mod:`edaformer.inference` (whole image or sliding
window, optionally multi-scale + flip) image by image, scores each prediction at the label's
original size with :class:`~edaformer.metrics.SegMetric`, and under ``torch.distributed``
splits the images over the ranks and reduces the counts. :func:`isr_sweep` repeats it for
several ISR settings of the same model (no reload) and adds each setting's GFLOPs.
:func:`save_confusion` writes an evaluation's confusion matrix (counts as CSV, a PNG plot).
"""
from __future__ import annotations

import csv
import json
import logging
import math
import os
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm import tqdm

from ..data import usable_workers
from ..data.palettes import make_palette
from ..flops import gflops as count_gflops
from ..inference import infer_tta, segment_input
from ..inference.predict import save_label, unique_stems
from ..isr import PAPER_ISR_SWEEP
from ..isr import isr as isr_context
from ..isr import parse_isr
from ..metrics import SegMetric
from ..plotting import plot_confusion, plot_sweep
from ..protocol import TestProtocol
from .distributed import get_rank, get_world_size, is_main_process

__all__ = ["evaluate", "isr_sweep", "format_sweep_table", "save_sweep", "plot_sweep", "common_test_size",
           "sweep_title", "save_confusion"]

log = logging.getLogger("edaformer")

Size = tuple[int, int]


def _base_indices(data: Dataset) -> tuple[Dataset, list[int]]:
    """The dataset under a chain of ``Subset``s and the indices into it that ``data`` covers."""
    indices = list(range(len(data)))
    while isinstance(data, Subset):
        indices = [int(data.indices[i]) for i in indices]
        data = data.dataset
    return data, indices


class _Indexed(Dataset):
    """Items of ``data`` with their index in the base dataset appended."""

    def __init__(self, data: Dataset, indices: Sequence[int]):
        self.data, self.indices = data, list(indices)

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> Any:
        image, label = self.data[i][:2]
        return image, label, self.indices[i]


def _collate_indexed(batch: Sequence[Any]) -> tuple[list, list, list]:
    return tuple(list(column) for column in zip(*batch))  # type: ignore[return-value]


class _PredictionWriter:
    """Writes ``<stem>_label.png`` per evaluated image (stems as ``edaformer predict`` names them)."""

    def __init__(self, out_dir: str | os.PathLike, dataset: Dataset):
        samples = getattr(dataset, "samples", None)
        if samples is None:
            raise ValueError("saving predictions needs a dataset with image paths (.samples)")
        self.out = Path(out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.stems = unique_stems([img for img, _ in samples])
        self.palette = getattr(dataset, "palette", None)

    def write(self, index: int, label: Any) -> None:
        label = label.cpu().numpy() if isinstance(label, torch.Tensor) else label
        palette = self.palette or make_palette(int(label.max()) + 1)
        save_label(label, palette, self.out / f"{self.stems[index]}_label.png")


@torch.inference_mode()
def evaluate(model: nn.Module, data: Dataset | DataLoader, protocol: TestProtocol | None = None, isr: Any = None, *,
             num_classes: int | None = None, ignore_index: int = 255, workers: int = 2, progress: bool = False,
             save_predictions: str | os.PathLike | None = None, pool: str | None = None) -> dict[str, Any]:
    """Score ``model`` on a validation set; returns :meth:`SegMetric.compute`'s ``aAcc``, ``mIoU``,
    ``mAcc``, ``mDice``, ``mPrec``, ``mRecall``, their per-class lists (fractions), the
    ``confusion`` matrix and ``num_images``.

    ``data``: a dataset of ``(normalized image at test size, label at original size)`` items, as
    :func:`~edaformer.data.eval_transforms` gives them (split over the ranks under DDP), or a loader
    of such batches (used as is). ``protocol``: the test protocol (default: the model spec's); its
    multi-scale test runs on the raw images (``dataset.load``). ``isr``: an ISR setting applied for
    this call only, with the key/value ``pool`` kind (default: the model's own, ``model.isr_pool``).
    ``save_predictions``: a folder that receives ``<stem>_label.png`` per image.
    """
    protocol = protocol or TestProtocol.from_model(model)
    dataset, indices = _base_indices(data.dataset if isinstance(data, DataLoader) else data)
    num_classes = num_classes or getattr(dataset, "num_classes", None) or model.num_classes
    metric = SegMetric(num_classes, ignore_index, getattr(dataset, "classes", None))
    writer = _PredictionWriter(save_predictions, dataset) if save_predictions is not None else None
    device = next(model.parameters()).device
    rank, world = get_rank(), get_world_size()

    was_training = model.training
    model.eval()
    try:
        with isr_context(model, isr if isr is not None else model.isr,
                         pool=pool if pool is not None else getattr(model, "isr_pool", None)):
            if protocol.tta_scales:
                if not hasattr(dataset, "load"):
                    raise ValueError("tta needs a dataset with load(index) -> (raw image, label)")
                if not isinstance(data, DataLoader):  # a loader is used as given (already split)
                    indices = indices[rank::world]
                for i in _progress(indices, progress):
                    image, label = dataset.load(i)
                    label = torch.as_tensor(label).long()
                    probs = infer_tta(model, torch.as_tensor(image), tuple(label.shape[-2:]),
                                      scales=protocol.tta_scales, flip=protocol.flip,
                                      base_scale=protocol.scale or tuple(label.shape[-2:]), mode=protocol.mode,
                                      crop_size=protocol.crop_size, stride=protocol.stride,
                                      divisor=protocol.size_divisor)
                    pred = probs.argmax(1)[0]
                    metric.update(pred, label)
                    if writer:
                        writer.write(i, pred)
            else:
                if isinstance(data, DataLoader):
                    if writer:
                        raise ValueError("save_predictions needs a dataset, not a DataLoader")
                    loader = data
                else:
                    shard = Subset(data, range(rank, len(data), world)) if world > 1 else data
                    shard_idx = indices[rank::world] if world > 1 else indices
                    # its own generator: evaluating leaves the global RNG (and so training) untouched
                    loader = DataLoader(_Indexed(shard, shard_idx), batch_size=1, shuffle=False,
                                        num_workers=usable_workers(workers), collate_fn=_collate_indexed, pin_memory=device.type == "cuda",
                                        generator=torch.Generator())
                for batch in _progress(loader, progress):
                    names = batch[2] if len(batch) > 2 else [None] * len(batch[0])
                    for (image, label), index in zip(_pairs(batch), names):
                        label = torch.as_tensor(label).long()
                        pred, _ = segment_input(model, image[None].to(device, non_blocking=True),
                                                tuple(label.shape[-2:]), protocol)
                        pred = torch.from_numpy(pred[0])
                        metric.update(pred.to(label.device).long(), label)
                        if writer and index is not None:
                            writer.write(index, pred)
    finally:
        model.train(was_training)
    return metric.compute()


def _pairs(batch: Any) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
    """``(image (3, h, w), label (H, W))`` pairs from a collated batch (stacked or lists)."""
    images, labels = batch[0], batch[1]
    if isinstance(images, torch.Tensor) and images.ndim == 3:
        images, labels = images[None], labels[None]
    return zip(images, labels)


def _progress(iterable, enabled: bool):
    if not enabled or not is_main_process():
        return iterable
    return tqdm(iterable, desc="eval", dynamic_ncols=True, leave=False)


# -- ISR sweep ------------------------------------------------------------------------------------
SWEEP_METRICS = ("mIoU", "aAcc", "mAcc", "mDice", "mPrec", "mRecall")  # per setting, in isr_sweep.json


def common_test_size(dataset: Dataset, protocol: TestProtocol) -> tuple[Size, int, int]:
    """The most common test size of ``dataset``'s images under ``protocol`` (sizes read from the
    file headers), with how many images have it and the image count."""
    base, indices = _base_indices(dataset)
    samples = getattr(base, "samples", None)
    sizes: Counter = Counter()
    for i in indices:
        if samples is not None:
            with Image.open(samples[i][0]) as im:
                w, h = im.size
        else:
            h, w = base.load(i)[0].shape[-2:]
        sizes[protocol.input_size(h, w)] += 1
    if not sizes:
        raise ValueError("the dataset is empty")
    size, count = max(sizes.items(), key=lambda kv: (kv[1], kv[0]))
    return size, count, sum(sizes.values())


def isr_sweep(model: nn.Module, data: Dataset | DataLoader, specs: Sequence[str] = PAPER_ISR_SWEEP,
              flops_input_size: Sequence[int] = (512, 512), pool: str | None = None,
              **eval_kwargs: Any) -> list[dict[str, Any]]:
    """Evaluate the same weights under each ISR setting (switched with ``model.set_isr``).

    Rows: ``isr``, ``gflops`` (at ``flops_input_size``, which should be the size the images run at),
    ``mIoU``, ``aAcc``, ``mAcc``, ``mDice``, ``mPrec``,
    ``mRecall`` and ``delta_mIoU`` vs the first setting. ``pool``: the key/value pooling kind (default: the model's own).
    ``eval_kwargs`` go to :func:`evaluate` (``protocol``, ``workers``, ...).
    """
    previous = (model.isr, getattr(model, "isr_pool", "avg"))
    pool = pool or previous[1]
    rows = []
    try:
        for spec in specs:
            setting = str(parse_isr(spec))
            model.set_isr(setting, pool=pool)
            gflops = count_gflops(model, flops_input_size)
            metrics = evaluate(model, data, isr=setting, pool=pool, **eval_kwargs)
            rows.append(dict(isr=setting, gflops=gflops, **{k: metrics[k] for k in SWEEP_METRICS}))
            log.info("ISR %s: mIoU %.2f  GFLOPs %.2f", setting, 100 * metrics["mIoU"], gflops)
    finally:
        model.set_isr(previous[0], pool=previous[1])
    ref = rows[0]["mIoU"] if rows else math.nan
    for row in rows:
        row["delta_mIoU"] = row["mIoU"] - ref
    return rows


def format_sweep_table(rows: Sequence[dict[str, Any]], input_size: Sequence[int] | None = None,
                       size_note: str = "") -> str:
    """The sweep as a text table (mIoU and its change in percentage points); ``size_note`` says
    where the GFLOPs input size comes from."""
    size = f" @ {input_size[0]}x{input_size[1]}" if input_size else ""
    head = f"| {'ISR':<10} | {'GFLOPs' + size:>18} | {'mIoU':>6} | {'change':>7} |"
    lines = ([f"GFLOPs at {input_size[0]}x{input_size[1]}: {size_note}"] if size_note and input_size else []) + [
        head, "|" + "|".join("-" * (len(c) + 0) for c in head.split("|")[1:-1]) + "|"]
    for row in rows:
        gf = f"{row['gflops']:.4g}" if row.get("gflops") is not None else "n/a"
        lines.append(f"| {row['isr']:<10} | {gf:>18} | {100 * row['mIoU']:>6.2f} | {100 * row['delta_mIoU']:>+7.2f} |")
    return "\n".join(lines)


def sweep_title(checkpoint: str | os.PathLike) -> str:
    """The run a checkpoint belongs to, for plot titles: ``<work dir>/<checkpoint stem>``."""
    path = Path(checkpoint)
    return f"{path.parent.name}/{path.stem}" if path.parent.name else path.stem


def save_sweep(rows: Sequence[dict[str, Any]], out_dir: str | os.PathLike, meta: dict[str, Any] | None = None) -> Path:
    """Write ``isr_sweep.json`` (rows plus ``meta``) into ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "isr_sweep.json"
    path.write_text(json.dumps({"meta": meta or {}, "results": list(rows)}, indent=2))
    return path


# -- confusion matrix -------------------------------------------------------------------------
def save_confusion(confusion: Sequence[Sequence[int]], png: str | os.PathLike,
                   class_names: Sequence[str] | None = None, title: str = "") -> tuple[Path, Path | None]:
    """Write the confusion matrix counts (rows: ground truth, columns: prediction) as a CSV with
    the class names as header row and first column, ``<png stem>.csv`` beside ``png``, and its
    row-normalised plot to ``png`` (None without matplotlib). Returns both paths."""
    png = Path(png)
    names = list(class_names) if class_names is not None else [str(i) for i in range(len(confusion))]
    if len(names) != len(confusion):
        raise ValueError(f"{len(names)} class names for {len(confusion)} classes")
    table = png.with_suffix(".csv")
    table.parent.mkdir(parents=True, exist_ok=True)
    with open(table, "w", newline="", encoding="utf-8") as f:
        out = csv.writer(f)
        out.writerow(["ground truth \\ prediction", *names])
        out.writerows([name, *map(int, row)] for name, row in zip(names, confusion))
    return table, plot_confusion(confusion, png, names, title)
