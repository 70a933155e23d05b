"""Semantic-segmentation metrics with the mmsegmentation definitions.

Per image, pixels whose label is the ignore index are dropped and the per-class
intersection, union, predicted area and label area are counted (``bincount``); the counts
are summed over the dataset. Then per class ``IoU = I / U`` and ``Acc = I / label_area``, and
``aAcc = sum(I) / sum(label_area)``. A class with no pixels in either the labels or the
predictions has ``U = 0`` and a NaN IoU; NaNs are left out of the means (``nanmean``).
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.distributed as dist

__all__ = ["intersect_and_union", "SegMetric", "format_metrics", "format_class_table"]


def intersect_and_union(pred: torch.Tensor, label: torch.Tensor, num_classes: int,
                        ignore_index: int = 255) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-class (intersection, union, predicted area, label area) of one prediction, int64.

    ``pred`` and ``label`` hold class indices and have the same shape (any number of dims).
    Labels outside ``[0, num_classes)`` other than ``ignore_index`` are an error.
    """
    if pred.shape != label.shape:
        raise ValueError(f"prediction {tuple(pred.shape)} and label {tuple(label.shape)} differ in shape")
    pred, label = pred.reshape(-1).long(), label.reshape(-1).long()
    keep = label != ignore_index
    pred, label = pred[keep], label[keep]
    if label.numel() and (label.min() < 0 or label.max() >= num_classes):
        bad = label[(label < 0) | (label >= num_classes)].unique()[:5].tolist()
        raise ValueError(f"label values {bad} are outside [0, {num_classes}) and not the ignore index "
                         f"{ignore_index}")
    if pred.numel() and (pred.min() < 0 or pred.max() >= num_classes):
        raise ValueError(f"predictions must lie in [0, {num_classes})")
    inter = torch.bincount(pred[pred == label], minlength=num_classes)
    area_pred = torch.bincount(pred, minlength=num_classes)
    area_label = torch.bincount(label, minlength=num_classes)
    return inter, area_pred + area_label - inter, area_pred, area_label


class SegMetric:
    """Accumulates intersection / union / areas over a dataset; ``compute()`` gives the metrics.

    Under ``torch.distributed`` each rank updates with its own images and ``compute()``
    all-reduces the sums first, so every rank gets the dataset-wide result.
    """

    def __init__(self, num_classes: int, ignore_index: int = 255, class_names: Sequence[str] | None = None):
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.class_names = list(class_names) if class_names is not None else None
        self.reset()

    def reset(self) -> None:
        self.totals = torch.zeros(4, self.num_classes, dtype=torch.int64)  # I, U, pred area, label area
        self.num_images = 0

    @torch.no_grad()
    def update(self, pred: torch.Tensor, label: torch.Tensor) -> None:
        """Add a prediction (class indices) and its label, one image ``(H, W)`` or a batch ``(B, H, W)``."""
        if pred.ndim == label.ndim + 1 and pred.shape[-3] == self.num_classes and pred.is_floating_point():
            raise ValueError("update() takes class indices, not logits: pass logits.argmax(1)")
        label = label.to(pred.device)
        if pred.ndim == 3:
            for p, t in zip(pred, label):
                self.update(p, t)
            return
        counts = intersect_and_union(pred, label, self.num_classes, self.ignore_index)
        self.totals += torch.stack(counts).cpu()
        self.num_images += 1

    def _reduced(self) -> tuple[torch.Tensor, int]:
        totals = torch.cat([self.totals.reshape(-1), torch.tensor([self.num_images])])
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
            totals = totals.to(device)
            dist.all_reduce(totals, op=dist.ReduceOp.SUM)
            totals = totals.cpu()
        return totals[:-1].reshape(4, self.num_classes), int(totals[-1])

    def compute(self) -> dict:
        """``aAcc``, ``mIoU``, ``mAcc`` (fractions in [0, 1]), the per-class ``IoU`` / ``Acc`` lists and
        ``num_images``; summed over all ranks under ``torch.distributed``."""
        totals, num_images = self._reduced()
        inter, union, _, area_label = totals.double()
        iou = inter / union          # 0 / 0 -> NaN: class absent from labels and predictions
        acc = inter / area_label     # NaN where the class is absent from the labels
        total = area_label.sum()
        return dict(
            aAcc=float(inter.sum() / total) if total > 0 else math.nan,
            mIoU=float(iou.nanmean()),
            mAcc=float(acc.nanmean()),
            IoU=iou.tolist(),
            Acc=acc.tolist(),
            num_images=num_images,
        )


def _pct(value: float) -> str:
    return "nan" if math.isnan(value) else f"{100 * value:.2f}"


def format_metrics(metrics: dict) -> str:
    """One line: ``aAcc 80.12  mIoU 45.67  mAcc 56.78`` (percent)."""
    return "  ".join(f"{k} {_pct(metrics[k])}" for k in ("aAcc", "mIoU", "mAcc"))


def format_class_table(metrics: dict, class_names: Sequence[str] | None = None) -> str:
    """Per-class IoU / Acc table (percent), with a summary row."""
    num = len(metrics["IoU"])
    names = list(class_names) if class_names is not None else [str(i) for i in range(num)]
    if len(names) != num:
        raise ValueError(f"{len(names)} class names for {num} classes")
    width = max([5, *map(len, names)])
    lines = [f"| {'Class':<{width}} | {'IoU':>6} | {'Acc':>6} |", f"|{'-' * (width + 2)}|--------|--------|"]
    for name, iou, acc in zip(names, metrics["IoU"], metrics["Acc"]):
        lines.append(f"| {name:<{width}} | {_pct(iou):>6} | {_pct(acc):>6} |")
    lines.append(f"|{'-' * (width + 2)}|--------|--------|")
    lines.append(f"| {'mean':<{width}} | {_pct(metrics['mIoU']):>6} | {_pct(metrics['mAcc']):>6} |")
    return "\n".join(lines)
