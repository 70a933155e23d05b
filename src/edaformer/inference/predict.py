"""Segmenting image files: ``<stem>_label.png`` (palette PNG, pixel = class id), ``<stem>_overlay.png``
(optionally with a legend) and ``<stem>_probs.png`` (the probability of the chosen class scaled to
0-255, 8-bit gray), all at the original size. A file that fails is reported by name and the others
are still processed."""
from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import numpy as np

from .images import load_image
from .segmenter import Segmenter
from .visualize import add_legend, colorize, confidence_image, overlay

__all__ = ["IMAGE_SUFFIXES", "InputList", "collect_inputs", "unique_stems", "rank_share", "check_alpha",
           "save_label", "PredictResult", "predict_files"]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


@dataclasses.dataclass
class InputList:
    """Image files to segment and what was left out (``(path, reason)``)."""

    files: list[Path]
    skipped: list[tuple[Path, str]]


def collect_inputs(paths: Iterable[str | os.PathLike], suffixes: Sequence[str] = IMAGE_SUFFIXES) -> InputList:
    """Image files of ``paths``; a folder gives its images (files with one of ``suffixes``, sorted,
    not recursive). Subfolders, files with other extensions and folders without images are listed
    in ``skipped``; paths that do not exist are kept as files, to be reported when read."""
    files: list[Path] = []
    skipped: list[tuple[Path, str]] = []
    for p in map(Path, paths):
        if not p.is_dir():
            files.append(p)
            continue
        found = []
        for f in sorted(p.iterdir()):
            if f.is_dir():
                skipped.append((f, "subfolder (not searched)"))
            elif f.suffix.lower() in suffixes:
                found.append(f)
            else:
                skipped.append((f, f"unsupported extension {f.suffix or '(none)'!r}"))
        if not found:
            skipped.append((p, "folder without images"))
        files.extend(found)
    return InputList(files, skipped)


def unique_stems(paths: Sequence[str | os.PathLike]) -> list[str]:
    """Output stems for ``paths``: the file stem, with ``_1``, ``_2``... added to repeats."""
    used: set[str] = set()
    out = []
    for path in map(Path, paths):
        stem, n = path.stem, 1
        while stem in used:
            stem, n = f"{path.stem}_{n}", n + 1
        used.add(stem)
        out.append(stem)
    return out


def rank_share(files: Sequence[Path], rank: int, world_size: int) -> tuple[list[Path], list[str]]:
    """The files that process ``rank`` of ``world_size`` segments, with their output stems: every
    ``world_size``-th file from the ``rank``-th on. The shares of the ranks are disjoint and cover
    ``files``, and each output keeps the stem one process gives it (:func:`unique_stems` of all)."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not among the {world_size} processes")
    files = list(files)
    stems = unique_stems(files)
    return files[rank::world_size], stems[rank::world_size]


def check_alpha(alpha: float) -> float:
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"--alpha must be in [0, 1], got {alpha:g}")
    return alpha


def save_label(label: np.ndarray, palette: Sequence[Sequence[int]], path: str | os.PathLike) -> Path:
    """Write a label map as a palette PNG (pixel value = class id)."""
    path = Path(path)
    colorize(label, palette).save(path)
    return path


@dataclasses.dataclass
class PredictResult:
    written: list[Path]
    failed: list[tuple[Path, str]]


def predict_files(segmenter: Segmenter, files: Sequence[Path], out_dir: str | os.PathLike, *, alpha: float = 0.5,
                  legend: bool = False, save_probs: bool = False, on_error: Callable[[Path, str], None] | None = None,
                  progress: Callable[[Iterable], Iterable] | None = None,
                  stems: Sequence[str] | None = None) -> PredictResult:
    """Segment ``files`` into ``out_dir``. Errors of one image (unreadable file, out of memory)
    are collected, passed to ``on_error(path, message)``, and the next image is processed; the
    outputs of a failed image are removed. ``stems``: the output stems of ``files`` (default
    :func:`unique_stems`; :func:`rank_share` gives those of a share)."""
    check_alpha(alpha)
    if stems is not None and len(stems) != len(files):
        raise ValueError(f"{len(stems)} output stems for {len(files)} files")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written, failed = [], []
    pairs = list(zip(files, unique_stems(files) if stems is None else stems))
    for path, stem in (progress(pairs) if progress else pairs):
        targets = [out / f"{stem}_label.png", out / f"{stem}_overlay.png"] + (
            [out / f"{stem}_probs.png"] if save_probs else [])
        try:
            image = load_image(path)
            label, conf = segmenter.predict(image, confidence=save_probs)
            save_label(label, segmenter.palette, targets[0])
            shown = overlay(image, label, segmenter.palette, alpha=alpha)
            del image
            if legend:
                shown = add_legend(shown, label, segmenter.classes, segmenter.palette)
            shown.save(targets[1])
            if conf is not None:
                confidence_image(conf).save(targets[2])
            written.append(path)
        except (ValueError, OSError, RuntimeError, MemoryError) as e:
            for t in targets:
                t.unlink(missing_ok=True)
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            msg = msg if str(path) in msg else f"{path}: {msg}"
            failed.append((path, msg))
            if on_error:
                on_error(path, msg)
    return PredictResult(written, failed)
