"""Write the ``*_labelTrainIds.png`` label files that :class:`Cityscapes` and :class:`COCOStuff` read."""
from __future__ import annotations

from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image
from tqdm import tqdm

from .datasets import IGNORE_INDEX, DatasetError

__all__ = ["convert_cityscapes", "convert_cocostuff", "ConversionResult", "CITYSCAPES_ID_TO_TRAINID",
           "COCOSTUFF_UNUSED_IDS", "cityscapes_lut", "cocostuff_lut"]

# Cityscapes label id -> train id; every other id is ignored
CITYSCAPES_ID_TO_TRAINID = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11,
                            25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}
# COCO-Stuff stuffthingmaps (0-based ids 0..181): the 11 thing ids COCO never used
COCOSTUFF_UNUSED_IDS = (11, 25, 28, 29, 44, 65, 67, 68, 70, 82, 90)
COCOSTUFF_NUM_IDS = 182


class ConversionResult(NamedTuple):
    written: int
    skipped: int
    folder: Path


def cityscapes_lut() -> np.ndarray:
    """256-entry uint8 table: Cityscapes label id -> train id (255 = ignore)."""
    lut = np.full(256, IGNORE_INDEX, dtype=np.uint8)
    for label_id, train_id in CITYSCAPES_ID_TO_TRAINID.items():
        lut[label_id] = train_id
    return lut


def cocostuff_lut() -> np.ndarray:
    """256-entry uint8 table: the 182 stuffthingmaps ids -> the 171 used ids in order (255 = ignore)."""
    lut = np.full(256, IGNORE_INDEX, dtype=np.uint8)
    used = [i for i in range(COCOSTUFF_NUM_IDS) if i not in COCOSTUFF_UNUSED_IDS]
    lut[used] = np.arange(len(used), dtype=np.uint8)
    return lut


def _convert_file(src: Path, dst: Path, lut: np.ndarray) -> None:
    with Image.open(src) as im:
        arr = np.array(im)
    if arr.ndim != 2 or arr.dtype != np.uint8:
        raise DatasetError(f"{src} is not an 8-bit single-channel label image (shape {arr.shape}, {arr.dtype})")
    Image.fromarray(lut[arr]).save(dst)


def _convert_all(pairs: list[tuple[Path, Path]], lut: np.ndarray, folder: Path, overwrite: bool, workers: int,
                 progress: bool, desc: str) -> ConversionResult:
    todo = [(s, d) for s, d in pairs if overwrite or not d.exists()]
    with ThreadPoolExecutor(max(workers, 1)) as pool:
        done: Iterable = pool.map(lambda p: _convert_file(p[0], p[1], lut), todo)
        if progress:
            done = tqdm(done, total=len(todo), desc=desc, unit="file")
        for _ in done:
            pass
    return ConversionResult(len(todo), len(pairs) - len(todo), folder)


def _sources(folder: Path, pattern: str, exclude: str) -> list[Path]:
    if not folder.is_dir():
        raise DatasetError(f"label folder does not exist: {folder}")
    return sorted(p for p in folder.rglob(pattern) if p.is_file() and not p.name.endswith(exclude))


def convert_cityscapes(root: str | Path, *, overwrite: bool = True, workers: int = 1,
                       progress: bool = False) -> ConversionResult:
    """For every ``ROOT/gtFine/**/*_labelIds.png`` write ``*_labelTrainIds.png`` beside it (the 19
    training classes, everything else 255). Returns how many files were written and skipped."""
    folder = Path(root) / "gtFine"
    sources = _sources(folder, "*_labelIds.png", "_labelTrainIds.png")
    if not sources:
        raise DatasetError(f"no *_labelIds.png files under {folder}")
    pairs = [(s, s.with_name(s.name[: -len("_labelIds.png")] + "_labelTrainIds.png")) for s in sources]
    return _convert_all(pairs, cityscapes_lut(), folder, overwrite, workers, progress, "cityscapes")


def convert_cocostuff(root: str | Path, *, overwrite: bool = True, workers: int = 1,
                      progress: bool = False) -> ConversionResult:
    """For every stuffthingmaps label ``ROOT/annotations/**/*.png`` write ``*_labelTrainIds.png``
    beside it (the 171 used ids in order 0..170; unused ids and 255 become 255)."""
    folder = Path(root) / "annotations"
    sources = _sources(folder, "*.png", "_labelTrainIds.png")
    if not sources:
        raise DatasetError(f"no stuffthingmaps *.png label files under {folder}")
    pairs = [(s, s.with_name(s.stem + "_labelTrainIds.png")) for s in sources]
    return _convert_all(pairs, cocostuff_lut(), folder, overwrite, workers, progress, "cocostuff")
