"""The numbers and pictures of a model card: per-class metrics, an ISR sweep with CPU latency, the
ISR auto-tuner's pick, a confusion matrix, training curves and a grid of overlays on val images.

    python benchmarks/model_card.py CONFIG --checkpoint CK --log RUN/log.jsonl --out docs/model-card-camvid \
        [--set data.root=...] [--threads 2] [--max-drop 1.0] [--calib 40] [--no-tune]

Writes into ``--out``: ``card.json`` (everything below), ``per_class.md``, ``isr_sweep.md``,
``curves.png``, ``confusion.png`` / ``confusion.csv``, ``isr_sweep.png``, ``overlays.png``.
Latency: one forward at the most common val test size, batch 1, median of ``--runs`` round-robin
calls over the settings in one process (ratios between settings are fair on a shared machine).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

import edaformer  # noqa: F401  (registers the models)
from edaformer import bench
from edaformer.checkpoint import build_from_checkpoint
from edaformer.config import load_config
from edaformer.data import build_dataset, dataset_config, eval_transforms
from edaformer.engine import evaluate, isr_sweep
from edaformer.engine.evaluate import common_test_size, save_confusion
from edaformer.engine.isr_tune import Budget, calibration_subset, grid_settings, tune_isr
from edaformer.inference import Segmenter, TestProtocol
from edaformer.inference.visualize import colorize, overlay
from edaformer.metrics import format_class_table, format_metrics
from edaformer.plotting import plot_sweep, plot_training_log

SWEEP = ("1111-111", "1111-222", "2211-222", "2222-222")


def latency_ms(model, settings, size, runs: int) -> dict[str, float]:
    x = torch.randn(1, 3, *size)

    def call(spec):
        def fn():
            with torch.inference_mode(), edaformer.isr(model, spec):
                model(x)
        return fn

    timings = bench.time_interleaved({s: call(s) for s in settings}, runs=runs, warmup=1)
    return {s: 1000 * t.median for s, t in timings.items()}


def overlay_grid(segmenter: Segmenter, dataset, indices, path: Path, width: int = 280) -> Path:
    """Rows of (image, prediction overlay, ground truth) for val images ``indices``."""
    tiles = []
    for i in indices:
        image, label = dataset.load(i)
        rgb = np.asarray(image.permute(1, 2, 0))
        pred = segmenter(rgb)
        gt = np.asarray(label).copy()
        truth = colorize(np.where(gt < len(segmenter.palette), gt, 0), segmenter.palette)
        truth_arr = np.asarray(truth.convert("RGB")).copy()
        truth_arr[gt >= len(segmenter.palette)] = 0
        row = [Image.fromarray(rgb), overlay(rgb, pred, segmenter.palette, alpha=0.6).convert("RGB"),
               Image.fromarray(truth_arr)]
        h = round(rgb.shape[0] * width / rgb.shape[1])
        tiles.append([t.resize((width, h), Image.BILINEAR) for t in row])
    h = tiles[0][0].height
    grid = Image.new("RGB", (3 * width + 8, len(tiles) * (h + 4) + 18), "white")
    draw = ImageDraw.Draw(grid)
    for c, title in enumerate(("image", "prediction", "ground truth (black: unlabelled)")):
        draw.text((c * (width + 4) + 4, 3), title, fill="black")
    for r, row in enumerate(tiles):
        for c, tile in enumerate(row):
            grid.paste(tile, (c * (width + 4), 18 + r * (h + 4)))
    grid.save(path)
    return path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("config")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--log", default=None, help="the run's log.jsonl (training curves)")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--runs", type=int, default=10, help="timed forwards per ISR setting")
    p.add_argument("--max-drop", type=float, default=1.0, help="auto-tuner: mIoU points it may give up")
    p.add_argument("--calib", type=int, default=None, help="auto-tuner: val images it scores on (default all)")
    p.add_argument("--overlays", type=int, default=6, help="val images in the overlay grid")
    p.add_argument("--val-name", default="CamVid val", help="what the config's val split is, for the plot titles")
    p.add_argument("--tune", action=argparse.BooleanOptionalAction, default=True,
                   help="run the ISR auto-tuner on the val split (--no-tune when that split is training data)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = args.out
    out.mkdir(parents=True, exist_ok=True)

    cfg = load_config(args.config, args.set)
    dataset = build_dataset(dataset_config(cfg["data"]), "val")
    model, report = build_from_checkpoint(args.checkpoint)
    model.eval()
    protocol = TestProtocol.resolve(model, report["meta"], base=TestProtocol.from_config(cfg), source=args.checkpoint)
    dataset.transforms = eval_transforms(protocol.scale, protocol.size_divisor)
    size, _, _ = common_test_size(dataset, protocol)
    card = dict(environment=bench.environment(), checkpoint=str(args.checkpoint), config=str(args.config),
                iteration=report["meta"].get("iteration"), protocol=protocol.to_dict(), test_size=list(size))

    metrics = evaluate(model, dataset, protocol, workers=0, progress=True)
    classes = list(dataset.classes)
    print(format_metrics(metrics))
    table = format_class_table(metrics, classes)
    print(table)
    (out / "per_class.md").write_text(table + "\n")
    card["metrics"] = {k: v for k, v in metrics.items() if k != "confusion"}
    save_confusion(metrics["confusion"], out / "confusion.png", classes, title=f"{args.val_name}, row-normalised")

    rows = isr_sweep(model, dataset, SWEEP, flops_input_size=size, protocol=protocol, workers=0, progress=True)
    settings = [r["isr"] for r in rows]
    tuned = None
    if not args.tune:
        print("isr tuner: skipped (--no-tune)", file=sys.stderr)
    else:
        try:
            calib = calibration_subset(dataset, args.calib)
            result = tune_isr(model, calib, Budget("max_drop", args.max_drop), settings=grid_settings((1, 2)),
                              flops_input_size=size, eval_kwargs=dict(protocol=protocol, workers=0))
            tuned = result.chosen.isr
            card["tuner"] = dict(max_drop=args.max_drop, calib_images=len(calib), pick=tuned,
                                 gflops=result.chosen.gflops, calib_mIoU=result.chosen.mIoU,
                                 settings=len(result.candidates), evaluated=len(result.evaluated))
        except Exception as e:  # the card is still useful without the tuner row
            print(f"isr tuner: {e}", file=sys.stderr)
    if tuned and tuned not in settings:
        rows += isr_sweep(model, dataset, [tuned], flops_input_size=size, protocol=protocol, workers=0)
        settings.append(tuned)
    ms = latency_ms(model, settings, size, args.runs)
    ref = rows[0]["mIoU"]
    lines = [f"| ISR | GFLOPs {size[0]}x{size[1]} | CPU ms ({args.threads} threads) | mIoU | change |", "|---|---|---|---|---|"]
    for r in rows:
        r["ms"] = ms[r["isr"]]
        pick = " (tuner's pick)" if r["isr"] == tuned else ""
        lines.append(f"| {r['isr']}{pick} | {r['gflops']:.2f} | {r['ms']:.0f} | {100 * r['mIoU']:.2f} | "
                     f"{100 * (r['mIoU'] - ref):+.2f} |")
    (out / "isr_sweep.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    card["isr_sweep"] = rows
    plot_sweep(rows, out / "isr_sweep.png", title=f"EDAFormer-T, {args.val_name}: ISR sweep")
    if args.log:
        plot_training_log(args.log, out / "curves.png", title="EDAFormer-T on CamVid, from scratch")
    segmenter = Segmenter(model, isr="1111-111", protocol=protocol, classes=classes, palette=dataset.palette)
    step = max(1, len(dataset) // args.overlays)
    overlay_grid(segmenter, dataset, list(range(0, len(dataset), step))[: args.overlays], out / "overlays.png")
    (out / "card.json").write_text(json.dumps(card, indent=1, default=lambda o: None if isinstance(o, float) and math.isnan(o) else str(o)))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
