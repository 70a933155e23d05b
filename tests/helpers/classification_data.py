"""A small image-classification set cut from real CamVid street frames, and pretraining configs for tests.

Each frame is cut into 96x96 patches; a patch is labelled by the class covering most of it (at
least ``purity`` of its pixels) when that class is one of ``CLASSES``. Training patches come from
CamVid's training frames, held-out ones from its validation frames (other drives and scenes).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import yaml
from PIL import Image

REPO = Path(__file__).resolve().parents[2]
CAMVID = REPO.parent / "shared" / "datasets" / "camvid"
SHIPPED_CONFIGS = REPO / "src" / "edaformer" / "configs"
CAMVID_IDS = {"sky": 0, "building": 1, "road": 3, "tree": 5}  # CamVid class ids (11 is void)
CLASSES = sorted(CAMVID_IDS)


def camvid_patches(root: Path, train_frames: int = 40, val_frames: int = 50, patch: int = 96,
                   purity: float = 0.7, cap: tuple[int, int] = (32, 40)) -> dict[str, dict[str, int]]:
    """Write ``root/{train,validation}/<class>/<frame>_<row>_<col>.png`` from every
    ``len // frames``-th frame of each CamVid split, at most ``cap`` (train, validation) patches a
    class; returns the patch count per split and class."""
    counts: dict[str, dict[str, int]] = {}
    for (split, out_split, frames), most in zip((("train", "train", train_frames), ("val", "validation", val_frames)),
                                                cap):
        images = sorted((CAMVID / "images" / split).glob("*.jpg"))
        step = max(len(images) // frames, 1)
        counts[out_split] = {name: 0 for name in CLASSES}
        for path in images[::step][:frames]:
            image = np.asarray(Image.open(path).convert("RGB"))
            label = np.asarray(Image.open(CAMVID / "annotations" / split / f"{path.stem}.png"))
            for r in range(0, image.shape[0] - patch + 1, patch):
                for c in range(0, image.shape[1] - patch + 1, patch):
                    ids = np.bincount(label[r:r + patch, c:c + patch].ravel(), minlength=12)
                    for name, cid in CAMVID_IDS.items():
                        if ids[cid] >= purity * patch * patch and counts[out_split][name] < most:
                            folder = root / out_split / name
                            folder.mkdir(parents=True, exist_ok=True)
                            Image.fromarray(image[r:r + patch, c:c + patch]).save(folder / f"{path.stem}_{r}_{c}.png")
                            counts[out_split][name] += 1
    return counts


def write_pretrain_config(path: Path, data_root: Path, **sections) -> Path:
    """A config on the shipped EFT-T recipe, cut down for a CPU: 32x32 crops, 4 classes, no
    workers, fp32, the epochs and updates a test can afford; ``sections`` override it."""
    cfg = {
        "_base_": str(SHIPPED_CONFIGS / "eft-t-imagenet.yaml"),
        "data": {"root": str(data_root), "img_size": 32, "batch_size": 16, "workers": 0, "repeated_aug": 0,
                 "scale": [0.35, 1.0]},
        "optim": {"lr": 1e-3, "lr_batch": None},
        "schedule": {"epochs": 2, "warmup_epochs": 0, "min_lr": 1e-5},
        "train": {"amp": False, "deterministic": True, "log_interval": 1},
    }
    for section, values in sections.items():
        cfg.setdefault(section, {}).update(values)
    path.write_text(yaml.safe_dump(cfg))
    return path
