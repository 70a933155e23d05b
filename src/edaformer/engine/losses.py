"""Training losses: pixel-wise cross-entropy, optionally class-weighted, optionally with online hard
example mining (OHEM).

Every variant follows one reduction: the per-pixel losses of the pixels that count (not ignored;
under OHEM, also mined) are weighted, summed and divided by *all* pixels of the batch (mmseg 0.x
``CrossEntropyLoss`` with ``reduction='mean'``). So plain CE is exactly :func:`segmentation_loss`,
a crop without labelled pixels gives 0, and equal per-rank batches average to the global loss.

Config (section ``loss``)::

    loss:
      name: ce              # ce | ohem
      class_weight: null    # null | median_freq | [w_0, ..., w_{C-1}]
      ohem_thresh: 0.7      # ohem: pixels whose probability of the true class is below this are kept
      ohem_min_kept: 100000 # ohem: ... and at least this many per image (the hardest ones)

``median_freq`` is median frequency balancing: ``w_c = median(f) / f_c`` with ``f_c`` the share of
labelled training pixels of class ``c`` (a class that never occurs gets the largest weight seen).
"""
from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from ..data.datasets import IGNORE_INDEX, read_label

__all__ = ["segmentation_loss", "SegmentationLoss", "build_loss", "class_pixel_counts", "median_frequency_weights"]

log = logging.getLogger("edaformer")


def segmentation_loss(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX,
                      weight: torch.Tensor | None = None, keep: torch.Tensor | None = None) -> torch.Tensor:
    """Pixel-wise cross-entropy, summed over the non-ignored pixels (and, with ``keep``, the kept ones;
    each scaled by ``weight[class]``) and divided by *all* pixels. Half-precision logits are
    promoted to float32; float64 stays float64."""
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    if weight is not None:
        weight = weight.to(device=logits.device, dtype=logits.dtype)
    if keep is None:
        loss = F.cross_entropy(logits, labels, weight=weight, ignore_index=ignore_index, reduction="sum")
    else:
        per_pixel = F.cross_entropy(logits, labels, weight=weight, ignore_index=ignore_index, reduction="none")
        loss = (per_pixel * keep).sum()
    return loss / labels.numel()


def ohem_keep_mask(logits: torch.Tensor, labels: torch.Tensor, thresh: float, min_kept: int,
                   ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """The pixels OHEM trains on: labelled pixels whose softmax probability of their true class is
    below ``max(thresh, p_k)``, where ``p_k`` is the ``k``-th smallest such probability and
    ``k = min_kept * batch`` (so at least ``k`` pixels are kept when there are that many)."""
    with torch.no_grad():
        valid = labels != ignore_index
        keep = torch.zeros(labels.shape, dtype=torch.bool, device=labels.device)
        if not bool(valid.any()):
            return keep
        prob = logits.float().softmax(dim=1)
        true_prob = prob.gather(1, labels.clamp(0, logits.shape[1] - 1).unsqueeze(1)).squeeze(1)[valid]
        k = min(min_kept * labels.shape[0], true_prob.numel() - 1)
        threshold = max(float(thresh), float(true_prob.kthvalue(k + 1).values)) if k >= 0 else float(thresh)
        keep[valid] = true_prob < threshold
        return keep


class SegmentationLoss(nn.Module):
    """The training loss of a run (see the module docstring): ``loss(logits, labels)``."""

    def __init__(self, name: str = "ce", class_weight: Sequence[float] | None = None, ohem_thresh: float = 0.7,
                 ohem_min_kept: int = 100_000, ignore_index: int = IGNORE_INDEX):
        super().__init__()
        if name not in ("ce", "ohem"):
            raise ValueError(f"loss.name must be ce or ohem, got {name!r}")
        self.name, self.ohem_thresh, self.ohem_min_kept, self.ignore_index = name, ohem_thresh, ohem_min_kept, ignore_index
        weight = None if class_weight is None else torch.as_tensor(list(class_weight), dtype=torch.float32)
        self.register_buffer("class_weight", weight, persistent=False)

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self.class_weight is not None and self.class_weight.numel() != logits.shape[1]:
            raise ValueError(f"loss.class_weight has {self.class_weight.numel()} values but the model predicts "
                             f"{logits.shape[1]} classes")
        keep = None
        if self.name == "ohem":
            keep = ohem_keep_mask(logits, labels, self.ohem_thresh, self.ohem_min_kept, self.ignore_index)
        return segmentation_loss(logits, labels, self.ignore_index, self.class_weight, keep)

    def extra_repr(self) -> str:
        weights = "none" if self.class_weight is None else "[" + ", ".join(f"{w:.3g}" for w in self.class_weight.tolist()) + "]"
        ohem = f", thresh={self.ohem_thresh}, min_kept={self.ohem_min_kept}" if self.name == "ohem" else ""
        return f"{self.name}, class_weight={weights}{ohem}"


def class_pixel_counts(dataset: Any, progress: bool = False) -> np.ndarray:
    """Labelled pixels per class over a dataset's label files (``dataset.samples``; ignored values
    excluded), read without decoding the images."""
    counts = np.zeros(dataset.num_classes, dtype=np.int64)
    for _, ann_path in tqdm(dataset.samples, desc="class frequencies", disable=not progress, leave=False):
        values = dataset.map_label(read_label(ann_path), ann_path).reshape(-1)
        values = values[values < dataset.num_classes]
        counts += np.bincount(values, minlength=dataset.num_classes)[: dataset.num_classes]
    return counts


def median_frequency_weights(counts: Sequence[int] | np.ndarray) -> list[float]:
    """``median(f) / f_c`` per class, ``f_c = counts[c] / sum(counts)``; an absent class gets the
    largest weight of the present ones."""
    counts = np.asarray(counts, dtype=np.float64)
    if counts.sum() <= 0:
        raise ValueError("loss.class_weight=median_freq: the training labels hold no labelled pixel")
    freq = counts / counts.sum()
    present = freq > 0
    weights = np.zeros_like(freq)
    weights[present] = np.median(freq[present]) / freq[present]
    weights[~present] = weights[present].max()
    return weights.tolist()


def build_loss(loss_cfg: Mapping[str, Any] | None, train_set: Any = None,
               ignore_index: int = IGNORE_INDEX) -> SegmentationLoss:
    """The ``loss`` config section as a :class:`SegmentationLoss`; ``median_freq`` weights are
    counted on ``train_set``'s labels."""
    cfg = dict(loss_cfg or {})
    weight = cfg.get("class_weight")
    if weight == "median_freq":
        if train_set is None:
            raise ValueError("loss.class_weight=median_freq needs the training set to count class frequencies")
        counts = class_pixel_counts(train_set, progress=True)
        weight = median_frequency_weights(counts)
        log.info("loss: median-frequency class weights %s", ", ".join(f"{w:.2f}" for w in weight))
    elif weight is not None and train_set is not None and len(weight) != train_set.num_classes:
        raise ValueError(f"loss.class_weight has {len(weight)} values but the dataset has {train_set.num_classes} classes")
    return SegmentationLoss(cfg.get("name", "ce"), weight, cfg.get("ohem_thresh", 0.7),
                            cfg.get("ohem_min_kept", 100_000), ignore_index)
