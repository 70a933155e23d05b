"""The ``edaformer`` command line.

Each sub-command is a pair of functions: ``_add_<name>(subparsers)`` declares its parser and binds
``_run_<name>`` to it with ``set_defaults(func=...)``; :data:`COMMANDS` lists them in help order.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys

from . import __version__

log = logging.getLogger("edaformer")


_VERBOSE = argparse.ArgumentParser(add_help=False)
_VERBOSE.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="debug logging")


def _command(sub, name: str, run, **kwargs) -> argparse.ArgumentParser:
    """A sub-command parser bound to ``run``; ``-v`` works after the sub-command too."""
    p = sub.add_parser(name, parents=[_VERBOSE], **kwargs)
    p.set_defaults(func=run)
    return p


# -- convert ---------------------------------------------------------------------------
def _add_convert(sub) -> None:
    p = _command(sub, "convert", _run_convert, help="write the *_labelTrainIds.png label files a dataset reads")
    p.add_argument("dataset", choices=["cityscapes", "cocostuff"])
    p.add_argument("root", help="dataset root (holding gtFine/ for cityscapes, annotations/ for cocostuff)")
    p.add_argument("--workers", type=int, default=4, help="threads (default 4)")
    p.add_argument("--skip-existing", action="store_true", help="keep label files that already exist")


def _run_convert(args) -> int:
    from .data import convert_cityscapes, convert_cocostuff

    convert = {"cityscapes": convert_cityscapes, "cocostuff": convert_cocostuff}[args.dataset]
    result = convert(args.root, overwrite=not args.skip_existing, workers=args.workers, progress=True)
    print(f"{args.dataset}: wrote {result.written} *_labelTrainIds.png files under {result.folder}"
          f" ({result.skipped} existing skipped)")
    return 0


# -- export-reference ------------------------------------------------------------------
def _add_export_reference(sub) -> None:
    p = _command(sub, "export-reference", _run_export_reference, help="write a checkpoint in the reference (mmseg) format")
    p.add_argument("checkpoint", help="checkpoint to convert (any supported format)")
    p.add_argument("--model", required=True, help="model name, see `edaformer list`")
    p.add_argument("--num-classes", type=int, default=None)
    p.add_argument("--out", required=True, help="output .pth path")


def _run_export_reference(args) -> int:
    from .checkpoint import export_reference, load_checkpoint
    from .models import create_model

    model = create_model(args.model, num_classes=args.num_classes)
    report = load_checkpoint(model, args.checkpoint)
    path = export_reference(model, args.out, meta=report["meta"])
    print(f"wrote {path} (from {report['format']} format)")
    return 0


# -- list ------------------------------------------------------------------------------
def _add_list(sub) -> None:
    _command(sub, "list", _run_list, help="list the named models")


def _run_list(args) -> int:
    from .models import MODEL_SPECS

    for name, spec in sorted(MODEL_SPECS.items()):
        print(f"{name:24s} classes={spec.num_classes:<4d} test={spec.test_mode}")
    return 0


# -- predict ---------------------------------------------------------------------------
def _alpha(text: str) -> float:
    from .inference.predict import check_alpha

    try:
        return check_alpha(float(text))
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e).replace("--alpha ", "")) from None


def _add_protocol_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--scale", type=int, nargs=2, default=None, metavar=("LONG", "SHORT"),
                   help="resize box of the test protocol (default: the checkpoint's, else the model's / config's)")
    p.add_argument("--mode", choices=["whole", "slide"], default=None,
                   help="whole image or sliding window (default: the checkpoint's, else the model's / config's)")


def _add_predict(sub) -> None:
    p = _command(sub, "predict", _run_predict,
                 help="segment images: writes <stem>_label.png and <stem>_overlay.png (and <stem>_probs.png)")
    p.add_argument("images", nargs="+", help="image files or folders (folders: the images inside, not recursive)")
    p.add_argument("--model", required=True, help="model name, see `edaformer list`")
    p.add_argument("--checkpoint", required=True, help="weights (any supported format)")
    p.add_argument("--isr", default=None, help="ISR factors, e.g. 2211-222 (default: training ratios)")
    p.add_argument("--out", default="predictions", help="output folder (default ./predictions)")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda when available")
    p.add_argument("--num-classes", type=int, default=None, help="default: the checkpoint's")
    p.add_argument("--alpha", type=_alpha, default=0.5, help="overlay opacity in [0, 1] (default 0.5)")
    p.add_argument("--legend", action="store_true", help="add a legend of the classes present to each overlay")
    p.add_argument("--save-probs", action="store_true",
                   help="also write <stem>_probs.png: the top class probability per pixel as 8-bit gray")
    _add_protocol_options(p)


def _run_predict(args) -> int:
    from tqdm import tqdm

    from .inference import Segmenter
    from .inference.predict import IMAGE_SUFFIXES, collect_inputs, predict_files
    from .utils import resolve_device

    device = resolve_device(args.device)
    inputs = collect_inputs(args.images)
    for path, why in inputs.skipped:
        print(f"edaformer predict: skipped {path}: {why}", file=sys.stderr)
    if not inputs.files:
        raise ValueError(f"no images ({', '.join(IMAGE_SUFFIXES)}) found in {', '.join(args.images)}")
    segmenter = Segmenter.from_checkpoint(args.model, args.checkpoint, device=device, isr=args.isr,
                                          num_classes=args.num_classes, test_scale=args.scale, mode=args.mode)
    log.info("%r", segmenter)
    result = predict_files(segmenter, inputs.files, args.out, alpha=args.alpha, legend=args.legend,
                           save_probs=args.save_probs,
                           on_error=lambda path, msg: tqdm.write(f"edaformer predict: {msg}", file=sys.stderr),
                           progress=lambda it: tqdm(it, desc="predict", unit="img", file=sys.stderr))
    failed = [str(p) for p, _ in result.failed]
    print(f"wrote {len(result.written)} prediction(s) to {args.out}"
          + (f"; {len(failed)} failed: {', '.join(failed)}" if failed else "")
          + (f"; {len(inputs.skipped)} input(s) skipped" if inputs.skipped else ""))
    return 1 if failed else 0


# -- train -----------------------------------------------------------------------------
def _add_train(sub) -> None:
    p = _command(sub, "train", _run_train, help="train a model from a config (also under torchrun for DDP)")
    p.add_argument("config", help="YAML config, e.g. configs/edaformer-t-ade20k.yaml")
    p.add_argument("--work-dir", default=None, help="output folder (default work_dirs/<config name>)")
    p.add_argument("--resume", nargs="?", const="auto", default=None, metavar="auto|PATH",
                   help="continue from the newest checkpoint in the work dir (auto, the default) or from PATH")
    p.add_argument("--amp", nargs="?", const="bf16", choices=["bf16", "fp16"], default=None,
                   help="mixed precision on CUDA (bf16 when given without a value)")
    p.add_argument("--set", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                   help="config overrides, e.g. optim.lr=1e-4 data.root=/data/ade")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda when available")


def _run_train(args) -> int:
    from pathlib import Path

    from .config import load_config
    from .engine import NonFiniteLossError, train

    cfg = load_config(args.config, args.set)
    if args.amp:
        cfg["train"]["amp"] = args.amp
    work_dir = Path(args.work_dir) if args.work_dir else Path("work_dirs") / Path(args.config).stem
    try:
        train(cfg, work_dir, resume=args.resume, device=args.device)
    except NonFiniteLossError as e:
        print(f"edaformer train: error: {e}", file=sys.stderr)
        return 1
    return 0


# -- eval ------------------------------------------------------------------------------
def _add_eval(sub) -> None:
    p = _command(sub, "eval", _run_eval, help="evaluate a checkpoint on the config's validation set (mIoU, per class)")
    p.add_argument("config", help="YAML config the model was trained with")
    p.add_argument("--checkpoint", required=True, help="weights (any supported format)")
    p.add_argument("--isr", default=None, help="ISR factors, e.g. 2211-222 (default: eval.isr of the config)")
    _add_protocol_options(p)
    p.add_argument("--tta", action="store_true", help="multi-scale + flip test (eval.tta_scales, eval.tta_flip)")
    p.add_argument("--isr-sweep", nargs="*", default=None, metavar="SPEC",
                   help="evaluate each ISR setting (default 1111-111 1111-222 2211-222 2222-222); writes "
                        "isr_sweep.json and isr_sweep.png to --out")
    p.add_argument("--out", default=None, help="folder for sweep results (default: the checkpoint's folder)")
    p.add_argument("--save-predictions", default=None, metavar="DIR",
                   help="write <stem>_label.png per validation image (named as `edaformer predict` names them)")
    p.add_argument("--set", nargs="+", action="extend", default=[], metavar="KEY=VALUE", help="config overrides")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda when available")
    p.epilog = ("Test protocol: --scale / --mode / --tta, else the one stored in the checkpoint by `edaformer "
                "train`, else the config's (data.test_scale or data.scale, data.size_divisor, eval.*).")


def _run_eval(args) -> int:
    from pathlib import Path

    from .checkpoint import load_checkpoint
    from .config import load_config
    from .data import build_dataset, test_transforms
    from .engine import build_model, evaluate, format_sweep_table, isr_sweep, plot_sweep, save_sweep
    from .engine.distributed import cleanup_distributed, init_distributed, is_distributed
    from .engine.evaluate import common_test_size, sweep_title
    from .inference import TestProtocol
    from .isr import PAPER_ISR_SWEEP
    from .metrics import format_class_table, format_metrics

    cfg = load_config(args.config, list(args.set) + ([f"eval.isr={args.isr}"] if args.isr else []))
    owns_group = not is_distributed()
    info = init_distributed(args.device)
    try:
        data_cfg, ecfg = cfg["data"], cfg["eval"]
        dataset = build_dataset({k: v for k, v in data_cfg.items() if k not in ("batch_size", "workers")}, "val")
        model = build_model(cfg["model"], dataset.num_classes, load_pretrained=False)
        report = load_checkpoint(model, args.checkpoint)
        model.to(info.device).eval()
        try:
            protocol = TestProtocol.resolve(model, report["meta"], base=TestProtocol.from_config(cfg),
                                            scale=args.scale, mode=args.mode)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{args.checkpoint}: invalid meta['test_protocol']: {e}") from None
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
            rows = isr_sweep(model, dataset, specs, flops_input_size=size, **kwargs)
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
            metrics = evaluate(model, dataset, isr=ecfg["isr"], save_predictions=args.save_predictions, **kwargs)
            if info.is_main:
                print(f"ISR {ecfg['isr'] or model.isr}  images {metrics['num_images']}")
                print(format_metrics(metrics))
                print(format_class_table(metrics, getattr(dataset, "classes", None)))
                if args.save_predictions:
                    print(f"wrote {metrics['num_images']} label map(s) to {args.save_predictions}")
    finally:
        if owns_group:
            cleanup_distributed()
    return 0


# -- flops -----------------------------------------------------------------------------
def _add_flops(sub) -> None:
    p = _command(sub, "flops", _run_flops, help="count parameters and GFLOPs (the paper's convention)")
    p.add_argument("model", help="model name, see `edaformer list`")
    p.add_argument("--size", type=int, nargs=2, required=True, metavar=("H", "W"), help="input height and width")
    p.add_argument("--isr", default="1111-111", help="ISR factors, encoder-decoder (default: 1111-111)")
    p.add_argument("--num-classes", type=int, default=None)
    p.add_argument("--convention", choices=["mmcv130", "mmcv127"], default="mmcv130",
                   help="mmcv130: LayerNorm counted, as published (default); mmcv127: not counted")
    p.add_argument("--json", action="store_true", help="end the output with one JSON line")


def _run_flops(args) -> int:
    from .flops import count_flops
    from .isr import parse_isr
    from .models import create_model

    setting = parse_isr(args.isr)  # fail on a bad spec before building the model
    model = create_model(args.model, num_classes=args.num_classes, isr=setting)
    report = count_flops(model, tuple(args.size), convention=args.convention)
    print(report.format_table())
    if args.json:
        print(json.dumps(report.to_dict()))
    return 0


# -- bench -----------------------------------------------------------------------------
def _add_bench(sub) -> None:
    p = _command(sub, "bench", _run_bench, help="inference latency, images/s and GFLOPs per ISR setting")
    p.add_argument("model", help="model name, see `edaformer list`")
    p.add_argument("--size", type=int, nargs=2, required=True, metavar=("H", "W"), help="input height and width")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--isr", default=None, help="ISR factors, e.g. 2211-222 (default: 1111-111)")
    g.add_argument("--isr-sweep", action="store_true", help="the paper's four ISR settings")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32", help="autocast dtype (default fp32)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--runs", type=int, default=10, help="timed runs (default 10)")
    p.add_argument("--warmup", type=int, default=2, help="untimed runs first (default 2)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    p.add_argument("--channels-last", action="store_true", help="channels-last weights and input")
    p.add_argument("--checkpoint", default=None, help="weights to load (default: random init)")
    p.add_argument("--num-classes", type=int, default=None)
    p.add_argument("--json", action="store_true", help="print JSON instead of the table")


def _run_bench(args) -> int:
    import torch

    from .benchmark import environment, format_table, run_isr_sweep, to_jsonable
    from .isr import PAPER_ISR_SWEEP, parse_isr
    from .models import create_model

    if args.batch < 1 or args.runs < 1 or args.warmup < 0:
        raise ValueError("--batch and --runs must be >= 1, --warmup >= 0")
    settings = list(PAPER_ISR_SWEEP) if args.isr_sweep else [str(parse_isr(args.isr or "1111-111"))]
    if args.threads:
        torch.set_num_threads(args.threads)
    model = create_model(args.model, num_classes=args.num_classes)
    if args.checkpoint:
        from .checkpoint import load_checkpoint

        load_checkpoint(model, args.checkpoint)
    rows = run_isr_sweep(model, tuple(args.size), settings, batch=args.batch, runs=args.runs, warmup=args.warmup,
                         device=args.device, dtype=args.dtype, channels_last=args.channels_last)
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


# -- export ----------------------------------------------------------------------------
def _add_export(sub) -> None:
    p = _command(sub, "export", _run_export, help="export to ONNX with an ISR setting baked in")
    p.add_argument("model", help="model name, see `edaformer list`")
    p.add_argument("--checkpoint", required=True, help="weights (any supported format)")
    p.add_argument("--isr", default="1111-111", help="ISR factors to bake in (default: 1111-111)")
    p.add_argument("--size", type=int, nargs=2, required=True, metavar=("H", "W"),
                   help="input height and width (the example size with --dynamic)")
    p.add_argument("--dynamic", action="store_true", help="symbolic height and width (>= the ISR's minimum)")
    p.add_argument("--num-classes", type=int, default=None, help="default: the model's")
    p.add_argument("--opset", type=int, default=None, help="ONNX opset (default: edaformer.export.DEFAULT_OPSET)")
    p.add_argument("--check", action="store_true", help="compare with PyTorch in onnxruntime after export")
    p.add_argument("--out", required=True, help="output .onnx path")


def _run_export(args) -> int:
    from .checkpoint import load_checkpoint
    from .export import DEFAULT_OPSET, export_onnx, verify_onnx
    from .isr import parse_isr
    from .models import create_model

    setting = parse_isr(args.isr)  # fail on a bad spec before building the model
    model = create_model(args.model, num_classes=args.num_classes).eval()
    load_checkpoint(model, args.checkpoint)
    path = export_onnx(model, args.out, size=tuple(args.size), isr=setting, dynamic=args.dynamic,
                       opset=args.opset or DEFAULT_OPSET)
    print(f"wrote {path} (ISR {setting}, {'dynamic HxW' if args.dynamic else f'{args.size[0]}x{args.size[1]}'})")
    if args.check:
        sizes = [tuple(args.size)]
        if args.dynamic:
            sizes.append((args.size[0] + 32, args.size[1] + 64))
        for r in verify_onnx(model, path, sizes, isr=setting):
            print(f"onnxruntime vs PyTorch at {r['size'][0]}x{r['size'][1]}: max abs diff {r['max_abs_diff']:.2e}")
    return 0


COMMANDS = (_add_list, _add_predict, _add_train, _add_eval, _add_flops, _add_bench, _add_export,
            _add_export_reference, _add_convert)

_DESCRIPTION = ("EDAFormer semantic segmentation: train, evaluate, segment images, count FLOPs, benchmark and "
                "export, with Inference Spatial Reduction (ISR) chosen at run time.")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edaformer", description=_DESCRIPTION, parents=[_VERBOSE])
    parser.add_argument("--version", action="version", version=f"edaformer {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in COMMANDS:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if getattr(args, "verbose", False) else logging.INFO,
                        format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError) as e:
        print(f"edaformer {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
