"""``edaformer export``: ONNX with an ISR setting baked in."""
from __future__ import annotations

import argparse

from .common import command
from ..checkpoint import build_from_checkpoint
from ..export import DEFAULT_OPSET, export_onnx, require_onnx, verify_onnx
from ..inference import TestProtocol
from ..isr import parse_isr
from ..models import ISR_POOLS


_EXPORT_DESCRIPTION = """\
Export a model with its checkpoint to ONNX, one ISR setting baked in. Input "image": float32
(N, 3, H, W), RGB, (pixel - mean) / std on 0-255 pixel values with mean (123.675, 116.28, 103.53)
and std (58.395, 57.12, 57.375). Output "logits": (N, classes, H, W) at the input size.
Test-time resize, as `edaformer predict` does it: fit the image into the dataset's (long, short)
box keeping its aspect ratio (ADE20K / COCO-Stuff (2048, 512), Cityscapes (2048, 1024)), then
round both sides up to a multiple of 32 (Cityscapes models: 1024x1024 windows every 768 pixels
instead). The file's metadata_props carry all of this: model, num_classes, classes, palette, isr,
input, mean, std, test_protocol, resize, output, dynamic."""


def add_parser(sub) -> None:
    p = command(sub, "export", run, help="export to ONNX with an ISR setting baked in",
                description=_EXPORT_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="model name, see `edaformer list`")
    p.add_argument("--checkpoint", required=True, help="weights (any supported format)")
    p.add_argument("--isr", default="1111-111", help="ISR factors to bake in (default: 1111-111)")
    p.add_argument("--size", type=int, nargs=2, required=True, metavar=("H", "W"),
                   help="input height and width (the example size with --dynamic)")
    p.add_argument("--dynamic", action="store_true",
                   help="symbolic batch, height and width (sides >= the ISR's minimum)")
    p.add_argument("--batch", type=int, default=1, help="batch size of a fixed-size graph (default 1)")
    p.add_argument("--num-classes", type=int, default=None, help="default: the checkpoint's")
    p.add_argument("--opset", type=int, default=None, help="ONNX opset (default: edaformer.export.DEFAULT_OPSET)")
    p.add_argument("--pool", choices=ISR_POOLS, default="avg",
                   help="ISR key/value pooling kind (default avg, the reference; see docs/ablations.md)")
    p.add_argument("--check", action="store_true", help="compare with PyTorch in onnxruntime after export")
    p.add_argument("--out", required=True, help="output .onnx path")


def run(args) -> int:
    require_onnx(*(("onnx", "onnxscript", "onnxruntime") if args.check else ()))
    setting = parse_isr(args.isr)  # fail on a bad spec before building the model
    model, report = build_from_checkpoint(args.checkpoint, args.model, args.num_classes)
    model.set_isr(setting, pool=args.pool)  # the active setting is what export_onnx bakes in
    meta = report.get("meta") or {}
    # the protocol the checkpoint was trained and evaluated with, else the model's
    protocol = TestProtocol.resolve(model, meta, source=args.checkpoint)
    path = export_onnx(model.eval(), args.out, size=tuple(args.size), isr=None, dynamic=args.dynamic,
                       opset=args.opset or DEFAULT_OPSET, batch=args.batch, verbose=getattr(args, "verbose", False),
                       classes=meta.get("CLASSES"), palette=meta.get("PALETTE"), protocol=protocol)
    shape = "dynamic batch and HxW" if args.dynamic else f"{args.batch}x{args.size[0]}x{args.size[1]}"
    print(f"wrote {path} ({model.name}, {model.num_classes} classes, ISR {setting}, {shape})")
    if args.check:
        runs = [(args.batch, [tuple(args.size)])]
        if args.dynamic:
            runs = [(1, [tuple(args.size), (args.size[0] + 32, args.size[1] + 64)]), (2, [tuple(args.size)])]
        for batch, sizes in runs:
            for r in verify_onnx(model, path, sizes, batch=batch, isr=None):
                print(f"onnxruntime vs PyTorch, batch {batch} at {r['size'][0]}x{r['size'][1]}: "
                      f"max abs diff {r['max_abs_diff']:.2e}")
    return 0
