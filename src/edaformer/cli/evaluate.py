"""``edaformer eval``: evaluate a checkpoint on the config's validation set."""
from __future__ import annotations

from .common import add_protocol_options, command


def add_parser(sub) -> None:
    p = command(sub, "eval", run, help="evaluate a checkpoint on the config's validation set (mIoU, per class)")
    p.add_argument("config", help="YAML config the model was trained with")
    p.add_argument("--checkpoint", required=True, help="weights (any supported format)")
    p.add_argument("--isr", default=None, help="ISR factors, e.g. 2211-222 (default: eval.isr of the config, else "
                   "the setting stored in the checkpoint by `edaformer isr-tune --write`, else the training ratios)")
    p.add_argument("--pool", choices=["avg", "max", "overlap", "merge"], default=None,
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
    from pathlib import Path

    from ..checkpoint import checkpoint_num_classes, load_checkpoint, read_checkpoint
    from ..config import load_config
    from ..data import build_dataset, test_transforms
    from ..engine import build_model, evaluate, format_sweep_table, isr_sweep, plot_sweep, save_sweep
    from ..engine.distributed import cleanup_distributed, init_distributed, is_distributed
    from ..engine.evaluate import common_test_size, save_confusion, sweep_title
    from ..engine.isr_tune import stored_isr
    from ..inference import TestProtocol
    from ..isr import PAPER_ISR_SWEEP
    from ..metrics import format_class_table, format_metrics

    if args.confusion is not None:
        if args.isr_sweep is not None:
            raise ValueError("--confusion is for a single evaluation, not with --isr-sweep")
        if Path(args.confusion).suffix.lower() != ".png":
            raise ValueError(f"--confusion takes a .png path, got {args.confusion}")
    cfg = load_config(args.config, list(args.set) + ([f"eval.isr={args.isr}"] if args.isr else []))
    owns_group = not is_distributed()
    info = init_distributed(args.device)
    try:
        data_cfg, ecfg = cfg["data"], cfg["eval"]
        dataset = build_dataset({k: v for k, v in data_cfg.items() if k not in ("batch_size", "workers")}, "val")
        checkpoint = read_checkpoint(args.checkpoint)
        trained_for = checkpoint_num_classes(checkpoint)
        if trained_for is not None and trained_for != dataset.num_classes:
            names = list(getattr(dataset, "classes", None) or [])
            shown = ", ".join(map(str, names[:8])) + (f", ... ({len(names)} in all)" if len(names) > 8 else "")
            raise ValueError(f"checkpoint {args.checkpoint} has {trained_for} classes but the config's dataset has "
                             f"{dataset.num_classes}" + (f" ({shown})" if names else ""))
        model = build_model(cfg["model"], dataset.num_classes, load_pretrained=False)
        report = load_checkpoint(model, checkpoint)
        model.to(info.device).eval()
        protocol = TestProtocol.resolve(model, report["meta"], base=TestProtocol.from_config(cfg),
                                        source=args.checkpoint, scale=args.scale, mode=args.mode)
        if args.tta:
            protocol = protocol.replace(tta_scales=tuple(ecfg["tta_scales"]), flip=bool(ecfg["tta_flip"]))
        dataset.transforms = test_transforms(protocol.scale, protocol.size_divisor)
        kwargs = dict(protocol=protocol, workers=data_cfg["workers"], progress=True)
        if info.is_main:
            print(f"{cfg['model']['name']}: {args.checkpoint} ({report['format']} format), {len(dataset)} images, "
                  f"{protocol.describe()}")
        if args.isr_sweep is not None:
            specs = args.isr_sweep or list(PAPER_ISR_SWEEP)
            if ecfg["flops_input_size"]:
                size, note = tuple(ecfg["flops_input_size"]), "eval.flops_input_size of the config"
            else:
                size, count, total = common_test_size(dataset, protocol)
                note = (f"the test size of all {total} images" if count == total else
                        f"the most common test size ({count} of {total} images)")
            rows = isr_sweep(model, dataset, specs, flops_input_size=size, pool=args.pool, **kwargs)
            if info.is_main:
                print(format_sweep_table(rows, size, note))
                out = Path(args.out) if args.out else Path(args.checkpoint).parent
                meta = dict(config=str(args.config), checkpoint=str(args.checkpoint), model=cfg["model"]["name"],
                            flops_input_size=list(size), flops_input_size_source=note,
                            test_protocol=protocol.to_dict())
                print(f"wrote {save_sweep(rows, out, meta)}")
                png = plot_sweep(rows, out / "isr_sweep.png", title=f"{sweep_title(args.checkpoint)} ISR sweep")
                if png:  # without matplotlib, plot_sweep has said so
                    print(f"wrote {png}")
        else:
            isr, pool = ecfg["isr"], args.pool
            if isr is None:  # the setting `edaformer isr-tune --write` stored, with its pool kind
                isr = stored_isr(report["meta"], source=args.checkpoint)
                pool = pool or (report["meta"].get("isr_pool") if isr else None)
            metrics = evaluate(model, dataset, isr=isr, save_predictions=args.save_predictions, pool=pool, **kwargs)
            if info.is_main:
                print(f"ISR {isr or model.isr} ({pool or model.isr_pool} pooling)  images {metrics['num_images']}")
                print(format_metrics(metrics))
                print(format_class_table(metrics, getattr(dataset, "classes", None)))
                if args.save_predictions:
                    print(f"wrote {metrics['num_images']} label map(s) to {args.save_predictions}")
                if args.confusion is not None:
                    title = f"{sweep_title(args.checkpoint)} confusion matrix (each row sums to 100%)"
                    for path in save_confusion(metrics["confusion"], args.confusion,
                                               getattr(dataset, "classes", None), title):
                        if path:  # without matplotlib, only the counts (plot_confusion has said so)
                            print(f"wrote {path}")
    finally:
        if owns_group:
            cleanup_distributed()
    return 0
