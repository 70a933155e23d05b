"""Colour label images to class-id labels: each pixel's RGB colour looked up in a palette.

Annotation tools often save a label as an RGB image, one colour per class. A dataset reads one
class id per pixel; :func:`convert_color_labels` (``edaformer convert colors``) writes those files.
A colour that is not in the palette becomes the ignore value, and is counted.
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from .datasets import IGNORE_INDEX, DatasetError

__all__ = ["colors_to_ids", "ids_to_colors", "convert_color_labels", "ColorConversion", "IDS_SUFFIX"]

IDS_SUFFIX = "_ids.png"  # the name ending of a class-id file written beside its colour label
Color = tuple[int, int, int]


def _codes(rgb: np.ndarray) -> np.ndarray:
    """One int per colour: ``r << 16 | g << 8 | b``."""
    rgb = rgb.astype(np.int32)
    return (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]


def _palette_array(palette: Sequence[Sequence[int]], ignore_index: int) -> np.ndarray:
    """The palette as an ``(N, 3)`` array; ``ValueError`` for a bad colour, a colour given twice or an
    ignore value that is also a class id."""
    colors = np.asarray(palette, dtype=np.int64)
    if colors.ndim != 2 or colors.shape[1] != 3 or not len(colors) or colors.min() < 0 or colors.max() > 255:
        raise ValueError(f"a palette is a list of [r, g, b] colours with values 0-255, got {palette!r:.80}")
    codes = _codes(colors)
    if len(np.unique(codes)) != len(codes):
        counts = Counter(codes.tolist())
        twice = sorted({tuple(c) for c, code in zip(colors.tolist(), codes.tolist()) if counts[code] > 1})
        raise ValueError(f"the palette gives one colour to two classes ({twice[:3]}): "
                         "a colour label would be ambiguous")
    if not len(colors) <= ignore_index <= 255:
        raise ValueError(f"the ignore value {ignore_index} must be in [{len(colors)}, 255] "
                         f"(the palette has {len(colors)} classes)")
    return colors


def colors_to_ids(rgb: np.ndarray, palette: Sequence[Sequence[int]],
                  ignore_index: int = IGNORE_INDEX) -> tuple[np.ndarray, Counter]:
    """An ``(H, W, 3)`` colour label as ``(H, W)`` uint8 class ids (the index of each pixel's
    colour in ``palette``), and the colours not in it with their pixel counts (those pixels are
    ``ignore_index``)."""
    colors = _palette_array(palette, ignore_index)
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"a colour label is (H, W, 3), got shape {rgb.shape}")
    palette_codes = _codes(colors)
    order = np.argsort(palette_codes)
    sorted_codes = palette_codes[order]
    codes = _codes(rgb)
    at = np.searchsorted(sorted_codes, codes).clip(max=len(sorted_codes) - 1)
    known = sorted_codes[at] == codes
    ids = np.where(known, order[at], ignore_index).astype(np.uint8)
    unknown, counts = np.unique(codes[~known], return_counts=True)
    return ids, Counter({(int(c >> 16), int(c >> 8 & 255), int(c & 255)): int(n) for c, n in zip(unknown, counts)})


def ids_to_colors(ids: np.ndarray, palette: Sequence[Sequence[int]], fill: Color = (0, 0, 0)) -> np.ndarray:
    """The inverse: ``(H, W)`` class ids as an ``(H, W, 3)`` uint8 colour label (ids outside the
    palette in ``fill``)."""
    table = np.tile(np.asarray(fill, np.uint8), (256, 1))
    table[: len(palette)] = np.asarray(palette, np.uint8)
    return table[ids]


@dataclass
class ColorConversion:
    """What :func:`convert_color_labels` did: files written and skipped, the colours not in the
    palette (pixel counts, over all files) and the files that could not be converted."""

    written: int = 0
    skipped: int = 0
    folder: Path = Path()
    unknown: Counter = field(default_factory=Counter)
    unknown_files: int = 0
    failed: list[str] = field(default_factory=list)

    def summary(self, ignore_index: int) -> str:
        text = f"wrote {self.written} class-id label files under {self.folder} ({self.skipped} existing skipped)"
        if self.unknown:
            shown = ", ".join(f"{list(c)} x {n}" for c, n in self.unknown.most_common(5))
            more = f", ... ({len(self.unknown) - 5} more colours)" if len(self.unknown) > 5 else ""
            text += (f"; {sum(self.unknown.values())} pixels in {self.unknown_files} files had a colour not in the "
                     f"palette and became {ignore_index} (ignore): {shown}{more}")
        return text


def _read_rgb(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        if im.mode not in ("RGB", "RGBA", "P"):
            raise DatasetError(f"{path} is not a colour label (mode {im.mode}): it may already hold class ids")
        return np.asarray(im.convert("RGB"))


def convert_color_labels(root: str | Path, palette: Sequence[Sequence[int]], *, ignore_index: int = IGNORE_INDEX,
                         out: str | Path | None = None, suffix: str = ".png", overwrite: bool = True,
                         workers: int = 1, progress: bool = False) -> ColorConversion:
    """For every colour label ``root/**/*<suffix>`` write its class ids as a single-channel PNG:
    into ``out`` under the same relative path and name, else beside it as ``<stem>_ids.png``
    (:data:`IDS_SUFFIX`; files of that ending are never sources). A file that cannot be read or
    is not a colour image is reported in ``failed`` and the others are still converted."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"label folder does not exist: {root}")
    _palette_array(palette, ignore_index)  # a bad palette fails before any file is written
    target = Path(out) if out is not None else None
    sources = sorted(p for p in root.rglob(f"*{suffix}") if p.is_file() and not p.name.endswith(IDS_SUFFIX)
                     and (target is None or target.resolve() not in p.resolve().parents))
    if not sources:
        raise DatasetError(f"no '*{suffix}' colour labels under {root}")

    def destination(src: Path) -> Path:
        if target is None:
            return src.with_name(src.name[: -len(suffix)] + IDS_SUFFIX)
        return target / src.relative_to(root).with_suffix(".png")

    result = ColorConversion(folder=target or root)
    todo = [(s, destination(s)) for s in sources if overwrite or not destination(s).exists()]
    result.skipped = len(sources) - len(todo)

    def convert(pair: tuple[Path, Path]) -> Counter | str:
        src, dst = pair
        try:
            ids, unknown = colors_to_ids(_read_rgb(src), palette, ignore_index)
            dst.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(ids).save(dst)
        except (OSError, ValueError) as e:  # one bad file is reported, the others still converted
            return str(e) if str(src) in str(e) else f"{src}: {e}"
        return unknown

    with ThreadPoolExecutor(max(workers, 1)) as pool:
        done = pool.map(convert, todo)
        if progress:
            done = tqdm(done, total=len(todo), desc="colors", unit="file")
        for outcome in done:
            if isinstance(outcome, str):
                result.failed.append(outcome)
                continue
            result.written += 1
            result.unknown.update(outcome)
            result.unknown_files += bool(outcome)
    return result
