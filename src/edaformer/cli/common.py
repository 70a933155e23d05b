"""What the commands share: the ``-v`` option, the sub-parser helper, the test-protocol options,
the options and endings of the training commands."""
from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..checkpoint import CheckpointWriteError
from ..engine import NonFiniteLossError, TrainingAborted, TrainingInterrupted
from ..engine.signals import exit_code
from ..models import TEST_MODES

VERBOSE = argparse.ArgumentParser(add_help=False)
VERBOSE.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="debug logging")


def command(sub, name: str, run, **kwargs) -> argparse.ArgumentParser:
    """A sub-command parser bound to ``run``; ``-v`` works after the sub-command too."""
    p = sub.add_parser(name, parents=[VERBOSE], **kwargs)
    p.set_defaults(func=run)
    return p


def add_protocol_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--scale", type=int, nargs=2, default=None, metavar=("LONG", "SHORT"),
                   help="resize box of the test protocol (default: the checkpoint's, else the model's / config's)")
    p.add_argument("--mode", choices=TEST_MODES, default=None,
                   help="whole image or sliding window (default: the checkpoint's, else the model's / config's)")


# -- what `train` and `pretrain` share -----------------------------------------------------------------
def add_run_options(p: argparse.ArgumentParser, config_help: str, set_example: str) -> None:
    """The config, work-dir, resume, precision, override and device options of a training command."""
    p.add_argument("config", help=config_help)
    p.add_argument("--work-dir", default=None, help="output folder (default work_dirs/<config name>)")
    p.add_argument("--resume", nargs="?", const="auto", default=None, metavar="auto|PATH",
                   help="continue from the newest checkpoint in the work dir (auto, the default) or from PATH")
    p.add_argument("--force", action="store_true",
                   help="start afresh in a work dir that holds an earlier run (its files are moved aside)")
    p.add_argument("--amp", nargs="?", const="bf16", choices=["bf16", "fp16"], default=None,
                   help="mixed precision on CUDA (bf16 when given without a value; default: the config's train.amp)")
    p.add_argument("--set", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                   help=f"config overrides, e.g. {set_example}")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda when available")


def resume_command(name: str, args, work_dir: Path) -> str:
    """The command line that continues the run of command ``name`` started with ``args``."""
    cmd = ["edaformer", name, args.config, "--work-dir", str(work_dir), "--resume", "auto"]
    if args.set:
        cmd += ["--set", *args.set]
    if args.amp:
        cmd += ["--amp", args.amp]
    if args.device:
        cmd += ["--device", args.device]
    return shlex.join(cmd)


def run_training(name: str, args, work_dir: Path, start: Callable[[], Any]) -> tuple[int, Any]:
    """Call ``start()`` and turn the ways a run ends early into a message and an exit status:
    ``(0, result)`` when it finished, ``(status, None)`` otherwise (interrupted runs print the
    command that continues them)."""
    try:
        return 0, start()
    except (NonFiniteLossError, CheckpointWriteError) as e:
        print(f"edaformer {name}: error: {e}", file=sys.stderr)
        return 1, None
    except TrainingInterrupted as e:
        print(f"edaformer {name}: {e}\ncontinue with: {resume_command(name, args, work_dir)}", file=sys.stderr)
        return exit_code(e.signum), None
    except TrainingAborted as e:
        print(f"edaformer {name}: {e}: the checkpoint being written was discarded, the earlier ones are intact\n"
              f"continue with: {resume_command(name, args, work_dir)}", file=sys.stderr)
        return exit_code(e.signum), None
