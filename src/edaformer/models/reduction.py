"""How an EFA layer reduces its key/value tokens under Inference Spatial Reduction (ISR).

A layer runs its training pooling while its ISR factor is 1: average pooling with kernel =
stride = ``train_ratio`` (floor), skipped for ratio 1. A layer with factor ``f > 1`` reduces
with the chosen ``pool`` (queries are never touched), where ``r = train_ratio * f``:

* ``avg`` (default, the reference ISR): average pooling, kernel = stride = ``r``, floor.
* ``max``: max pooling, kernel = stride = ``r``, floor.
* ``overlap``: overlapping average pooling, stride ``r``, padding ``p = r // 2``, kernel
  ``r + 2p`` (``2r`` for even ``r``), ``count_include_pad=False``. Each window is the
  non-overlapping one widened by half a stride on both sides (neighbouring windows overlap by
  50% for even ``r``), so every window is centred where the ``avg`` window is and the output
  grid, ``floor((n + 2p - (r + 2p)) / r) + 1 = floor(n / r)``, is exactly the ``avg`` grid:
  the attention costs the same. Border windows average only the tokens that exist.
* ``merge``: average pooling at the training ratio (as for factor 1), the 1x1 ``sr`` conv (and
  the decoder's LayerNorm + GELU), then one step of bipartite soft matching (token merging) on
  the resulting key/value tokens, :func:`merge_tokens`. One step removes at most half of the
  tokens, so factor 2 means "halve the key/value tokens once" and factor 1 "no merging"; a
  larger factor is rejected.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

__all__ = ["ISR_POOLS", "KVReduction", "check_pool", "check_factor", "plan", "pool_map", "overlap_geometry",
           "merged_count", "merge_tokens", "merge_flops"]

ISR_POOLS = ("avg", "max", "overlap", "merge")
MERGE_MAX_FACTOR = 2


class KVReduction(NamedTuple):
    """What one layer does to its key/value tokens for one query grid.

    ``op``: the pooling run on the token map (``"avg"``, ``"max"`` or ``"overlap"``; ratio 1
    ``avg`` is the identity); ``kernel``, ``stride``, ``padding`` its geometry; ``pooled_hw``
    the pooled grid; ``merged``: a merging step follows; ``tokens``: key/value tokens attended to.
    """

    op: str
    kernel: int
    stride: int
    padding: int
    pooled_hw: tuple[int, int]
    merged: bool
    tokens: int


def check_pool(pool: str) -> str:
    """``pool`` if it names an ISR pooling kind, else ``ValueError``."""
    if pool not in ISR_POOLS:
        raise ValueError(f"unknown ISR pool {pool!r}; choose one of {', '.join(ISR_POOLS)}")
    return pool


def check_factor(factor: int, pool: str, where: str = "layer") -> int:
    """The factor as an ``int``; ``ValueError`` for ``pool="merge"`` with a factor above 2."""
    factor = int(factor)
    if factor < 1:
        raise ValueError(f"{where}: ISR factor {factor} must be >= 1")
    if check_pool(pool) == "merge" and factor > MERGE_MAX_FACTOR:
        raise ValueError(
            f"{where}: ISR factor {factor} is not possible with pool 'merge': one bipartite merging step "
            f"removes at most half of the key/value tokens, so the factor must be 1 (no merging) or 2 (halve them)")
    return factor


def overlap_geometry(ratio: int) -> tuple[int, int, int]:
    """``(kernel, stride, padding)`` of the ``overlap`` pooling for pooling ratio ``ratio``."""
    padding = ratio // 2
    return ratio + 2 * padding, ratio, padding


def plan(train_ratio: int, factor: int, pool: str, h: int, w: int) -> KVReduction:
    """The key/value reduction of a layer (training ratio, ISR factor, pool) on an ``h x w`` grid.

    The grid must hold the pooling window (the caller checks it).
    """
    if factor == 1 or pool == "merge":
        ratio = train_ratio
        op, kernel, stride, padding = "avg", ratio, ratio, 0
    else:
        ratio = train_ratio * factor
        op = pool
        kernel, stride, padding = overlap_geometry(ratio) if pool == "overlap" else (ratio, ratio, 0)
    pooled = (h // ratio, w // ratio)
    merged = pool == "merge" and factor > 1
    n = pooled[0] * pooled[1]
    return KVReduction(op, kernel, stride, padding, pooled, merged, merged_count(n) if merged else n)


def pool_map(x: torch.Tensor, step: KVReduction) -> torch.Tensor:
    """Pool the ``(B, C, H, W)`` token map as ``step`` says."""
    if step.op == "avg":
        return x if step.kernel == 1 else F.avg_pool2d(x, step.kernel, step.stride)
    if step.op == "max":
        return F.max_pool2d(x, step.kernel, step.stride)
    return F.avg_pool2d(x, step.kernel, step.stride, step.padding, count_include_pad=False)


def merged_count(n: int) -> int:
    """Tokens left after one merging step on ``n`` tokens: ``n - floor(n / 2) = ceil(n / 2)``."""
    return n - n // 2


def merge_tokens(x: torch.Tensor) -> torch.Tensor:
    """One step of bipartite soft matching on ``(B, N, C)`` tokens -> ``(B, ceil(N / 2), C)``.

    The tokens are split alternately into sets A (even positions, ``ceil(N/2)`` tokens) and B
    (odd positions, ``floor(N/2)``). Each A token finds its most cosine-similar B token; the
    ``r = floor(N/2)`` A tokens with the highest similarity are merged into their B match by
    averaging (every token stands for the same number of pixels here, so this is the
    size-weighted average), the others are kept. Output: kept A tokens, then the B tokens.
    The attention that follows is plain (no size bias). Deterministic: ties in the ranking
    keep token order, and the merge is a matrix product with a 0/1 assignment, not an atomic
    scatter-add.
    """
    b, n, c = x.shape
    r = n // 2
    if r == 0:
        return x
    a, dst = x[:, 0::2], x[:, 1::2]
    scores = F.normalize(a, dim=-1) @ F.normalize(dst, dim=-1).transpose(1, 2)  # (B, |A|, |B|)
    match = scores.argmax(dim=-1)                                                # (B, |A|)
    best = scores.gather(-1, match.unsqueeze(-1)).squeeze(-1)
    order = torch.sort(best, dim=-1, descending=True, stable=True).indices
    merged, kept = order[:, :r], order[:, r:]
    src = a.gather(1, merged.unsqueeze(-1).expand(-1, -1, c))                  # (B, r, C)
    assign = torch.zeros(b, r, dst.shape[1], dtype=x.dtype, device=x.device)
    assign.scatter_(2, match.gather(1, merged).unsqueeze(-1), 1.0)             # (B, r, |B|)
    sums = dst + assign.transpose(1, 2) @ src
    counts = 1.0 + assign.sum(dim=1).unsqueeze(-1)                              # (B, |B|, 1)
    out = sums / counts
    if kept.shape[1]:
        out = torch.cat([a.gather(1, kept.unsqueeze(-1).expand(-1, -1, c)), out], dim=1)
    return out


def merge_flops(n: int, channels: int) -> int:
    """Multiply-adds of one merging step on ``n`` tokens of ``channels`` (one image).

    ``n * C`` for the squared norms of the cosine similarity, ``|A| * |B| * C`` for the
    similarity matrix, ``r * C`` for adding the merged tokens into their matches.
    """
    n_a, n_b = n - n // 2, n // 2
    return channels * (n + n_a * n_b + n // 2)
