"""``edaformer package-weights``: a training checkpoint as shipped weights."""
from __future__ import annotations

from ..models import ISR_POOLS
from ..pretrained import package_weights
from .common import command


def add_parser(sub) -> None:
    p = command(sub, "package-weights", run,
                help="write a training checkpoint as shipped fp16 safetensors weights with their metadata",
                description="Write a training checkpoint as shipped weights: float16 safetensors (integer buffers "
                            "as they are) whose metadata hold the model name, classes, palette, test protocol, "
                            "recommended ISR, training config, the checkpoint's SHA-256, iteration and mIoU. "
                            "Default output: <package>/weights/NAME.safetensors, which `edaformer predict` and "
                            "`edaformer.pretrained.load_pretrained(NAME)` then find by name.")
    p.add_argument("checkpoint", help="training checkpoint (as `edaformer train` writes it)")
    p.add_argument("--name", required=True, help="shipped name, e.g. edaformer-t-camvid")
    p.add_argument("--isr", default=None, help="recommended ISR setting, e.g. 2211-222 (default: the one stored "
                   "in the checkpoint by `edaformer isr-tune --write`, else 1111-111)")
    p.add_argument("--pool", choices=ISR_POOLS, default=None,
                   help="ISR pooling kind of the recommended setting (default: the checkpoint's stored one, else avg)")
    p.add_argument("--config", default=None,
                   help="training config YAML to store, for a checkpoint that holds none (best_mIoU.pth: the "
                        "work dir's config.yaml); default: the checkpoint's")
    p.add_argument("--out", default=None,
                   help="output .safetensors file, else a folder for NAME.safetensors (default: the package's "
                        "weights folder)")


def run(args) -> int:
    result = package_weights(args.checkpoint, args.name, isr=args.isr, pool=args.pool, out=args.out,
                             config=args.config)
    info = result.info
    print(f"wrote {result.path} ({result.size / 2**20:.2f} MiB, {result.tensors} tensors in float16; "
          f"{info.model}, {info.num_classes} classes, ISR {info.isr} {info.isr_pool}"
          + (f", mIoU {100 * info.mIoU:.2f}" if info.mIoU is not None else "") + ")")
    return 0
