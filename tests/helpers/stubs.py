"""Stub models and images shared by the inference tests."""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

ADE = "edaformer-t-ade20k"


class Stub(nn.Module):
    """Logits at the input size that depend on the window contents (1x1 conv + window mean)."""

    def __init__(self, num_classes: int = 4, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.conv = nn.Conv2d(3, num_classes, 1)
        self.num_classes = num_classes
        self.calls: list[tuple[int, ...]] = []

    def forward(self, x):
        self.calls.append(tuple(x.shape))
        return self.conv(x) + x.mean((1, 2, 3)).view(-1, 1, 1, 1)


class Conv1x1(Stub):
    """A flip- and translation-equivariant stub: a plain 1x1 conv."""

    def forward(self, x):
        self.calls.append(tuple(x.shape))
        return self.conv(x)


class Asymmetric(Stub):
    """Output depends on the column position, so it is not flip-equivariant."""

    def forward(self, x):
        ramp = torch.linspace(0, 1, x.shape[-1], dtype=x.dtype, device=x.device)
        return self.conv(x) + ramp


def rgb(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
