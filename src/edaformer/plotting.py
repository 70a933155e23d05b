"""PNG plots: the ISR trade-off (mIoU against GFLOPs), the ISR tuner's Pareto front, training
curves (loss, mIoU) and the confusion matrix of an evaluation."""
from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger("edaformer")

__all__ = ["plot_sweep", "plot_pareto", "plot_training_log", "plot_confusion"]


def _pyplot():
    try:  # matplotlib is an optional package (the plot extra)
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # optional, as above
    except ImportError:
        log.warning("matplotlib is not installed: no plot written (pip install matplotlib)")
        return None
    return plt


def _save(fig, path: str | os.PathLike) -> Path:
    import matplotlib.pyplot as plt  # optional; a figure exists, so it is installed

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_sweep(rows: Sequence[dict[str, Any]], path: str | os.PathLike, title: str = "") -> Path | None:
    """mIoU vs GFLOPs (or vs the setting, without GFLOPs) as a PNG; None if matplotlib is missing."""
    plt = _pyplot()
    if plt is None:
        return None
    have_flops = all(r.get("gflops") is not None for r in rows)
    xs = [r["gflops"] for r in rows] if have_flops else list(range(len(rows)))
    ys = [100 * r["mIoU"] for r in rows]
    fig, ax = plt.subplots(figsize=(5, 3.6), dpi=120)
    ax.plot(xs, ys, "o-")
    for x, y, r in zip(xs, ys, rows):
        ax.annotate(r["isr"], (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel("GFLOPs" if have_flops else "ISR setting")
    if not have_flops:
        ax.set_xticks(xs, [r["isr"] for r in rows])
    ax.set_ylabel("mIoU (%)")
    ax.set_title(title or "ISR sweep")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return _save(fig, path)


def plot_pareto(points: Sequence[dict[str, Any]], front: Sequence[dict[str, Any]], path: str | os.PathLike, *,
                cost: str = "gflops", chosen: str | None = None, budget: float | None = None,
                title: str = "") -> Path | None:
    """mIoU against ``cost`` (``gflops`` or ``ms``) of every evaluated setting, the Pareto ``front``
    joined, the ``chosen`` setting marked and a cost ``budget`` drawn; None if matplotlib is missing.
    Rows hold ``isr``, ``mIoU`` (a fraction) and the cost key."""
    plt = _pyplot()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(5.5, 3.8), dpi=120)
    ax.scatter([r[cost] for r in points], [100 * r["mIoU"] for r in points], s=12, color="tab:gray", alpha=0.6,
               label="evaluated")
    xs, ys = [r[cost] for r in front], [100 * r["mIoU"] for r in front]
    ax.plot(xs, ys, "o-", color="tab:blue", label="Pareto front")
    for x, y, r in zip(xs, ys, front):
        ax.annotate(r["isr"], (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    best = [r for r in points if r["isr"] == chosen]
    if best:
        ax.plot([best[0][cost]], [100 * best[0]["mIoU"]], "*", ms=14, color="tab:red", label=f"chosen {chosen}")
    if budget is not None:
        ax.axvline(budget, color="tab:red", ls="--", lw=1, label="budget")
    ax.set_xlabel("GFLOPs" if cost == "gflops" else "latency (ms)")
    ax.set_ylabel("mIoU (%)")
    ax.set_title(title or "ISR settings", fontsize=9)
    ax.locator_params(axis="x", nbins=5)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return _save(fig, path)


def read_log(path: str | os.PathLike) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Training and validation records of a ``log.jsonl``. A torn last line (a write cut short
    by a kill) is skipped with a warning; a bad line elsewhere raises ``ValueError`` naming the
    file and line."""
    train, val = [], []
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    last = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            if i == last:
                log.warning("%s: skipping its last line %d, which is incomplete (%s)", path, i + 1, e)
                continue
            raise ValueError(f"{path} line {i + 1} is not a JSON record: {e}") from e
        if not isinstance(record, dict):
            raise ValueError(f"{path} line {i + 1} is not a JSON object")
        (val if record.get("mode") == "val" else train).append(record)
    return train, val


def plot_training_log(log_path: str | os.PathLike, path: str | os.PathLike, title: str = "") -> Path | None:
    """Loss and learning rate against iteration, and validation mIoU, from a ``log.jsonl``."""
    plt = _pyplot()
    if plt is None:
        return None
    train, val = read_log(log_path)
    if not train:
        raise ValueError(f"{log_path} holds no training records")
    fig, (ax_loss, ax_miou) = plt.subplots(1, 2, figsize=(9, 3.6), dpi=120)
    ax_loss.plot([r["iter"] for r in train], [r["loss"] for r in train], label="loss")
    ax_loss.set_xlabel("iteration")
    ax_loss.set_ylabel("training loss")
    ax_lr = ax_loss.twinx()
    ax_lr.plot([r["iter"] for r in train], [r["lr"] for r in train], color="tab:gray", alpha=0.5, lw=1)
    ax_lr.set_ylabel("learning rate", color="tab:gray")
    ax_miou.plot([r["iter"] for r in val], [100 * r["mIoU"] for r in val], "o-", color="tab:green")
    ax_miou.set_xlabel("iteration")
    ax_miou.set_ylabel("validation mIoU (%)")
    for ax in (ax_loss, ax_miou):
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, path)


# above this many classes the confusion matrix cells carry no numbers (they would not be legible)
CONFUSION_TEXT_MAX_CLASSES = 30


def plot_confusion(confusion: Sequence[Sequence[int]], path: str | os.PathLike,
                   class_names: Sequence[str] | None = None, title: str = "") -> Path | None:
    """The confusion matrix (rows: ground truth, columns: prediction) normalised per row, as a
    PNG with the class names on both axes and, up to :data:`CONFUSION_TEXT_MAX_CLASSES` classes, the
    percentages in the cells; rows of classes absent from the labels are grey. None if
    matplotlib is missing."""
    counts = np.asarray(confusion, dtype=np.float64)
    num = counts.shape[0]
    if counts.shape != (num, num) or num == 0:
        raise ValueError(f"a confusion matrix must be square and not empty, got shape {counts.shape}")
    names = list(class_names) if class_names is not None else [str(i) for i in range(num)]
    if len(names) != num:
        raise ValueError(f"{len(names)} class names for {num} classes")
    plt = _pyplot()
    if plt is None:
        return None
    rows = counts.sum(1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        share = np.where(rows > 0, counts / rows, np.nan)
    text = num <= CONFUSION_TEXT_MAX_CLASSES
    cell = 0.42 if text else 0.17  # inches per class
    label_inches = 0.07 * max(map(len, names)) + 0.6
    side = num * cell
    fig, ax = plt.subplots(figsize=(side + label_inches + 1.4, side + label_inches + 0.8), dpi=100)
    cmap = plt.get_cmap("Blues").with_extremes(bad="lightgray")
    image = ax.imshow(share, cmap=cmap, vmin=0.0, vmax=1.0, interpolation="nearest")
    tick_size = 8 if text else 5
    ax.set_xticks(range(num), names, rotation=90, fontsize=tick_size)
    ax.set_yticks(range(num), names, fontsize=tick_size)
    ax.set_xlabel("prediction")
    ax.set_ylabel("ground truth")
    ax.set_title(title or "confusion matrix (each row sums to 100%)", fontsize=9)
    if text:
        for i, j in zip(*np.nonzero(np.isfinite(share))):
            value = share[i, j]
            ax.text(j, i, f"{100 * value:.0f}", ha="center", va="center", fontsize=6,
                    color="white" if value > 0.5 else "black")
    fig.colorbar(image, ax=ax, fraction=0.04, pad=0.02)
    fig.tight_layout()
    return _save(fig, path)
