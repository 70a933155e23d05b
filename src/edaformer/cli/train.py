"""``edaformer train``: train a model from a config."""
from __future__ import annotations

import sys

from .common import command
import shlex
from pathlib import Path
from ..checkpoint import CheckpointWriteError
from ..config import load_config
from ..engine import NonFiniteLossError, TrainingAborted, TrainingInterrupted, train
from ..engine.signals import exit_code


def add_parser(sub) -> None:
    p = command(sub, "train", run, help="train a model from a config (also under torchrun for DDP)")
    p.add_argument("config", help="a YAML file or a shipped config name (`edaformer configs`), e.g. "
                   "edaformer-t-ade20k")
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


def run(args) -> int:
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
