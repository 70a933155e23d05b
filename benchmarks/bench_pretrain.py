"""Pretraining-step benchmark: images/s of one ``edaformer pretrain`` update, its FLOPs, and what 300
ImageNet-1K epochs cost from them.

One step is the update of :mod:`edaformer.engine.pretrain` with the shipped recipe
(``eft-t-imagenet`` / ``eft-b-imagenet``): Mixup / CutMix on a batch of already augmented
``batch x 3 x size x size`` images, forward with stochastic depth, soft-target cross-entropy,
backward, AdamW step (timm's ``create_optimizer_v2``), under autocast with ``--amp``. The data
pipeline (JPEG decoding and the training transform: random-resized crop, flip, RandAugment,
random erasing) is timed apart with ``--pipeline DIR`` (JPEG files, e.g. CamVid's 480x360
frames, about ImageNet's typical size), images/s on one core, as each loader worker runs it.

Reported per model: forward GMACs at ``size`` (the paper's convention, ``edaformer flops``),
training GFLOP per image (3 passes x 2 FLOP per multiply-add), step time (median of ``--runs``),
images/s, the FLOP/s that is, and the GPU-hours of 300 epochs of ImageNet-1K (1,281,167 images)
at ``--gpu-tflops`` peak and each ``--utilization``.

    python benchmarks/bench_pretrain.py --threads 2 --batch 32 --runs 5 \\
        --pipeline ../shared/datasets/camvid/images/train --json benchmarks/results/pretrain_cpu.json
    python benchmarks/bench_pretrain.py --device cuda --amp bf16 --batch 128 --runs 20   # on a GPU
"""
from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import torch  # noqa: E402

from edaformer import bench as bm  # noqa: E402
from edaformer.config import PRETRAINING, load_config  # noqa: E402
from edaformer.engine.pretrain import (build_classifier, build_criterion, build_mixup,  # noqa: E402
                                       build_pretrain_optimizer)
from edaformer.utils import resolve_device  # noqa: E402

import harness  # noqa: E402

CONFIGS = Path(__file__).resolve().parents[1] / "src" / "edaformer" / "configs"
IMAGENET_TRAIN = 1_281_167


def recipe(model: str) -> dict:
    return load_config(CONFIGS / f"{model.replace('_', '-')}-imagenet.yaml", [], PRETRAINING)


def make_step(cfg: dict, batch: int, size: int, device: torch.device, amp: str | None):
    """A no-argument pretraining update on fixed random (already augmented) images."""
    classes = 1000
    torch.manual_seed(0)
    model = build_classifier(cfg["model"], classes).to(device).train()
    optimizer = build_pretrain_optimizer(model, cfg["optim"])
    mixup = build_mixup(cfg["mixup"], cfg["loss"]["label_smoothing"], classes)
    criterion = build_criterion(mixup, cfg["loss"]["label_smoothing"])
    dtype = bm.resolve_dtype(amp) if amp else None
    scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, size, size, generator=g).to(device)
    y = torch.randint(0, classes, (batch,), generator=g).to(device)

    def step():
        images, targets = mixup(x, y) if mixup is not None else (x, y)
        with bm.autocast_context(device, dtype):
            loss = criterion(model(images), targets)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        return loss.detach()
    return step, model


def pipeline_rate(folder: Path, size: int, seconds: float) -> dict:
    """Images/s of decode + the training transform on this core, cycling over ``folder``'s JPEGs."""
    from PIL import Image

    from edaformer.data.classification import train_transform
    from edaformer.engine.pretrain import _mean_std

    files = sorted(folder.glob("*.jpg")) + sorted(folder.glob("*.JPEG"))
    if not files:
        raise SystemExit(f"--pipeline {folder}: no .jpg / .JPEG files")
    cfg = recipe("eft_t")["data"]
    transform = train_transform(dict(cfg, img_size=size), *_mean_std("eft_t"))
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds or n < 20:
        with Image.open(files[n % len(files)]) as im:
            transform(im.convert("RGB"))
        n += 1
    elapsed = time.perf_counter() - t0
    with Image.open(files[0]) as im:
        shape = im.size
    return dict(images=n, seconds=elapsed, images_per_s=n / elapsed, example_size=list(shape), files=len(files))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["eft_t", "eft_b"])
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--amp", choices=["bf16", "fp16"], default=None, help="autocast dtype (default: float32)")
    p.add_argument("--pipeline", type=Path, default=None, metavar="DIR",
                   help="also time decode + training transform of DIR's JPEGs on one core")
    p.add_argument("--pipeline-seconds", type=float, default=10.0)
    p.add_argument("--gpu-tflops", type=float, default=989.0,
                   help="GPU dense bf16 peak for the estimate (default 989: H100 SXM; A100: 312)")
    p.add_argument("--utilization", type=float, nargs="+", default=[0.05, 0.1, 0.2],
                   help="model-FLOP utilisations of that peak to estimate with")
    p.add_argument("--epochs", type=int, default=300)
    p.add_argument("--json", default=None, metavar="PATH|-")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    images = args.epochs * IMAGENET_TRAIN
    rows = []
    for name in args.models:
        cfg = recipe(name)
        step, model = make_step(cfg, args.batch, args.size, device, args.amp)
        gmacs = bm.gflops(copy.deepcopy(model).cpu().eval(), (args.size, args.size))
        timing = bm.time_callable(step, runs=args.runs, warmup=args.warmup, device=device)
        train_gflop = 6 * gmacs                       # forward 2 FLOP / MAC, backward twice the forward
        per_s = args.batch / timing.median
        row = dict(model=name, params_m=sum(q.numel() for q in model.parameters()) / 1e6, fwd_gmacs=gmacs,
                   train_gflop_per_image=train_gflop, batch=args.batch, step_s=timing.median, iqr_s=timing.iqr,
                   images_per_s=per_s, achieved_gflops=per_s * train_gflop,
                   epochs_flop=images * train_gflop * 1e9, measured_device_hours=images / per_s / 3600)
        row["gpu_hours"] = {f"{u:g}": images * train_gflop * 1e9 / (args.gpu_tflops * 1e12 * u) / 3600
                            for u in args.utilization}
        rows.append(row)
        del step, model
    pipe = pipeline_rate(args.pipeline, args.size, args.pipeline_seconds) if args.pipeline else None
    env = bm.environment()
    lines = [f"pretraining step, {args.size}x{args.size}, batch {args.batch}, {device.type} {args.amp or 'fp32'}, "
             f"{args.runs} runs after {args.warmup} warm-up; torch {env['torch']}, {env['torch_threads']} thread(s)"]
    lines.append(f"{'model':8s} {'params M':>8s} {'fwd GMACs':>9s} {'train GFLOP/img':>15s} {'step s':>8s} "
                 f"{'img/s':>8s} {'GFLOP/s':>8s}  {args.epochs} epochs here (h)")
    for r in rows:
        lines.append(f"{r['model']:8s} {r['params_m']:8.2f} {r['fwd_gmacs']:9.3f} {r['train_gflop_per_image']:15.2f} "
                     f"{r['step_s']:8.3f} {r['images_per_s']:8.2f} {r['achieved_gflops']:8.1f}  "
                     f"{r['measured_device_hours']:.0f}")
    lines.append(f"GPU-hours for {args.epochs} epochs of ImageNet-1K at {args.gpu_tflops:g} TFLOP/s peak:")
    for r in rows:
        lines.append(f"  {r['model']}: {r['epochs_flop']:.3g} FLOP; " + ", ".join(
            f"{float(u) * 100:.0f}% -> {h:.1f} GPU-h ({h / 8:.1f} h on 8 GPUs)" for u, h in r["gpu_hours"].items()))
    if pipe:
        lines.append(f"data pipeline (decode {pipe['example_size'][0]}x{pipe['example_size'][1]} JPEG + training "
                     f"transform to {args.size}): {pipe['images_per_s']:.1f} images/s on one core")
    result = dict(environment=env, size=args.size, batch=args.batch, device=device.type, amp=args.amp,
                  runs=args.runs, warmup=args.warmup, gpu_tflops=args.gpu_tflops, epochs=args.epochs,
                  imagenet_train_images=IMAGENET_TRAIN, rows=rows, pipeline=pipe)
    harness.emit_report(result, "\n".join(lines), args.json)


if __name__ == "__main__":
    main()
