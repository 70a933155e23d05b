"""The work dir of one training run: an exclusive lock, leftovers of killed runs, earlier runs'
files, and a free-space check."""
from __future__ import annotations

import fcntl
import logging
import os
import shutil
import socket
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from ..checkpoint import read_checkpoint
from .state import find_resume_checkpoint

__all__ = ["WorkDirError", "WorkDirLock", "remove_partial_files", "previous_run_files", "move_aside",
           "check_free_space", "open_work_dir", "RUN_FILES"]

log = logging.getLogger("edaformer")

LOCK_NAME = "train.lock"
RUN_FILES = ("config.yaml", "log.jsonl", "curves.png", "latest.pth", "best_mIoU.pth", "tensorboard")
_PARTIAL_PATTERNS = (".*.pth.*.tmp", ".*.link", ".log.jsonl.*.tmp")


class WorkDirError(ValueError):
    """The work dir is in use by another run, or holds an earlier run that would be mixed in."""


class WorkDirLock:
    """An exclusive ``flock`` on ``WORK_DIR/train.lock`` for the lifetime of a run.

    The lock goes away with the process, so a killed run never leaves the dir locked.
    """

    def __init__(self, work_dir: Path):
        self.path = Path(work_dir) / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> WorkDirLock:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise WorkDirError(f"work dir {self.path.parent} is in use by another training run ({holder}; "
                               f"lock file {self.path}); wait for it to end or use another --work-dir") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> WorkDirLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def remove_partial_files(work_dir: Path) -> list[Path]:
    """Delete the temporary files a killed run left behind (partial checkpoint or log writes)."""
    removed = []
    for pattern in _PARTIAL_PATTERNS:
        for path in Path(work_dir).glob(pattern):
            path.unlink(missing_ok=True)
            removed.append(path)
            log.info("removed %s, a partial file of an interrupted run", path)
    return removed


def previous_run_files(work_dir: Path) -> list[Path]:
    """The files of an earlier run in ``work_dir`` (empty when it holds no checkpoint)."""
    work_dir = Path(work_dir)
    checkpoints = sorted(work_dir.glob("iter_*.pth")) + [p for p in (work_dir / "latest.pth",
                                                                     work_dir / "best_mIoU.pth") if p.exists()]
    if not checkpoints:
        return []
    others = [work_dir / name for name in RUN_FILES if not name.endswith(".pth") and (work_dir / name).exists()]
    return checkpoints + others


def move_aside(work_dir: Path, files: list[Path]) -> Path:
    """Move ``files`` into ``WORK_DIR/previous-<time>/`` and say so."""
    target = Path(work_dir) / time.strftime("previous-%Y%m%d-%H%M%S")
    n = 0
    while target.exists():
        n += 1
        target = target.with_name(f"{target.name.split('.')[0]}.{n}")
    target.mkdir()
    for path in files:
        os.replace(path, target / path.name)
    log.warning("--force: moved %d files of the earlier run (%s) to %s", len(files),
                ", ".join(p.name for p in files[:6]) + (" ..." if len(files) > 6 else ""), target)
    return target


def check_free_space(work_dir: Path, checkpoint_bytes: int) -> None:
    """Warn when ``work_dir`` cannot hold the next checkpoint and its ``latest.pth`` copy."""
    free = shutil.disk_usage(work_dir).free
    if free < 2 * checkpoint_bytes:
        log.warning("only %.1f MB free in %s; each checkpoint needs about %.1f MB, written twice (iter_<n>.pth and "
                    "latest.pth): the first checkpoint may fail", free / 2**20, work_dir, checkpoint_bytes / 2**20)


def open_work_dir(work_dir: Path, resume: str | None, force: bool,
                  check_config: Callable[[Mapping[str, Any], Path], list[str]],
                  run_files: Sequence[str] = ()) -> dict[str, Any]:
    """Lock the work dir, clear partial files, pick the checkpoint to resume (``resume``: ``"auto"``,
    a path or None) and check the config against it (``check_config(ckpt, path)`` returns the
    changes, raises for a forbidden one), all before anything in the dir changes. Files of an
    earlier run (:func:`previous_run_files`, plus ``run_files`` names) refuse a fresh start unless
    ``force`` moves them aside. Rank 0 only. Returns ``{"lock", "found": (path, checkpoint) | None}``."""
    work_dir.mkdir(parents=True, exist_ok=True)
    lock = WorkDirLock(work_dir).acquire()
    try:
        remove_partial_files(work_dir)
        found = None
        if resume == "auto":
            found = find_resume_checkpoint(work_dir)
            if found is None:
                log.info("resume auto: no checkpoint in %s, starting from scratch", work_dir)
        elif resume:
            found = (Path(resume), read_checkpoint(resume))
        earlier = []
        if found is None:
            earlier = previous_run_files(work_dir) + [work_dir / n for n in run_files if (work_dir / n).exists()]
        if earlier and not force:
            names = ", ".join(p.name for p in earlier[:4]) + (" ..." if len(earlier) > 4 else "")
            raise WorkDirError(f"work dir {work_dir} holds an earlier run ({names}); continue it with --resume auto, "
                               "or start over with --force (moves its files aside), or use another --work-dir")
        if found is not None:
            for change in check_config(found[1], found[0]):
                log.info("config changed since %s: %s (applied)", found[0].name, change)
        elif earlier:
            move_aside(work_dir, earlier)
    except BaseException:
        lock.release()
        raise
    return dict(lock=lock, found=found)
