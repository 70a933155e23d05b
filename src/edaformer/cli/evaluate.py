"""``edaformer eval``: evaluate a checkpoint on the config's validation set."""
from __future__ import annotations

from pathlib import Path

from ..config import load_config
from ..engine import evaluate, format_sweep_table, isr_sweep, plot_sweep, save_sweep
from ..engine.distributed import cleanup_distributed, init_distributed, is_distributed
from ..engine.evaluate import common_test_size, save_confusion, sweep_title
from ..engine.prepare import evaluation_isr, prepare_evaluation
from ..inference.onnx_backend import is_onnx_file
from ..isr import PAPER_ISR_SWEEP
from ..metrics import format_class_table, format_metrics
from ..models import ISR_POOLS
from .common import add_protocol_options, command


def add_parser(sub) -> None:
    p = command(sub, "eval", run, help="evaluate a checkpoint on the config's validation set (mIoU, per class)")
    p.add_argument("config", help="the config the model was trained with: a YAML file or a shipped name "
                   "(`edaformer configs`)")
    p.add_argument("--checkpoint", required=True,
                   help="weights (any supported format), or an `edaformer export` .onnx file (run in ONNX Runtime)")
    p.add_argument("--isr", default=None, help="ISR factors, e.g. 2211-222 (default: eval.isr of the config, else "
                   "the setting stored in the checkpoint by `edaformer isr-tune --write`, else the training ratios)")
    p.add_argument("--pool", choices=ISR_POOLS, default=None,
                   help="ISR key/value pooling kind (default: the checkpoint's stored one, else avg)")
    add_protocol_options(p)
    p.add_argument("--tta", action="store_true", help="multi-scale + flip test (eval.tta_scales, eval.tta_flip)")
    p.add_argument("--isr-sweep", nargs="*", default=None, metavar="SPEC",
                   help="evaluate each ISR setting (default 1111-111 1111-222 2211-222 2222-222); writes "
                        "isr_sweep.json and isr_sweep.png to --out")
    p.add_argument("--out", default=None, help="folder for sweep results (default: the checkpoint's folder)")
    p.add_argument("--save-predictions", default=None, metavar="DIR",
                   help="write <stem>_label.png per validation image (named as `edaformer predict` names them)")
    p.add_argument("--confusion", default=None, metavar="PATH.png",
                   help="write the row-normalised confusion matrix plot to PATH.png (needs matplotlib) and its "
                        "pixel counts to PATH.csv (rows: ground truth, columns: prediction)")
    p.add_argument("--set", nargs="+", action="extend", default=[], metavar="KEY=VALUE", help="config overrides")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda when available")
    p.epilog = ("Test protocol: --scale / --mode / --tta, else the one stored in the checkpoint by `edaformer "
                "train`, else the config's (data.test_scale or data.scale, data.size_divisor, eval.*).")


def run(args) -> int:
    if args.confusion is not None:
        if args.isr_sweep is not None:
            raise ValueError("--confusion is for a single evaluation, not with --isr-sweep")
        if Path(args.confusion).suffix.lower() != ".png":
            raise ValueError(f"--confusion takes a .png path, got {args.confusion}")
    if args.isr_sweep is not None and is_onnx_file(args.checkpoint):
        raise ValueError(f"--isr-sweep needs a checkpoint: {args.checkpoint} has one ISR setting baked in")
    cfg = load_config(args.config, list(args.set) + ([f"eval.isr={args.isr}"] if args.isr else []))
    owns_group = not is_distributed()
    info = init_distributed(args.device)
    try:
        ev = prepare_evaluation(cfg, args.checkpoint, info.device, scale=args.scale, mode=args.mode, tta=args.tta)
        if info.is_main:
            print(f"{cfg['model']['name']}: {args.checkpoint} ({ev.report['format']} format), {len(ev.dataset)} "
                  f"images, {ev.protocol.describe()}")
        if args.isr_sweep is not None:
            _sweep(args, cfg, ev, info.is_main)
        else:
            _evaluate_once(args, cfg, ev, info.is_main)
    finally:
        if owns_group:
            cleanup_distributed()
    return 0


def _sweep(args, cfg, ev, is_main: bool) -> None:
    """``--isr-sweep``: every setting's mIoU and GFLOPs, a table, isr_sweep.json and .png."""
    specs = args.isr_sweep or list(PAPER_ISR_SWEEP)
    if cfg["eval"]["flops_input_size"]:
        size, note = tuple(cfg["eval"]["flops_input_size"]), "eval.flops_input_size of the config"
    else:
        size, count, total = common_test_size(ev.dataset, ev.protocol)
        note = (f"the test size of all {total} images" if count == total else
                f"the most common test size ({count} of {total} images)")
    rows = isr_sweep(ev.model, ev.dataset, specs, flops_input_size=size, pool=args.pool, protocol=ev.protocol,
                     workers=cfg["data"]["workers"], progress=True)
    if not is_main:
        return
    print(format_sweep_table(rows, size, note))
    out = Path(args.out) if args.out else Path(args.checkpoint).parent
    meta = dict(config=str(args.config), checkpoint=str(args.checkpoint), model=cfg["model"]["name"],
                flops_input_size=list(size), flops_input_size_source=note, test_protocol=ev.protocol.to_dict())
    print(f"wrote {save_sweep(rows, out, meta)}")
    png = plot_sweep(rows, out / "isr_sweep.png", title=f"{sweep_title(args.checkpoint)} ISR sweep")
    if png:  # without matplotlib, plot_sweep has said so
        print(f"wrote {png}")


def _evaluate_once(args, cfg, ev, is_main: bool) -> None:
    """One evaluation at eval.isr (else the checkpoint's stored setting): metrics, the class table,
    label maps and the confusion matrix when asked for."""
    isr, pool = evaluation_isr(cfg["eval"]["isr"], args.pool, ev.report["meta"], source=args.checkpoint)
    metrics = evaluate(ev.model, ev.dataset, isr=isr, save_predictions=args.save_predictions, pool=pool,
                       protocol=ev.protocol, workers=cfg["data"]["workers"], progress=True)
    if not is_main:
        return
    classes = getattr(ev.dataset, "classes", None)
    print(f"ISR {isr or ev.model.isr} ({pool or ev.model.isr_pool} pooling)  images {metrics['num_images']}")
    print(format_metrics(metrics))
    print(format_class_table(metrics, classes))
    if args.save_predictions:
        print(f"wrote {metrics['num_images']} label map(s) to {args.save_predictions}")
    if args.confusion is not None:
        title = f"{sweep_title(args.checkpoint)} confusion matrix (each row sums to 100%)"
        for path in save_confusion(metrics["confusion"], args.confusion, classes, title):
            if path:  # without matplotlib, only the counts (plot_confusion has said so)
                print(f"wrote {path}")
