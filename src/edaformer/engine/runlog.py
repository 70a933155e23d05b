"""What a training run writes about itself: ``log.jsonl`` records and the process's memory."""
from __future__ import annotations

import json
import logging
import math
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

try:  # not on Windows
    import resource
except ImportError:  # pragma: no cover
    resource = None

__all__ = ["JsonLog", "memory_mb"]

log = logging.getLogger(__name__)


class JsonLog:
    """One JSON object per line in ``log.jsonl`` (rank 0 only: ``path`` None elsewhere)."""

    def __init__(self, path: Path | None):
        self.path = path

    def start(self, iteration: int) -> None:
        """Keep only the records up to ``iteration`` (0: a new log), so that a resumed run does
        not repeat records; a torn last line (a killed write) is dropped."""
        if self.path is None or not self.path.exists():
            return
        kept, lines = [], self.path.read_text(encoding="utf-8").splitlines()
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                log.warning("%s line %d is not JSON (a torn write?): dropped", self.path, number)
                continue
            if iteration and record.get("iter", 0) <= iteration:
                kept.append(line)
        if len(kept) != len(lines):
            fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.", suffix=".tmp")
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write("".join(line + "\n" for line in kept))
            os.replace(tmp, self.path)

    def write(self, **record: Any) -> None:
        if self.path is not None:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")


def memory_mb(device: torch.device) -> float:
    """Peak CUDA memory allocated on ``device``, or this process's resident memory on CPU, in MiB."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        if resource is None:
            return math.nan
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
