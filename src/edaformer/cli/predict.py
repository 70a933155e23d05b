"""``edaformer predict``: segment images."""
from __future__ import annotations

import argparse
import logging
import os
import sys

from .common import add_protocol_options, command
from ..inference.predict import check_alpha
from ..pretrained import DEFAULT_NAME, list_pretrained
from tqdm import tqdm
from ..inference import Segmenter
from ..inference.predict import IMAGE_SUFFIXES, collect_inputs, predict_files
from ..inference.video import VIDEO_SUFFIXES, check_smooth, is_video, predict_videos
from ..inference.video_io import require_video
from ..utils import resolve_device
from ..models import ISR_POOLS


log = logging.getLogger("edaformer")

def _alpha(text: str) -> float:
    try:
        return check_alpha(float(text))
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e).replace("--alpha ", "")) from None


def _smooth(text: str) -> float:
    try:
        return check_smooth(float(text))
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e).replace("--smooth ", "")) from None


def add_parser(sub) -> None:
    p = command(sub, "predict", run,
                help="segment images and videos: writes <stem>_label.png and <stem>_overlay.png (and "
                     "<stem>_probs.png); for a video <stem>_overlay.mp4 (and <stem>_<frame>_label.png)")
    p.add_argument("images", nargs="+", help="image or video files, or folders (folders: the images and videos "
                   f"inside, not recursive; videos: {' '.join(VIDEO_SUFFIXES)})")
    p.add_argument("--model", default=None,
                   help="model name, see `edaformer list` (default: the one the checkpoint stores)")
    p.add_argument("--checkpoint", default=None,
                   help="weights (any supported format) or the name of a shipped model (default: the shipped "
                        "edaformer-t-camvid)")
    p.add_argument("--isr", default=None, help="ISR factors, e.g. 2211-222 (default: the setting stored in the "
                   "checkpoint by `edaformer isr-tune --write` or shipped with the model, else the training ratios)")
    p.add_argument("--pool", choices=ISR_POOLS, default=None,
                   help="ISR key/value pooling kind (default: the checkpoint's stored one, else avg)")
    p.add_argument("--out", default="predictions", help="output folder (default ./predictions)")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda when available")
    p.add_argument("--num-classes", type=int, default=None, help="default: the checkpoint's")
    p.add_argument("--alpha", type=_alpha, default=0.5, help="overlay opacity in [0, 1] (default 0.5)")
    p.add_argument("--legend", action="store_true", help="add a legend of the classes present to each overlay")
    p.add_argument("--save-probs", action="store_true",
                   help="also write <stem>_probs.png: the top class probability per pixel as 8-bit gray")
    p.add_argument("--smooth", type=_smooth, default=0.0, metavar="WEIGHT",
                   help="videos: moving average of the class probabilities over frames, WEIGHT of the past in "
                        "[0, 1) (default 0: off, each frame on its own)")
    p.add_argument("--frame-labels", action="store_true",
                   help="videos: also write <stem>_<frame:06d>_label.png for every frame")
    add_protocol_options(p)


def _predict_checkpoint(checkpoint: str | None) -> str:
    """``--checkpoint``, by default the shipped default model (an error when none is shipped)."""
    if checkpoint is not None:
        return checkpoint
    shipped = list_pretrained()
    if not shipped:
        raise ValueError("no model is shipped with this install; pass --checkpoint")
    if DEFAULT_NAME not in shipped:
        raise ValueError(f"the default model {DEFAULT_NAME} is not shipped with this install; pass --checkpoint "
                         f"(a checkpoint file, or a shipped model: {', '.join(shipped)})")
    return DEFAULT_NAME


def run(args) -> int:
    device = resolve_device(args.device)
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise ValueError(f"--out {args.out} is a file; give a folder (it is created if missing)")
    inputs = collect_inputs(args.images, IMAGE_SUFFIXES + VIDEO_SUFFIXES)
    for path, why in inputs.skipped:
        print(f"edaformer predict: skipped {path}: {why}", file=sys.stderr)
    if not inputs.files:
        raise ValueError(f"no images or videos ({', '.join(IMAGE_SUFFIXES + VIDEO_SUFFIXES)}) found in "
                         f"{', '.join(args.images)}")
    videos = [f for f in inputs.files if is_video(f)]
    images = [f for f in inputs.files if not is_video(f)]
    if videos:
        require_video()
    segmenter = Segmenter.from_checkpoint(args.model, _predict_checkpoint(args.checkpoint), device=device,
                                          isr=args.isr, num_classes=args.num_classes, test_scale=args.scale,
                                          mode=args.mode, pool=args.pool)
    log.info("%r", segmenter)
    report = lambda path, msg: tqdm.write(f"edaformer predict: {msg}", file=sys.stderr)  # noqa: E731
    result = predict_files(segmenter, images, args.out, alpha=args.alpha, legend=args.legend,
                           save_probs=args.save_probs, on_error=report,
                           progress=lambda it: tqdm(it, desc="predict", unit="img", file=sys.stderr, disable=not it))
    if videos:  # each with its own progress bar in frames/s
        done = predict_videos(segmenter, videos, args.out, alpha=args.alpha, smooth=args.smooth,
                              frame_labels=args.frame_labels, progress=True, on_error=report)
        result.written += done.written
        result.failed += done.failed
    failed = [str(p) for p, _ in result.failed]
    print(f"wrote {len(result.written)} prediction(s) to {args.out}"
          + (f"; {len(failed)} failed: {', '.join(failed)}" if failed else "")
          + (f"; {len(inputs.skipped)} input(s) skipped" if inputs.skipped else ""))
    return 1 if failed else 0
