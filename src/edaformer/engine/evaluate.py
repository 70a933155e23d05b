"""Evaluation on a segmentation dataset (mIoU etc.) and the ISR sweep.

:func:`evaluate` runs the test protocol of :mod:`edaformer.inference` (whole image or sliding
window, optionally multi-scale + flip) image by image, scores each prediction at the label's
original size with :class:`~edaformer.metrics.SegMetric`, and under ``torch.distributed``
splits the images over the ranks and reduces the counts. :func:`isr_sweep` repeats it for
several ISR settings of the same model (no reload) and adds each setting's GFLOPs.
"""
from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from ..isr import PAPER_ISR_SWEEP, isr as isr_context
from ..metrics import SegMetric
from ..plotting import plot_sweep
from .distributed import get_rank, get_world_size, is_main_process

__all__ = ["evaluate", "isr_sweep", "format_sweep_table", "save_sweep", "plot_sweep", "default_stride"]

log = logging.getLogger("edaformer")

Size = tuple[int, int]


def default_stride(crop_size: Sequence[int]) -> Size:
    """Sliding-window stride when none is given: 2/3 of the window (341 for 512)."""
    return int(crop_size[0] * 2 / 3), int(crop_size[1] * 2 / 3)


def _base_indices(data: Dataset) -> tuple[Dataset, list[int]]:
    """The dataset under a chain of ``Subset``s and the indices into it that ``data`` covers."""
    indices = list(range(len(data)))
    while isinstance(data, Subset):
        indices = [int(data.indices[i]) for i in indices]
        data = data.dataset
    return data, indices


def _pairs(batch: Any) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
    """``(image (3, h, w), label (H, W))`` pairs from a collated batch (stacked or lists)."""
    images, labels = batch[0], batch[1]
    if isinstance(images, torch.Tensor) and images.ndim == 3:
        images, labels = images[None], labels[None]
    return zip(images, labels)


@torch.inference_mode()
def evaluate(model: nn.Module, data: Dataset | DataLoader, mode: str = "whole",
             crop_size: Sequence[int] | int | None = None, stride: Sequence[int] | int | None = None,
             tta: bool = False, isr: Any = None, *, tta_scales: Sequence[float] = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75),
             tta_flip: bool = True, test_scale: Sequence[int] | None = None, num_classes: int | None = None,
             ignore_index: int = 255, workers: int = 2, progress: bool = False) -> dict[str, Any]:
    """Score ``model`` on a validation set; returns ``aAcc``, ``mIoU``, ``mAcc``, per-class ``IoU`` /
    ``Acc`` (fractions) and ``num_images``.

    ``data``: a dataset of ``(normalized image at test scale, label at original size)`` items
    (split over the ranks under DDP), or a loader of such batches (used as is).
    ``mode``: ``whole`` or ``slide`` with ``crop_size`` / ``stride`` windows (defaults: the model's
    training crop, 2/3 of it). ``isr``: an ISR setting applied for this call only.
    ``tta``: multi-scale (``tta_scales`` x ``test_scale``) + flip on the raw images (``dataset.load``).
    """
    from ..data import collate
    from ..inference import infer_logits, infer_tta

    spec = getattr(model, "spec", None)
    crop = crop_size if crop_size is not None else getattr(spec, "crop_size", (512, 512))
    crop = (crop, crop) if isinstance(crop, int) else tuple(crop)
    step = stride if stride is not None else default_stride(crop)
    step = (step, step) if isinstance(step, int) else tuple(step)
    dataset, indices = _base_indices(data.dataset if isinstance(data, DataLoader) else data)
    num_classes = num_classes or getattr(dataset, "num_classes", None) or model.num_classes
    metric = SegMetric(num_classes, ignore_index, getattr(dataset, "classes", None))
    device = next(model.parameters()).device
    rank, world = get_rank(), get_world_size()

    was_training = model.training
    model.eval()
    try:
        with isr_context(model, isr if isr is not None else model.isr):
            if tta:
                if not hasattr(dataset, "load"):
                    raise ValueError("tta needs a dataset with load(index) -> (raw image, label)")
                scale = tuple(test_scale or getattr(spec, "test_scale", (2048, 512)))
                if not isinstance(data, DataLoader):  # a loader is used as given (already split)
                    indices = indices[rank::world]
                for i in _progress(indices, progress):
                    image, label = dataset.load(i)
                    label = torch.as_tensor(label).long()
                    probs = infer_tta(model, torch.as_tensor(image), tuple(label.shape[-2:]), scales=tuple(tta_scales),
                                      flip=tta_flip, base_scale=scale, mode=mode, crop_size=crop, stride=step,
                                      divisor=32 if mode == "whole" else None)
                    metric.update(probs.argmax(1)[0], label)
            else:
                if isinstance(data, DataLoader):
                    loader = data
                else:
                    shard = Subset(data, range(rank, len(data), world)) if world > 1 else data
                    # its own generator: evaluating leaves the global RNG (and so training) untouched
                    loader = DataLoader(shard, batch_size=1, shuffle=False, num_workers=workers, collate_fn=collate,
                                        pin_memory=device.type == "cuda", generator=torch.Generator())
                for batch in _progress(loader, progress):
                    for image, label in _pairs(batch):
                        label = torch.as_tensor(label).long()
                        logits = infer_logits(model, image[None].to(device, non_blocking=True),
                                              tuple(label.shape[-2:]), mode=mode, crop_size=crop, stride=step)
                        metric.update(logits.argmax(1)[0], label)
    finally:
        model.train(was_training)
    return metric.compute()


def _progress(iterable, enabled: bool):
    if not enabled or not is_main_process():
        return iterable
    from tqdm import tqdm

    return tqdm(iterable, desc="eval", dynamic_ncols=True, leave=False)


# -- ISR sweep ------------------------------------------------------------------------------------
def _gflops(model: nn.Module, input_size: Size) -> float | None:
    try:
        from ..flops import count_flops
    except ImportError:
        return None
    return float(count_flops(model, tuple(input_size)).gflops)


def isr_sweep(model: nn.Module, data: Dataset | DataLoader, specs: Sequence[str] = PAPER_ISR_SWEEP,
              flops_input_size: Sequence[int] = (512, 512), **eval_kwargs: Any) -> list[dict[str, Any]]:
    """Evaluate the same weights under each ISR setting (switched with ``model.set_isr``).

    Rows: ``isr``, ``gflops`` (at ``flops_input_size``; None if :mod:`edaformer.flops` is
    unavailable), ``mIoU``, ``aAcc``, ``mAcc`` and ``delta_mIoU`` vs the first setting.
    """
    from ..isr import parse_isr

    previous = model.isr
    rows = []
    try:
        for spec in specs:
            setting = str(parse_isr(spec))
            model.set_isr(setting)
            gflops = _gflops(model, tuple(flops_input_size))
            metrics = evaluate(model, data, isr=setting, **eval_kwargs)
            rows.append(dict(isr=setting, gflops=gflops, mIoU=metrics["mIoU"], aAcc=metrics["aAcc"],
                             mAcc=metrics["mAcc"]))
            log.info("ISR %s: mIoU %.2f%s", setting, 100 * metrics["mIoU"],
                     f"  GFLOPs {gflops:.2f}" if gflops is not None else "")
    finally:
        model.set_isr(previous)
    ref = rows[0]["mIoU"] if rows else math.nan
    for row in rows:
        row["delta_mIoU"] = row["mIoU"] - ref
    return rows


def format_sweep_table(rows: Sequence[dict[str, Any]], input_size: Sequence[int] | None = None) -> str:
    """The sweep as a text table (mIoU and its change in percentage points)."""
    size = f" @ {input_size[0]}x{input_size[1]}" if input_size else ""
    head = f"| {'ISR':<10} | {'GFLOPs' + size:>18} | {'mIoU':>6} | {'change':>7} |"
    lines = [head, "|" + "|".join("-" * (len(c) + 0) for c in head.split("|")[1:-1]) + "|"]
    for row in rows:
        gf = f"{row['gflops']:.4g}" if row.get("gflops") is not None else "n/a"
        lines.append(f"| {row['isr']:<10} | {gf:>18} | {100 * row['mIoU']:>6.2f} | {100 * row['delta_mIoU']:>+7.2f} |")
    if rows and all(r.get("gflops") is None for r in rows):
        lines.append("(GFLOPs not available: edaformer.flops could not be imported)")
    return "\n".join(lines)


def save_sweep(rows: Sequence[dict[str, Any]], out_dir: str | os.PathLike, meta: dict[str, Any] | None = None) -> Path:
    """Write ``isr_sweep.json`` (rows plus ``meta``) into ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "isr_sweep.json"
    path.write_text(json.dumps({"meta": meta or {}, "results": list(rows)}, indent=2))
    return path
