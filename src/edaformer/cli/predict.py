"""``edaformer predict``: segment images and videos (one process, or a share of them per torchrun process)."""
from __future__ import annotations

import argparse
import logging
import os
import sys

from tqdm import tqdm

from ..engine.distributed import (DistInfo, all_gather_object, barrier, cleanup_distributed, init_distributed,
                                  is_distributed)
from ..inference import Segmenter
from ..inference.predict import IMAGE_SUFFIXES, check_alpha, collect_inputs, predict_files, rank_share
from ..inference.video import VIDEO_SUFFIXES, check_smooth, is_video, predict_videos
from ..inference.video_io import require_video
from ..models import ISR_POOLS
from ..pretrained import DEFAULT_NAME, list_pretrained
from .common import add_protocol_options, command

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
    p.epilog = ("Under torchrun (torchrun --nproc-per-node N -m edaformer predict ...) each process segments "
                "every N-th image or video; the outputs are those of one process.")
    p.add_argument("images", nargs="+", help="image or video files, or folders (folders: the images and videos "
                   f"inside, not recursive; videos: {' '.join(VIDEO_SUFFIXES)})")
    p.add_argument("--model", default=None,
                   help="model name, see `edaformer list` (default: the one the checkpoint stores); without "
                        "--checkpoint, a model shipped with weights")
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


def _predict_checkpoint(model: str | None, checkpoint: str | None) -> tuple[str | None, str]:
    """``(--model, --checkpoint)`` to build from: without ``--checkpoint``, the shipped weights of
    ``--model`` (an error for a model shipped without weights), else the shipped default model."""
    if checkpoint is not None:
        return model, checkpoint
    shipped = list_pretrained()
    if model is not None:
        if model in shipped:
            return None, model
        raise ValueError(f"no weights ship for model {model}"
                         + (f" (shipped: {', '.join(shipped)})" if shipped else "")
                         + "; pass --checkpoint FILE with weights trained for it")
    if not shipped:
        raise ValueError("no model is shipped with this install; pass --checkpoint")
    if DEFAULT_NAME not in shipped:
        raise ValueError(f"the default model {DEFAULT_NAME} is not shipped with this install; pass --checkpoint "
                         f"(a checkpoint file, or a shipped model: {', '.join(shipped)})")
    return None, DEFAULT_NAME


def run(args) -> int:
    owns_group = not is_distributed()
    info = init_distributed(args.device)  # under torchrun: this process's share of the images
    try:
        return _run(args, info)
    finally:
        if owns_group:
            cleanup_distributed()


def _run(args, info: DistInfo) -> int:
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise ValueError(f"--out {args.out} is a file; give a folder (it is created if missing)")
    inputs = collect_inputs(args.images, IMAGE_SUFFIXES + VIDEO_SUFFIXES)
    for path, why in inputs.skipped if info.is_main else ():
        print(f"edaformer predict: skipped {path}: {why}", file=sys.stderr)
    if not inputs.files:
        raise ValueError(f"no images or videos ({', '.join(IMAGE_SUFFIXES + VIDEO_SUFFIXES)}) found in "
                         f"{', '.join(args.images)}")
    videos = [f for f in inputs.files if is_video(f)][info.rank::info.world_size]
    images, stems = rank_share([f for f in inputs.files if not is_video(f)], info.rank, info.world_size)
    if videos:
        require_video()
    model, checkpoint = _predict_checkpoint(args.model, args.checkpoint)
    segmenter = Segmenter.from_checkpoint(checkpoint, model=model, device=info.device, isr=args.isr,
                                          num_classes=args.num_classes, test_scale=args.scale, mode=args.mode,
                                          pool=args.pool)
    if info.is_main:
        log.info("%r", segmenter)
    report = lambda path, msg: tqdm.write(f"edaformer predict: {msg}", file=sys.stderr)  # noqa: E731
    result = predict_files(segmenter, images, args.out, alpha=args.alpha, legend=args.legend,
                           save_probs=args.save_probs, stems=stems, on_error=report,
                           progress=lambda it: tqdm(it, desc="predict", unit="img", file=sys.stderr,
                                                    disable=not info.is_main or not it))
    if videos:  # each with its own progress bar in frames/s
        done = predict_videos(segmenter, videos, args.out, alpha=args.alpha, smooth=args.smooth,
                              frame_labels=args.frame_labels, progress=info.is_main, on_error=report)
        result.written += done.written
        result.failed += done.failed
    shares = all_gather_object((len(result.written), [str(p) for p, _ in result.failed]))
    failed = [p for _, paths in shares for p in paths]
    if info.is_main:
        print(f"wrote {sum(n for n, _ in shares)} prediction(s) to {args.out}"
              + (f"; {len(failed)} failed: {', '.join(failed)}" if failed else "")
              + (f"; {len(inputs.skipped)} input(s) skipped" if inputs.skipped else ""), flush=True)
    barrier()  # torchrun stops every process once one exits non-zero: not before the summary is out
    return 1 if result.failed else 0
