"""``torchrun -m edaformer predict``: the images split over the processes, the outputs those of one."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from PIL import Image

import edaformer
from edaformer.checkpoint import save_checkpoint
from edaformer.cli import main
from edaformer.engine.state import checkpoint_payload
from edaformer.inference import TestProtocol

from tests.helpers.stubs import ADE, rgb

SRC = Path(__file__).resolve().parents[2] / "src"

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.slow,
              pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()), reason="needs gloo")]


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_two_processes_write_what_one_writes(tmp_path, capsys):
    torch.manual_seed(0)
    model = edaformer.create_model(ADE, num_classes=3)
    meta = {"test_protocol": TestProtocol(scale=(64, 48), divisor=32).to_dict()}
    ckpt = save_checkpoint(checkpoint_payload(model, meta, config={"model": {"name": ADE}}), tmp_path / "tiny.pth")
    images = tmp_path / "images"
    images.mkdir()
    for i in range(5):  # sorted: rank 0 takes 0, 2, 4 and rank 1 takes 1, 3
        Image.fromarray(rgb(30 + i, 41, i)).save(images / f"im{i}.png")
    (images / "im3.png").write_bytes(b"\x89PNG not an image")
    args = ["predict", str(images), "--checkpoint", str(ckpt), "--device", "cpu", "--save-probs"]

    assert main(args + ["--out", str(tmp_path / "one")]) == 1
    capsys.readouterr()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1")
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          "-m", "edaformer", *args, "--out", str(tmp_path / "two")],
                         env=env, capture_output=True, text=True, timeout=180)
    assert run.returncode != 0  # the rank with the unreadable image fails, and torchrun with it
    # reported once, by name (the processes share stderr: the line may follow rank 0's progress bar)
    assert run.stderr.count("edaformer predict: ") == 1
    assert (f"edaformer predict: cannot read image {images / 'im3.png'}: cannot identify image file "
            f"'{images / 'im3.png'}'\n") in run.stderr
    assert run.stdout.splitlines() == [f"wrote 4 prediction(s) to {tmp_path / 'two'}; 1 failed: {images / 'im3.png'}"]
    one, two = _files(tmp_path / "one"), _files(tmp_path / "two")
    assert sorted(two) == sorted(f"im{i}_{k}.png" for i in (0, 1, 2, 4) for k in ("label", "overlay", "probs"))
    assert two == one  # byte for byte
