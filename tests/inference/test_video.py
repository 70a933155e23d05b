"""Video in, overlay video out: :mod:`edaformer.inference.video`, :mod:`edaformer.inference.video_io`
and ``edaformer predict`` on video files."""
from __future__ import annotations

import dataclasses
import sys
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import edaformer
from edaformer import cli, pretrained
from edaformer.inference import Segmenter, TestProtocol, preprocess
from edaformer.inference.video import (FlickerMeter, SmoothedSegmenter, flicker, frames_miou, is_video,
                                       predict_video, predict_videos)
from edaformer.inference.video_io import VideoExtrasMissing, VideoReader, VideoWriter, write_video
from edaformer.models import MODEL_SPECS

from tests.helpers.stubs import ADE, Conv1x1, rgb
from tests.helpers.training_data import CAMVID

av = pytest.importorskip("av")

CAMVID_CLASSES = 11  # CamVid annotations: ids 0-10, 11 = void
SHIPPED = pretrained.DEFAULT_NAME


def synthetic_frames(n: int = 10, h: int = 48, w: int = 64, seed: int = 0) -> list[np.ndarray]:
    """A bright block moving right over a noisy two-colour background."""
    rng = np.random.default_rng(seed)
    frames = []
    for i in range(n):
        f = np.zeros((h, w, 3), np.int16)
        f[: h // 2] = (70, 130, 180)
        f[h // 2:] = (128, 64, 128)
        x0 = (i * w // n) % (w - w // 4)
        f[h // 4: 3 * h // 4, x0: x0 + w // 4] = (220, 220, 0)
        frames.append(np.clip(f + rng.integers(-20, 21, f.shape), 0, 255).astype(np.uint8))
    return frames


def encode(frames: list[np.ndarray], path: Path, fps: int, container: str) -> Path:
    """Frames as H.264 in another container than ours (Matroska, AVI)."""
    with av.open(str(path), "w", format=container) as out:
        stream = out.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = frames[0].shape[1], frames[0].shape[0], "yuv420p"
        for f in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    return path


def decoded(path: Path) -> list[np.ndarray]:
    with VideoReader(path) as video:
        return list(video)


def cut_in_half(path: Path) -> Path:
    data = path.read_bytes()
    cut = path.with_name(f"cut_{path.name}")
    cut.write_bytes(data[: len(data) // 2])
    return cut


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> Path:
    return write_video_file(synthetic_frames(), tmp_path_factory.mktemp("clip") / "street.mp4", 15)


def write_video_file(frames, path: Path, fps) -> Path:
    assert write_video(frames, path, fps) == len(frames)
    return path


@pytest.fixture
def small_seg(ade_model) -> Segmenter:
    """The tiny random-weight 150-class model at a small test size."""
    return Segmenter(ade_model, device="cpu", test_scale=(64, 48))


# -- reading and writing ---------------------------------------------------------------------------
def test_written_video_has_the_frames_size_and_rate(tmp_path):
    frames = synthetic_frames(n=7, h=48, w=64)
    path = write_video_file(frames, tmp_path / "a.mp4", Fraction(30000, 1001))
    with VideoReader(path) as video:
        assert (video.width, video.height, video.fps, video.frames) == (64, 48, Fraction(30000, 1001), 7)
        back = list(video)
    assert len(back) == 7 and all(f.shape == (48, 64, 3) and f.dtype == np.uint8 for f in back)
    assert np.abs(back[3].astype(int) - frames[3]).mean() < 12  # H.264 is lossy, not that lossy
    with av.open(str(path)) as c:
        s = c.streams.video[0]
        assert (s.codec_context.name, s.format.name) == ("h264", "yuv420p")


def test_odd_sizes_are_padded_to_even_by_repeating_the_edge(tmp_path):
    frames = synthetic_frames(n=3, h=31, w=45)
    frames[0][:, -1] = (255, 0, 0)
    with VideoWriter(tmp_path / "odd.mp4", 45, 31, 10) as writer:
        assert writer.padded == (46, 32)
        for f in frames:
            writer.write(f)
        with pytest.raises(ValueError, match=r"expected a 31x45x3 uint8 frame"):
            writer.write(np.zeros((32, 46, 3), np.uint8))
    back = decoded(tmp_path / "odd.mp4")
    assert len(back) == 3 and back[0].shape == (32, 46, 3)
    assert np.abs(back[0][:31, :45].astype(int) - frames[0]).mean() < 12
    assert back[0][:31, 45, 0].mean() > 180  # the repeated red column


def test_a_rotated_video_is_read_upright(tmp_path):
    frames = synthetic_frames(n=2, h=32, w=64)
    with av.open(str(tmp_path / "r.mp4"), "w") as out:
        stream = out.add_stream("libx264", rate=10)
        stream.width, stream.height, stream.pix_fmt = 64, 32, "yuv420p"
        if not hasattr(stream, "set_display_rotation"):
            pytest.skip("this PyAV cannot write a display rotation")
        stream.set_display_rotation(90)
        for f in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    with VideoReader(tmp_path / "r.mp4") as video:
        assert (video.width, video.height) == (32, 64)
        first = next(iter(video))
    assert np.abs(first.astype(int) - np.rot90(frames[0])).mean() < 12  # a quarter turn counter-clockwise


# -- the figures -----------------------------------------------------------------------------------
def test_flicker_is_the_mean_share_of_changed_labels():
    a = np.zeros((4, 4), np.uint8)
    b = a.copy()
    b[0] = 1                        # 4 of 16 pixels change
    c = b.copy()
    c[1:3] = 2                      # 8 of 16 change
    assert flicker([a, a]) == 0.0
    assert flicker([a, b]) == 0.25
    assert flicker([a, b, c]) == pytest.approx((0.25 + 0.5) / 2)
    assert np.isnan(flicker([a]))
    meter = FlickerMeter()
    for label in (a, b, c, c):
        meter.update(label)
    assert meter.pairs == 3 and meter.value == pytest.approx(0.75 / 3)


def test_frames_miou_uses_the_labelled_frames_only():
    pred = np.array([[0, 0], [1, 1]])
    label = np.array([[0, 1], [1, 255]])
    # class 0: I=1, U=2; class 1: I=1, U=2 (the ignored pixel left out)
    assert frames_miou([pred, pred * 0], [label, None], 2) == pytest.approx(0.5)
    assert frames_miou([pred, pred], [label, label], 2) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="no annotated frames"):
        frames_miou([pred], [None], 2)


# -- segmenting a video ----------------------------------------------------------------------------
def test_predict_video_writes_the_overlay_video_and_frame_labels(small_seg, clip, tmp_path):
    seen = []
    result = predict_video(small_seg, clip, tmp_path / "o", frame_labels=True, on_frame=lambda i, lab: seen.append(i))
    assert result.error is None and result.frames == 10 and seen == list(range(10))
    assert result.video == tmp_path / "o" / "street_overlay.mp4"
    with VideoReader(result.video) as video:
        assert (video.width, video.height, video.fps, video.frames) == (64, 48, Fraction(15), 10)
        assert len(list(video)) == 10
    names = sorted(p.name for p in (tmp_path / "o").iterdir())
    assert names == [f"street_{i:06d}_label.png" for i in range(10)] + ["street_overlay.mp4"]
    frames = decoded(clip)
    labels = [np.asarray(Image.open(tmp_path / "o" / f"street_{i:06d}_label.png")) for i in range(10)]
    for frame, label in zip(frames, labels):
        np.testing.assert_array_equal(label, small_seg(frame))  # smoothing off: the Segmenter's labels
    assert result.flicker == pytest.approx(flicker(labels))


def test_smoothing_is_the_moving_average_of_the_probabilities():
    seg = Segmenter(Conv1x1(num_classes=3, seed=1), device="cpu", protocol=TestProtocol(scale=None, divisor=None))
    frames = synthetic_frames(n=4, h=12, w=16)
    smoothed = SmoothedSegmenter(seg, 0.6)
    mean = None
    for frame in frames:
        with torch.inference_mode():
            p = seg.model(preprocess(frame, seg.protocol)).softmax(1)
        mean = p if mean is None else 0.6 * mean + 0.4 * p
        np.testing.assert_array_equal(smoothed(frame), mean.argmax(1)[0].numpy())
    smoothed.reset()
    np.testing.assert_array_equal(smoothed(frames[-1]), seg(frames[-1]))  # a fresh start: the frame alone
    with pytest.raises(ValueError, match=r"--smooth must be in \[0, 1\), got 1"):
        SmoothedSegmenter(seg, 1.0)


def test_smoothing_reduces_flicker_on_a_noisy_clip(small_seg, clip, tmp_path):
    plain = predict_video(small_seg, clip, tmp_path, stem="plain")
    smooth = predict_video(small_seg, clip, tmp_path, stem="smooth", smooth=0.7)
    assert plain.frames == smooth.frames == 10
    assert smooth.flicker < plain.flicker


def test_an_odd_sized_video_gives_an_overlay_one_pixel_larger(small_seg, tmp_path):
    frames = synthetic_frames(n=3, h=35, w=49)
    with av.open(str(tmp_path / "odd.mkv"), "w") as out:  # lossless FFV1 keeps odd sides, unlike H.264 4:2:0
        stream = out.add_stream("ffv1", rate=5)
        stream.width, stream.height, stream.pix_fmt = 49, 35, "bgr0"
        for f in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    assert [f.tolist() for f in decoded(tmp_path / "odd.mkv")] == [f.tolist() for f in frames]
    result = predict_video(small_seg, tmp_path / "odd.mkv", tmp_path / "o", frame_labels=True)
    assert result.error is None and result.frames == 3 and result.size == (49, 35)
    back = decoded(result.video)
    assert len(back) == 3 and back[0].shape == (36, 50, 3)
    label = np.asarray(Image.open(tmp_path / "o" / "odd_000000_label.png"))
    assert label.shape == (35, 49)  # the labels keep the frame's size
    np.testing.assert_array_equal(label, small_seg(frames[0]))


# -- bad input -------------------------------------------------------------------------------------
@pytest.mark.parametrize("container", ["mp4", "avi", "matroska"])
def test_a_truncated_video_keeps_the_frames_before_the_fault(small_seg, tmp_path, container):
    frames = synthetic_frames(n=24, h=48, w=64)
    if container == "mp4":
        whole = write_video_file(frames, tmp_path / "clip.mp4", 12)
    else:
        whole = encode(frames, tmp_path / f"clip.{'mkv' if container == 'matroska' else 'avi'}", 12, container)
    cut = cut_in_half(whole)
    result = predict_video(small_seg, cut, tmp_path / "o")
    assert 0 < result.frames < 24
    assert result.error.startswith(f"{cut}: ") and f"frame {result.frames - 1}" in result.error
    assert "truncated" in result.error and "\n" not in result.error
    assert f"{result.frames} frame(s) written to" in result.error
    back = decoded(result.video)  # the overlay video is complete and holds the frames before the fault
    assert len(back) == result.frames and back[0].shape == (48, 64, 3)


def test_a_decoding_error_keeps_the_frames_before_it(small_seg, clip, tmp_path, monkeypatch):
    opened = VideoReader.__init__

    def breaks_after_four(self, path):  # the decoder fails on the fifth frame, as on corrupt data
        opened(self, path)  # has read the first frame
        good = self._decoded

        def decode():
            for _ in range(3):
                yield next(good)
            raise av.InvalidDataError(-1094995529, "Invalid data found when processing input")
        self._decoded = decode()

    monkeypatch.setattr(VideoReader, "__init__", breaks_after_four)
    result = predict_video(small_seg, clip, tmp_path / "o", frame_labels=True)
    assert result.frames == 4
    assert result.error == (f"{clip}: cannot decode frame 4 (Invalid data found when processing input); "
                            f"4 frame(s) written to {tmp_path / 'o' / 'street_overlay.mp4'}")
    monkeypatch.undo()
    assert len(decoded(result.video)) == 4
    assert sorted(p.name for p in (tmp_path / "o").glob("*.png")) == [f"street_{i:06d}_label.png" for i in range(4)]


def test_a_file_that_is_no_video_is_one_line_error(small_seg, tmp_path):
    fake = tmp_path / "notes.mp4"
    fake.write_text("not a video at all")
    with pytest.raises(ValueError, match=r"^cannot read video .*notes\.mp4: not a video") as info:
        predict_video(small_seg, fake, tmp_path / "o")
    assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match="no such file"):
        predict_video(small_seg, tmp_path / "missing.mkv", tmp_path / "o")
    assert not (tmp_path / "o").exists()
    errors = []
    result = predict_videos(small_seg, [fake, tmp_path / "missing.mkv"], tmp_path / "o",
                            on_error=lambda p, m: errors.append(m))
    assert result.written == [] and [p for p, _ in result.failed] == [fake, tmp_path / "missing.mkv"]
    assert len(errors) == 2 and all(str(p) in m for p, m in zip((fake, tmp_path / "missing.mkv"), errors))


def test_without_pyav_a_video_is_a_one_line_error(small_seg, clip, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "av", None)
    with pytest.raises(VideoExtrasMissing, match=r'pip install "edaformer\[video\]"'):
        predict_videos(small_seg, [clip], tmp_path)
    assert cli.main(["predict", str(clip), "--model", ADE, "--checkpoint", str(tmp_path / "never-read.pth"),
                     "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.strip() == 'edaformer predict: error: video files need PyAV: pip install "edaformer[video]"'


def test_is_video():
    assert is_video("a/street.MP4") and is_video("x.webm") and not is_video("x.png")


# -- the command line ------------------------------------------------------------------------------
@pytest.fixture
def small_ade_spec(monkeypatch):
    """Make the ADE20K model's test scale small so that the command runs fast."""
    monkeypatch.setitem(MODEL_SPECS, ADE, dataclasses.replace(MODEL_SPECS[ADE], test_scale=(64, 48)))


def test_predict_command_on_images_and_videos(ade_model, ade_checkpoint, small_ade_spec, clip, tmp_path, capsys):
    folder = tmp_path / "in"
    folder.mkdir()
    Image.fromarray(rgb(30, 40)).save(folder / "photo.png")
    write_video_file(synthetic_frames(n=4, seed=1), folder / "drive.mp4", 10)
    cut = cut_in_half(write_video_file(synthetic_frames(n=24), tmp_path / "long.mp4", 12))
    (tmp_path / "fake.mov").write_text("no video")
    out = tmp_path / "out"
    rc = cli.main(["predict", str(folder), str(clip), str(cut), str(tmp_path / "fake.mov"), "--model", ADE,
                   "--checkpoint", str(ade_checkpoint), "--out", str(out), "--smooth", "0.5", "--frame-labels",
                   "--isr", "2211-222"])
    captured = capsys.readouterr()
    assert rc == 1
    messages = [line for line in captured.err.replace("\r", "\n").splitlines() if line.startswith("edaformer predict:")]
    assert len(messages) == 2
    assert any(f"{cut}: the file ends after frame" in m for m in messages)
    assert any(f"cannot read video {tmp_path / 'fake.mov'}" in m for m in messages)
    assert "frame/s" in captured.err  # the progress bar of the videos
    assert captured.out.startswith("wrote 3 prediction(s)") and "2 failed" in captured.out
    names = {p.name for p in out.iterdir()}
    assert {"photo_label.png", "photo_overlay.png", "drive_overlay.mp4", "street_overlay.mp4",
            "cut_long_overlay.mp4"} <= names
    assert {f"drive_{i:06d}_label.png" for i in range(4)} <= names
    assert {f"street_{i:06d}_label.png" for i in range(10)} <= names
    with VideoReader(out / "street_overlay.mp4") as video:
        assert (video.frames, video.width, video.height, video.fps) == (10, 64, 48, 15)
    with edaformer.isr(ade_model, "2211-222"):  # the ISR setting applies to videos as to images
        seg = SmoothedSegmenter(Segmenter(ade_model, device="cpu", test_scale=(64, 48)), 0.5)
        for i, frame in enumerate(decoded(clip)):
            np.testing.assert_array_equal(np.asarray(Image.open(out / f"street_{i:06d}_label.png")), seg(frame))


def test_bad_smooth_is_refused_before_any_work(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["predict", str(tmp_path / "a.mp4"), "--smooth", "1", "--out", str(tmp_path / "o")])
    assert exit_info.value.code == 2
    assert "must be in [0, 1), got 1" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


# -- a real drive: consecutive CamVid frames with the shipped model ------------------------------------
@pytest.fixture(scope="module")
def camvid_clip(tmp_path_factory):
    """Ten consecutive frames of the 0016E5 drive (CamVid val, 15 frames/s), at 160x120, and their
    annotations."""
    stems = sorted(p.stem for p in (CAMVID / "images" / "val").glob("0016E5_*.jpg"))[:10] if CAMVID.is_dir() else []
    if len(stems) < 10:
        pytest.skip("the CamVid dataset (0016E5 val frames) is not in ../shared/datasets/camvid")
    if SHIPPED not in pretrained.list_pretrained():
        pytest.skip(f"{SHIPPED} is not shipped in this checkout")
    frames = [np.asarray(Image.open(CAMVID / "images" / "val" / f"{s}.jpg").convert("RGB").resize((160, 120),
                                                                                                 Image.BILINEAR))
              for s in stems]
    labels = [np.asarray(Image.open(CAMVID / "annotations" / "val" / f"{s}.png").resize((160, 120), Image.NEAREST))
              for s in stems]
    path = tmp_path_factory.mktemp("camvid") / "0016E5.mp4"
    return write_video_file(frames, path, 15), labels


def test_smoothing_on_a_camvid_drive(camvid_clip, tmp_path, one_thread):
    path, annotations = camvid_clip
    seg = Segmenter.pretrained(device="cpu", test_scale=(160, 120))
    figures = {}
    for smooth in (0.0, 0.5):
        labels = []
        result = predict_video(seg, path, tmp_path, stem=f"s{smooth}", smooth=smooth,
                               on_frame=lambda i, lab: labels.append(lab))
        assert result.error is None and result.frames == 10
        figures[smooth] = result.flicker, frames_miou(labels, annotations, CAMVID_CLASSES,
                                                      ignore_index=CAMVID_CLASSES)
    (flicker_off, miou_off), (flicker_on, miou_on) = figures[0.0], figures[0.5]
    assert 0 < flicker_on < flicker_off < 0.2
    assert 0.2 < miou_off <= 1 and abs(miou_on - miou_off) < 0.05  # steadier, about as accurate
