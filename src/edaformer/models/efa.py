"""Embedding-free attention (EFA) and the transformer block built on it.

Tokens travel as ``(B, N, C)`` with ``N = H * W`` in row-major order. That is
the same memory as a channels-last ``(B, C, H, W)`` map, so :func:`to_map` and
:func:`to_tokens` are views, not copies, and the 1x1 / depthwise convolutions
run in channels-last layout.
"""
from __future__ import annotations

import ctypes
import functools
import math
import os
import sys

import torch
import torch.nn.functional as F
from timm.layers import DropPath, trunc_normal_
from torch import nn

__all__ = ["EFA", "ConvFFN", "EFABlock", "to_map", "to_tokens", "init_weights", "resize_bilinear"]

# Opt-in: CPU inference resize outputs of at least this many bytes are allocated on transparent
# huge pages (see :func:`resize_bilinear`). ``None`` (the default) disables it; the environment
# variable ``EDAFORMER_HUGE_PAGES=1`` sets 32 MiB at import.
HUGE_PAGE_MIN_BYTES: int | None = (32 << 20) if os.environ.get("EDAFORMER_HUGE_PAGES", "0") not in ("", "0") else None

# CPU inference runs the FFN of maps with more tokens than this in bands of about this many
# tokens (see :class:`ConvFFN`); ``None`` disables it (environment at import:
# ``EDAFORMER_FFN_CHUNK_TOKENS=0``).
FFN_CHUNK_TOKENS: int | None = int(os.environ.get("EDAFORMER_FFN_CHUNK_TOKENS", "4096") or 0) or None


def to_map(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """View tokens ``(B, H*W, C)`` as a channels-last map ``(B, C, H, W)`` (no copy)."""
    return x.unflatten(1, (h, w)).permute(0, 3, 1, 2)


def to_tokens(x: torch.Tensor) -> torch.Tensor:
    """Flatten a map ``(B, C, H, W)`` to tokens ``(B, H*W, C)`` (no copy when channels-last)."""
    return x.permute(0, 2, 3, 1).flatten(1, 2)


@functools.lru_cache(maxsize=None)
def _madvise_hugepage():
    """``madvise(addr, len, MADV_HUGEPAGE)`` where transparent huge pages can be requested, else None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            if "[never]" in f.read():
                return None
        libc = ctypes.CDLL(None, use_errno=True)
        madvise = libc.madvise
        madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        madvise.restype = ctypes.c_int
    except (OSError, AttributeError):
        return None
    page = os.sysconf("SC_PAGE_SIZE")
    madv_hugepage = 14

    def advise(t: torch.Tensor) -> None:
        start, nbytes = t.data_ptr(), t.untyped_storage().nbytes()
        aligned = (start + page - 1) // page * page
        if start + nbytes > aligned:
            madvise(aligned, start + nbytes - aligned, madv_hugepage)
    return advise


def _huge_page_output(x: torch.Tensor, size) -> bool:
    if (HUGE_PAGE_MIN_BYTES is None or not isinstance(x, torch.Tensor) or x.device.type != "cpu"
            or (x.requires_grad and torch.is_grad_enabled())):
        return False
    if torch.jit.is_scripting() or torch.jit.is_tracing() or torch.compiler.is_compiling():
        return False
    nbytes = x.shape[0] * x.shape[1] * int(size[0]) * int(size[1]) * x.element_size()
    return nbytes >= HUGE_PAGE_MIN_BYTES and _madvise_hugepage() is not None


def resize_bilinear(x: torch.Tensor, size) -> torch.Tensor:
    """``F.interpolate(x, size, mode="bilinear", align_corners=False)``, bit for bit.

    Opt-in (:data:`HUGE_PAGE_MIN_BYTES`): a large CPU inference output (the full-resolution
    logits: 150 x 512 x 512 floats are 157 MB) is allocated untouched, advised onto transparent
    huge pages, and then written by the same kernel. First-touching fresh memory 4 KiB page by
    page costs more than the interpolation itself, and huge pages cut the resize at 512x512 from
    ~110 ms to ~30 ms on the benchmark machine -- as long as the kernel has recently freed huge
    pages at hand. In a VM that returns free memory to the host (virtio-balloon free page
    reporting), a huge-page allocation after an idle second costs ~5x more than 4 KiB pages, so
    this is off by default (``benchmarks/RESULTS.md`` has the numbers). Autograd, tracing,
    ``torch.compile``, other devices and kernels without THP always take the plain call.
    """
    if not _huge_page_output(x, size):
        return F.interpolate(x, size=size, mode="bilinear", align_corners=False)
    size = (int(size[0]), int(size[1]))
    channels_last = not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
    out = torch.empty((x.shape[0], x.shape[1], *size), dtype=x.dtype, device=x.device,
                      memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    _madvise_hugepage()(out)
    return torch._C._nn.upsample_bilinear2d(x, size, False, None, None, out=out)


class EFA(nn.Module):
    """Embedding-free attention.

    The input tokens are the queries, split into heads without projection. Keys
    and values are one tensor: the token map average-pooled with kernel = stride
    = ``pool_ratio`` (floor), then a 1x1 conv ``sr`` (and, in the decoder,
    LayerNorm + GELU). ``pool_ratio = train_ratio * isr_factor``; the factor is
    set at run time (Inference Spatial Reduction) without touching weights.
    """

    def __init__(self, dim: int, num_heads: int, train_ratio: int, kv_norm: bool = False,
                 kv_norm_eps: float = 1e-5, name: str = "attention"):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.train_ratio = int(train_ratio)
        self.isr_factor = 1
        self.name = name
        self.sr = nn.Conv2d(dim, dim, kernel_size=1)
        if kv_norm:
            self.norm = nn.LayerNorm(dim, eps=kv_norm_eps)
            self.act = nn.GELU()
        else:
            self.norm = None
            self.act = None
        self.proj = nn.Linear(dim, dim)

    @property
    def pool_ratio(self) -> int:
        return self.train_ratio * self.isr_factor

    def pooled_hw(self, h: int, w: int) -> tuple[int, int]:
        """Key/value grid for an ``h x w`` query grid; raises when it would be empty."""
        r = self.pool_ratio
        if h < r or w < r:
            raise ValueError(
                f"{self.name}: pooling ratio {r} (train {self.train_ratio} x ISR {self.isr_factor}) "
                f"does not fit the {h}x{w} feature map; use a smaller ISR factor or a larger input")
        return h // r, w // r

    def forward(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        b, n, c = x.shape
        self.pooled_hw(h, w)
        r = self.pool_ratio
        kv = to_map(x, h, w)
        if r > 1:
            kv = F.avg_pool2d(kv, r, r)
        kv = to_tokens(self.sr(kv))
        if self.norm is not None:
            kv = self.act(self.norm(kv))
        if kv.stride(-1) != 1:  # the fused SDPA kernels need unit stride along the head dim
            kv = kv.contiguous()
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
        return f"heads={self.num_heads}, train_ratio={self.train_ratio}, isr_factor={self.isr_factor}"


class ConvFFN(nn.Module):
    """``Linear -> [ReLU] -> depthwise 3x3 conv -> GELU -> Linear`` on tokens.

    CPU inference on large maps runs image by image in bands of rows (about
    :data:`FFN_CHUNK_TOKENS` tokens each): the hidden activations (``mlp_ratio`` times wider than
    the tokens) then never exist for the whole map at once, stay in cache, and need no fresh
    page-faulted memory. Each band recomputes the row above and below it that the 3x3
    convolution needs, so the result is that of the whole-map computation up to float rounding
    (BLAS may round a smaller matrix product differently in the last bit; at the default band
    size the float32 logits were bit-identical in the tests).
    The sub-modules are then called once per band (forward hooks see bands); FLOP counting on
    the ``meta`` device and everything under autograd, tracing or ``torch.compile`` take the
    whole-map path.
    """

    def __init__(self, dim: int, hidden: int, relu: bool):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.relu = nn.ReLU(inplace=True) if relu else None
        self.dwconv = nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        rows = self._band_rows(x, h, w)
        if rows:
            return self._forward_bands(x, h, w, rows)
        x = self.fc1(x)
        if self.relu is not None:
            x = self.relu(x)
        x = to_tokens(self.dwconv(to_map(x, h, w)))
        return self.fc2(self.act(x))

    def _band_rows(self, x: torch.Tensor, h: int, w: int) -> int:
        """Rows per band for banded inference, or 0 for the whole-map computation."""
        if FFN_CHUNK_TOKENS is None or torch.jit.is_scripting() or torch.jit.is_tracing():
            return 0
        if torch.compiler.is_compiling() or not isinstance(x, torch.Tensor):
            return 0  # keep compiled / exported / fx graphs shape-generic and loop-free
        if x.device.type != "cpu" or x.shape[1] <= FFN_CHUNK_TOKENS:
            return 0
        if torch.is_grad_enabled() and (x.requires_grad or self.fc1.weight.requires_grad):
            return 0  # training: autograd keeps every band's activations anyway
        rows = max(4, FFN_CHUNK_TOKENS // w)  # >= 4 rows: at most 50% recomputed halo rows
        return rows if rows < h else 0

    def _forward_bands(self, x: torch.Tensor, h: int, w: int, rows: int) -> torch.Tensor:
        b, n, c = x.shape
        out = x.new_empty(b, n, self.fc2.out_features)
        x_rows = x.reshape(b, h, w, c)
        out_rows = out.view(b, h, w, -1)
        gelu_inplace = type(self.act) is nn.GELU
        for i in range(b):
            for r0 in range(0, h, rows):
                r1 = min(h, r0 + rows)
                a0, a1 = max(0, r0 - 1), min(h, r1 + 1)  # a halo row each side (zero padding at the map edges)
                t = self.fc1(x_rows[i:i + 1, a0:a1])
                if self.relu is not None:
                    t = self.relu(t)
                t = self.dwconv(t.permute(0, 3, 1, 2))[:, :, r0 - a0:r1 - a0].permute(0, 2, 3, 1)
                t = torch.ops.aten.gelu_(t, approximate=self.act.approximate) if gelu_inplace else self.act(t)
                out_rows[i:i + 1, r0:r1] = self.fc2(t)
        return out


class EFABlock(nn.Module):
    """Pre-norm transformer block: ``x + EFA(LN(x))`` then ``x + FFN(LN(x))``."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, train_ratio: int, *,
                 norm_eps: float, drop_path: float = 0.0, kv_norm: bool = False,
                 ffn_relu: bool = True, name: str = "block"):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = EFA(dim, num_heads, train_ratio, kv_norm=kv_norm, name=name)
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
