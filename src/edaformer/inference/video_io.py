"""Reading and writing video files with PyAV (the optional ``video`` extra): frames as ``(H, W, 3)``
uint8 RGB arrays, turned upright by the stream's display rotation; H.264 (yuv420p) MP4 output."""
from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from fractions import Fraction
from pathlib import Path

import numpy as np

__all__ = ["VIDEO_SUFFIXES", "VideoExtrasMissing", "require_video", "VideoDecodeError", "VideoReader", "VideoWriter",
           "write_video"]

VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv", ".webm")
DEFAULT_FPS = Fraction(25)  # when a stream states no frame rate


class VideoExtrasMissing(ImportError, ValueError):
    """PyAV, needed for video files, is not installed (a ``ValueError`` too: the command line
    reports it in one line, as it does bad input)."""


class VideoDecodeError(ValueError):
    """A video that ends in a fault after ``frame`` good frames (truncated or corrupt data)."""

    def __init__(self, path: Path, frame: int, message: str):
        super().__init__(f"{path}: {message}")
        self.path, self.frame = path, frame


def _av():
    try:
        import av  # optional: the `video` extra
    except ImportError:
        raise VideoExtrasMissing('video files need PyAV: pip install "edaformer[video]"') from None
    return av


def require_video() -> None:
    """Raise :class:`VideoExtrasMissing` (with the install hint) unless PyAV is installed."""
    _av()


def _reason(error: BaseException) -> str:
    """PyAV's error text without its errno and file name."""
    text = getattr(error, "strerror", None) or str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


class VideoReader:
    """The frames of a file's first video stream, upright, as ``(H, W, 3)`` uint8 RGB arrays
    (iterate once).

    Opening raises ``ValueError`` naming the file when it is missing, is no video, or its first
    frame cannot be decoded. Iterating raises :class:`VideoDecodeError` after the last good frame
    when decoding fails, or when the stream ends before the frame count the container states (a
    truncated file). ``width`` / ``height`` are the upright size of the first frame (later frames
    of another size are scaled to it), ``fps`` the average frame rate, ``frames`` the stated frame
    count (None when the container states none).

    >>> with VideoReader("street.mp4") as video:
    ...     for rgb in video: ...
    """

    def __init__(self, path: str | os.PathLike):
        self._av = av = _av()
        self.path = Path(path)
        if self.path.is_dir():
            raise ValueError(f"cannot read video {self.path}: is a directory")
        if not self.path.exists():
            raise ValueError(f"cannot read video {self.path}: no such file")
        try:
            self._container = av.open(str(self.path))
        except av.FFmpegError as e:
            raise ValueError(f"cannot read video {self.path}: not a video, or its header is damaged "
                             f"({_reason(e)})") from None
        try:
            if not self._container.streams.video:
                raise ValueError(f"cannot read video {self.path}: no video stream")
            self._stream = self._container.streams.video[0]
            self._stream.thread_type = "AUTO"
            self.fps = Fraction(self._stream.average_rate or self._stream.guessed_rate or DEFAULT_FPS)
            self.frames = int(self._stream.frames) or None
            self._decoded = self._container.decode(self._stream)
            self._count = 0
            self._size = None
            self._last_time: float | None = None
            try:
                first = self._next()
            except VideoDecodeError as e:
                raise ValueError(f"cannot read video {e}") from None
            if first is None:
                raise ValueError(f"cannot read video {self.path}: no frames")
            self._first: np.ndarray | None = first
            self.height, self.width = first.shape[:2]
        except BaseException:
            self._container.close()
            raise

    def __enter__(self) -> "VideoReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._container.close()

    def _next(self) -> np.ndarray | None:
        """The next frame upright, None at the end of the stream."""
        try:
            frame = next(self._decoded)
        except StopIteration:
            return None
        except self._av.FFmpegError as e:
            raise VideoDecodeError(self.path, self._count,
                                   f"cannot decode frame {self._count} ({_reason(e)})") from None
        if self._size is None:
            self._size = frame.width, frame.height
        self._last_time = frame.time
        # later frames of another size (a mid-stream change) are scaled to the first one's
        rgb = frame.to_ndarray(format="rgb24", width=self._size[0], height=self._size[1])
        turns = round((frame.rotation or 0) / 90) % 4  # counter-clockwise quarter turns that show it upright
        self._count += 1
        return np.ascontiguousarray(np.rot90(rgb, turns)) if turns else rgb

    def __iter__(self) -> Iterator[np.ndarray]:
        if self._first is not None:
            first, self._first = self._first, None
            yield first
        while (rgb := self._next()) is not None:
            yield rgb
        if self.frames is not None and self._count < self.frames:
            raise VideoDecodeError(self.path, self._count, f"the file ends after frame {self._count - 1}, "
                                   f"{self._count} of the {self.frames} frames it states (truncated)")
        stated = self._stated_seconds()
        if self.frames is None and stated is not None and self._last_time is not None:
            # without a frame count (Matroska / WebM): the last frame against the stated duration
            shown = self._last_time - float((self._stream.start_time or 0) * self._stream.time_base) + 1 / self.fps
            if shown < stated - 2 / self.fps:
                raise VideoDecodeError(self.path, self._count, f"the file ends after frame {self._count - 1}, at "
                                       f"{float(shown):.2f} s of the {stated:.2f} s it states (truncated)")

    def _stated_seconds(self) -> float | None:
        """The video stream's duration as the container states it (None when it does not)."""
        s = self._stream
        if s.duration and s.time_base:
            return float(s.duration * s.time_base)
        text = (s.metadata or {}).get("DURATION", "")  # Matroska's per-stream tag, HH:MM:SS.fraction
        try:
            h, m, sec = text.split(":")
            return int(h) * 3600 + int(m) * 60 + float(sec)
        except ValueError:
            return None


class VideoWriter:
    """Writes ``(H, W, 3)`` uint8 RGB frames as H.264 (yuv420p) at ``fps`` into an MP4 file (index at
    the front, so that a cut copy still plays). yuv420p needs even sides: an odd width or height
    is padded by repeating the last column or row. Close it (or use ``with``) to finish the file."""

    def __init__(self, path: str | os.PathLike, width: int, height: int, fps: Fraction | float, crf: int = 20):
        av = _av()
        self.path = Path(path)
        self.size = (int(width), int(height))
        self.padded = (self.size[0] + self.size[0] % 2, self.size[1] + self.size[1] % 2)
        self._av = av
        self._container = av.open(str(self.path), "w", format="mp4", options={"movflags": "+faststart"})
        try:
            self._stream = self._container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1 << 16),
                                                      options={"crf": str(crf)})
            self._stream.width, self._stream.height = self.padded
            self._stream.pix_fmt = "yuv420p"
        except BaseException:
            self._container.close()
            raise
        self.frames = 0

    def __enter__(self) -> "VideoWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def write(self, rgb: np.ndarray) -> None:
        """Append one frame of the writer's size."""
        rgb = np.asarray(rgb)
        if rgb.shape != (self.size[1], self.size[0], 3) or rgb.dtype != np.uint8:
            raise ValueError(f"{self.path}: expected a {self.size[1]}x{self.size[0]}x3 uint8 frame, got "
                             f"{rgb.dtype} {rgb.shape}")
        pad_w, pad_h = self.padded[0] - self.size[0], self.padded[1] - self.size[1]
        if pad_w or pad_h:
            rgb = np.pad(rgb, ((0, pad_h), (0, pad_w), (0, 0)), mode="edge")
        frame = self._av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")
        for packet in self._stream.encode(frame):
            self._container.mux(packet)
        self.frames += 1

    def close(self) -> None:
        """Flush the encoder and finish the file (safe to call twice)."""
        if self._container is None:
            return
        try:
            for packet in self._stream.encode(None):
                self._container.mux(packet)
        finally:
            self._container.close()
            self._container = None


def write_video(frames: Iterable[np.ndarray], path: str | os.PathLike, fps: Fraction | float) -> int:
    """Write ``(H, W, 3)`` uint8 RGB frames (all of the first one's size) as an H.264 MP4; returns
    the number of frames written."""
    writer = None
    try:
        for rgb in frames:
            if writer is None:
                writer = VideoWriter(path, rgb.shape[1], rgb.shape[0], fps)
            writer.write(rgb)
    finally:
        if writer is not None:
            writer.close()
    if writer is None:
        raise ValueError(f"{path}: no frames to write")
    return writer.frames
