"""``edaformer bench``: inference latency, images/s and GFLOPs per ISR setting."""
from __future__ import annotations

import json

import torch

from ..bench import environment, format_table, run_isr_sweep, to_jsonable
from ..checkpoint import build_from_checkpoint
from ..isr import PAPER_ISR_SWEEP, parse_isr
from ..models import ISR_POOLS, create_model
from .common import command


def add_parser(sub) -> None:
    p = command(sub, "bench", run, help="inference latency, images/s and GFLOPs per ISR setting")
    p.add_argument("model", help="model name, see `edaformer list`")
    p.add_argument("--size", type=int, nargs=2, required=True, metavar=("H", "W"), help="input height and width")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--isr", default=None, help="ISR factors, e.g. 2211-222 (default: 1111-111)")
    g.add_argument("--isr-sweep", action="store_true", help="the paper's four ISR settings")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where to run (default cpu)")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32", help="autocast dtype (default fp32)")
    p.add_argument("--batch", type=int, default=1, help="images per forward pass (default 1)")
    p.add_argument("--runs", type=int, default=10, help="timed runs (default 10)")
    p.add_argument("--warmup", type=int, default=2, help="untimed runs first (default 2)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    p.add_argument("--channels-last", action="store_true", help="channels-last weights and input")
    p.add_argument("--pool", choices=ISR_POOLS, default="avg",
                   help="ISR key/value pooling kind (default avg, the reference; see docs/ablations.md)")
    p.add_argument("--checkpoint", default=None, help="weights to load (default: random init)")
    p.add_argument("--num-classes", type=int, default=None,
                   help="default: the checkpoint's, without one the model's dataset's")
    p.add_argument("--json", action="store_true", help="print JSON instead of the table")


def run(args) -> int:
    if args.batch < 1 or args.runs < 1 or args.warmup < 0:
        raise ValueError("--batch and --runs must be >= 1, --warmup >= 0")
    settings = list(PAPER_ISR_SWEEP) if args.isr_sweep else [str(parse_isr(args.isr or "1111-111"))]
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.checkpoint:
        model, _ = build_from_checkpoint(args.checkpoint, args.model, args.num_classes)
    else:
        model = create_model(args.model, num_classes=args.num_classes)
    rows = run_isr_sweep(model, tuple(args.size), settings, batch=args.batch, runs=args.runs, warmup=args.warmup,
                         device=args.device, dtype=args.dtype, channels_last=args.channels_last, pool=args.pool)
    base = rows[0]["median_ms"]
    for row in rows:
        row["time_vs_first"] = row["median_ms"] / base
    if args.json:
        print(json.dumps(to_jsonable(dict(model=args.model, environment=environment(), runs=args.runs,
                                          warmup=args.warmup, rows=rows)), indent=2))
        return 0
    env = environment()
    print(f"{args.model} {args.size[0]}x{args.size[1]} batch {args.batch} {args.device} {args.dtype}, "
          f"{args.runs} runs after {args.warmup} warm-up; torch {env['torch']}, {env['torch_threads']} thread(s)")
    print(format_table(rows, [("isr", "ISR", ""), ("gflops", "GFLOPs", ".1f"), ("median_ms", "median ms", ".1f"),
                              ("iqr_ms", "IQR ms", ".1f"), ("min_ms", "min ms", ".1f"), ("max_ms", "max ms", ".1f"),
                              ("images_per_s", "images/s", ".2f"), ("cpu_median_ms", "CPU ms", ".0f"),
                              ("time_vs_first", "time vs first", ".2f")]))
    return 0
