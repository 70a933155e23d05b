"""``edaformer convert``: write the label files a dataset reads."""
from __future__ import annotations

from .common import command
from ..data import convert_cityscapes, convert_cocostuff


def add_parser(sub) -> None:
    p = command(sub, "convert", run, help="write the *_labelTrainIds.png label files a dataset reads")
    p.add_argument("dataset", choices=["cityscapes", "cocostuff"], help="which dataset's labels to convert")
    p.add_argument("root", help="dataset root (holding gtFine/ for cityscapes, annotations/ for cocostuff)")
    p.add_argument("--workers", type=int, default=4, help="threads (default 4)")
    p.add_argument("--skip-existing", action="store_true", help="keep label files that already exist")


def run(args) -> int:
    convert = {"cityscapes": convert_cityscapes, "cocostuff": convert_cocostuff}[args.dataset]
    result = convert(args.root, overwrite=not args.skip_existing, workers=args.workers, progress=True)
    print(f"{args.dataset}: wrote {result.written} *_labelTrainIds.png files under {result.folder}"
          f" ({result.skipped} existing skipped)")
    return 0
