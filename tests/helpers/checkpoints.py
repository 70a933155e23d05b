"""Random-weight checkpoints for the command-line tests."""
from __future__ import annotations

from pathlib import Path

import torch

import edaformer


def random_checkpoint(path: Path, name: str, num_classes: int, seed: int = 0) -> tuple[edaformer.EDAFormer, Path]:
    """A model ``name`` with ``num_classes`` classes and seeded random weights, and its checkpoint at ``path``."""
    torch.manual_seed(seed)
    model = edaformer.create_model(name, num_classes=num_classes).eval()
    return model, edaformer.save_checkpoint(model, path)
