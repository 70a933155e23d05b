"""``edaformer isr-tune``: the best ISR setting within a budget."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..config import load_config
from ..engine.isr_tune import (Budget, calibration_subset, format_pareto_table, grid_settings, parse_factors,
                               plot_result, tune_isr, write_isr_checkpoint)
from ..engine.prepare import prepare_evaluation
from ..utils import resolve_device
from .common import command

_ISR_TUNE_DESCRIPTION = """\
Find the best ISR setting of a trained model within a budget, on the config's validation split
(or --calib N images of it, spread evenly). GFLOPs are counted at eval.flops_input_size (else
data.crop_size), as `edaformer flops` counts them; latency is one forward at that size on this
device (median of --runs, the settings timed interleaved).

Search space: every combination of --factors (default 1,2) over the 4 encoder stages and 3
decoder levels (2^7 = 128 settings), or --grid paper (1111-111 1111-222 2211-222 2222-222);
1111-111 is always included as the reference.

Strategy, exact for the grid: GFLOPs of every setting (cheap, no data); with --budget-ms the
latency of every setting; mIoU only where it decides. --budget-gflops / --budget-ms: every
setting within the budget is evaluated, the answer is the highest mIoU (ties: fewer GFLOPs).
--max-drop D: settings in rising GFLOPs order until the first GFLOPs level with one within D
mIoU points of 1111-111 (every cheaper one was evaluated and dropped more).

Prints the Pareto table (setting, GFLOPs, ms, mIoU, change vs 1111-111), writes isr_tune.png
and isr_tune.json to --out; --json ends the output with one line {"isr", "gflops", "ms",
"mIoU" (a fraction)}. --write stores the chosen setting as meta.isr in a copy of the checkpoint."""


def add_parser(sub) -> None:
    p = command(sub, "isr-tune", run, help="find the best ISR setting within a GFLOPs, latency or mIoU budget",
                description=_ISR_TUNE_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", help="the config the model was trained with: a YAML file or a shipped name "
                   "(`edaformer configs`)")
    p.add_argument("--checkpoint", required=True, help="trained weights (any supported format)")
    budget = p.add_mutually_exclusive_group(required=True)
    budget.add_argument("--budget-gflops", type=float, metavar="G", help="at most G GFLOPs")
    budget.add_argument("--budget-ms", type=float, metavar="T", help="at most T ms per forward on this device")
    budget.add_argument("--max-drop", type=float, metavar="D",
                        help="fewest GFLOPs within D mIoU points of 1111-111")
    grid = p.add_mutually_exclusive_group()
    grid.add_argument("--factors", default="1,2", metavar="F,F",
                      help="ISR factors tried at every stage and level (default 1,2: 128 settings)")
    grid.add_argument("--grid", choices=["paper"], default=None, help="the paper's four settings instead")
    p.add_argument("--calib", type=int, default=None, metavar="N",
                   help="evaluate on N validation images spread evenly (default: all)")
    p.add_argument("--pool", default=None, metavar="P", help="ISR pooling variant passed to the model (default: its own)")
    p.add_argument("--runs", type=int, default=3, help="timed forwards per setting (default 3)")
    p.add_argument("--warmup", type=int, default=1, help="untimed forwards per setting first (default 1)")
    p.add_argument("--write", nargs="?", const="", default=None, metavar="PATH",
                   help="store the chosen setting in a copy of the checkpoint "
                        "(default PATH: <checkpoint stem>-isr<setting>.pth beside it)")
    p.add_argument("--out", default=None, help="folder for isr_tune.png / .json (default work_dirs/<config name>)")
    p.add_argument("--set", nargs="+", action="extend", default=[], metavar="KEY=VALUE", help="config overrides")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda when available")
    p.add_argument("--json", action="store_true", help="end the output with one JSON line of the chosen setting")


def run(args) -> int:
    kind, value = next((k, v) for k, v in (("gflops", args.budget_gflops), ("ms", args.budget_ms),
                                           ("max_drop", args.max_drop)) if v is not None)
    budget = Budget(kind, value)
    if args.runs < 1 or args.warmup < 0:
        raise ValueError("--runs must be >= 1 and --warmup >= 0")
    settings = grid_settings(grid="paper") if args.grid else grid_settings(parse_factors(args.factors))
    cfg = load_config(args.config, args.set)
    data_cfg, ecfg = cfg["data"], cfg["eval"]
    ev = prepare_evaluation(cfg, args.checkpoint, resolve_device(args.device))
    calib = calibration_subset(ev.dataset, args.calib)
    size = (ecfg["flops_input_size"] or data_cfg.get("crop_size")
            or list(getattr(ev.model.spec, "crop_size", (512, 512))))
    print(f"{cfg['model']['name']}: {args.checkpoint} ({ev.report['format']} format), {len(calib)} of "
          f"{len(ev.dataset)} images, {len(settings)} ISR settings, budget {budget}")
    result = tune_isr(ev.model, calib, budget, settings=settings, flops_input_size=size,
                      eval_kwargs=dict(protocol=ev.protocol, workers=data_cfg["workers"]), pool=args.pool,
                      runs=args.runs, warmup=args.warmup)
    print(format_pareto_table(result))
    print(f"{len(result.evaluated)} of {len(result.candidates)} settings evaluated"
          + (f"; left out (do not fit {size[0]}x{size[1]}): {', '.join(result.skipped)}" if result.skipped else ""))
    _write_outputs(args, cfg, result, budget, images=len(calib))
    c = result.chosen
    if args.json:
        print(json.dumps(result.summary()))
    else:
        print(f"best within {budget}: ISR {c.isr}, {c.gflops:.4g} GFLOPs, {c.ms:.1f} ms, mIoU {100 * c.mIoU:.2f}")
    return 0


def _write_outputs(args, cfg, result, budget, images: int) -> None:
    """isr_tune.json and isr_tune.png to --out, and with --write the checkpoint with the setting."""
    out = Path(args.out) if args.out else Path("work_dirs") / Path(args.config).stem
    out.mkdir(parents=True, exist_ok=True)
    meta = dict(config=str(args.config), checkpoint=str(args.checkpoint), model=cfg["model"]["name"],
                images=images, pool=args.pool, grid=args.grid or f"factors {args.factors}")
    (out / "isr_tune.json").write_text(json.dumps({"meta": meta, **result.to_dict()}, indent=2))
    print(f"wrote {out / 'isr_tune.json'}")
    png = plot_result(result, out / "isr_tune.png", title=f"{cfg['model']['name']}: {budget}")
    print(f"wrote {png}" if png else "no plot: matplotlib is not installed (pip install matplotlib)")
    if args.write is not None:
        path = write_isr_checkpoint(args.checkpoint, result, args.write or None, pool=args.pool)
        print(f"wrote {path} (meta.isr = {result.chosen.isr})")
