"""``edaformer export``: ONNX with an ISR setting baked in."""
from __future__ import annotations

import argparse

from ..checkpoint import build_from_checkpoint, checkpoint_model_name, read_checkpoint
from ..export import DEFAULT_OPSET, export_onnx, min_input_side, require_onnx, verify_onnx
from ..inference import TestProtocol
from ..isr import TRAINING_ISR, parse_isr
from ..meta import stored_isr, stored_isr_pool
from ..models import ISR_POOLS, get_model_spec
from .common import command

_EXPORT_DESCRIPTION = """\
Export a model with its checkpoint to ONNX, one ISR setting baked in. The architecture is the one
the checkpoint names (checkpoints written by edaformer and shipped models name one; give NAME for
others), the ISR setting the one it stores (`edaformer isr-tune --write`, shipped models), else
1111-111. Input "image": float32 (N, 3, H, W), RGB, (pixel - mean) / std on 0-255 pixel values with
mean (123.675, 116.28, 103.53) and std (58.395, 57.12, 57.375). Output "logits": (N, classes,
ceil(H/8), ceil(W/8)), the decoder's logits at output stride 8: resize them bilinearly to the
input size before the argmax (`edaformer predict --checkpoint model.onnx` does). Test-time resize,
as `edaformer predict` does it: fit the image into the dataset's (long, short) box keeping its
aspect ratio (ADE20K / COCO-Stuff (2048, 512), Cityscapes (2048, 1024)), then round both sides up
to a multiple of 32 (Cityscapes models: 1024x1024 windows every 768 pixels instead). The file's
metadata_props carry all of this: model, num_classes, classes, palette, isr, isr_pool, input,
mean, std, test_protocol, resize, output, output_stride, dynamic."""

DYNAMIC_EXAMPLE_SIDE = 256  # the example input side of a dynamic export without --size
# config fields that name a model and its dataset's protocol, not its network
_IDENTITY_FIELDS = ("name", "dataset", "num_classes", "test_scale", "test_mode", "crop_size", "slide_stride")


def add_parser(sub) -> None:
    p = command(sub, "export", run, help="export to ONNX with an ISR setting baked in",
                description=_EXPORT_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", nargs="?", default=None,
                   help="model name, see `edaformer list` (default: the one the checkpoint names)")
    p.add_argument("--checkpoint", required=True, help="weights (any supported format) or a shipped model's name")
    p.add_argument("--isr", default=None, help="ISR factors to bake in (default: the setting the checkpoint stores, "
                   f"else {TRAINING_ISR})")
    p.add_argument("--size", type=int, nargs=2, default=None, metavar=("H", "W"),
                   help="input height and width (with --dynamic: the example size, default "
                        f"{DYNAMIC_EXAMPLE_SIDE}x{DYNAMIC_EXAMPLE_SIDE} or the ISR's minimum)")
    p.add_argument("--dynamic", action="store_true",
                   help="symbolic batch, height and width (sides >= the ISR's minimum)")
    p.add_argument("--batch", type=int, default=1, help="batch size of a fixed-size graph (default 1)")
    p.add_argument("--num-classes", type=int, default=None, help="default: the checkpoint's")
    p.add_argument("--opset", type=int, default=None, help="ONNX opset (default: edaformer.export.DEFAULT_OPSET)")
    p.add_argument("--pool", choices=ISR_POOLS, default=None,
                   help="ISR key/value pooling kind (default: the checkpoint's stored one with its stored ISR, "
                        "else avg, the reference; see docs/ablations.md)")
    p.add_argument("--check", action="store_true", help="compare with PyTorch in onnxruntime after export")
    p.add_argument("--out", required=True, help="output .onnx path")


def _architecture(name: str) -> tuple:
    """What a named model's network is, apart from its name, dataset and protocol."""
    spec = get_model_spec(name)
    return spec.family, {k: v for k, v in spec.to_dict().items() if k not in _IDENTITY_FIELDS}


def _model_name(given: str | None, checkpoint: dict, source: str) -> str:
    """The model to build: ``given`` when the checkpoint names none or names the same network,
    else the checkpoint's; a ``given`` name of another network raises ``ValueError``."""
    if given is None:
        return checkpoint_model_name(checkpoint, source)
    try:
        stored = checkpoint_model_name(checkpoint, source)
    except ValueError:
        return given  # the checkpoint names no model: the given name says what it is
    if given != stored and _architecture(given) != _architecture(stored):
        raise ValueError(f"model {given} contradicts checkpoint {source}, which holds {stored}; leave the model "
                         "name out to export the checkpoint's")
    return given


def _example_size(args, model) -> tuple[int, int]:
    """``--size``, else (with ``--dynamic``) a square example at least as large as the ISR's minimum."""
    if args.size is not None:
        return tuple(args.size)
    if not args.dynamic:
        raise ValueError("--size H W is needed for a fixed-size export (or give --dynamic)")
    return tuple(max(DYNAMIC_EXAMPLE_SIDE, min_input_side(model, axis)) for axis in (0, 1))


def run(args) -> int:
    require_onnx(*(("onnx", "onnxscript", "onnxruntime") if args.check else ()))
    if args.isr is not None:
        parse_isr(args.isr)  # fail on a bad spec before reading the checkpoint
    obj = read_checkpoint(args.checkpoint)
    name = _model_name(args.model, obj, args.checkpoint)
    model, report = build_from_checkpoint(obj, name, args.num_classes)
    meta = report.get("meta") or {}
    # the given setting, else the one the checkpoint stores (with its pool kind), else the training ratios
    stored = stored_isr(meta, source=args.checkpoint) if args.isr is None else None
    setting = str(parse_isr(args.isr)) if args.isr is not None else stored or str(TRAINING_ISR)
    pool = args.pool or (stored_isr_pool(meta) if stored else None) or "avg"
    model.set_isr(setting, pool=pool)  # the active setting is what export_onnx bakes in
    size = _example_size(args, model)
    # the protocol the checkpoint was trained and evaluated with, else the model's
    protocol = TestProtocol.resolve(model, meta, source=args.checkpoint)
    path = export_onnx(model.eval(), args.out, size=size, isr=None, dynamic=args.dynamic,
                       opset=args.opset or DEFAULT_OPSET, batch=args.batch, verbose=getattr(args, "verbose", False),
                       classes=meta.get("CLASSES"), palette=meta.get("PALETTE"), protocol=protocol)
    shape = "dynamic batch and HxW" if args.dynamic else f"{args.batch}x{size[0]}x{size[1]}"
    origin = " (stored in the checkpoint)" if stored else ""
    print(f"wrote {path} ({model.name}, {model.num_classes} classes, ISR {setting}{origin}, {shape})")
    if args.check:
        runs = [(args.batch, [size])]
        if args.dynamic:
            runs = [(1, [size, (size[0] + 32, size[1] + 64)]), (2, [size])]
        for batch, sizes in runs:
            for r in verify_onnx(model, path, sizes, batch=batch, isr=None):
                print(f"onnxruntime vs PyTorch, batch {batch} at {r['size'][0]}x{r['size'][1]}: "
                      f"max abs diff {r['max_abs_diff']:.2e}")
    return 0
