"""``edaformer list``: the named models and the models shipped with weights."""
from __future__ import annotations

from ..models import MODEL_SPECS
from ..pretrained import list_pretrained, read_info, weights_path
from .common import command


def add_parser(sub) -> None:
    command(sub, "list", run, help="list the named models and those shipped with weights")


def _shipped_row(name: str) -> str:
    try:
        info = read_info(weights_path(name))
    except (ValueError, OSError) as e:
        return f"{name:24s} weights=shipped (unreadable: {e})"
    return (f"{name:24s} classes={info.num_classes:<4d} test={info.protocol.mode:5s} weights=shipped "
            f"(architecture {info.model}, isr {info.isr} {info.isr_pool})")


def run(args) -> int:
    rows = {name: f"{name:24s} classes={spec.num_classes:<4d} test={spec.test_mode:5s} weights=none "
                  "(pass --checkpoint)" for name, spec in MODEL_SPECS.items()}
    rows.update({name: _shipped_row(name) for name in list_pretrained()})
    for name in sorted(rows):
        print(rows[name])
    return 0
