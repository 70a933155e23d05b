"""EDAFormer computed the way the reference implementation computes it: the benchmark baseline.

Same network, same parameters and the same state-dict key names as
:class:`edaformer.EDAFormer` (so ``baseline.load_state_dict(model.state_dict())`` works), but the
forward pass follows the reference code's tensor handling:

* tokens ``(B, N, C)``, turned into a map with ``x.permute(0, 2, 1).reshape(B, C, H, W)`` in
  attention and ``x.transpose(1, 2).view(B, C, H, W)`` in the FFN's depthwise conv;
* key/value pooling by an ``nn.AvgPool2d(r, r)`` module (applied for every ratio, 1 included);
* explicit attention: ``attn = (q @ k.transpose(-2, -1)) * scale; attn.softmax(-1); attn @ v``,
  then ``.transpose(1, 2).reshape(B, N, C)`` (a copy);
* patch embeddings on contiguous NCHW maps, ``flatten(2).transpose(1, 2)`` to tokens;
* stage outputs ``x.reshape(B, H, W, -1).permute(0, 3, 1, 2).contiguous()`` (a copy);
* decoder levels flattened to tokens and back with ``permute(0, 2, 1).reshape``;
* float32, no ``scaled_dot_product_attention``, no memory-format tricks.

It is written from the architecture description, only to give the optimized library a fair
"same network, reference-style code" baseline. It lives outside the package on purpose.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ReferenceStyleEDAFormer", "from_model"]


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, pool_ratio: int, kv_norm: bool):
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.train_ratio = pool_ratio
        self.pool = nn.AvgPool2d(pool_ratio, pool_ratio)
        self.sr = nn.Conv2d(dim, dim, kernel_size=1, stride=1)
        self.kv_norm = kv_norm
        if kv_norm:
            self.norm = nn.LayerNorm(dim, eps=1e-5)
            self.act = nn.GELU()
        self.proj = nn.Linear(dim, dim)

    def set_factor(self, factor: int) -> None:
        r = self.train_ratio * factor
        self.pool = nn.AvgPool2d(r, r)

    def forward(self, x: torch.Tensor, H: int, W: int) -> torch.Tensor:
        B, N, C = x.shape
        q = x.reshape(B, N, self.num_heads, C // self.num_heads).permute(0, 2, 1, 3)
        x_ = x.permute(0, 2, 1).reshape(B, C, H, W)
        x_ = self.sr(self.pool(x_)).reshape(B, C, -1).permute(0, 2, 1)
        if self.kv_norm:
            x_ = self.act(self.norm(x_))
        kv = x_.reshape(B, -1, self.num_heads, C // self.num_heads).permute(0, 2, 1, 3)
        k, v = kv, kv
        attn = (q @ k.transpose(-2, -1)) * self.scale
        attn = attn.softmax(dim=-1)
        x = (attn @ v).transpose(1, 2).reshape(B, N, C)
        return self.proj(x)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, relu: bool):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.relu = nn.ReLU(inplace=True) if relu else None
        self.dwconv = nn.Conv2d(hidden, hidden, 3, 1, 1, bias=True, groups=hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor, H: int, W: int) -> torch.Tensor:
        x = self.fc1(x)
        if self.relu is not None:
            x = self.relu(x)
        B, N, C = x.shape
        x = x.transpose(1, 2).view(B, C, H, W)
        x = self.dwconv(x)
        x = x.flatten(2).transpose(1, 2)
        x = self.act(x)
        return self.fc2(x)


class Block(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, pool_ratio: int, eps: float,
                 kv_norm: bool, relu: bool):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, num_heads, pool_ratio, kv_norm)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), relu)

    def forward(self, x: torch.Tensor, H: int, W: int) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), H, W)
        x = x + self.mlp(self.norm2(x), H, W)
        return x


class OverlapPatchEmbed(nn.Module):
    def __init__(self, in_chans: int, dim: int, kernel: int, stride: int):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, dim, kernel, stride=stride, padding=kernel // 2)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor):
        x = self.proj(x)
        _, _, H, W = x.shape
        x = x.flatten(2).transpose(1, 2)
        x = self.norm(x)
        return x, H, W


class Stage(nn.Module):
    def __init__(self, index, in_chans, dim, depth, heads, mlp_ratio, pool_ratio):
        super().__init__()
        k, s = (7, 4) if index == 0 else (3, 2)
        self.downsample = OverlapPatchEmbed(in_chans, dim, k, s)
        self.blocks = nn.ModuleList(Block(dim, heads, mlp_ratio, pool_ratio, 1e-6, False, True)
                                    for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=1e-6)


class Encoder(nn.Module):
    def __init__(self, embed_dims, num_heads, depths, mlp_ratio, in_chans=3, pool_ratios=(8, 4, 2, 1)):
        super().__init__()
        stages, prev = [], in_chans
        for i in range(4):
            stages.append(Stage(i, prev, embed_dims[i], depths[i], num_heads[i], mlp_ratio, pool_ratios[i]))
            prev = embed_dims[i]
        self.stages = nn.ModuleList(stages)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        B = x.shape[0]
        outs = []
        for stage in self.stages:
            x, H, W = stage.downsample(x)
            for blk in stage.blocks:
                x = blk(x, H, W)
            x = stage.norm(x)
            x = x.reshape(B, H, W, -1).permute(0, 3, 1, 2).contiguous()
            outs.append(x)
        return outs


class ConvModule(nn.Module):
    def __init__(self, in_chans, out_chans):
        super().__init__()
        self.conv = nn.Conv2d(in_chans, out_chans, 1, bias=False)
        self.bn = nn.BatchNorm2d(out_chans)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x):
        return self.act(self.bn(self.conv(x)))


class Decoder(nn.Module):
    def __init__(self, in_channels, num_classes, embed_dim, mlp_ratio):
        super().__init__()
        c2, c3, c4 = in_channels
        self.c4 = nn.ModuleList(Block(c4, 8, mlp_ratio, 1, 1e-5, True, False) for _ in range(3))
        self.c3 = nn.ModuleList(Block(c3, 4, mlp_ratio, 2, 1e-5, True, False) for _ in range(2))
        self.c2 = nn.ModuleList(Block(c2, 2, mlp_ratio, 4, 1e-5, True, False) for _ in range(1))
        self.fuse = ConvModule(c2 + c3 + c4, embed_dim)
        self.dropout = nn.Dropout2d(0.1)
        self.classifier = nn.Conv2d(embed_dim, num_classes, 1)

    def forward(self, inputs):
        c2, c3, c4 = inputs
        n, _, h2, w2 = c2.shape

        def run(c, blocks):
            _, _, h, w = c.shape
            x = c.flatten(2).transpose(1, 2)
            for blk in blocks:
                x = blk(x, h, w)
            return x.permute(0, 2, 1).reshape(n, -1, h, w)

        _c4 = F.interpolate(run(c4, self.c4), size=(h2, w2), mode="bilinear", align_corners=False)
        _c3 = F.interpolate(run(c3, self.c3), size=(h2, w2), mode="bilinear", align_corners=False)
        _c2 = run(c2, self.c2)
        x = self.fuse(torch.cat([_c4, _c3, _c2], dim=1))
        x = self.dropout(x)
        return self.classifier(x)


class ReferenceStyleEDAFormer(nn.Module):
    """The EDAFormer network in reference-style code; key names match :class:`edaformer.EDAFormer`."""

    def __init__(self, embed_dims, num_heads, depths, mlp_ratio, num_classes, decoder_dim, decoder_mlp_ratio,
                 in_chans: int = 3):
        super().__init__()
        self.encoder = Encoder(embed_dims, num_heads, depths, mlp_ratio, in_chans)
        self.decoder = Decoder(embed_dims[1:], num_classes, decoder_dim, decoder_mlp_ratio)

    def set_isr(self, spec) -> "ReferenceStyleEDAFormer":
        from edaformer.isr import parse_isr

        setting = parse_isr(spec)
        for stage, f in zip(self.encoder.stages, setting.encoder):
            for blk in stage.blocks:
                blk.attn.set_factor(f)
        for blocks, f in zip((self.decoder.c2, self.decoder.c3, self.decoder.c4), setting.decoder):
            for blk in blocks:
                blk.attn.set_factor(f)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = self.encoder(x)
        logits = self.decoder(feats[1:])
        return F.interpolate(logits, size=x.shape[2:], mode="bilinear", align_corners=False)


def from_model(model) -> ReferenceStyleEDAFormer:
    """A reference-style copy of an :class:`edaformer.EDAFormer`: same weights, same ISR, same mode."""
    enc = model.encoder
    stages = list(enc.stages)
    dec = model.decoder
    base = ReferenceStyleEDAFormer(
        embed_dims=[s.norm.normalized_shape[0] for s in stages],
        num_heads=[s.blocks[0].attn.num_heads for s in stages],
        depths=[len(s.blocks) for s in stages],
        mlp_ratio=stages[0].blocks[0].mlp.fc1.out_features / stages[0].norm.normalized_shape[0],
        num_classes=dec.classifier.out_channels,
        decoder_dim=dec.classifier.in_channels,
        decoder_mlp_ratio=dec.c2[0].mlp.fc1.out_features / dec.c2[0].norm1.normalized_shape[0],
        in_chans=stages[0].downsample.proj.in_channels,
    )
    # hidden sizes are int(C * ratio): rebuild the FFNs with the model's exact sizes
    _match_hidden(model, base)
    base.load_state_dict(model.state_dict(), strict=True)
    base.set_isr(model.isr)
    base.train(model.training)
    return base.to(next(model.parameters()).device, next(model.parameters()).dtype)


def _match_hidden(model, base) -> None:
    """Make every FFN hidden size equal to the model's (``int(C * mlp_ratio)`` may round either way)."""
    ours = {n: m for n, m in model.named_modules() if n.endswith(".mlp")}
    for name, mlp in base.named_modules():
        if name.endswith(".mlp"):
            ref = ours[name]
            hidden, dim = ref.fc1.out_features, ref.fc1.in_features
            if mlp.fc1.out_features != hidden:
                parent = base.get_submodule(name.rsplit(".", 1)[0])
                parent.mlp = Mlp(dim, hidden, ref.relu is not None)


def build(name: str, isr: str | None = None, num_classes: int | None = None, seed: int = 0) -> ReferenceStyleEDAFormer:
    """The reference-style twin of ``harness.build_named(name, isr, num_classes, seed)``
    (same weights): the baseline builder used by the benchmarks."""
    from harness import build_named

    return from_model(build_named(name, isr=isr, num_classes=num_classes, seed=seed)).eval()
