"""Inference Spatial Reduction (ISR) settings.

An ISR setting multiplies every key/value pooling ratio by an integer factor at
inference time. For EDAFormer it is written as encoder factors (stages 1-4) then
decoder factors (levels c2, c3, c4): ``"2211-222"``; ``"1111-111"`` is the training
setting. SegFormer and PVTv2 models (see :mod:`edaformer.isr_adapters`) take one
factor per encoder stage: ``"2211"``.
"""
from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator, Sequence
from typing import NamedTuple, Union

from . import isr_adapters
from .utils import unwrap_model

__all__ = ["ISRSetting", "parse_isr", "parse_stage_factors", "set_isr", "set_inference_isr", "get_isr", "isr",
           "TRAINING_ISR", "PAPER_ISR_SWEEP", "MAX_INFERENCE_FACTOR"]


class ISRSetting(NamedTuple):
    """ISR factors: ``encoder`` for stages 1-4, ``decoder`` for levels (c2, c3, c4)."""

    encoder: tuple[int, int, int, int]
    decoder: tuple[int, int, int]

    def __str__(self) -> str:
        sep = "" if all(f < 10 for f in self.encoder + self.decoder) else ","
        return sep.join(map(str, self.encoder)) + "-" + sep.join(map(str, self.decoder))


ISRSpec = Union[str, ISRSetting, Sequence]

_SPEC_RE = re.compile(r"^\s*(\d+)\s*-\s*(\d+)\s*$")


def _check_factors(values: Sequence, expected: int, part: str, spec) -> tuple[int, ...]:
    if len(values) != expected:
        raise ValueError(f"ISR spec {spec!r}: the {part} needs {expected} factors, got {len(values)}")
    out = []
    for v in values:
        if isinstance(v, bool) or not isinstance(v, int) and not (isinstance(v, str) and v.isdigit()):
            raise ValueError(f"ISR spec {spec!r}: {part} factor {v!r} is not a positive integer")
        v = int(v)
        if v < 1:
            raise ValueError(f"ISR spec {spec!r}: {part} factor {v} must be >= 1")
        out.append(v)
    return tuple(out)


def parse_isr(spec: ISRSpec) -> ISRSetting:
    """Parse ``"2211-222"``, ``"2,2,1,1-2,2,2"``, ``((2,2,1,1), (2,2,2))`` or 7 flat integers."""
    if isinstance(spec, ISRSetting):
        return spec
    if isinstance(spec, str):
        text = spec.strip()
        if "," in text:
            parts = text.split("-")
            if len(parts) != 2:
                raise ValueError(f"ISR spec {spec!r}: expected ENCODER-DECODER, e.g. '2211-222'")
            enc, dec = (p.split(",") for p in parts)
            enc = [e.strip() for e in enc]
            dec = [d.strip() for d in dec]
        else:
            m = _SPEC_RE.match(text)
            if not m:
                raise ValueError(
                    f"ISR spec {spec!r}: expected 4 encoder digits, '-', 3 decoder digits, e.g. '2211-222'")
            enc, dec = list(m[1]), list(m[2])
        return ISRSetting(_check_factors(enc, 4, "encoder", spec), _check_factors(dec, 3, "decoder", spec))
    if isinstance(spec, Sequence):
        if len(spec) == 2 and all(isinstance(s, Sequence) for s in spec):
            enc, dec = spec
        elif len(spec) == 7:
            enc, dec = spec[:4], spec[4:]
        else:
            raise ValueError(f"ISR spec {spec!r}: give (encoder 4-tuple, decoder 3-tuple) or 7 integers")
        return ISRSetting(_check_factors(list(enc), 4, "encoder", spec),
                          _check_factors(list(dec), 3, "decoder", spec))
    raise ValueError(f"ISR spec {spec!r}: unsupported type {type(spec).__name__}")


def parse_stage_factors(spec, num_stages: int = 4) -> tuple[int, ...]:
    """Parse one factor per encoder stage: ``"2211"``, ``"16,2,1,1"`` or ``(2, 2, 1, 1)``."""
    example = "2" * min(2, num_stages) + "1" * max(num_stages - 2, 0)
    if isinstance(spec, ISRSetting) or isinstance(spec, str) and "-" in spec:
        raise ValueError(f"ISR spec {spec!r}: this model takes one factor per encoder stage and no decoder "
                         f"part, e.g. {example!r}")
    if isinstance(spec, str):
        text = spec.strip()
        if "," in text:
            values = [v.strip() for v in text.split(",")]
        elif text.isdigit() or not text:
            values = list(text)
        else:
            raise ValueError(f"ISR spec {spec!r}: expected {num_stages} encoder digits, e.g. {example!r}")
    elif isinstance(spec, Sequence):
        values = list(spec)
    else:
        raise ValueError(f"ISR spec {spec!r}: unsupported type {type(spec).__name__}")
    return _check_factors(values, num_stages, "encoder", spec)


TRAINING_ISR = ISRSetting((1, 1, 1, 1), (1, 1, 1))
PAPER_ISR_SWEEP = ("1111-111", "1111-222", "2211-222", "2222-222")
# The largest factor :func:`set_inference_isr` takes. At 8 the first EDAFormer stage already pools
# 64x64 windows (4 key/value tokens for a 512x512 input); the paper's settings use 1 and 2.
MAX_INFERENCE_FACTOR = 8


def _has_own_isr(model) -> bool:
    """EDAFormer (or anything else with a ``set_isr`` method and an ``isr`` attribute)."""
    return callable(getattr(model, "set_isr", None)) and hasattr(model, "isr")


def set_isr(model, spec, pool: str | None = None):
    """Apply an ISR setting to ``model`` in place and return it; no rebuild, no weight change.

    EDAFormer takes ``"2211-222"`` (encoder-decoder) and a key/value ``pool`` kind (``avg``, the
    default, ``max``, ``overlap`` or ``merge``; see :mod:`edaformer.models.reduction`);
    transformers SegFormer and timm PVTv2 models take one factor per encoder stage, ``"2211"``,
    average pooling only, and factor 1 leaves a stage exactly as built. Other models raise
    ``TypeError``.
    """
    target = unwrap_model(model)
    if _has_own_isr(target):
        target.set_isr(spec) if pool is None else target.set_isr(spec, pool=pool)
    else:
        if pool not in (None, "avg"):
            raise ValueError(f"ISR pool {pool!r} is available for EDAFormer models only; "
                             f"{type(target).__name__} takes average pooling")
        factors = parse_stage_factors(spec, isr_adapters.num_stages(target))
        isr_adapters.set_stage_factors(target, factors)
    return model


def _factors(setting) -> tuple[int, ...]:
    return setting.encoder + setting.decoder if isinstance(setting, ISRSetting) else tuple(setting)


def set_inference_isr(model, spec, pool: str | None = None):
    """:func:`set_isr` for a setting given to run inference with (``edaformer predict --isr``,
    ``Segmenter(isr=...)``): every factor must also be at most :data:`MAX_INFERENCE_FACTOR`. A
    setting that does not parse, or with a larger factor (a typo such as ``9999-999``), raises a
    one-line ``ValueError`` naming it, the form and the range, and the model keeps its setting."""
    previous, previous_pool = get_isr(model), getattr(unwrap_model(model), "isr_pool", None)
    set_isr(model, spec, pool=pool)
    active = get_isr(model)
    too_large = [f for f in _factors(active) if f > MAX_INFERENCE_FACTOR]
    if too_large:
        set_isr(model, previous, pool=previous_pool)
        n = len(active)
        form = ("4 encoder and 3 decoder factors, e.g. '2211-222'" if isinstance(active, ISRSetting)
                else f"{n} encoder stage factors, e.g. '{'2' * min(2, n)}{'1' * (n - 2)}'")
        raise ValueError(f"ISR setting {spec!r}: factor {too_large[0]} is out of range; each factor is 1 to "
                         f"{MAX_INFERENCE_FACTOR} ({form})")
    return model


def get_isr(model):
    """The active setting: an :class:`ISRSetting` for EDAFormer, a tuple of stage factors otherwise."""
    target = unwrap_model(model)
    return target.isr if _has_own_isr(target) else isr_adapters.stage_factors(target)


@contextlib.contextmanager
def isr(model, spec: ISRSpec, pool: str | None = None) -> Iterator:
    """Apply an ISR setting (and pool kind) inside a ``with`` block, restoring the previous
    setting and pool kind after (also on error).

    Public as ``edaformer.isr(model, "2211-222")``; inside the package it is imported as
    ``isr_context``, since ``isr`` also names this module, the models' property, the ``eval.isr``
    key and the ``meta["isr"]`` entry."""
    previous = get_isr(model)
    previous_pool = getattr(unwrap_model(model), "isr_pool", None)
    set_isr(model, spec, pool=pool)
    try:
        yield model
    finally:
        set_isr(model, previous, pool=previous_pool)
