"""The argmax of bilinearly resized logits from a few candidate classes per pixel.

A resized logit is a convex combination of source logits: output pixel ``p`` takes
``sum_s w_s * l_s[k]`` over a small block of source pixels ``s`` (2 x 2 for one bilinear step,
up to 3 x 3 or 4 x 4 for a chain of them), with ``w_s >= 0``. For a class ``k`` outside the top
``T`` classes of every source pixel of the block, ``l_s[k] <= t_s`` (the ``T+1``-th largest logit
of ``s``), so its resized logit is at most ``sum_s w_s * t_s``. The union of the blocks' top-``T``
classes therefore holds the argmax wherever the best of them scores above that bound, and only the
rare pixel where it does not (near-ties of many classes) needs all ``K`` classes.

This turns ``K`` multiply-adds per output pixel and source pixel into about ``4 T`` (one step)
and never makes the full-resolution logits: with 150 classes and ``T = 4`` the label map of a
512 x 512 image from stride-8 logits is several times faster than resize + argmax. The labels are
those of ``F.interpolate`` (each size in turn) + ``argmax``; the resized logits are summed in
another order, so a pixel whose two best classes tie to within float rounding may differ.
"""
from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

import numpy as np
import torch

__all__ = ["TOP", "axis_taps", "candidate_labels", "row_weights"]

TOP = 4  # candidate classes taken from each source pixel


@lru_cache(maxsize=64)
def row_weights(in_size: int, out_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Source rows ``i0, i1`` and weights ``w0, w1`` of each output row of a bilinear resize
    (``align_corners=False``), as the kernel computes them in float32 (shared: do not modify)."""
    scale = torch.tensor(in_size, dtype=torch.float32) / out_size
    dst = torch.arange(out_size, dtype=torch.float32) + 0.5
    real = torch.addcmul(torch.full_like(dst, -0.5), dst, scale.expand_as(dst)).clamp_min_(0)
    i0 = real.floor().long().clamp_(max=in_size - 1)
    w1 = (real - i0).clamp_(0, 1)
    i1 = i0 + (i0 < in_size - 1).long()
    return i0, i1, 1 - w1, w1


def axis_taps(in_size: int, out_sizes: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """One axis of a chain of bilinear resizes ``in_size -> out_sizes[0] -> ... -> out_sizes[-1]``
    as ``(start, weights)``: output ``i`` is ``sum_j weights[i, j] * source[start[i] + j]``, with
    ``start[i] + weights.shape[1] <= in_size``."""
    rows = torch.arange(in_size)[:, None]
    weights = torch.ones(in_size, 1)
    for size in out_sizes:
        i0, i1, w0, w1 = row_weights(rows.shape[0], size)
        rows = torch.cat([rows[i0], rows[i1]], 1)
        weights = torch.cat([weights[i0] * w0[:, None], weights[i1] * w1[:, None]], 1)
    start = rows.amin(1)
    taps = min(int((rows.amax(1) - start).max()) + 1, in_size)
    start = start.clamp(max=in_size - taps)
    out = torch.zeros(rows.shape[0], taps)
    out.scatter_add_(1, (rows - start[:, None]).clamp_(0, taps - 1), weights)
    return start, out


def _gather_blocks(t: torch.Tensor, r: int, c: int, rows: slice) -> torch.Tensor:
    """``(B, n, w2, r, c, ...)``: the ``r x c`` block of ``t (B, h, w, ...)`` at every block origin
    of the cell rows ``rows``."""
    w2 = t.shape[2] - c + 1
    n = rows.stop - rows.start
    return torch.stack([torch.stack([t[:, rows.start + dr:rows.start + dr + n, dc:dc + w2] for dc in range(c)], 3)
                        for dr in range(r)], 3)


def candidate_labels(logits: torch.Tensor, sizes: Sequence[tuple[int, int]], band_bytes: int,
                     top: int = TOP) -> np.ndarray | None:
    """Label maps ``(B, H, W)`` of ``logits (B, K, h, w)`` resized through ``sizes`` and reduced
    by argmax, from ``top`` candidate classes per source pixel; None where that would not save
    work (fewer than twice as many classes as candidates), and the caller takes every class."""
    b, k, h, w = logits.shape
    sy, wy = axis_taps(h, [s[0] for s in sizes])
    sx, wx = axis_taps(w, [s[1] for s in sizes])
    r, c = wy.shape[1], wx.shape[1]
    n = r * c * top
    if 2 * n > k:
        return None
    out_h, out_w = sizes[-1]
    with torch.inference_mode():
        src = logits.float().permute(0, 2, 3, 1).contiguous()  # (B, h, w, K), a view for channels-last logits
        vals, idx = src.topk(top + 1, dim=-1)
        bound_src, idx = vals[..., top].contiguous(), idx[..., :top].contiguous()
        labels = np.empty((b, out_h, out_w), np.uint8 if k <= 256 else np.int64)
        step = max(1, band_bytes // (4 * b * out_w * n * 3))
        for y0 in range(0, out_h, step):
            y1 = min(out_h, y0 + step)
            labels[:, y0:y1] = _band(src, idx, bound_src, sy[y0:y1], wy[y0:y1], sx, wx, r, c).numpy()
    return labels


def _band(src, idx, bound_src, sy, wy, sx, wx, r: int, c: int) -> torch.Tensor:
    """Labels of the output rows whose blocks start at source rows ``sy`` (weights ``wy``)."""
    cells = slice(int(sy[0]), int(sy[-1]) + 1)
    local = sy - cells.start
    cand = _gather_blocks(idx, r, c, cells).flatten(3)            # (B, n, w2, N) candidate classes
    blocks = _gather_blocks(src, r, c, cells)                        # (B, n, w2, r, c, K)
    vals = blocks.gather(-1, cand[:, :, :, None, None].expand(-1, -1, -1, r, c, -1))
    # the bound of the other classes rides along as one more column, blended with the same weights
    vals = torch.cat([vals, _gather_blocks(bound_src, r, c, cells)[..., None]], -1)
    cols = None                                                      # (B, n, W, r, N + 1): the width step
    for dc in range(c):
        term, weight = vals[:, :, sx, :, dc], wx[:, dc].view(1, 1, -1, 1, 1)
        cols = term.mul_(weight) if cols is None else cols.addcmul_(term, weight)
    score = None                                                     # (B, rows, W, N + 1): the height step
    for dr in range(r):
        term, weight = cols[:, local, :, dr], wy[:, dr].view(1, -1, 1, 1)
        score = term.mul_(weight) if score is None else score.addcmul_(term, weight)
    best, arg = score[..., :-1].max(-1)
    n_cand, w2 = cand.shape[-1], cand.shape[2]
    at = (local[:, None] * w2 + sx[None, :]) * n_cand + arg          # the chosen candidate, flat in cand
    labels = cand.flatten(1).gather(1, at.flatten(1)).view_as(arg)
    open_ = ~(best > score[..., -1])
    if open_.any():  # near-ties of many classes: every class at those pixels
        bi, yi, xi = open_.nonzero(as_tuple=True)
        block = blocks[bi, local[yi], sx[xi]]                        # (m, r, c, K)
        weight = wy[yi][:, :, None] * wx[xi][:, None, :]
        labels[bi, yi, xi] = (block * weight[..., None]).sum((1, 2)).argmax(-1)
    return labels
