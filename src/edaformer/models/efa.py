"""Embedding-free attention (EFA) and the transformer block built on it.

Tokens travel as ``(B, N, C)`` with ``N = H * W`` in row-major order. That is
the same memory as a channels-last ``(B, C, H, W)`` map, so :func:`to_map` and
:func:`to_tokens` are views, not copies, and the 1x1 / depthwise convolutions
run in channels-last layout.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from timm.layers import DropPath, trunc_normal_
from torch import nn

from . import fastpath, reduction

__all__ = ["EFA", "ConvFFN", "EFABlock", "to_map", "to_tokens", "init_weights"]


def to_map(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """View tokens ``(B, H*W, C)`` as a channels-last map ``(B, C, H, W)`` (no copy)."""
    return x.unflatten(1, (h, w)).permute(0, 3, 1, 2)


def to_tokens(x: torch.Tensor) -> torch.Tensor:
    """Flatten a map ``(B, C, H, W)`` to tokens ``(B, H*W, C)`` (no copy when channels-last)."""
    return x.permute(0, 2, 3, 1).flatten(1, 2)


class EFA(nn.Module):
    """Embedding-free attention.

    The input tokens are the queries, split into heads without projection. Keys
    and values are one tensor: the token map average-pooled with kernel = stride
    = ``pool_ratio`` (floor), then a 1x1 conv ``sr`` (and, in the decoder,
    LayerNorm + GELU). ``pool_ratio = train_ratio * isr_factor``; the factor is
    set at run time (Inference Spatial Reduction) without touching weights, and
    ``pool`` says how a factor above 1 reduces (:mod:`.reduction`: ``avg``, ``max``,
    ``overlap``, ``merge``).
    """

    def __init__(self, dim: int, num_heads: int, train_ratio: int, kv_norm: bool = False,
                 kv_norm_eps: float = 1e-5, name: str = "attention"):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.train_ratio = int(train_ratio)
        self.isr_factor = 1
        self.pool = "avg"
        self.name = name
        self.sr = nn.Conv2d(dim, dim, kernel_size=1)
        if kv_norm:
            self.norm = nn.LayerNorm(dim, eps=kv_norm_eps)
            self.act = nn.GELU()
        else:
            self.norm = None
            self.act = None
        self.proj = nn.Linear(dim, dim)

    def set_isr(self, factor: int, pool: str = "avg") -> None:
        """ISR factor and pooling kind (``ValueError`` for ``merge`` with a factor above 2)."""
        self.isr_factor = reduction.check_factor(factor, pool, self.name)
        self.pool = pool

    @property
    def pool_ratio(self) -> int:
        """Pooling ratio of the key/value map (``merge`` pools at the training ratio, then merges)."""
        return self.train_ratio * (1 if self.pool == "merge" else self.isr_factor)

    def pooled_hw(self, h: int, w: int) -> tuple[int, int]:
        """Key/value grid for an ``h x w`` query grid; raises when it would be empty."""
        r = self.pool_ratio
        if h < r or w < r:
            how = (f"train {self.train_ratio}, ISR {self.isr_factor} by merging" if self.pool == "merge"
                   else f"train {self.train_ratio} x ISR {self.isr_factor}")
            raise ValueError(f"{self.name}: pooling ratio {r} ({how}) does not fit the {h}x{w} feature map; "
                             f"use a smaller ISR factor or a larger input")
        return h // r, w // r

    def kv_reduction(self, h: int, w: int) -> reduction.KVReduction:
        """How the key/value tokens of an ``h x w`` query grid are reduced (checks the grid)."""
        self.pooled_hw(h, w)
        return reduction.plan(self.train_ratio, self.isr_factor, self.pool, h, w)

    def keys_values(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """The reduced key/value tokens ``(B, M, C)`` of the query tokens ``x`` (unit last stride)."""
        step = self.kv_reduction(h, w)
        kv = to_tokens(self.sr(reduction.pool_map(to_map(x, h, w), step)))
        if self.norm is not None:
            kv = self.act(self.norm(kv))
        if step.merged:
            kv = reduction.merge_tokens(kv)
        if kv.stride(-1) != 1:  # the fused SDPA kernels need unit stride along the head dim
            kv = kv.contiguous()
        return kv

    def forward(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        b, n, c = x.shape
        kv = self.keys_values(x, h, w)
        d = c // self.num_heads
        # Heads are views: (B, N, C) -> (B, heads, N, d) with strides (N*C, d, C, 1). The CPU
        # flash kernel and the CUDA flash / memory-efficient kernels take these strides as they
        # are, and return the output laid out as (B, N, heads, d), so merging the heads back is a
        # view too (no copy on either side of the attention).
        q = x.view(b, n, self.num_heads, d).transpose(1, 2)
        kv = kv.view(b, kv.shape[1], self.num_heads, d).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, kv, kv)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))

    def extra_repr(self) -> str:
        return (f"heads={self.num_heads}, train_ratio={self.train_ratio}, isr_factor={self.isr_factor}, "
                f"pool={self.pool}")


class ConvFFN(nn.Module):
    """``Linear -> [ReLU] -> depthwise 3x3 conv -> GELU -> Linear`` on tokens.

    CPU inference on large maps may run in bands of rows (:mod:`.fastpath`, same result).
    """

    def __init__(self, dim: int, hidden: int, relu: bool):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.relu = nn.ReLU(inplace=True) if relu else None
        self.dwconv = nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        banded = fastpath.banded_ffn(self, x, h, w)
        if banded is not None:
            return banded
        x = self.fc1(x)
        if self.relu is not None:
            x = self.relu(x)
        x = to_tokens(self.dwconv(to_map(x, h, w)))
        return self.fc2(self.act(x))


class EFABlock(nn.Module):
    """Pre-norm transformer block: ``x + attn(LN(x))`` then ``x + FFN(LN(x))``.

    ``attn`` is the token mixer at the attention position: an :class:`EFA` unless ``mixer``
    gives another module called as ``mixer(x, h, w)`` (see :mod:`.mixers`).
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, train_ratio: int, *,
                 norm_eps: float, drop_path: float = 0.0, kv_norm: bool = False,
                 ffn_relu: bool = True, name: str = "block", mixer: nn.Module | None = None):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = mixer if mixer is not None else EFA(dim, num_heads, train_ratio, kv_norm=kv_norm, name=name)
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = ConvFFN(dim, int(dim * mlp_ratio), relu=ffn_relu)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x), h, w))
        return x + self.drop_path(self.mlp(self.norm2(x), h, w))


def init_weights(m: nn.Module) -> None:
    """Reference init: trunc-normal(0.02) linear, unit LayerNorm, He-style fan-out conv."""
    if isinstance(m, nn.Linear):
        trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)
    elif isinstance(m, nn.Conv2d):
        fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
        nn.init.normal_(m.weight, 0, math.sqrt(2.0 / fan_out))
        if m.bias is not None:
            nn.init.zeros_(m.bias)
