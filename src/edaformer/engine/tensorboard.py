"""TensorBoard scalars of a training run: the records of ``log.jsonl`` (``train.tensorboard: true``).

Training records go under ``train/<key>`` (loss, lr, time, data_time, memory_mb), validation
records under ``val/<key>`` (mIoU, aAcc, mAcc, mDice) and the per-class IoU under
``val/IoU/<class>``, all at the record's iteration. The ``tensorboard`` package is needed only
when the writer is opened (``pip install tensorboard``).
"""
from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

from ..config import ConfigError

__all__ = ["TensorBoardLog", "require_tensorboard"]

_MISSING = "train.tensorboard needs the tensorboard package: pip install tensorboard"


def require_tensorboard() -> None:
    """Raise :class:`~edaformer.config.ConfigError` if ``tensorboard`` cannot be imported."""
    try:
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401  (imports tensorboard, an optional package)
    except ImportError:
        raise ConfigError(_MISSING) from None


class TensorBoardLog:
    """Writes log records as scalars to an event file in ``log_dir``.

    ``first_iteration``: the first iteration this run logs (a resumed run: the checkpoint's
    iteration + 1); points at it and later, left in ``log_dir`` by an earlier run, are dropped
    from the view (TensorBoard's ``purge_step``), so a resumed run repeats none.
    """

    def __init__(self, log_dir: str | os.PathLike, first_iteration: int = 1, class_names: Sequence[str] = ()):
        require_tensorboard()
        from torch.utils.tensorboard import SummaryWriter  # tensorboard is an optional package

        self.class_names = list(class_names)
        self.writer = SummaryWriter(str(log_dir), purge_step=first_iteration)

    def write(self, record: Mapping[str, Any], iou: Sequence[float] | None = None) -> None:
        """One ``log.jsonl`` record (``iter``, ``mode`` "val" for validation, numbers) and, for a
        validation record, the per-class IoU (classes absent from the validation set, NaN, are
        left out). Written to disk at once, as ``log.jsonl`` is."""
        step = int(record["iter"])
        prefix = "val" if record.get("mode") == "val" else "train"
        for key, value in record.items():
            if key not in ("iter", "mode") and isinstance(value, (int, float)) and not isinstance(value, bool):
                self.writer.add_scalar(f"{prefix}/{key}", value, step)
        names = self.class_names or [str(i) for i in range(len(iou or ()))]
        for name, value in zip(names, iou or ()):
            if math.isfinite(value):
                self.writer.add_scalar(f"val/IoU/{name}", value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
