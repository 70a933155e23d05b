"""PNG plots: the ISR trade-off (mIoU against GFLOPs) and training curves (loss, mIoU)."""
from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

log = logging.getLogger("edaformer")

__all__ = ["plot_sweep", "plot_training_log"]


def _pyplot():
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed: no plot written (pip install matplotlib)")
        return None
    return plt


def _save(fig, path: str | os.PathLike) -> Path:
    import matplotlib.pyplot as plt

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
