"""``edaformer list``: the named models."""
from __future__ import annotations

from .common import command
from ..models import MODEL_SPECS


def add_parser(sub) -> None:
    command(sub, "list", run, help="list the named models")


def run(args) -> int:
    for name, spec in sorted(MODEL_SPECS.items()):
        print(f"{name:24s} classes={spec.num_classes:<4d} test={spec.test_mode}")
    return 0
