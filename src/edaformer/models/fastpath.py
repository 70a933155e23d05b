"""CPU inference fast paths, switched by a scoped option.

Two paths give the same numbers as the plain computation while using memory better on CPU:

* banded ConvFFN (on by default): the FFN of a large map runs image by image in bands of rows
  of about ``ffn_band_tokens`` tokens, so the ``mlp_ratio`` times wider hidden activations never
  exist for the whole map at once, stay in cache and need no fresh page-faulted memory. Each band
  recomputes the row above and below it that the 3x3 depthwise convolution needs; the result is
  the whole-map result up to float rounding (BLAS may round a smaller matrix product differently
  in the last bit).
* huge-page resize outputs (off by default): a large bilinear resize output (the full-resolution
  logits) is allocated untouched, advised onto transparent huge pages with ``madvise`` and then
  written by the same kernel, bit for bit the result of ``F.interpolate``. First-touching fresh
  memory 4 KiB page by page can cost more than the interpolation itself; but in a VM that hands
  freed memory back to the host a cold huge-page allocation costs ~5x more, hence opt-in
  (``benchmarks/RESULTS.md`` has the numbers).

Both apply only to CPU tensors outside autograd, tracing, scripting and ``torch.compile``;
everything else (training, FLOP counting on ``meta``, CUDA, ONNX export) takes the plain path.
The options live in a :class:`~contextvars.ContextVar`: :func:`options` changes them for a
``with`` block of the current thread / task only.
"""
from __future__ import annotations

import contextlib
import contextvars
import ctypes
import dataclasses
import functools
import os
import sys
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["FastPathOptions", "options", "get_options", "ffn_band_rows", "banded_ffn", "resize_bilinear"]


@dataclasses.dataclass(frozen=True)
class FastPathOptions:
    """``ffn_band_tokens``: band size of the banded ConvFFN, ``None`` for whole maps.
    ``huge_pages``: resize outputs of at least ``huge_page_min_bytes`` go on transparent huge pages."""

    ffn_band_tokens: int | None = 4096
    huge_pages: bool = False
    huge_page_min_bytes: int = 32 << 20

    def __post_init__(self) -> None:
        band = self.ffn_band_tokens
        if band is not None and (isinstance(band, bool) or not isinstance(band, int) or band < 1):
            raise ValueError(f"ffn_band_tokens must be a positive integer or None, got {band!r}")
        if not isinstance(self.huge_pages, bool):
            raise ValueError(f"huge_pages must be True or False, got {self.huge_pages!r}")
        size = self.huge_page_min_bytes
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise ValueError(f"huge_page_min_bytes must be a non-negative integer, got {size!r}")


_OPTIONS: contextvars.ContextVar[FastPathOptions] = contextvars.ContextVar(
    "edaformer_fastpath_options", default=FastPathOptions())


def get_options() -> FastPathOptions:
    """The fast-path options in force here."""
    return _OPTIONS.get()


@contextlib.contextmanager
def options(**changes) -> Iterator[FastPathOptions]:
    """Change fast-path options inside a ``with`` block; the previous ones come back on exit.

    ``with fastpath.options(ffn_band_tokens=None, huge_pages=True): model(x)``
    """
    names = {f.name for f in dataclasses.fields(FastPathOptions)}
    unknown = sorted(set(changes) - names)
    if unknown:
        raise ValueError(f"unknown fast-path option(s) {', '.join(unknown)}; known: {', '.join(sorted(names))}")
    token = _OPTIONS.set(dataclasses.replace(_OPTIONS.get(), **changes))
    try:
        yield _OPTIONS.get()
    finally:
        _OPTIONS.reset(token)


def _plain_graph(x) -> bool:
    """True where only the plain computation may run: tracing, scripting, compiling, no real tensor."""
    if torch.jit.is_scripting() or torch.jit.is_tracing() or torch.compiler.is_compiling():
        return True
    return not isinstance(x, torch.Tensor)


# -- banded ConvFFN ------------------------------------------------------------------------------
def ffn_band_rows(ffn: nn.Module, x: torch.Tensor, h: int, w: int) -> int:
    """Rows per band for the banded FFN of tokens ``x`` on an ``h x w`` map, 0 for the whole map."""
    if _plain_graph(x) or x.device.type != "cpu":
        return 0  # compiled / exported / fx graphs stay shape-generic and loop-free
    band = _OPTIONS.get().ffn_band_tokens
    if band is None or x.shape[1] <= band:
        return 0
    if torch.is_grad_enabled() and (x.requires_grad or ffn.fc1.weight.requires_grad):
        return 0  # training: autograd keeps every band's activations anyway
    rows = max(4, band // w)  # >= 4 rows: at most 50% recomputed halo rows
    return rows if rows < h else 0


def banded_ffn(ffn: nn.Module, x: torch.Tensor, h: int, w: int) -> torch.Tensor | None:
    """The ConvFFN ``ffn`` on ``x`` computed in bands, or ``None`` where the plain path applies.

    ``ffn`` has ``fc1``, optional ``relu``, ``dwconv`` (3x3 depthwise, padding 1), ``act``, ``fc2``;
    its sub-modules are called once per band (forward hooks see bands).
    """
    rows = ffn_band_rows(ffn, x, h, w)
    if not rows:
        return None
    b, n, c = x.shape
    out = x.new_empty(b, n, ffn.fc2.out_features)
    x_rows = x.reshape(b, h, w, c)
    out_rows = out.view(b, h, w, -1)
    gelu_inplace = type(ffn.act) is nn.GELU
    for i in range(b):
        for r0 in range(0, h, rows):
            r1 = min(h, r0 + rows)
            a0, a1 = max(0, r0 - 1), min(h, r1 + 1)  # a halo row each side (zero padding at the map edges)
            t = ffn.fc1(x_rows[i:i + 1, a0:a1])
            if ffn.relu is not None:
                t = ffn.relu(t)
            t = ffn.dwconv(t.permute(0, 3, 1, 2))[:, :, r0 - a0:r1 - a0].permute(0, 2, 3, 1)
            t = torch.ops.aten.gelu_(t, approximate=ffn.act.approximate) if gelu_inplace else ffn.act(t)
            out_rows[i:i + 1, r0:r1] = ffn.fc2(t)
    return out


# -- huge-page resize ----------------------------------------------------------------------------
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


def _huge_page_output(x: torch.Tensor, size: Sequence[int]) -> bool:
    if _plain_graph(x) or x.device.type != "cpu" or (x.requires_grad and torch.is_grad_enabled()):
        return False
    opts = _OPTIONS.get()
    if not opts.huge_pages:
        return False
    nbytes = x.shape[0] * x.shape[1] * int(size[0]) * int(size[1]) * x.element_size()
    return nbytes >= opts.huge_page_min_bytes and _madvise_hugepage() is not None


def resize_bilinear(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """``F.interpolate(x, size, mode="bilinear", align_corners=False)``, bit for bit; with the
    ``huge_pages`` option a large CPU inference output is written into huge-page memory."""
    if not _huge_page_output(x, size):
        return F.interpolate(x, size=size, mode="bilinear", align_corners=False)
    size = (int(size[0]), int(size[1]))
    channels_last = not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
    out = torch.empty((x.shape[0], x.shape[1], *size), dtype=x.dtype, device=x.device,
                      memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    _madvise_hugepage()(out)
    return torch._C._nn.upsample_bilinear2d(x, size, False, None, None, out=out)
