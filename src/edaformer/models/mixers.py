"""Token mixers that can take EFA's place in a decoder block (the decoder-operation ablation).

Every mixer is called as ``mixer(x, h, w)`` on ``(B, H*W, C)`` tokens and returns the same
shape; the block around it (pre-norm residual, then the ConvFFN) is unchanged.

* ``efa``: :class:`~.efa.EFA`, the reference.
* ``attention``: :class:`Attention`, standard attention "with embedding".
* ``dwconv``: :class:`DWConvMixer`, a depthwise 3x3 conv then a pointwise 1x1 conv.
* ``conv``: :class:`ConvMixer`, a dense 3x3 conv.

The convolution mixers have no key/value pooling, so an ISR factor does nothing to them.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .efa import EFA, to_map, to_tokens

__all__ = ["DECODER_OPS", "Attention", "DWConvMixer", "ConvMixer", "build_mixer", "check_op"]

DECODER_OPS = ("efa", "attention", "dwconv", "conv")


class Attention(EFA):
    """Standard attention at the EFA position: EFA's key/value path plus q/k/v embeddings.

    ``q = Linear(x)``; the key/value tokens are EFA's (pooled map, 1x1 ``sr`` conv, in the
    decoder LayerNorm + GELU, ISR as for EFA), then ``k = Linear(kv)``, ``v = Linear(kv)``;
    softmax attention over heads and the output ``proj``, as in EFA.
    """

    def __init__(self, dim: int, num_heads: int, train_ratio: int, kv_norm: bool = False,
                 kv_norm_eps: float = 1e-5, name: str = "attention"):
        super().__init__(dim, num_heads, train_ratio, kv_norm=kv_norm, kv_norm_eps=kv_norm_eps, name=name)
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        b, n, c = x.shape
        kv = self.keys_values(x, h, w)
        m, d = kv.shape[1], c // self.num_heads
        q = self.q(x).view(b, n, self.num_heads, d).transpose(1, 2)
        k = self.k(kv).view(b, m, self.num_heads, d).transpose(1, 2)
        v = self.v(kv).view(b, m, self.num_heads, d).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class DWConvMixer(nn.Module):
    """Depthwise-separable conv on the token map: depthwise 3x3 (padding 1) then pointwise 1x1, both with bias."""

    def __init__(self, dim: int):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.pwconv = nn.Conv2d(dim, dim, 1)

    def forward(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        return to_tokens(self.pwconv(self.dwconv(to_map(x, h, w))))


class ConvMixer(nn.Module):
    """A dense 3x3 conv (padding 1, with bias) on the token map."""

    def __init__(self, dim: int):
        super().__init__()
        self.conv = nn.Conv2d(dim, dim, 3, padding=1)

    def forward(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        return to_tokens(self.conv(to_map(x, h, w)))


def check_op(op: str) -> str:
    """``op`` if it names a decoder operation, else ``ValueError``."""
    if op not in DECODER_OPS:
        raise ValueError(f"unknown decoder_op {op!r}; choose one of {', '.join(DECODER_OPS)}")
    return op


def build_mixer(op: str, dim: int, num_heads: int, train_ratio: int, *, kv_norm: bool, name: str) -> nn.Module:
    """The token mixer ``op`` for a block of width ``dim``."""
    check_op(op)
    if op == "efa":
        return EFA(dim, num_heads, train_ratio, kv_norm=kv_norm, name=name)
    if op == "attention":
        return Attention(dim, num_heads, train_ratio, kv_norm=kv_norm, name=name)
    return DWConvMixer(dim) if op == "dwconv" else ConvMixer(dim)
