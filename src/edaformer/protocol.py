"""The test-time protocol: how an image is resized and run, in one object.

:class:`TestProtocol` holds the resize box, the size divisor, whole / sliding-window mode, the
window and stride, and the multi-scale (+ flip) test. It comes from a model spec, a config or a
checkpoint's ``meta["test_protocol"]`` (:mod:`edaformer.meta`); :meth:`TestProtocol.resolve`
applies the precedence explicit argument > checkpoint meta > model spec.
:func:`edaformer.inference.preprocess` runs it on an image.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from .data import _pipeline_options
from .data.transforms import eval_input_size
from .meta import TEST_PROTOCOL, protocol_fields
from .models.config import TEST_MODES
from .utils import to_pair

__all__ = ["TestProtocol", "protocol_size"]

Size = tuple[int, int]


@dataclasses.dataclass(frozen=True)
class TestProtocol:
    """How test images are resized and run.

    ``scale``: ``(long, short)`` box the image is resized to fit (keeping its aspect ratio);
    ``None`` keeps the size. ``divisor``: in whole mode both sides are then rounded up to a
    multiple of it (``None``: no rounding; slide mode never rounds). ``mode``: ``whole`` or
    ``slide`` (``crop_size`` windows every ``stride`` pixels). ``tta_scales``: multi-scale test
    ratios of ``scale`` (empty: off), with horizontal flips when ``flip``; without ``tta_scales``,
    ``flip`` averages the prediction with the flipped one.
    """

    __test__ = False  # not a pytest test class

    scale: Size | None = (2048, 512)
    divisor: int | None = 32
    mode: str = "whole"
    crop_size: Size = (512, 512)
    stride: Size = (341, 341)
    tta_scales: tuple[float, ...] = ()
    flip: bool = False

    def __post_init__(self) -> None:
        if self.mode not in TEST_MODES:
            raise ValueError(f"mode must be 'whole' or 'slide', got {self.mode!r}")
        set_ = object.__setattr__
        set_(self, "scale", to_pair(self.scale if self.scale is None else tuple(self.scale), "scale",
                                    allow_none=True))
        set_(self, "crop_size", to_pair(_seq(self.crop_size), "crop_size"))
        set_(self, "stride", to_pair(_seq(self.stride), "stride"))
        if self.divisor is not None:
            if isinstance(self.divisor, bool) or not isinstance(self.divisor, int) or self.divisor < 1:
                raise ValueError(f"divisor must be a positive integer or None, got {self.divisor!r}")
        if self.stride[0] > self.crop_size[0] or self.stride[1] > self.crop_size[1]:
            raise ValueError(f"stride {self.stride} larger than crop_size {self.crop_size} would leave pixels "
                             "unpredicted")
        scales = tuple(float(r) for r in self.tta_scales)
        if any(r <= 0 for r in scales):
            raise ValueError(f"tta_scales must be positive, got {self.tta_scales!r}")
        set_(self, "tta_scales", scales)
        set_(self, "flip", bool(self.flip))

    # -- derived ---------------------------------------------------------------------------
    @property
    def size_divisor(self) -> int | None:
        """The rounding applied: ``divisor`` in whole mode, none in slide mode."""
        return self.divisor if self.mode == "whole" and self.divisor and self.divisor > 1 else None

    def input_size(self, h: int, w: int) -> Size:
        """The size an ``h x w`` image is run at."""
        return protocol_size(h, w, self.scale, self.size_divisor)

    def replace(self, **overrides: Any) -> "TestProtocol":
        """A copy with the given fields replaced; ``None`` values are ignored."""
        return dataclasses.replace(self, **{k: v for k, v in overrides.items() if v is not None})

    def to_dict(self) -> dict[str, Any]:
        """Plain lists and numbers, for checkpoint meta and JSON."""
        return dict(scale=None if self.scale is None else list(self.scale), divisor=self.divisor, mode=self.mode,
                    crop_size=list(self.crop_size), stride=list(self.stride), tta_scales=list(self.tta_scales),
                    flip=self.flip)

    def describe(self) -> str:
        scale = "original size" if self.scale is None else f"fit {self.scale[0]}x{self.scale[1]}"
        parts = [self.mode, scale]
        if self.size_divisor:
            parts.append(f"sides to multiples of {self.size_divisor}")
        if self.mode == "slide":
            parts.append(f"window {self.crop_size[0]}x{self.crop_size[1]} stride {self.stride[0]}x{self.stride[1]}")
        if self.tta_scales:
            parts.append(f"scales {', '.join(f'{r:g}' for r in self.tta_scales)}" + (" + flip" if self.flip else ""))
        elif self.flip:
            parts.append("flip")
        return ", ".join(parts)

    # -- sources ---------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "TestProtocol":
        """From :meth:`to_dict` output (e.g. a checkpoint's ``meta["test_protocol"]``); the names of
        earlier ONNX metadata, ``test_scale`` / ``size_divisor``, are read as ``scale`` / ``divisor``."""
        if not isinstance(data, Mapping):
            raise ValueError(f"a test protocol must be a mapping, got {type(data).__name__}")
        data = protocol_fields(data)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown test protocol key(s) {', '.join(unknown)}; expected {', '.join(sorted(known))}")
        return cls(**dict(data))

    @classmethod
    def from_spec(cls, spec: Any) -> "TestProtocol":
        """The named model's protocol (``test_scale``, ``test_mode``, ``crop_size``, ``slide_stride``);
        ``None`` gives the defaults."""
        if spec is None:
            return cls()
        mode = getattr(spec, "test_mode", "whole")
        return cls(scale=tuple(spec.test_scale), divisor=32 if mode == "whole" else None, mode=mode,
                   crop_size=tuple(spec.crop_size), stride=tuple(spec.slide_stride))

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> "TestProtocol":
        """From a resolved config: ``data.test_scale or data.scale``, ``data.size_divisor`` (with the
        dataset type's defaults), ``eval.mode``, ``eval.crop_size or data.crop_size``, ``eval.stride``
        (default 2/3 of the window), ``eval.tta_scales`` / ``eval.tta_flip`` when ``eval.tta``."""
        data, ecfg = cfg["data"], cfg["eval"]
        opts = _pipeline_options(data, str(data.get("type", "")).lower())
        crop = to_pair(_seq(ecfg.get("crop_size") or opts["crop_size"]), "crop_size")
        stride = ecfg.get("stride") or (int(crop[0] * 2 / 3), int(crop[1] * 2 / 3))
        tta = bool(ecfg.get("tta"))
        return cls(scale=tuple(data.get("test_scale") or opts["scale"]), divisor=opts["size_divisor"],
                   mode=ecfg.get("mode") or "whole", crop_size=crop, stride=_seq(stride),
                   tta_scales=tuple(ecfg.get("tta_scales") or ()) if tta else (),
                   flip=bool(ecfg.get("tta_flip", True)) if tta else False)

    @classmethod
    def from_model(cls, model: Any) -> "TestProtocol":
        return cls.from_spec(getattr(model, "spec", None))

    @classmethod
    def resolve(cls, model: Any = None, meta: Mapping[str, Any] | None = None, base: "TestProtocol | None" = None,
                source: Any = None, **overrides: Any) -> "TestProtocol":
        """Explicit ``overrides`` (``None`` = not given) > ``meta["test_protocol"]`` > ``base`` (default:
        the model's spec). A malformed stored protocol raises ``ValueError`` naming ``source`` (the
        checkpoint file)."""
        stored = (meta or {}).get(TEST_PROTOCOL)
        if stored is not None:
            try:
                protocol = cls.from_dict(stored)
            except (TypeError, ValueError) as e:
                raise ValueError(f"{source if source is not None else 'checkpoint'}: invalid "
                                 f"meta[{TEST_PROTOCOL!r}]: {e}") from None
        else:
            protocol = base if base is not None else cls.from_model(model)
        if overrides.get("mode") == "whole" and protocol.divisor is None and overrides.get("divisor") is None:
            overrides["divisor"] = 32  # a slide protocol switched to whole mode rounds as whole mode does
        return protocol.replace(**overrides)


def _seq(value: Any) -> Any:
    return tuple(value) if isinstance(value, (list, tuple)) else value


def protocol_size(h: int, w: int, scale: Size | None = (2048, 512), divisor: int | None = 32) -> Size:
    """The test-time input size of an ``h x w`` image: fit the ``(long, short)`` box ``scale``, then
    both sides rounded up to a multiple of ``divisor`` (``None`` or 1 skips it)."""
    return eval_input_size((h, w), scale, divisor)
