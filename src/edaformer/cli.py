"""The ``edaformer`` command line. Each sub-command lives in its own ``_cmd_<name>`` pair:
``_add_<name>(subparsers)`` declares its arguments and ``_run_<name>(args)`` runs it."""
from __future__ import annotations

import argparse
import json
import logging
import sys

from . import __version__

log = logging.getLogger("edaformer")


# -- convert ---------------------------------------------------------------------------
def _add_convert(sub) -> None:
    p = sub.add_parser("convert", help="write the *_labelTrainIds.png label files a dataset reads")
    p.add_argument("dataset", choices=["cityscapes", "cocostuff"])
    p.add_argument("root", help="dataset root (holding gtFine/ for cityscapes, annotations/ for cocostuff)")
    p.add_argument("--workers", type=int, default=4, help="threads (default 4)")
    p.add_argument("--skip-existing", action="store_true", help="keep label files that already exist")


def _run_convert(args) -> int:
    from .data import convert_cityscapes, convert_cocostuff

    convert = {"cityscapes": convert_cityscapes, "cocostuff": convert_cocostuff}[args.dataset]
    result = convert(args.root, overwrite=not args.skip_existing, workers=args.workers, progress=True)
    print(f"{args.dataset}: wrote {result.written} *_labelTrainIds.png files under {result.folder}"
          f" ({result.skipped} existing skipped)")
    return 0


# -- export-reference ------------------------------------------------------------------
def _add_export_reference(sub) -> None:
    p = sub.add_parser("export-reference", help="write a checkpoint in the reference (mmseg) format")
    p.add_argument("checkpoint", help="checkpoint to convert (any supported format)")
    p.add_argument("--model", required=True, help="model name, see `edaformer list`")
    p.add_argument("--num-classes", type=int, default=None)
    p.add_argument("--out", required=True, help="output .pth path")


def _run_export_reference(args) -> int:
    from .checkpoint import export_reference, load_checkpoint
    from .models import create_model

    model = create_model(args.model, num_classes=args.num_classes)
    report = load_checkpoint(model, args.checkpoint)
    path = export_reference(model, args.out, meta=report["meta"])
    print(f"wrote {path} (from {report['format']} format)")
    return 0


# -- list ------------------------------------------------------------------------------
def _add_list(sub) -> None:
    sub.add_parser("list", help="list the named models")


def _run_list(args) -> int:
    from .models import MODEL_SPECS

    for name, spec in sorted(MODEL_SPECS.items()):
        print(f"{name:24s} classes={spec.num_classes:<4d} test={spec.test_mode}")
    return 0


# -- predict ---------------------------------------------------------------------------
_PREDICT_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")


def _add_predict(sub) -> None:
    p = sub.add_parser("predict", help="segment images: writes <stem>_label.png and <stem>_overlay.png")
    p.add_argument("images", nargs="+", help="image files or folders (folders: the images inside)")
    p.add_argument("--model", required=True, help="model name, see `edaformer list`")
    p.add_argument("--checkpoint", required=True, help="weights (any supported format)")
    p.add_argument("--isr", default=None, help="ISR factors, e.g. 2211-222 (default: training ratios)")
    p.add_argument("--out", default="predictions", help="output folder (default ./predictions)")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda when available")
    p.add_argument("--num-classes", type=int, default=None, help="default: the checkpoint's")
    p.add_argument("--alpha", type=float, default=0.5, help="overlay opacity (default 0.5)")


def _predict_inputs(paths: list[str]) -> list:
    """Image files of ``paths`` (folders: their images, sorted); missing paths are kept to be reported."""
    from pathlib import Path

    files = []
    for p in map(Path, paths):
        if p.is_dir():
            files.extend(sorted(f for f in p.iterdir() if f.is_file() and f.suffix.lower() in _PREDICT_SUFFIXES))
        else:
            files.append(p)
    return files


def _unique_stem(path, used: set) -> str:
    stem, n = path.stem, 1
    while stem in used:
        stem, n = f"{path.stem}_{n}", n + 1
    used.add(stem)
    return stem


def _run_predict(args) -> int:
    from pathlib import Path

    from tqdm import tqdm

    from .inference import Segmenter, colorize, load_image, overlay

    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise ValueError("--device cuda: CUDA is not available on this machine")
    files = _predict_inputs(args.images)
    if not files:
        raise ValueError(f"no images ({', '.join(_PREDICT_SUFFIXES)}) found in {', '.join(args.images)}")
    segmenter = Segmenter.from_checkpoint(args.model, args.checkpoint, device=args.device, isr=args.isr,
                                          num_classes=args.num_classes)
    log.info("%r", segmenter)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    used: set = set()
    failed = []
    for path in tqdm(files, desc="predict", unit="img", file=sys.stderr):
        stem = _unique_stem(path, used)
        try:
            image = load_image(path)
            label = segmenter(image)
            colorize(label, segmenter.palette).save(out / f"{stem}_label.png")
            overlay(image, label, segmenter.palette, alpha=args.alpha).save(out / f"{stem}_overlay.png")
        except (ValueError, OSError) as e:
            failed.append(path)
            msg = str(e) if str(path) in str(e) else f"{path}: {e}"
            tqdm.write(f"edaformer predict: {msg}", file=sys.stderr)
    print(f"wrote {len(files) - len(failed)} prediction(s) to {out}"
          + (f"; {len(failed)} failed: {', '.join(map(str, failed))}" if failed else ""))
    return 1 if failed else 0


COMMANDS = ["list", "export-reference", "convert", "predict"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edaformer", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"edaformer {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        globals()[f"_add_{name.replace('-', '_')}"](sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    try:
        return int(globals()[f"_run_{args.command.replace('-', '_')}"](args) or 0)
    except (ValueError, FileNotFoundError) as e:
        print(f"edaformer {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
