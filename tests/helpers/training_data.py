"""Tiny folder datasets and configs for training tests (32x32 images of coloured blocks)."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
import yaml
from PIL import Image

from edaformer.config import configs_dir

REPO = Path(__file__).resolve().parents[2]
CAMVID = REPO.parent / "shared" / "datasets" / "camvid"  # ../shared beside the repository
DEFAULT_YAML = configs_dir() / "_base_" / "default.yaml"  # the shipped defaults
CLASSES = ["red", "green", "blue", "yellow"]
COLORS = np.array([[220, 40, 40], [40, 200, 60], [50, 60, 230], [230, 230, 40]], np.uint8)


def make_dataset(root: Path, n: int = 4, size: int = 32, seed: int = 0, sizes=None) -> Path:
    """``n`` images per split (or one per ``(h, w)`` of ``sizes``; default ``size`` x ``size``): a 4x4
    grid of coloured blocks, label = colour index; a few ignored (255) pixels. The val split holds
    the same images."""
    rng = np.random.default_rng(seed)
    for i, (h, w) in enumerate(sizes if sizes is not None else [(size, size)] * n):
        grid = rng.integers(0, len(CLASSES), (4, 4))
        label = np.kron(grid, np.ones((-(-h // 4), -(-w // 4)), np.int64))[:h, :w].astype(np.uint8)
        image = COLORS[label].astype(np.int16) + rng.integers(-12, 12, (h, w, 3))
        label[0, :3] = 255
        for split in ("train", "val"):
            (root / "images" / split).mkdir(parents=True, exist_ok=True)
            (root / "annotations" / split).mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(root / "images" / split / f"{i}.png")
            Image.fromarray(label).save(root / "annotations" / split / f"{i}.png")
    return root


def write_config(path: Path, data_root: Path, size: int = 32, **sections) -> Path:
    """A config inheriting the repository's default.yaml: edaformer-t, 4 classes, no augmentation."""
    cfg = {
        "_base_": str(DEFAULT_YAML),
        "model": {"name": "edaformer-t-ade20k", "num_classes": 4, "drop_path_rate": 0.0,
                  "decoder_drop_path": 0.0, "dropout": 0.0},
        "data": {"type": "folder", "root": str(data_root), "classes": CLASSES, "img_suffix": ".png",
                 "scale": [size, size], "ratio_range": [1.0, 1.0], "crop_size": [size, size],
                 "cat_max_ratio": 1.0, "flip_prob": 0.0, "photometric": False, "batch_size": 2, "workers": 0},
        "optim": {"lr": 1e-4},
        "schedule": {"iters": 6, "warmup_iters": 2},
        "train": {"checkpoint_interval": 2, "eval_interval": 0, "log_interval": 1, "keep_checkpoints": 2,
                  "deterministic": True},
    }
    for section, values in sections.items():
        cfg.setdefault(section, {}).update(values)
    path.write_text(yaml.safe_dump(cfg))
    return path


def state(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a if a[k].is_floating_point())


def subprocess_env() -> dict:
    """The environment of a training subprocess: one thread, unbuffered, this checkout's package."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO / "src"), env.get("PYTHONPATH")]))
    return env
