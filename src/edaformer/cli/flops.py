"""``edaformer flops``: parameters and GFLOPs."""
from __future__ import annotations

import json

from ..flops import count_flops
from ..isr import parse_isr
from ..models import DECODER_OPS, ISR_POOLS, create_model
from .common import command


def add_parser(sub) -> None:
    p = command(sub, "flops", run, help="count parameters and GFLOPs (the paper's convention)")
    p.add_argument("model", help="model name, see `edaformer list`")
    p.add_argument("--size", type=int, nargs=2, required=True, metavar=("H", "W"), help="input height and width")
    p.add_argument("--isr", default="1111-111", help="ISR factors, encoder-decoder (default: 1111-111)")
    p.add_argument("--num-classes", type=int, default=None, help="default: the model's dataset's")
    p.add_argument("--convention", choices=["mmcv130", "mmcv127"], default="mmcv130",
                   help="mmcv130: LayerNorm counted, as published (default); mmcv127: not counted")
    p.add_argument("--pool", choices=ISR_POOLS, default="avg",
                   help="ISR key/value pooling kind (default avg, the reference; see docs/ablations.md)")
    p.add_argument("--decoder-depths", type=int, nargs=3, default=None, metavar=("C4", "C3", "C2"),
                   help="decoder blocks at c4, c3, c2 (default 3 2 1)")
    p.add_argument("--decoder-op", choices=DECODER_OPS, default=None,
                   help="token mixer of the decoder blocks (default efa)")
    p.add_argument("--train-isr", default=None, help="training ratios raised by these ISR factors (default none)")
    p.add_argument("--json", action="store_true", help="end the output with one JSON line")


def run(args) -> int:
    setting = parse_isr(args.isr)  # fail on a bad spec before building the model
    options = {k: v for k, v in dict(decoder_depths=args.decoder_depths, decoder_op=args.decoder_op,
                                      train_isr=args.train_isr).items() if v is not None}
    model = create_model(args.model, num_classes=args.num_classes, isr=setting, isr_pool=args.pool, **options)
    report = count_flops(model, tuple(args.size), convention=args.convention)
    print(report.format_table())
    if args.json:
        print(json.dumps(report.to_dict()))
    return 0
