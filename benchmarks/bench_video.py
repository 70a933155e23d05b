"""Video prediction with temporal smoothing: frames/s, flicker and mIoU per smoothing weight.

Builds a clip (H.264 MP4) from consecutive frames, by default the 101 frames of the CamVid drive
``0016E5`` in ``images/val`` (every other frame of the 30 frames/s camera, so 15 frames/s), and runs
``edaformer.inference.video.predict_video`` with the shipped model (``edaformer-t-camvid``, or
``--checkpoint``) once per smoothing weight (the weight of the past in the moving average of the
class probabilities; 0 = off). Per weight: frames/s of the whole path (decode, segment, overlay,
encode), the flicker figure (share of pixels whose label changes between consecutive frames,
mean over frame pairs) and the mIoU over the frames that have an annotation (``annotations/val``
with the frame's stem; CamVid id 11 = void is ignored). The frames are segmented as the video
decoder gives them back (after H.264 compression).

    python benchmarks/bench_video.py                                # the 0016E5 drive, 960x720
    python benchmarks/bench_video.py --limit 8 --size 160 120 --scale 160 120 --smooth 0 0.5
    python benchmarks/bench_video.py --frames DIR --pattern "*.png" --labels DIR2 --ignore-index 255
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from edaformer import bench as bm  # noqa: E402
from edaformer.inference import Segmenter  # noqa: E402
from edaformer.inference.video import frames_miou, predict_video  # noqa: E402
from edaformer.inference.video_io import write_video  # noqa: E402
from edaformer.pretrained import DEFAULT_NAME  # noqa: E402

import harness  # noqa: E402

CAMVID = HERE.parent.parent / "shared" / "datasets" / "camvid"
COLUMNS = [("smooth", "smoothing", ".1f"), ("frames", "frames", "d"), ("fps", "frames/s", ".2f"),
           ("flicker_pct", "flicker %", ".2f"), ("miou_pct", "mIoU %", ".2f"), ("labelled", "labelled frames", "d")]


def load_frames(args) -> tuple[list[np.ndarray], list[np.ndarray | None], list[str]]:
    """The clip's frames (RGB, resized to ``--size`` when given) and their annotations (None where
    there is none), in name order."""
    paths = sorted(Path(args.frames).glob(args.pattern))[: args.limit or None]
    if not paths:
        raise SystemExit(f"no frames {args.pattern} in {args.frames}")
    frames, labels = [], []
    for p in paths:
        img = Image.open(p).convert("RGB")
        if args.size:
            img = img.resize(tuple(args.size), Image.BILINEAR)
        frames.append(np.asarray(img))
        ann = Path(args.labels) / f"{p.stem}.png" if args.labels else None
        if ann is not None and ann.is_file():
            lab = Image.open(ann)
            labels.append(np.asarray(lab.resize(img.size, Image.NEAREST) if lab.size != img.size else lab))
        else:
            labels.append(None)
    return frames, labels, [p.stem for p in paths]


def run(args) -> dict:
    torch.set_num_threads(args.threads)
    frames, annotations, stems = load_frames(args)
    kwargs = dict(device=args.device, test_scale=tuple(args.scale) if args.scale else None)
    seg = (Segmenter.pretrained(**kwargs) if args.checkpoint is None
           else Segmenter.from_checkpoint(None, args.checkpoint, **kwargs))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        clip = Path(tmp) / "clip.mp4"
        write_video(frames, clip, args.fps)
        labelled = sum(a is not None for a in annotations)
        seg(frames[0])  # one untimed frame: the kernels' one-time set-up is not in the first row
        for smooth in args.smooth:
            labels: list[np.ndarray] = []
            t0 = time.perf_counter()
            result = predict_video(seg, clip, Path(tmp) / "out", stem=f"smooth{smooth}", smooth=smooth,
                                   on_frame=lambda i, lab: labels.append(lab))
            seconds = time.perf_counter() - t0
            if result.error:
                raise SystemExit(result.error)
            miou = (frames_miou(labels, annotations, seg.num_classes, ignore_index=args.ignore_index)
                    if labelled else None)
            rows.append(dict(smooth=smooth, frames=result.frames, fps=result.frames / seconds,
                             flicker_pct=100 * result.flicker, miou_pct=None if miou is None else 100 * miou,
                             labelled=labelled))
    return dict(environment=bm.environment(), command=" ".join(sys.argv), model=repr(seg),
                clip=dict(first=stems[0], last=stems[-1], frames=len(frames), size=list(frames[0].shape[1::-1]),
                          fps=args.fps), rows=rows)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--frames", default=str(CAMVID / "images" / "val"), help="folder of consecutive frames")
    p.add_argument("--pattern", default="0016E5_*.jpg", help="frame file pattern (default 0016E5_*.jpg)")
    p.add_argument("--labels", default=str(CAMVID / "annotations" / "val"),
                   help="folder of annotations named by frame stem (PNG, pixel = class id); '' for none")
    p.add_argument("--ignore-index", type=int, default=11, help="annotation id left out of the mIoU (CamVid: 11)")
    p.add_argument("--limit", type=int, default=0, help="use the first N frames only (default: all)")
    p.add_argument("--size", type=int, nargs=2, default=None, metavar=("W", "H"), help="resize the frames first")
    p.add_argument("--fps", type=float, default=15.0, help="frame rate of the clip (default 15)")
    p.add_argument("--smooth", type=float, nargs="+", default=[0.0, 0.3, 0.5, 0.7], help="weights to compare")
    p.add_argument("--checkpoint", default=None, help=f"model weights (default: the shipped {DEFAULT_NAME})")
    p.add_argument("--scale", type=int, nargs=2, default=None, metavar=("LONG", "SHORT"),
                   help="test resize box (default: the model's)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    p.add_argument("--json", default=None, metavar="PATH", help="also write JSON ('-': stdout only)")
    args = p.parse_args(argv)
    result = run(args)
    env, clip = result["environment"], result["clip"]
    text = "\n".join([
        f"`{result['command']}`", "",
        f"{env['date']}; torch {env['torch']}; {env.get('cuda_device') or env['cpu']} ({env['cpu_count']} cores, "
        f"{env['torch_threads']} torch thread(s)); {result['model']}; clip {clip['first']}..{clip['last']}, "
        f"{clip['frames']} frames, {clip['size'][0]}x{clip['size'][1]} at {clip['fps']:g} frames/s (H.264)", "",
        bm.format_table(result["rows"], COLUMNS)])
    harness.emit_report(result, text, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
