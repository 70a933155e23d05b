"""``edaformer pretrain``: ImageNet-style pretraining of the EFT encoder (:mod:`edaformer.engine.pretrain`).

:func:`add_parser` declares the sub-command on the ``edaformer`` sub-parsers and binds
:func:`run` to it; the command line module only has to call it.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from pathlib import Path

from .common import command
from ..checkpoint import CheckpointWriteError
from ..config import PRETRAINING, load_config, resolve_config
from ..engine.pretrain import pretrain
from ..engine.signals import TrainingAborted, TrainingInterrupted, exit_code
from ..engine.train import NonFiniteLossError

__all__ = ["add_parser", "run", "resume_command"]

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
    p.add_argument("config", help="YAML config or a shipped config's name, e.g. eft-t-imagenet")
    p.add_argument("--work-dir", default=None, help="output folder (default work_dirs/<config name>)")
    p.add_argument("--resume", nargs="?", const="auto", default=None, metavar="auto|PATH",
                   help="continue from the newest checkpoint in the work dir (auto, the default) or from PATH")
    p.add_argument("--force", action="store_true",
                   help="start afresh in a work dir that holds an earlier run (its files are moved aside)")
    p.add_argument("--amp", nargs="?", const="bf16", choices=["bf16", "fp16"], default=None,
                   help="mixed precision on CUDA (bf16 when given without a value; default: the config's train.amp)")
    p.add_argument("--set", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                   help="config overrides, e.g. data.root=/data/imagenet optim.lr=5e-4")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda when available")
    p.add_argument("--json", action="store_true",
                   help="end the output with one JSON line: top1, top5 (validation, percent), checkpoint (the "
                        "encoder weights file), epochs, ...")
    return p


def resume_command(args, work_dir: Path) -> str:
    """The command line that continues this run."""
    cmd = ["edaformer", "pretrain", args.config, "--work-dir", str(work_dir), "--resume", "auto"]
    if args.set:
        cmd += ["--set", *args.set]
    if args.amp:
        cmd += ["--amp", args.amp]
    if args.device:
        cmd += ["--device", args.device]
    return shlex.join(cmd)


def run(args) -> int:
    path = resolve_config(args.config)
    cfg = load_config(path, args.set, PRETRAINING)
    if args.amp:
        cfg["train"]["amp"] = args.amp
    work_dir = Path(args.work_dir) if args.work_dir else Path("work_dirs") / path.stem
    try:
        result = pretrain(cfg, work_dir, resume=args.resume, device=args.device, force=args.force)
    except (NonFiniteLossError, CheckpointWriteError) as e:
        print(f"edaformer pretrain: error: {e}", file=sys.stderr)
        return 1
    except TrainingInterrupted as e:
        print(f"edaformer pretrain: {e}\ncontinue with: {resume_command(args, work_dir)}", file=sys.stderr)
        return exit_code(e.signum)
    except TrainingAborted as e:
        print(f"edaformer pretrain: {e}: the checkpoint being written was discarded, the earlier ones are intact\n"
              f"continue with: {resume_command(args, work_dir)}", file=sys.stderr)
        return exit_code(e.signum)
    if int(os.environ.get("RANK", 0)) == 0:  # torchrun: one report, from rank 0
        top1 = result["top1"]
        print(f"{result['model']}: {result['epochs']} epochs, validation top-1 "
              f"{'?' if top1 is None else f'{top1:.2f}'}"
              f"{' (EMA weights)' if result['ema'] else ''}; encoder weights {result['checkpoint']}")
        if args.json:
            print(json.dumps(result))
    return 0
