"""The ``edaformer`` parser and entry point."""
from __future__ import annotations

import argparse
import logging
import os
import re
import sys

from .. import __version__
from ..export import OnnxExtrasMissing
from ..utils import resolve_device
from . import (bench, configs, convert, evaluate, export, export_reference, flops, isr_tune, list_models,
               package_weights, predict, pretrain, train)
from .common import VERBOSE

log = logging.getLogger("edaformer")


# one module per sub-command, each with ``add_parser(subparsers)`` and ``run(args)``, in help order
COMMANDS = (list_models, configs, predict, train, pretrain, evaluate, isr_tune, flops, bench, export, export_reference,
            package_weights, convert)

_DESCRIPTION = ("EDAFormer semantic segmentation: train, evaluate, segment images, count FLOPs, benchmark and "
                "export, with Inference Spatial Reduction (ISR) chosen at run time.")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edaformer", description=_DESCRIPTION, parents=[VERBOSE])
    parser.add_argument("--version", action="version", version=f"edaformer {__version__}",
                        help="print the version and exit")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                help="`edaformer COMMAND --help` for its options")
    for module in COMMANDS:
        module.add_parser(sub)
    return parser


class _OthersQuiet(logging.Filter):
    """Pass this package's records, and other libraries' from ``level`` up."""

    def __init__(self, level: int):
        super().__init__()
        self.level = level

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= self.level or record.name == "edaformer" or record.name.startswith("edaformer.")


def _configure_logging(verbose: bool) -> None:
    """INFO from this package (DEBUG with -v); other libraries only warn (INFO with -v)."""
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S"))
    handler.addFilter(_OthersQuiet(logging.INFO if verbose else logging.WARNING))
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, handlers=[handler])


_WORKER_TRACEBACK = "Original Traceback (most recent call last):"


def error_message(error: BaseException) -> str:
    """An exception's own message; for one re-raised from a DataLoader worker, without the worker
    traceback that torch puts into the message."""
    text = str(error)
    if _WORKER_TRACEBACK in text:
        tail = text[text.rindex(_WORKER_TRACEBACK):]
        name = re.escape(type(error).__name__)
        lines = list(re.finditer(rf"(?m)^(?:[\w.]+\.)?{name}: ", tail)) or list(re.finditer(r"(?m)^[A-Za-z_][\w.]*: ", tail))
        if lines:
            text = tail[lines[-1].end():]
    return text.strip()


# Errors of the user's input: printed as one message, exit status 2.
_USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, OSError)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    verbose = bool(getattr(args, "verbose", False))
    _configure_logging(verbose)
    prog = f"edaformer {args.command}"
    try:
        if getattr(args, "device", None) is not None:
            resolve_device(args.device)  # every --device fails the same way, before any work
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)  # on a fresh line after ^C or a progress bar
        return 130
    except BrokenPipeError:  # the reader went away (`edaformer configs | head`): stop quietly, as cat does
        try:  # no second error when the interpreter flushes stdout at exit
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError):  # stdout has no file descriptor (captured)
            pass
        return 141
    except (*_USER_ERRORS, OnnxExtrasMissing) as e:
        log.debug("traceback", exc_info=True)
        print(f"{prog}: error: {error_message(e)}", file=sys.stderr)
        return 2
    except Exception as e:
        if verbose:
            raise
        print(f"{prog}: error: {type(e).__name__}: {error_message(e)} (rerun with -v for the traceback)",
              file=sys.stderr)
        return 1

