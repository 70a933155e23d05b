"""``edaformer pretrain``: ImageNet-style pretraining of the EFT encoder (:mod:`edaformer.engine.pretrain`).

:func:`add_parser` declares the sub-command on the ``edaformer`` sub-parsers and binds
:func:`run` to it; the command line module only has to call it.
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from ..config import PRETRAINING, load_config, resolve_config
from ..engine.pretrain import pretrain
from .common import add_run_options, command, run_training

__all__ = ["add_parser", "run"]

_DESCRIPTION = """\
Pretrain an encoder as an image classifier, as the EDAFormer paper did on ImageNet-1K with the
PVTv2 (DeiT) recipe: AdamW, cosine schedule with warm-up, RandAugment, random erasing, Mixup and
CutMix, label smoothing, stochastic depth, repeated augmentation; EMA optional. CONFIG is a file
or the name of a shipped config (eft-t-imagenet, eft-b-imagenet). Several GPUs or machines:
torchrun --nproc-per-node 8 -m edaformer pretrain CONFIG ... (data.batch_size is per process;
optim.lr is the peak rate as given). After every validation the weights are written to
WORK_DIR/encoder.pth, which `edaformer train CONFIG --set model.encoder_weights=WORK_DIR/encoder.pth`
and timm.create_model(NAME, pretrained=True, pretrained_cfg_overlay=dict(file=...)) load."""


def add_parser(sub) -> argparse.ArgumentParser:
    """Add ``pretrain`` to the sub-parsers ``sub``."""
    p = command(sub, "pretrain", run, help="pretrain an encoder on ImageNet-style classification (also under torchrun)",
                description=_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_options(p, "YAML config or a shipped config's name, e.g. eft-t-imagenet",
                    "data.root=/data/imagenet optim.lr=5e-4")
    p.add_argument("--json", action="store_true",
                   help="end the output with one JSON line: top1, top5 (validation, percent), checkpoint (the "
                        "encoder weights file), epochs, ...")
    return p


def run(args) -> int:
    path = resolve_config(args.config)
    cfg = load_config(path, args.set, PRETRAINING)
    if args.amp:
        cfg["train"]["amp"] = args.amp
    work_dir = Path(args.work_dir) if args.work_dir else Path("work_dirs") / path.stem
    status, result = run_training("pretrain", args, work_dir, lambda: pretrain(
        cfg, work_dir, resume=args.resume, device=args.device, force=args.force))
    if status:
        return status
    if int(os.environ.get("RANK", 0)) == 0:  # torchrun: one report, from rank 0
        top1 = result["top1"]
        print(f"{result['model']}: {result['epochs']} epochs, validation top-1 "
              f"{'?' if top1 is None else f'{top1:.2f}'}"
              f"{' (EMA weights)' if result['ema'] else ''}; encoder weights {result['checkpoint']}")
        if args.json:
            print(json.dumps(result))
    return 0
