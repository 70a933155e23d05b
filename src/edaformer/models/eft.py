"""EFT: the Embedding-Free Transformer encoder (sizes T and B).

Four stages; each owns its overlapping patch embedding (downsampling), its EFT
blocks and its output LayerNorm, and maps ``(B, C_in, H, W) -> (B, C_i, H_i, W_i)``.
Registered with timm as ``eft_t`` and ``eft_b`` (``features_only=True`` gives the
four stage maps); with ``num_classes > 0`` it is an ImageNet-style classifier.
"""
from __future__ import annotations

import re
from collections.abc import Sequence

import torch
import torch.utils.checkpoint
from timm.models import build_model_with_cfg, register_model
from torch import nn

from . import reduction
from .efa import EFABlock, init_weights, to_map, to_tokens

__all__ = ["EFT", "EFTStage", "EFT_CONFIGS", "TRAIN_POOL_RATIOS", "checkpoint_filter_fn"]

TRAIN_POOL_RATIOS = (8, 4, 2, 1)

EFT_CONFIGS = {
    "t": dict(embed_dims=(32, 64, 128, 256), num_heads=(1, 2, 4, 8), depths=(2, 2, 10, 2), mlp_ratio=3.8),
    "b": dict(embed_dims=(64, 128, 256, 512), num_heads=(1, 2, 4, 8), depths=(3, 3, 22, 3), mlp_ratio=4.0),
}


class OverlapPatchEmbed(nn.Module):
    """Strided conv (kernel k, padding k // 2) then LayerNorm: the stage's downsampling."""

    def __init__(self, in_chans: int, dim: int, kernel: int, stride: int):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, dim, kernel, stride=stride, padding=kernel // 2)
        self.norm = nn.LayerNorm(dim, eps=1e-5)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        x = self.proj(x)
        h, w = x.shape[-2:]
        return self.norm(to_tokens(x)), h, w

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        """Output grid of the conv for an input grid: ``floor((in + 2p - k) / s) + 1`` per axis."""
        k, s, p = self.proj.kernel_size, self.proj.stride, self.proj.padding
        return tuple((n + 2 * p[a] - k[a]) // s[a] + 1 for a, n in enumerate((height, width)))

    def min_input_size(self, out_h: int, out_w: int) -> tuple[int, int]:
        """Smallest input grid whose output grid is at least ``out_h x out_w`` (and at least 1x1)."""
        k, s, p = self.proj.kernel_size, self.proj.stride, self.proj.padding
        return tuple(max(1, s[a] * (max(n, 1) - 1) + k[a] - 2 * p[a]) for a, n in enumerate((out_h, out_w)))


class EFTStage(nn.Module):
    """Patch embedding, ``depth`` EFT blocks, LayerNorm; map in, map out."""

    def __init__(self, index: int, in_chans: int, dim: int, depth: int, num_heads: int,
                 mlp_ratio: float, train_ratio: int, drop_path: Sequence[float]):
        super().__init__()
        kernel, stride = (7, 4) if index == 0 else (3, 2)
        self.reduction = 4 * 2 ** index  # input pixels per token along each side
        self.downsample = OverlapPatchEmbed(in_chans, dim, kernel, stride)
        self.blocks = nn.ModuleList(
            EFABlock(dim, num_heads, mlp_ratio, train_ratio, norm_eps=1e-6, drop_path=drop_path[j],
                     ffn_relu=True, name=f"encoder stage {index + 1}")
            for j in range(depth))
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.grad_checkpointing = False

    @property
    def pool_ratio(self) -> int:
        """Key/value pooling ratio of the stage's blocks under the active ISR factor."""
        return self.blocks[0].attn.pool_ratio

    def set_isr(self, factor: int, pool: str = "avg") -> None:
        """Set the ISR factor and pooling kind (:mod:`.reduction`) of every block's attention."""
        for blk in self.blocks:
            blk.attn.set_isr(factor, pool)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, h, w = self.downsample(x)
        for blk in self.blocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(blk, x, h, w, use_reentrant=False)
            else:
                x = blk(x, h, w)
        return to_map(self.norm(x), h, w)


class EFT(nn.Module):
    """Embedding-Free Transformer encoder / classifier."""

    def __init__(self, embed_dims: Sequence[int] = (32, 64, 128, 256), num_heads: Sequence[int] = (1, 2, 4, 8),
                 depths: Sequence[int] = (2, 2, 10, 2), mlp_ratio: float = 3.8, in_chans: int = 3,
                 num_classes: int = 1000, global_pool: str = "avg", drop_rate: float = 0.0,
                 drop_path_rate: float = 0.2, pool_ratios: Sequence[int] = TRAIN_POOL_RATIOS):
        super().__init__()
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.embed_dims = tuple(embed_dims)
        self.num_features = self.head_hidden_size = embed_dims[-1]
        n = sum(depths)  # drop-path rate rising linearly over all blocks (plain Python: meta-device friendly)
        dpr = [drop_path_rate * i / max(n - 1, 1) for i in range(n)]
        stages, cur, prev = [], 0, in_chans
        self.feature_info = []
        for i, (dim, depth) in enumerate(zip(embed_dims, depths)):
            stages.append(EFTStage(i, prev, dim, depth, num_heads[i], mlp_ratio, pool_ratios[i],
                                   dpr[cur:cur + depth]))
            self.feature_info.append(dict(num_chs=dim, reduction=4 * 2 ** i, module=f"stages.{i}"))
            cur += depth
            prev = dim
        self.stages = nn.Sequential(*stages)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        self.apply(init_weights)

    # ISR and input geometry --------------------------------------------------------
    def set_isr(self, factors: Sequence[int], pool: str = "avg") -> None:
        """ISR factors of the four stages (each multiplies the stage's training pooling ratio) and
        the pooling kind of the reduction (:mod:`.reduction`: ``avg``, ``max``, ``overlap``, ``merge``)."""
        if len(factors) != len(self.stages):
            raise ValueError(f"the encoder needs {len(self.stages)} ISR factors, got {len(factors)}")
        reduction.check_pool(pool)
        for stage, factor in zip(self.stages, factors):
            reduction.check_factor(factor, pool, stage.blocks[0].attn.name)
        for stage, factor in zip(self.stages, factors):
            stage.set_isr(factor, pool)

    def pool_ratios(self) -> tuple[int, ...]:
        """Active pooling ratio of each stage."""
        return tuple(stage.pool_ratio for stage in self.stages)

    def stage_sizes(self, height: int, width: int) -> list[tuple[int, int]]:
        """Token grid of each stage for an input of ``height x width`` (the patch-embedding convs)."""
        sizes, hw = [], (height, width)
        for stage in self.stages:
            hw = stage.downsample.output_size(*hw)
            sizes.append(hw)
        return sizes

    def check_input_size(self, height: int, width: int) -> list[tuple[int, int]]:
        """The stage grids for ``height x width``; ``ValueError`` when a grid would be empty or
        smaller than its stage's active pooling window."""
        sizes = self.stage_sizes(height, width)
        for i, (stage, (h, w)) in enumerate(zip(self.stages, sizes)):
            if h < 1 or w < 1:
                raise ValueError(f"input {height}x{width} is too small for encoder stage {i + 1}")
            stage.blocks[0].attn.pooled_hw(h, w)
        return sizes

    def min_input_size(self, stage_minima: Sequence[int] | None = None) -> tuple[int, int]:
        """Smallest input ``(h, w)`` whose stage grids are at least ``stage_minima[i]`` on each side
        (default: each stage's active pooling ratio), by inverting each conv's geometry."""
        minima = self.pool_ratios() if stage_minima is None else tuple(stage_minima)
        if len(minima) != len(self.stages):
            raise ValueError(f"stage_minima needs {len(self.stages)} values, got {len(minima)}")
        best = (1, 1)
        for j in range(len(self.stages)):
            need = (minima[j], minima[j])
            for stage in reversed(self.stages[:j + 1]):
                need = stage.downsample.min_input_size(*need)
            best = (max(best[0], need[0]), max(best[1], need[1]))
        return best

    # timm model interface ------------------------------------------------------------
    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return set()

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        return dict(stem=r"^stages\.0\.downsample",
                    blocks=r"^stages\.(\d+)" if coarse else [(r"^stages\.(\d+)\.blocks\.(\d+)", None),
                                                              (r"^stages\.(\d+)\.norm", (99999,))])

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        for stage in self.stages:
            stage.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        self.num_classes = num_classes
        if global_pool is not None:
            self.global_pool = global_pool
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def forward_stages(self, x: torch.Tensor) -> list[torch.Tensor]:
        """All four stage maps, strides 4, 8, 16, 32."""
        outs = []
        for stage in self.stages:
            x = stage(x)
            outs.append(x)
        return outs

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.stages(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.global_pool == "avg":
            x = x.mean(dim=(2, 3))
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


_REFERENCE_ENCODER_RULES = [
    (r"^patch_embed(\d)\.", lambda m: f"stages.{int(m[1]) - 1}.downsample."),
    (r"^block(\d)\.(\d+)\.mlp\.dwconv\.dwconv\.", lambda m: f"stages.{int(m[1]) - 1}.blocks.{m[2]}.mlp.dwconv."),
    (r"^block(\d)\.(\d+)\.", lambda m: f"stages.{int(m[1]) - 1}.blocks.{m[2]}."),
    (r"^norm(\d)\.", lambda m: f"stages.{int(m[1]) - 1}.norm."),
]


def reference_encoder_key(key: str) -> str:
    """Map one reference encoder key (no ``backbone.`` prefix) onto this module tree."""
    for pattern, repl in _REFERENCE_ENCODER_RULES:
        new, n = re.subn(pattern, repl, key, count=1)
        if n:
            return new
    return key


def checkpoint_filter_fn(state_dict: dict, model: EFT) -> dict:
    """Convert a reference (or mmseg ``backbone.``) EFT state dict to this naming.

    Classifier weights are kept only when the model has a head of the same shape.
    """
    state_dict = state_dict.get("state_dict", state_dict.get("model", state_dict))
    target = model.state_dict()
    out = {}
    for k, v in state_dict.items():
        k = k.removeprefix("backbone.")
        k = reference_encoder_key(k)
        if k.startswith("head.") and (k not in target or target[k].shape != v.shape):
            continue
        out[k] = v
    return out


def _create_eft(variant: str, size: str, pretrained: bool = False, **kwargs) -> EFT:
    out_indices = kwargs.pop("out_indices", (0, 1, 2, 3))
    cfg = dict(EFT_CONFIGS[size])
    cfg.update(kwargs)
    return build_model_with_cfg(
        EFT, variant, pretrained, pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(flatten_sequential=True, out_indices=out_indices), **cfg)


def _cfg(**kwargs) -> dict:
    return dict(num_classes=1000, input_size=(3, 224, 224), pool_size=(7, 7), crop_pct=0.9,
                interpolation="bicubic", mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
                first_conv="stages.0.downsample.proj", classifier="head", license="apache-2.0", **kwargs)


try:  # timm >= 0.9: pretrained config tags
    from timm.models import generate_default_cfgs

    default_cfgs = generate_default_cfgs({"eft_t": _cfg(), "eft_b": _cfg()})
except ImportError:  # pragma: no cover
    default_cfgs = {}


@register_model
def eft_t(pretrained: bool = False, **kwargs) -> EFT:
    """EFT-T: channels 32/64/128/256, depths 2/2/10/2.

    ``pretrained`` is timm's ``create_model`` argument (weights from its hub, where none are
    registered for EFT); an ImageNet encoder checkpoint is loaded with
    :func:`edaformer.load_checkpoint` (config key ``model.encoder_weights``)."""
    return _create_eft("eft_t", "t", pretrained, **kwargs)


@register_model
def eft_b(pretrained: bool = False, **kwargs) -> EFT:
    """EFT-B: channels 64/128/256/512, depths 3/3/22/3 (``pretrained``: see :func:`eft_t`)."""
    return _create_eft("eft_b", "b", pretrained, **kwargs)
