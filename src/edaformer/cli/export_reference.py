"""``edaformer export-reference``: a checkpoint in the reference (mmseg) format."""
from __future__ import annotations

from ..checkpoint import build_from_checkpoint, export_reference
from .common import command


def add_parser(sub) -> None:
    p = command(sub, "export-reference", run, help="write a checkpoint in the reference (mmseg) format")
    p.add_argument("checkpoint", help="checkpoint to convert (any supported format)")
    p.add_argument("--model", required=True, help="model name, see `edaformer list`")
    p.add_argument("--num-classes", type=int, default=None, help="default: the checkpoint's")
    p.add_argument("--out", required=True, help="output .pth path")



def run(args) -> int:
    model, report = build_from_checkpoint(args.checkpoint, args.model, args.num_classes)
    path = export_reference(model, args.out, meta=report["meta"])
    print(f"wrote {path} (from {report['format']} format)")
    return 0
