"""Semantic-segmentation metrics with the mmsegmentation definitions.

Per image, pixels whose label is the ignore index are dropped and a ``num_classes x
num_classes`` confusion matrix is counted (``bincount``; rows: label, columns: prediction);
the matrices are summed over the dataset. From its diagonal (intersection ``I`` = true
positives), row sums (label area) and column sums (predicted area), per class:

- ``IoU = I / (pred + label - I)`` and ``Dice = 2I / (pred + label)`` (= F1): NaN for a class
  absent from both the labels and the predictions;
- ``Acc = Recall = I / label`` (NaN for a class absent from the labels) and
  ``Precision = I / pred`` (NaN for a class never predicted);
- ``aAcc = sum(I) / sum(label)``.

NaNs are left out of the means (``nanmean``).
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.distributed as dist

__all__ = ["confusion_matrix", "intersect_and_union", "SegMetric", "format_metrics", "format_class_table"]

# per-class metrics: the key of the per-class list and of its mean in compute()'s result
PER_CLASS = {"IoU": "mIoU", "Acc": "mAcc", "Dice": "mDice", "Precision": "mPrec", "Recall": "mRecall"}


def confusion_matrix(pred: torch.Tensor, label: torch.Tensor, num_classes: int,
                     ignore_index: int = 255) -> torch.Tensor:
    """``(num_classes, num_classes)`` int64 pixel counts of one prediction: entry ``[i, j]`` counts
    pixels labelled ``i`` and predicted ``j``; pixels labelled ``ignore_index`` are left out.

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
    counts = torch.bincount(label * num_classes + pred, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes)


def _areas(confusion: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(intersection, union, predicted area, label area) per class of a confusion matrix."""
    inter, area_pred, area_label = confusion.diagonal(), confusion.sum(0), confusion.sum(1)
    return inter, area_pred + area_label - inter, area_pred, area_label


def intersect_and_union(pred: torch.Tensor, label: torch.Tensor, num_classes: int,
                        ignore_index: int = 255) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-class (intersection, union, predicted area, label area) of one prediction, int64;
    arguments and errors as :func:`confusion_matrix`."""
    return _areas(confusion_matrix(pred, label, num_classes, ignore_index))


class SegMetric:
    """Accumulates the confusion matrix over a dataset; ``compute()`` gives the metrics.

    Under ``torch.distributed`` each rank updates with its own images and ``compute()``
    all-reduces the sums first, so every rank gets the dataset-wide result.
    """

    def __init__(self, num_classes: int, ignore_index: int = 255, class_names: Sequence[str] | None = None):
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.class_names = list(class_names) if class_names is not None else None
        self.reset()

    def reset(self) -> None:
        self.confusion = torch.zeros(self.num_classes, self.num_classes, dtype=torch.int64)
        self.num_images = 0

    @property
    def totals(self) -> torch.Tensor:
        """``(4, num_classes)``: intersection, union, predicted area, label area (this rank's)."""
        return torch.stack(_areas(self.confusion))

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
        self.confusion += confusion_matrix(pred, label, self.num_classes, self.ignore_index).cpu()
        self.num_images += 1

    def _reduced(self) -> tuple[torch.Tensor, int]:
        totals = torch.cat([self.confusion.reshape(-1), torch.tensor([self.num_images])])
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
            totals = totals.to(device)
            dist.all_reduce(totals, op=dist.ReduceOp.SUM)
            totals = totals.cpu()
        return totals[:-1].reshape(self.num_classes, self.num_classes), int(totals[-1])

    def compute(self) -> dict:
        """``aAcc``, ``mIoU``, ``mAcc``, ``mDice``, ``mPrec``, ``mRecall`` (fractions in [0, 1]), the
        per-class ``IoU`` / ``Acc`` / ``Dice`` / ``Precision`` / ``Recall`` lists, the ``confusion``
        matrix (nested lists of counts) and ``num_images``; summed over all ranks under
        ``torch.distributed``."""
        confusion, num_images = self._reduced()
        inter, union, area_pred, area_label = (t.double() for t in _areas(confusion))
        per_class = dict(
            IoU=inter / union,                         # 0 / 0 -> NaN: absent from labels and predictions
            Acc=inter / area_label,                    # NaN where the class is absent from the labels
            Dice=2 * inter / (area_pred + area_label),  # NaN as IoU
            Precision=inter / area_pred,               # NaN where the class is never predicted
        )
        per_class["Recall"] = per_class["Acc"]
        total = area_label.sum()
        result: dict = dict(aAcc=float(inter.sum() / total) if total > 0 else math.nan)
        result.update({PER_CLASS[k]: float(v.nanmean()) for k, v in per_class.items()})
        result.update({k: v.tolist() for k, v in per_class.items()})
        result.update(confusion=confusion.tolist(), num_images=num_images)
        return result


def _pct(value: float) -> str:
    return "nan" if math.isnan(value) else f"{100 * value:.2f}"


SUMMARY_KEYS = ("aAcc", "mIoU", "mAcc", "mDice", "mPrec", "mRecall")


def format_metrics(metrics: dict) -> str:
    """One line: ``aAcc 80.12  mIoU 45.67  mAcc 56.78  mDice ...  mPrec ...  mRecall ...`` (percent;
    keys missing from ``metrics`` are left out)."""
    return "  ".join(f"{k} {_pct(metrics[k])}" for k in SUMMARY_KEYS if k in metrics)


_TABLE = (("IoU", "IoU", "mIoU"), ("Dice", "Dice", "mDice"), ("Prec", "Precision", "mPrec"),
          ("Recall", "Recall", "mRecall"))


def format_class_table(metrics: dict, class_names: Sequence[str] | None = None) -> str:
    """Per-class IoU / Dice / precision / recall table (percent), with a summary row. Recall is
    the per-class accuracy (``Acc``)."""
    num = len(metrics["IoU"])
    names = list(class_names) if class_names is not None else [str(i) for i in range(num)]
    if len(names) != num:
        raise ValueError(f"{len(names)} class names for {num} classes")
    width = max([5, *map(len, names)])
    rule = f"|{'-' * (width + 2)}|" + "|".join("-" * 8 for _ in _TABLE) + "|"
    lines = [f"| {'Class':<{width}} | " + " | ".join(f"{head:>6}" for head, _, _ in _TABLE) + " |", rule]
    for i, name in enumerate(names):
        lines.append(f"| {name:<{width}} | " + " | ".join(f"{_pct(metrics[key][i]):>6}" for _, key, _ in _TABLE) + " |")
    lines.append(rule)
    lines.append(f"| {'mean':<{width}} | " + " | ".join(f"{_pct(metrics[mean]):>6}" for _, _, mean in _TABLE) + " |")
    return "\n".join(lines)
