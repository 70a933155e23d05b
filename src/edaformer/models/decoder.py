"""The all-attention decoder: EFA blocks on encoder stages 2-4, then a 1x1 fuse."""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from . import reduction
from .efa import EFA, EFABlock, init_weights, to_map, to_tokens
from .fastpath import resize_bilinear
from .mixers import build_mixer, check_op

__all__ = ["AllAttentionDecoder", "DECODER_TRAIN_RATIOS", "DECODER_DEPTHS", "check_depths"]

# Training pooling ratios of the decoder attention, in (c2, c3, c4) order.
DECODER_TRAIN_RATIOS = (4, 2, 1)
# Blocks per level in the paper's notation {a-b-c}: (c4, c3, c2).
DECODER_DEPTHS = (3, 2, 1)
_HEADS = (2, 4, 8)  # (c2, c3, c4)


def check_depths(depths: Sequence[int]) -> tuple[int, int, int]:
    """``(a, b, c)`` blocks at (c4, c3, c2) as ints, else ``ValueError``."""
    try:
        values = tuple(depths)
    except TypeError:
        values = ()
    if len(values) != 3 or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in values):
        raise ValueError(f"decoder_depths must be 3 integers >= 0 (blocks at c4, c3, c2), got {depths!r}")
    return values


class ConvBNReLU(nn.Sequential):
    def __init__(self, in_chans: int, out_chans: int):
        super().__init__()
        self.conv = nn.Conv2d(in_chans, out_chans, 1, bias=False)
        self.bn = nn.BatchNorm2d(out_chans)
        self.act = nn.ReLU(inplace=True)


class AllAttentionDecoder(nn.Module):
    """Blocks per level (default c4: 3, c3: 2, c2: 1), resize to c2, concat [c4, c3, c2], fuse, classify.

    Input: the encoder maps at strides 8, 16, 32 (c2, c3, c4). Output: logits at stride 8.
    Blocks live in ``c2``, ``c3`` and ``c4`` (ModuleLists), each level with its own pooling ratio
    (``train_ratios``, in (c2, c3, c4) order) and its heads (c2: 2, c3: 4, c4: 8).

    ``depths``: blocks at (c4, c3, c2), the paper's {a-b-c}; a level with 0 blocks passes its
    encoder map straight to the resize and fuse. ``op``: the token mixer of every block
    (:mod:`.mixers`); with ``dwconv`` / ``conv`` the decoder has no key/value pooling, its ISR
    factors do nothing and it sets no minimum input size.
    """

    level_reductions = (8, 16, 32)  # input pixels per token of levels (c2, c3, c4)

    def __init__(self, in_channels: Sequence[int], num_classes: int, embed_dim: int, mlp_ratio: float,
                 drop_path: float = 0.1, dropout: float = 0.1, *, depths: Sequence[int] = DECODER_DEPTHS,
                 op: str = "efa", train_ratios: Sequence[int] = DECODER_TRAIN_RATIOS):
        super().__init__()
        self.in_channels = tuple(in_channels)
        self.num_classes = num_classes
        self.depths = check_depths(depths)
        self.op = check_op(op)
        for level, (dim, heads, depth, ratio) in enumerate(
                zip(in_channels, _HEADS, self.depths[::-1], train_ratios), start=2):
            name = f"decoder c{level}"
            setattr(self, f"c{level}", nn.ModuleList(
                EFABlock(dim, heads, mlp_ratio, ratio, norm_eps=1e-5, drop_path=drop_path, ffn_relu=False,
                         mixer=build_mixer(op, dim, heads, ratio, kv_norm=True, name=name))
                for _ in range(depth)))
        self.fuse = ConvBNReLU(sum(in_channels), embed_dim)
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(embed_dim, num_classes, 1)
        self.apply(init_weights)

    def levels(self) -> list[nn.ModuleList]:
        """Block lists in (c2, c3, c4) order, the order of the decoder ISR factors."""
        return [self.c2, self.c3, self.c4]

    def attention(self, level: int) -> list[EFA]:
        """The pooling attention modules of level ``level`` (0, 1, 2 = c2, c3, c4); empty without pooling."""
        return [blk.attn for blk in self.levels()[level] if isinstance(blk.attn, EFA)]

    def set_isr(self, factors: Sequence[int], pool: str = "avg") -> None:
        """ISR factors of levels (c2, c3, c4) (each multiplies the level's training pooling ratio)
        and the pooling kind (:mod:`.reduction`); a level without pooling ignores its factor."""
        levels = self.levels()
        if len(factors) != len(levels):
            raise ValueError(f"the decoder needs {len(levels)} ISR factors, got {len(factors)}")
        reduction.check_pool(pool)
        for i, factor in enumerate(factors):
            for attn in self.attention(i)[:1]:
                reduction.check_factor(factor, pool, attn.name)
        for i, factor in enumerate(factors):
            for attn in self.attention(i):
                attn.set_isr(factor, pool)

    def pool_ratios(self) -> tuple[int | None, ...]:
        """Active pooling ratio of levels (c2, c3, c4); ``None`` for a level without pooling."""
        return tuple(attn[0].pool_ratio if attn else None for attn in map(self.attention, range(3)))

    def check_input_size(self, sizes: Sequence[tuple[int, int]]) -> None:
        """``ValueError`` when a level's grid (c2, c3, c4 order) is smaller than its pooling window."""
        for i, (h, w) in enumerate(sizes):
            for attn in self.attention(i)[:1]:
                attn.pooled_hw(h, w)

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        c2 = features[-3]
        size = c2.shape[-2:]
        outs = []
        for feat, blocks in zip(features[-3:], self.levels()):
            h, w = feat.shape[-2:]
            x = feat
            if len(blocks):
                x = to_tokens(feat)
                for blk in blocks:
                    x = blk(x, h, w)
                x = to_map(x, h, w)
            if (h, w) != size:
                x = resize_bilinear(x, size)
            outs.append(x)
        x = self.fuse(torch.cat(outs[::-1], dim=1))
        return self.classifier(self.dropout(x))
