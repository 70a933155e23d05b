"""The ``edaformer`` command line: one module per sub-command (``add_parser(subparsers)`` declares
its options and binds its ``run(args)``: parse, call the library, print); :mod:`.main` builds the
parser and runs a command."""
from .main import COMMANDS, build_parser, error_message, main

__all__ = ["main", "build_parser", "error_message", "COMMANDS"]
