"""``edaformer train``: train a model from a config."""
from __future__ import annotations

from pathlib import Path

from ..config import load_config
from ..engine import train
from .common import add_run_options, command, run_training


def add_parser(sub) -> None:
    p = command(sub, "train", run, help="train a model from a config (also under torchrun for DDP)")
    add_run_options(p, "a YAML file or a shipped config name (`edaformer configs`), e.g. edaformer-t-ade20k",
                    "optim.lr=1e-4 data.root=/data/ade")
    p.add_argument("--verify-data", choices=["fast", "full", "off"], default="fast",
                   help="check the data before the first step: fast (headers and labels, the default), "
                        "full (also decode every image) or off")


def run(args) -> int:
    cfg = load_config(args.config, args.set)
    if args.amp:
        cfg["train"]["amp"] = args.amp
    work_dir = Path(args.work_dir) if args.work_dir else Path("work_dirs") / Path(args.config).stem
    status, _ = run_training("train", args, work_dir, lambda: train(
        cfg, work_dir, resume=args.resume, device=args.device, force=args.force, verify_data=args.verify_data))
    return status
