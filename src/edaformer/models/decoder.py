"""The all-attention decoder: EFA blocks on encoder stages 2-4, then a 1x1 fuse."""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .efa import EFABlock, init_weights, to_map, to_tokens
from .fastpath import resize_bilinear

__all__ = ["AllAttentionDecoder", "DECODER_TRAIN_RATIOS"]

# Training pooling ratios of the decoder attention, in (c2, c3, c4) order.
DECODER_TRAIN_RATIOS = (4, 2, 1)
_HEADS = (2, 4, 8)
_DEPTHS = (1, 2, 3)


class ConvBNReLU(nn.Sequential):
    def __init__(self, in_chans: int, out_chans: int):
        super().__init__()
        self.conv = nn.Conv2d(in_chans, out_chans, 1, bias=False)
        self.bn = nn.BatchNorm2d(out_chans)
        self.act = nn.ReLU(inplace=True)


class AllAttentionDecoder(nn.Module):
    """EFA blocks per level (c4: 3, c3: 2, c2: 1), resize to c2, concat [c4, c3, c2], fuse, classify.

    Input: the encoder maps at strides 8, 16, 32 (c2, c3, c4). Output: logits at stride 8.
    Blocks live in ``c2``, ``c3`` and ``c4`` (ModuleLists), each with its own pooling ratio.
    """

    level_reductions = (8, 16, 32)  # input pixels per token of levels (c2, c3, c4)

    def __init__(self, in_channels: Sequence[int], num_classes: int, embed_dim: int, mlp_ratio: float,
                 drop_path: float = 0.1, dropout: float = 0.1):
        super().__init__()
        self.in_channels = tuple(in_channels)
        self.num_classes = num_classes
        for level, (dim, heads, depth, ratio) in enumerate(
                zip(in_channels, _HEADS, _DEPTHS, DECODER_TRAIN_RATIOS), start=2):
            setattr(self, f"c{level}", nn.ModuleList(
                EFABlock(dim, heads, mlp_ratio, ratio, norm_eps=1e-5, drop_path=drop_path, kv_norm=True,
                         ffn_relu=False, name=f"decoder c{level}")
                for _ in range(depth)))
        self.fuse = ConvBNReLU(sum(in_channels), embed_dim)
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(embed_dim, num_classes, 1)
        self.apply(init_weights)

    def levels(self) -> list[nn.ModuleList]:
        """Block lists in (c2, c3, c4) order, the order of the decoder ISR factors."""
        return [self.c2, self.c3, self.c4]

    def set_isr(self, factors: Sequence[int]) -> None:
        """ISR factors of levels (c2, c3, c4) (each multiplies the level's training pooling ratio)."""
        levels = self.levels()
        if len(factors) != len(levels):
            raise ValueError(f"the decoder needs {len(levels)} ISR factors, got {len(factors)}")
        for blocks, factor in zip(levels, factors):
            for blk in blocks:
                blk.attn.isr_factor = int(factor)

    def pool_ratios(self) -> tuple[int, ...]:
        """Active pooling ratio of levels (c2, c3, c4)."""
        return tuple(blocks[0].attn.pool_ratio for blocks in self.levels())

    def check_input_size(self, sizes: Sequence[tuple[int, int]]) -> None:
        """``ValueError`` when a level's grid (c2, c3, c4 order) is smaller than its pooling window."""
        for (h, w), blocks in zip(sizes, self.levels()):
            blocks[0].attn.pooled_hw(h, w)

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        c2 = features[-3]
        size = c2.shape[-2:]
        outs = []
        for feat, blocks in zip(features[-3:], self.levels()):
            h, w = feat.shape[-2:]
            x = to_tokens(feat)
            for blk in blocks:
                x = blk(x, h, w)
            x = to_map(x, h, w)
            if (h, w) != size:
                x = resize_bilinear(x, size)
            outs.append(x)
        x = self.fuse(torch.cat(outs[::-1], dim=1))
        return self.classifier(self.dropout(x))
