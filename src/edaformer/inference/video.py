"""Segmenting video files frame by frame: ``<stem>_overlay.mp4`` (the overlay of every frame, H.264,
same frame count, size and frame rate) and optionally ``<stem>_<frame:06d>_label.png`` per frame;
temporal smoothing of the class probabilities; the flicker figure and the mIoU of labelled frames.

A video that breaks off (truncated or corrupt data) keeps the frames decoded before the fault: the
overlay video holds them and is closed properly, and the fault is reported by file and frame.
"""
from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Callable, Iterable, Sequence
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ..bands import labels_from_logits
from ..metrics import SegMetric
from .images import ImageInput, as_chw
from .infer import preprocess, protocol_logits, protocol_tta
from .predict import PredictResult, check_alpha, save_label, unique_stems
from .segmenter import Segmenter
from .video_io import VIDEO_SUFFIXES, VideoDecodeError, VideoExtrasMissing, VideoReader, VideoWriter
from .visualize import overlay

__all__ = ["VIDEO_SUFFIXES", "is_video", "check_smooth", "SmoothedSegmenter", "FlickerMeter", "flicker",
           "frames_miou", "VideoResult", "predict_video", "predict_videos"]


def is_video(path: str | os.PathLike) -> bool:
    """Whether ``path`` has a video suffix (:data:`VIDEO_SUFFIXES`)."""
    return Path(path).suffix.lower() in VIDEO_SUFFIXES


def check_smooth(smooth: float) -> float:
    if not 0.0 <= smooth < 1.0:
        raise ValueError(f"--smooth must be in [0, 1), got {smooth:g}")
    return smooth


class SmoothedSegmenter:
    """Label maps of consecutive frames from an exponential moving average of the class
    probabilities: ``mean = smooth * mean + (1 - smooth) * p(frame)``, then the argmax.

    ``smooth`` is the weight of the past (0: off, each frame on its own, the labels are the
    Segmenter's). The average is kept at the resolution the model gives (the decoder's logits in
    whole mode, the input size otherwise, the frame size under the multi-scale test) and resized to
    the frame in bands, as image prediction does; a frame of another size starts it afresh.
    """

    def __init__(self, segmenter: Segmenter, smooth: float = 0.0):
        self.segmenter, self.smooth = segmenter, check_smooth(smooth)
        self._mean: torch.Tensor | None = None

    def reset(self) -> None:
        """Forget the past (a new video)."""
        self._mean = None

    def _probabilities(self, raw: torch.Tensor) -> tuple[torch.Tensor, list[tuple[int, int]]]:
        seg = self.segmenter
        if seg.protocol.tta_scales:
            return protocol_tta(seg.model, raw, seg.protocol).float(), []
        logits, sizes = protocol_logits(seg.model, preprocess(raw, seg.protocol, device=seg.device), seg.protocol)
        return logits.float().softmax(1), sizes

    def __call__(self, frame: ImageInput) -> np.ndarray:
        """Label map ``(H, W)`` of the next frame."""
        if self.smooth == 0.0:
            return self.segmenter(frame)
        raw = as_chw(frame)
        out_size = tuple(raw.shape[-2:])
        with torch.inference_mode():
            probs, sizes = self._probabilities(raw)
            if self._mean is None or self._mean.shape != probs.shape:
                self._mean = probs
            else:
                self._mean.mul_(self.smooth).add_(probs, alpha=1.0 - self.smooth)
        if not sizes or sizes[-1] != out_size:
            sizes = sizes + [out_size]
        return labels_from_logits(self._mean, sizes)[0][0]


class FlickerMeter:
    """The flicker figure, frame by frame: the share of pixels whose label changes between
    consecutive frames, averaged over the frame pairs (NaN before the second frame)."""

    def __init__(self):
        self._previous: np.ndarray | None = None
        self._total, self._pairs = 0.0, 0

    def update(self, label: np.ndarray) -> None:
        label = np.asarray(label)
        if self._previous is not None and self._previous.shape == label.shape:
            self._total += float(np.mean(self._previous != label))
            self._pairs += 1
        self._previous = label

    @property
    def pairs(self) -> int:
        return self._pairs

    @property
    def value(self) -> float:
        return self._total / self._pairs if self._pairs else float("nan")


def flicker(labels: Iterable[np.ndarray]) -> float:
    """Share of pixels whose label changes between consecutive label maps, the mean over the
    pairs (in [0, 1]; NaN for fewer than two maps). Pairs of different sizes are left out."""
    meter = FlickerMeter()
    for label in labels:
        meter.update(label)
    return meter.value


def frames_miou(predictions: Sequence[np.ndarray], annotations: Sequence[np.ndarray | None], num_classes: int,
                ignore_index: int = 255) -> float:
    """mIoU of the frames that have an annotation (None: an unlabelled frame, left out), over the
    pixels of all of them together (as a dataset's mIoU)."""
    if len(predictions) != len(annotations):
        raise ValueError(f"{len(predictions)} predictions for {len(annotations)} annotations")
    metric = SegMetric(num_classes, ignore_index)
    used = 0
    for pred, label in zip(predictions, annotations):
        if label is not None:
            metric.update(torch.as_tensor(np.asarray(pred, np.int64)), torch.as_tensor(np.asarray(label, np.int64)))
            used += 1
    if not used:
        raise ValueError("no annotated frames")
    return float(metric.compute()["mIoU"])


@dataclasses.dataclass
class VideoResult:
    """What :func:`predict_video` did: ``frames`` segmented and written to ``video`` (None when
    none was), the input's ``fps`` and upright ``size`` (width, height), the ``flicker`` figure of
    the labels, and ``error``: the fault that ended the video early, else None."""

    path: Path
    video: Path | None
    frames: int
    fps: Fraction
    size: tuple[int, int]
    flicker: float
    error: str | None = None


def _one_line(error: BaseException, path: Path, frame: int) -> str:
    if isinstance(error, VideoDecodeError):
        return str(error)
    text = str(error).strip()
    text = text.splitlines()[0] if text else type(error).__name__
    return f"{path}: frame {frame}: {text}"


def predict_video(segmenter: Segmenter, path: str | os.PathLike, out_dir: str | os.PathLike, *,
                  stem: str | None = None, alpha: float = 0.5, smooth: float = 0.0, frame_labels: bool = False,
                  progress: bool = False, on_frame: Callable[[int, np.ndarray], None] | None = None) -> VideoResult:
    """Segment every frame of the video ``path`` into ``out_dir``: ``<stem>_overlay.mp4`` (H.264,
    yuv420p, the input's frame count, size and frame rate; an odd side is padded by one pixel),
    with ``frame_labels`` also ``<stem>_<frame:06d>_label.png`` (palette PNG, pixel = class id).

    ``smooth``: the weight of the past in the moving average of the class probabilities (see
    :class:`SmoothedSegmenter`). ``progress``: a progress bar in frames/s on stderr.
    ``on_frame(index, label)`` is called for each frame. Raises ``ValueError`` naming the file when
    it is no video (nothing is written). A fault later on (truncated or corrupt data, an error while
    segmenting or writing) ends the video there: the overlay keeps the frames before it and the
    result's ``error`` names the file and the frame.
    """
    check_alpha(alpha)
    path, out = Path(path), Path(out_dir)
    stem = stem or path.stem
    labeler = SmoothedSegmenter(segmenter, smooth)
    meter = FlickerMeter()
    with VideoReader(path) as reader:
        out.mkdir(parents=True, exist_ok=True)
        writer, index, error = None, 0, None
        frames = tqdm(reader, total=reader.frames, desc=path.name, unit="frame", file=sys.stderr,
                      disable=not progress, leave=False, dynamic_ncols=True)
        try:
            for index, rgb in enumerate(frames):
                label = labeler(rgb)
                shown = np.asarray(overlay(rgb, label, segmenter.palette, alpha=alpha))
                if writer is None:
                    writer = VideoWriter(out / f"{stem}_overlay.mp4", reader.width, reader.height, reader.fps)
                writer.write(shown)
                if frame_labels:
                    save_label(label, segmenter.palette, out / f"{stem}_{index:06d}_label.png")
                meter.update(label)
                if on_frame is not None:
                    on_frame(index, label)
        except (VideoDecodeError, ValueError, OSError, RuntimeError, MemoryError) as e:
            kept = f"{writer.frames} frame(s) written to {writer.path}" if writer is not None else "nothing written"
            error = f"{_one_line(e, path, index)}; {kept}"
        finally:
            frames.close()
            if writer is not None:
                writer.close()
    return VideoResult(path, writer.path if writer is not None else None, writer.frames if writer is not None else 0,
                       reader.fps, (reader.width, reader.height), meter.value, error)


def predict_videos(segmenter: Segmenter, files: Sequence[Path], out_dir: str | os.PathLike, *,
                   on_error: Callable[[Path, str], None] | None = None, **options) -> PredictResult:
    """:func:`predict_video` for each of ``files`` (output stems made unique, see
    :func:`~.predict.unique_stems`). A file that is no video, or that breaks off, is passed to
    ``on_error(path, message)`` and listed in ``failed`` (the frames of one that broke off are
    kept), and so is one whose overlay cannot be finished (e.g. a full disk); the next file is
    processed."""
    written, failed = [], []
    for path, stem in zip(files, unique_stems(files)):
        try:
            result = predict_video(segmenter, path, out_dir, stem=stem, **options)
            message = result.error
        except VideoExtrasMissing:
            raise
        except (ValueError, OSError, RuntimeError, MemoryError) as e:
            message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            message = message if str(path) in message else f"{path}: {message}"
        if message is None:
            written.append(path)
            continue
        failed.append((path, message))
        if on_error is not None:
            on_error(path, message)
    return PredictResult(written, failed)
