"""What the commands share: the ``-v`` option, the sub-parser helper, the test-protocol options."""
from __future__ import annotations

import argparse

from ..models import TEST_MODES


VERBOSE = argparse.ArgumentParser(add_help=False)
VERBOSE.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="debug logging")


def command(sub, name: str, run, **kwargs) -> argparse.ArgumentParser:
    """A sub-command parser bound to ``run``; ``-v`` works after the sub-command too."""
    p = sub.add_parser(name, parents=[VERBOSE], **kwargs)
    p.set_defaults(func=run)
    return p


def add_protocol_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--scale", type=int, nargs=2, default=None, metavar=("LONG", "SHORT"),
                   help="resize box of the test protocol (default: the checkpoint's, else the model's / config's)")
    p.add_argument("--mode", choices=TEST_MODES, default=None,
                   help="whole image or sliding window (default: the checkpoint's, else the model's / config's)")
