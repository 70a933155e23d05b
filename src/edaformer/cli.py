"""The ``edaformer`` command line. Each sub-command lives in its own ``_cmd_<name>`` pair:
``_add_<name>(subparsers)`` declares its arguments and ``_run_<name>(args)`` runs it."""
from __future__ import annotations

import argparse
import json
import logging
import sys

from . import __version__

log = logging.getLogger("edaformer")


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


COMMANDS = ["list", "export-reference"]


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
