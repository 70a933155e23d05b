"""``edaformer convert``: write the label files a dataset reads."""
from __future__ import annotations

import sys

from ..config import load_config, parse_value
from ..data import convert_cityscapes, convert_cocostuff, convert_color_labels, effective_data_config
from ..data.color_labels import IDS_SUFFIX
from ..data.datasets import IGNORE_INDEX
from ..data.palettes import DATASET_INFO, get_dataset_info
from .common import command


def add_parser(sub) -> None:
    p = command(sub, "convert", run, help="write the label files a dataset reads (class ids from colours, "
                                          "Cityscapes / COCO-Stuff train ids)",
                description="cityscapes / cocostuff: write the *_labelTrainIds.png files of a dataset root. "
                            "colors: map RGB colour labels to class-id PNGs with a palette (--palette or "
                            "--config); a colour not in it becomes the ignore value, counted.")
    p.add_argument("dataset", choices=["cityscapes", "cocostuff", "colors"], help="which labels to convert")
    p.add_argument("root", nargs="?", default=None,
                   help="dataset root (gtFine/ for cityscapes, annotations/ for cocostuff); for colors the "
                        "folder of colour label PNGs (searched recursively)")
    p.add_argument("--root", dest="root_option", default=None, metavar="DIR", help="the same as ROOT")
    p.add_argument("--workers", type=int, default=4, help="threads (default 4)")
    p.add_argument("--skip-existing", action="store_true", help="keep label files that already exist")
    colors = p.add_argument_group("colors")
    colors.add_argument("--palette", default=None,
                        help="the label colours, index = class id: a list such as '[[0, 0, 0], [255, 0, 0]]' "
                             f"or a dataset's ({', '.join(DATASET_INFO)})")
    colors.add_argument("--config", default=None,
                        help="take data.palette (and data.ignore_index) from this training config")
    colors.add_argument("--ignore-index", type=int, default=None,
                        help="the value of a colour not in the palette (default: the config's data.ignore_index, "
                             "else 255)")
    colors.add_argument("--out", default=None,
                        help=f"write into this folder (same relative paths and names); default: beside each "
                             f"label as <name>{IDS_SUFFIX}")
    colors.add_argument("--suffix", default=".png", help="file ending of the colour labels (default .png)")


def _palette(args) -> tuple[list, int]:
    """The palette and ignore value of ``convert colors``: --palette, else the config's data.palette."""
    if (args.palette is None) == (args.config is None):
        raise ValueError("convert colors needs the label colours: --palette or --config (one of them)")
    ignore = IGNORE_INDEX
    if args.config is not None:
        data = load_config(args.config)["data"]
        ignore = data["ignore_index"]
        if data.get("palette") is None and data.get("type") == "folder":
            raise ValueError(f"{args.config} sets no data.palette: give the colours of your labels there "
                             "(index = class id) or as --palette")
        palette = effective_data_config(data)["palette"]
    elif args.palette.strip().lower() in DATASET_INFO:
        palette = [list(c) for c in get_dataset_info(args.palette.strip().lower()).palette]
    else:
        palette = parse_value(args.palette)
        if not isinstance(palette, list):
            raise ValueError(f"--palette must be a list of [r, g, b] colours or one of {', '.join(DATASET_INFO)}, "
                             f"got {args.palette!r}")
    return palette, ignore if args.ignore_index is None else args.ignore_index


def run(args) -> int:
    root = args.root_option or args.root
    if root is None:
        raise ValueError("give the folder to convert (ROOT or --root)")
    if args.dataset == "colors":
        palette, ignore = _palette(args)
        result = convert_color_labels(root, palette, ignore_index=ignore, out=args.out, suffix=args.suffix,
                                      overwrite=not args.skip_existing, workers=args.workers, progress=True)
        print(f"colors: {result.summary(ignore)}")
        for problem in result.failed:
            print(f"edaformer convert: error: {problem}", file=sys.stderr)
        return 1 if result.failed else 0
    convert = {"cityscapes": convert_cityscapes, "cocostuff": convert_cocostuff}[args.dataset]
    result = convert(root, overwrite=not args.skip_existing, workers=args.workers, progress=True)
    print(f"{args.dataset}: wrote {result.written} *_labelTrainIds.png files under {result.folder}"
          f" ({result.skipped} existing skipped)")
    return 0
