"""Inference Spatial Reduction (ISR) settings.

An ISR setting multiplies every key/value pooling ratio by an integer factor at
inference time. It is written as encoder factors (stages 1-4) then decoder
factors (levels c2, c3, c4): ``"2211-222"``. ``"1111-111"`` is the training setting.
"""
from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator, Sequence
from typing import NamedTuple, Union

__all__ = ["ISRSetting", "parse_isr", "isr", "TRAINING_ISR", "PAPER_ISR_SWEEP"]


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


TRAINING_ISR = ISRSetting((1, 1, 1, 1), (1, 1, 1))
PAPER_ISR_SWEEP = ("1111-111", "1111-222", "2211-222", "2222-222")


@contextlib.contextmanager
def isr(model, spec: ISRSpec) -> Iterator:
    """Apply an ISR setting inside a ``with`` block, restoring the previous one after."""
    previous = model.isr
    model.set_isr(spec)
    try:
        yield model
    finally:
        model.set_isr(previous)
