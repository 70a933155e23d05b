"""The ``edaformer`` command line.

Each sub-command is a pair of functions: ``_add_<name>(subparsers)`` declares its parser and binds
``_run_<name>`` to it with ``set_defaults(func=...)``; :data:`COMMANDS` lists them in help order.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shlex
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from . import __version__
from .bench import environment, format_table, run_isr_sweep, to_jsonable
from .checkpoint import (CheckpointWriteError, build_from_checkpoint, checkpoint_num_classes, export_reference,
                         load_checkpoint, read_checkpoint)
from .config import load_config
from .data import build_dataset, convert_cityscapes, convert_cocostuff, test_transforms
from .engine import (NonFiniteLossError, TrainingAborted, TrainingInterrupted, build_model, evaluate,
                     format_sweep_table, isr_sweep, plot_sweep, save_sweep, train)
from .engine.distributed import cleanup_distributed, init_distributed, is_distributed
from .engine.evaluate import common_test_size, save_confusion, sweep_title
from .engine.isr_tune import (Budget, calibration_subset, format_pareto_table, grid_settings, parse_factors,
                              plot_result, tune_isr, write_isr_checkpoint)
from .engine.signals import exit_code
from .export import DEFAULT_OPSET, OnnxExtrasMissing, export_onnx, require_onnx, verify_onnx
from .flops import count_flops
from .inference import Segmenter, TestProtocol
from .inference.predict import IMAGE_SUFFIXES, check_alpha, collect_inputs, predict_files
from .isr import PAPER_ISR_SWEEP, parse_isr
from .meta import stored_isr
from .metrics import format_class_table, format_metrics
from .models import MODEL_SPECS, create_model
from .pretrained import DEFAULT_NAME, available, package_weights
from .utils import resolve_device

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
    p.add_argument("dataset", choices=["cityscapes", "cocostuff"], help="which dataset's labels to convert")
    p.add_argument("root", help="dataset root (holding gtFine/ for cityscapes, annotations/ for cocostuff)")
    p.add_argument("--workers", type=int, default=4, help="threads (default 4)")
    p.add_argument("--skip-existing", action="store_true", help="keep label files that already exist")


def _run_convert(args) -> int:
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
    p.add_argument("--num-classes", type=int, default=None, help="default: the checkpoint's")
    p.add_argument("--out", required=True, help="output .pth path")


def _load_weights(name: str, checkpoint: str, num_classes: int | None):
    """The named model with a checkpoint's weights and the architecture options of its training
    config; its class count is the checkpoint's unless given."""
    return build_from_checkpoint(checkpoint, name, num_classes)


def _run_export_reference(args) -> int:
    model, report = _load_weights(args.model, args.checkpoint, args.num_classes)
    path = export_reference(model, args.out, meta=report["meta"])
    print(f"wrote {path} (from {report['format']} format)")
    return 0


# -- list ------------------------------------------------------------------------------
def _add_list(sub) -> None:
    _command(sub, "list", _run_list, help="list the named models")


def _run_list(args) -> int:
    for name, spec in sorted(MODEL_SPECS.items()):
        print(f"{name:24s} classes={spec.num_classes:<4d} test={spec.test_mode}")
    return 0


# -- predict ---------------------------------------------------------------------------
def _alpha(text: str) -> float:
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
    p.add_argument("--model", default=None,
                   help="model name, see `edaformer list` (default: the one the checkpoint stores)")
    p.add_argument("--checkpoint", default=None,
                   help="weights (any supported format) or the name of a shipped model (default: the shipped "
                        "edaformer-t-camvid)")
    p.add_argument("--isr", default=None, help="ISR factors, e.g. 2211-222 (default: the setting stored in the "
                   "checkpoint by `edaformer isr-tune --write` or shipped with the model, else the training ratios)")
    p.add_argument("--pool", choices=["avg", "max", "overlap", "merge"], default=None,
                   help="ISR key/value pooling kind (default: the checkpoint's stored one, else avg)")
    p.add_argument("--out", default="predictions", help="output folder (default ./predictions)")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda when available")
    p.add_argument("--num-classes", type=int, default=None, help="default: the checkpoint's")
    p.add_argument("--alpha", type=_alpha, default=0.5, help="overlay opacity in [0, 1] (default 0.5)")
    p.add_argument("--legend", action="store_true", help="add a legend of the classes present to each overlay")
    p.add_argument("--save-probs", action="store_true",
                   help="also write <stem>_probs.png: the top class probability per pixel as 8-bit gray")
    _add_protocol_options(p)


def _predict_checkpoint(checkpoint: str | None) -> str:
    """``--checkpoint``, by default the shipped default model (an error when none is shipped)."""
    if checkpoint is not None:
        return checkpoint
    shipped = available()
    if not shipped:
        raise ValueError("no model is shipped with this install; pass --checkpoint")
    if DEFAULT_NAME not in shipped:
        raise ValueError(f"the default model {DEFAULT_NAME} is not shipped with this install; pass --checkpoint "
                         f"(a checkpoint file, or a shipped model: {', '.join(shipped)})")
    return DEFAULT_NAME


def _run_predict(args) -> int:
    device = resolve_device(args.device)
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise ValueError(f"--out {args.out} is a file; give a folder (it is created if missing)")
    inputs = collect_inputs(args.images)
    for path, why in inputs.skipped:
        print(f"edaformer predict: skipped {path}: {why}", file=sys.stderr)
    if not inputs.files:
        raise ValueError(f"no images ({', '.join(IMAGE_SUFFIXES)}) found in {', '.join(args.images)}")
    segmenter = Segmenter.from_checkpoint(args.model, _predict_checkpoint(args.checkpoint), device=device,
                                          isr=args.isr, num_classes=args.num_classes, test_scale=args.scale,
                                          mode=args.mode, pool=args.pool)
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


# -- package-weights -------------------------------------------------------------------
def _add_package_weights(sub) -> None:
    p = _command(sub, "package-weights", _run_package_weights,
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
    p.add_argument("--pool", choices=["avg", "max", "overlap", "merge"], default=None,
                   help="ISR pooling kind of the recommended setting (default: the checkpoint's stored one, else avg)")
    p.add_argument("--config", default=None,
                   help="training config YAML to store, for a checkpoint that holds none (best_mIoU.pth: the "
                        "work dir's config.yaml); default: the checkpoint's")
    p.add_argument("--out", default=None,
                   help="output .safetensors file, else a folder for NAME.safetensors (default: the package's "
                        "weights folder)")


def _run_package_weights(args) -> int:
    result = package_weights(args.checkpoint, args.name, isr=args.isr, pool=args.pool, out=args.out,
                             config=args.config)
    info = result.info
    print(f"wrote {result.path} ({result.size / 2**20:.2f} MiB, {result.tensors} tensors in float16; "
          f"{info.model}, {info.num_classes} classes, ISR {info.isr} {info.isr_pool}"
          + (f", mIoU {100 * info.mIoU:.2f}" if info.mIoU is not None else "") + ")")
    return 0


# -- train -----------------------------------------------------------------------------
def _add_train(sub) -> None:
    p = _command(sub, "train", _run_train, help="train a model from a config (also under torchrun for DDP)")
    p.add_argument("config", help="YAML config, e.g. configs/edaformer-t-ade20k.yaml")
    p.add_argument("--work-dir", default=None, help="output folder (default work_dirs/<config name>)")
    p.add_argument("--resume", nargs="?", const="auto", default=None, metavar="auto|PATH",
                   help="continue from the newest checkpoint in the work dir (auto, the default) or from PATH")
    p.add_argument("--force", action="store_true",
                   help="start afresh in a work dir that holds an earlier run (its files are moved aside)")
    p.add_argument("--verify-data", choices=["fast", "full", "off"], default="fast",
                   help="check the data before the first step: fast (headers and labels, the default), "
                        "full (also decode every image) or off")
    p.add_argument("--amp", nargs="?", const="bf16", choices=["bf16", "fp16"], default=None,
                   help="mixed precision on CUDA (bf16 when given without a value)")
    p.add_argument("--set", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                   help="config overrides, e.g. optim.lr=1e-4 data.root=/data/ade")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda when available")


def _resume_command(args, work_dir) -> str:
    """The command line that continues this run."""
    cmd = ["edaformer", "train", args.config, "--work-dir", str(work_dir), "--resume", "auto"]
    if args.set:
        cmd += ["--set", *args.set]
    if args.amp:
        cmd += ["--amp", args.amp]
    if args.device:
        cmd += ["--device", args.device]
    return shlex.join(cmd)


def _run_train(args) -> int:
    cfg = load_config(args.config, args.set)
    if args.amp:
        cfg["train"]["amp"] = args.amp
    work_dir = Path(args.work_dir) if args.work_dir else Path("work_dirs") / Path(args.config).stem
    try:
        train(cfg, work_dir, resume=args.resume, device=args.device, force=args.force, verify_data=args.verify_data)
    except (NonFiniteLossError, CheckpointWriteError) as e:
        print(f"edaformer train: error: {e}", file=sys.stderr)
        return 1
    except TrainingInterrupted as e:
        print(f"edaformer train: {e}\ncontinue with: {_resume_command(args, work_dir)}", file=sys.stderr)
        return exit_code(e.signum)
    except TrainingAborted as e:
        print(f"edaformer train: {e}: the checkpoint being written was discarded, the earlier ones are intact\n"
              f"continue with: {_resume_command(args, work_dir)}", file=sys.stderr)
        return exit_code(e.signum)
    return 0


# -- eval ------------------------------------------------------------------------------
def _add_eval(sub) -> None:
    p = _command(sub, "eval", _run_eval, help="evaluate a checkpoint on the config's validation set (mIoU, per class)")
    p.add_argument("config", help="YAML config the model was trained with")
    p.add_argument("--checkpoint", required=True, help="weights (any supported format)")
    p.add_argument("--isr", default=None, help="ISR factors, e.g. 2211-222 (default: eval.isr of the config, else "
                   "the setting stored in the checkpoint by `edaformer isr-tune --write`, else the training ratios)")
    p.add_argument("--pool", choices=["avg", "max", "overlap", "merge"], default=None,
                   help="ISR key/value pooling kind (default: the checkpoint's stored one, else avg)")
    _add_protocol_options(p)
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


def _run_eval(args) -> int:
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


# -- flops -----------------------------------------------------------------------------
def _add_flops(sub) -> None:
    p = _command(sub, "flops", _run_flops, help="count parameters and GFLOPs (the paper's convention)")
    p.add_argument("model", help="model name, see `edaformer list`")
    p.add_argument("--size", type=int, nargs=2, required=True, metavar=("H", "W"), help="input height and width")
    p.add_argument("--isr", default="1111-111", help="ISR factors, encoder-decoder (default: 1111-111)")
    p.add_argument("--num-classes", type=int, default=None, help="default: the model's dataset's")
    p.add_argument("--convention", choices=["mmcv130", "mmcv127"], default="mmcv130",
                   help="mmcv130: LayerNorm counted, as published (default); mmcv127: not counted")
    p.add_argument("--pool", choices=["avg", "max", "overlap", "merge"], default="avg",
                   help="ISR key/value pooling kind (default avg, the reference; see docs/ablations.md)")
    p.add_argument("--decoder-depths", type=int, nargs=3, default=None, metavar=("C4", "C3", "C2"),
                   help="decoder blocks at c4, c3, c2 (default 3 2 1)")
    p.add_argument("--decoder-op", choices=["efa", "attention", "dwconv", "conv"], default=None,
                   help="token mixer of the decoder blocks (default efa)")
    p.add_argument("--train-isr", default=None, help="training ratios raised by these ISR factors (default none)")
    p.add_argument("--json", action="store_true", help="end the output with one JSON line")


def _run_flops(args) -> int:
    setting = parse_isr(args.isr)  # fail on a bad spec before building the model
    options = {k: v for k, v in dict(decoder_depths=args.decoder_depths, decoder_op=args.decoder_op,
                                      train_isr=args.train_isr).items() if v is not None}
    model = create_model(args.model, num_classes=args.num_classes, isr=setting, isr_pool=args.pool, **options)
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
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where to run (default cpu)")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32", help="autocast dtype (default fp32)")
    p.add_argument("--batch", type=int, default=1, help="images per forward pass (default 1)")
    p.add_argument("--runs", type=int, default=10, help="timed runs (default 10)")
    p.add_argument("--warmup", type=int, default=2, help="untimed runs first (default 2)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    p.add_argument("--channels-last", action="store_true", help="channels-last weights and input")
    p.add_argument("--pool", choices=["avg", "max", "overlap", "merge"], default="avg",
                   help="ISR key/value pooling kind (default avg, the reference; see docs/ablations.md)")
    p.add_argument("--checkpoint", default=None, help="weights to load (default: random init)")
    p.add_argument("--num-classes", type=int, default=None,
                   help="default: the checkpoint's, without one the model's dataset's")
    p.add_argument("--json", action="store_true", help="print JSON instead of the table")


def _run_bench(args) -> int:
    if args.batch < 1 or args.runs < 1 or args.warmup < 0:
        raise ValueError("--batch and --runs must be >= 1, --warmup >= 0")
    settings = list(PAPER_ISR_SWEEP) if args.isr_sweep else [str(parse_isr(args.isr or "1111-111"))]
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.checkpoint:
        model, _ = _load_weights(args.model, args.checkpoint, args.num_classes)
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


# -- export ----------------------------------------------------------------------------
_EXPORT_DESCRIPTION = """\
Export a model with its checkpoint to ONNX, one ISR setting baked in. Input "image": float32
(N, 3, H, W), RGB, (pixel - mean) / std on 0-255 pixel values with mean (123.675, 116.28, 103.53)
and std (58.395, 57.12, 57.375). Output "logits": (N, classes, H, W) at the input size.
Test-time resize, as `edaformer predict` does it: fit the image into the dataset's (long, short)
box keeping its aspect ratio (ADE20K / COCO-Stuff (2048, 512), Cityscapes (2048, 1024)), then
round both sides up to a multiple of 32 (Cityscapes models: 1024x1024 windows every 768 pixels
instead). The file's metadata_props carry all of this: model, num_classes, classes, palette, isr,
input, mean, std, test_protocol, resize, output, dynamic."""


def _add_export(sub) -> None:
    p = _command(sub, "export", _run_export, help="export to ONNX with an ISR setting baked in",
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
    p.add_argument("--pool", choices=["avg", "max", "overlap", "merge"], default="avg",
                   help="ISR key/value pooling kind (default avg, the reference; see docs/ablations.md)")
    p.add_argument("--check", action="store_true", help="compare with PyTorch in onnxruntime after export")
    p.add_argument("--out", required=True, help="output .onnx path")


def _run_export(args) -> int:
    require_onnx(*(("onnx", "onnxscript", "onnxruntime") if args.check else ()))
    setting = parse_isr(args.isr)  # fail on a bad spec before building the model
    model, report = _load_weights(args.model, args.checkpoint, args.num_classes)
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


# -- isr-tune --------------------------------------------------------------------------
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


def _add_isr_tune(sub) -> None:
    p = _command(sub, "isr-tune", _run_isr_tune, help="find the best ISR setting within a GFLOPs, latency or mIoU budget",
                 description=_ISR_TUNE_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", help="YAML config the model was trained with")
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


def _run_isr_tune(args) -> int:
    kind, value = next((k, v) for k, v in (("gflops", args.budget_gflops), ("ms", args.budget_ms),
                                           ("max_drop", args.max_drop)) if v is not None)
    budget = Budget(kind, value)
    if args.runs < 1 or args.warmup < 0:
        raise ValueError("--runs must be >= 1 and --warmup >= 0")
    settings = grid_settings(grid="paper") if args.grid else grid_settings(parse_factors(args.factors))
    cfg = load_config(args.config, args.set)
    data_cfg, ecfg = cfg["data"], cfg["eval"]
    dataset = build_dataset({k: v for k, v in data_cfg.items() if k not in ("batch_size", "workers")}, "val")
    model = build_model(cfg["model"], dataset.num_classes, load_pretrained=False)
    report = load_checkpoint(model, args.checkpoint)
    model.to(resolve_device(args.device)).eval()
    protocol = TestProtocol.resolve(model, report["meta"], base=TestProtocol.from_config(cfg), source=args.checkpoint)
    dataset.transforms = test_transforms(protocol.scale, protocol.size_divisor)
    calib = calibration_subset(dataset, args.calib)
    size = ecfg["flops_input_size"] or data_cfg.get("crop_size") or list(getattr(model.spec, "crop_size", (512, 512)))
    print(f"{cfg['model']['name']}: {args.checkpoint} ({report['format']} format), {len(calib)} of {len(dataset)} "
          f"images, {len(settings)} ISR settings, budget {budget}")
    result = tune_isr(model, calib, budget, settings=settings, flops_input_size=size,
                      eval_kwargs=dict(protocol=protocol, workers=data_cfg["workers"]), pool=args.pool, runs=args.runs, warmup=args.warmup)
    print(format_pareto_table(result))
    print(f"{len(result.evaluated)} of {len(result.candidates)} settings evaluated"
          + (f"; left out (do not fit {size[0]}x{size[1]}): {', '.join(result.skipped)}" if result.skipped else ""))
    out = Path(args.out) if args.out else Path("work_dirs") / Path(args.config).stem
    out.mkdir(parents=True, exist_ok=True)
    meta = dict(config=str(args.config), checkpoint=str(args.checkpoint), model=cfg["model"]["name"],
                images=len(calib), pool=args.pool, grid=args.grid or f"factors {args.factors}")
    (out / "isr_tune.json").write_text(json.dumps({"meta": meta, **result.to_dict()}, indent=2))
    print(f"wrote {out / 'isr_tune.json'}")
    png = plot_result(result, out / "isr_tune.png", title=f"{cfg['model']['name']}: {budget}")
    print(f"wrote {png}" if png else "no plot: matplotlib is not installed (pip install matplotlib)")
    if args.write is not None:
        path = write_isr_checkpoint(args.checkpoint, result, args.write or None, pool=args.pool)
        print(f"wrote {path} (meta.isr = {result.chosen.isr})")
    c = result.chosen
    if args.json:
        print(json.dumps(result.summary()))
    else:
        print(f"best within {budget}: ISR {c.isr}, {c.gflops:.4g} GFLOPs, {c.ms:.1f} ms, mIoU {100 * c.mIoU:.2f}")
    return 0


COMMANDS = (_add_list, _add_predict, _add_train, _add_eval, _add_isr_tune, _add_flops, _add_bench, _add_export,
            _add_export_reference, _add_package_weights, _add_convert)

_DESCRIPTION = ("EDAFormer semantic segmentation: train, evaluate, segment images, count FLOPs, benchmark and "
                "export, with Inference Spatial Reduction (ISR) chosen at run time.")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edaformer", description=_DESCRIPTION, parents=[_VERBOSE])
    parser.add_argument("--version", action="version", version=f"edaformer {__version__}",
                        help="print the version and exit")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                help="`edaformer COMMAND --help` for its options")
    for add in COMMANDS:
        add(sub)
    return parser


class _OthersQuiet(logging.Filter):
    """Pass this package's records, and other libraries' from ``level`` up."""

    def __init__(self, level: int):
        super().__init__()
        self.level = level

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= self.level or record.name == "edaformer" or record.name.startswith("edaformer.")


def _configure_logging(verbose: bool) -> None:
    """INFO from this package (DEBUG with -v); other libraries only warn (INFO with -v)."""
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S"))
    handler.addFilter(_OthersQuiet(logging.INFO if verbose else logging.WARNING))
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, handlers=[handler])


_WORKER_TRACEBACK = "Original Traceback (most recent call last):"


def error_message(error: BaseException) -> str:
    """An exception's own message; for one re-raised from a DataLoader worker, without the worker
    traceback that torch puts into the message."""
    text = str(error)
    if _WORKER_TRACEBACK in text:
        tail = text[text.rindex(_WORKER_TRACEBACK):]
        name = re.escape(type(error).__name__)
        lines = list(re.finditer(rf"(?m)^(?:[\w.]+\.)?{name}: ", tail)) or list(re.finditer(r"(?m)^[A-Za-z_][\w.]*: ", tail))
        if lines:
            text = tail[lines[-1].end():]
    return text.strip()


# Errors of the user's input: printed as one message, exit status 2.
_USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, OSError)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    verbose = bool(getattr(args, "verbose", False))
    _configure_logging(verbose)
    prog = f"edaformer {args.command}"

    try:
        if getattr(args, "device", None) is not None:
            resolve_device(args.device)  # every --device fails the same way, before any work
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)  # on a fresh line after ^C or a progress bar
        return 130
    except (*_USER_ERRORS, OnnxExtrasMissing) as e:
        log.debug("traceback", exc_info=True)
        print(f"{prog}: error: {error_message(e)}", file=sys.stderr)
        return 2
    except Exception as e:
        if verbose:
            raise
        print(f"{prog}: error: {type(e).__name__}: {error_message(e)} (rerun with -v for the traceback)",
              file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
