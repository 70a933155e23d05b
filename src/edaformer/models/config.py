"""What a model is: the architecture it is built from and the reference test protocol of its dataset.

:class:`EDAFormerConfig` is to :class:`~.segmentor.EDAFormer` what ``SegformerConfig`` is to a
transformers SegFormer: ``EDAFormer(config)`` builds the network from it and keeps it as
``model.config``; the named models of :mod:`.registry` are configs (``get_model_spec(name)``).
A config is frozen and plain: :meth:`~ModelConfig.to_dict` gives lists, numbers and strings (YAML,
JSON or checkpoint meta), :meth:`~ModelConfig.from_dict` reads them back and refuses unknown keys;
every choice is checked when a config is made (:data:`~.reduction.ISR_POOLS`,
:data:`~.mixers.DECODER_OPS`, :data:`TEST_MODES`).

:class:`HFSegFormerConfig` does the same for the SegFormer models of :mod:`.hf_segformer` (which
build a ``transformers.SegformerConfig`` from it).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from ..isr import TRAINING_ISR, parse_isr
from ..utils import plain
from .decoder import DECODER_DEPTHS, check_depths
from .hf_segformer import SEGFORMER_OPTIONS, SEGFORMER_SIZES
from .mixers import DECODER_OPS, check_op  # noqa: F401  (re-exported beside the config)
from .reduction import ISR_POOLS, check_pool  # noqa: F401  (re-exported beside the config)

__all__ = ["ModelConfig", "EDAFormerConfig", "HFSegFormerConfig", "TEST_MODES", "ARCHITECTURE_KEYS"]

TEST_MODES = ("whole", "slide")  # the test protocol's inference modes: the whole image, or sliding windows

# EDAFormerConfig fields that change the network beyond its named model (the paper's ablations):
# training configs set them as ``model.<key>`` and checkpoints rebuild from them
ARCHITECTURE_KEYS = ("decoder_depths", "decoder_op", "train_isr")


def _pair(value: Any, name: str) -> tuple[int, int]:
    values = tuple(value) if isinstance(value, (list, tuple)) else ()
    if len(values) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in values):
        raise ValueError(f"{name} must be 2 integers > 0, got {value!r}")
    return values


def _ints(value: Any, name: str, length: int, minimum: int = 1) -> tuple[int, ...]:
    values = tuple(value) if isinstance(value, (list, tuple)) else ()
    if len(values) != length or not all(isinstance(v, int) and not isinstance(v, bool) and v >= minimum
                                        for v in values):
        raise ValueError(f"{name} must be {length} integers >= {minimum}, got {value!r}")
    return values


def _int(value: Any, name: str, minimum: int = 1) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def _number(value: Any, name: str, low: float = 0.0, high: float | None = None, positive: bool = False) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value >= low
    ok = ok and (not positive or value > 0) and (high is None or value < high)
    if not ok:
        bound = "> 0" if positive else f">= {low:g}" if high is None else f"in [{low:g}, {high:g})"
        raise ValueError(f"{name} must be a number {bound}, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class ModelConfig:
    """What every named model has: its name and dataset, class count, input channels, and the
    reference test protocol of its dataset (``test_scale``: the ``(long, short)`` box images are
    resized to fit; ``test_mode``: ``whole`` or ``slide``; ``crop_size``: the training crop, the
    window in slide mode; ``slide_stride``)."""

    family: ClassVar[str] = ""

    name: str | None = None                        # the registry name; None for a config of one's own
    dataset: str | None = None                     # its classes and palette (edaformer.data.palettes)
    num_classes: int = 150
    in_chans: int = 3
    test_scale: tuple[int, int] = (2048, 512)
    test_mode: str = "whole"
    crop_size: tuple[int, int] = (512, 512)
    slide_stride: tuple[int, int] = (341, 341)

    def __post_init__(self):
        _int(self.num_classes, "num_classes")
        _int(self.in_chans, "in_chans")
        for key in ("test_scale", "crop_size", "slide_stride"):
            self._set(key, _pair(getattr(self, key), key))
        if self.test_mode not in TEST_MODES:
            raise ValueError(f"unknown test_mode {self.test_mode!r}; choose one of {', '.join(TEST_MODES)}")
        for key in ("name", "dataset"):
            if getattr(self, key) is not None and not isinstance(getattr(self, key), str):
                raise ValueError(f"{key} must be a string or None, got {getattr(self, key)!r}")

    def _set(self, key: str, value: Any) -> None:
        object.__setattr__(self, key, value)  # normalising a field of the frozen instance being made

    @classmethod
    def keys(cls) -> tuple[str, ...]:
        """The field names, in order."""
        return tuple(f.name for f in dataclasses.fields(cls))

    def to_dict(self) -> dict[str, Any]:
        """Every field as a plain value (tuples as lists): what :meth:`from_dict` reads back."""
        return plain({key: getattr(self, key) for key in self.keys()})

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]):
        """A config from :meth:`to_dict`'s output (missing keys take their defaults); an unknown
        key or a bad value raises ``ValueError``."""
        if not isinstance(values, Mapping):
            raise ValueError(f"a {cls.__name__} is read from a mapping, got {type(values).__name__}")
        unknown = sorted(str(k) for k in values if k not in cls.keys())
        if unknown:
            raise ValueError(f"unknown {cls.__name__} key(s) {', '.join(map(repr, unknown))}; "
                             f"known: {', '.join(cls.keys())}")
        return cls(**values)

    def replace(self, **changes: Any):
        """A copy with ``changes``; an unknown key raises ``ValueError`` naming the known ones."""
        unknown = sorted(set(changes) - set(self.keys()))
        if unknown:
            raise ValueError(f"unknown {type(self).__name__} key(s) {', '.join(map(repr, unknown))}; "
                             f"known: {', '.join(self.keys())}")
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class EDAFormerConfig(ModelConfig):
    """The architecture of an :class:`~.segmentor.EDAFormer` (defaults: EDAFormer-T for ADE20K).

    Encoder (EFT): ``embed_dims``, ``num_heads``, ``depths`` per stage, ``mlp_ratio``,
    ``in_chans``, ``drop_path_rate`` (stochastic depth, rising linearly over the blocks).

    Decoder: ``num_classes``, ``decoder_dim`` (width of every level), ``decoder_mlp_ratio``,
    ``decoder_depths`` (blocks at c4, c3, c2, the paper's {a-b-c}; 0: none at that level),
    ``decoder_op`` (the token mixer, one of :data:`~.mixers.DECODER_OPS`), ``decoder_drop_path``,
    ``dropout`` (before the classifier).

    ISR: ``train_isr`` (an ISR setting baked into the training pooling ratios, e.g. ``2211-222``;
    ``1111-111``: the reference ratios) and ``isr_pool``, the pooling kind the model starts with
    (one of :data:`~.reduction.ISR_POOLS`; ``model.set_isr`` changes the run-time setting).

    Then the :class:`ModelConfig` fields: name, dataset, reference test protocol.
    """

    family: ClassVar[str] = "edaformer"

    embed_dims: tuple[int, int, int, int] = (32, 64, 128, 256)
    num_heads: tuple[int, int, int, int] = (1, 2, 4, 8)
    depths: tuple[int, int, int, int] = (2, 2, 10, 2)
    mlp_ratio: float = 3.8
    drop_path_rate: float = 0.2
    decoder_dim: int = 128
    decoder_mlp_ratio: float = 2.0
    decoder_depths: tuple[int, int, int] = DECODER_DEPTHS
    decoder_op: str = "efa"
    decoder_drop_path: float = 0.1
    dropout: float = 0.1
    train_isr: str = str(TRAINING_ISR)
    isr_pool: str = "avg"

    def __post_init__(self):
        super().__post_init__()
        for key in ("embed_dims", "num_heads", "depths"):
            self._set(key, _ints(getattr(self, key), key, 4))
        if any(d % h for d, h in zip(self.embed_dims, self.num_heads)):
            raise ValueError(f"embed_dims {self.embed_dims} must be multiples of num_heads {self.num_heads}")
        self._set("mlp_ratio", _number(self.mlp_ratio, "mlp_ratio", positive=True))
        _int(self.decoder_dim, "decoder_dim")
        self._set("decoder_mlp_ratio", _number(self.decoder_mlp_ratio, "decoder_mlp_ratio", positive=True))
        for key in ("drop_path_rate", "decoder_drop_path", "dropout"):
            self._set(key, _number(getattr(self, key), key, 0.0, 1.0))
        self._set("decoder_depths", check_depths(self.decoder_depths))
        check_op(self.decoder_op)
        check_pool(self.isr_pool)
        try:
            self._set("train_isr", str(parse_isr(TRAINING_ISR if self.train_isr is None else self.train_isr)))
        except ValueError as e:
            raise ValueError(f"train_isr: {e}") from None

    def architecture_options(self) -> dict[str, Any]:
        """The :data:`ARCHITECTURE_KEYS` as ``create_model`` keywords (plain values)."""
        return plain({key: getattr(self, key) for key in ARCHITECTURE_KEYS})


@dataclass(frozen=True)
class HFSegFormerConfig(ModelConfig):
    """A SegFormer model of :mod:`.hf_segformer` (defaults: SegFormer-B0 for ADE20K): ``size``
    (``b0`` / ``b1``: the published encoder sizes), ``drop_path_rate``, ``dropout`` and
    ``options``, ``transformers.SegformerConfig`` fields over the size's (``hidden_sizes``,
    ``depths``, ...). SegFormer runs average pooling only (no ``isr_pool``)."""

    family: ClassVar[str] = "segformer"

    size: str = "b0"
    drop_path_rate: float = 0.1
    dropout: float = 0.1
    options: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        super().__post_init__()
        for key in ("drop_path_rate", "dropout"):
            self._set(key, _number(getattr(self, key), key, 0.0, 1.0))
        if self.size not in SEGFORMER_SIZES:
            raise ValueError(f"unknown SegFormer size {self.size!r}; choose one of {', '.join(SEGFORMER_SIZES)}")
        unknown = sorted(set(self.options) - set(SEGFORMER_OPTIONS))
        if unknown:
            raise ValueError(f"unknown SegformerConfig option(s) {', '.join(map(repr, unknown))}; "
                             f"known: {', '.join(SEGFORMER_OPTIONS)}")
        self._set("options", dict(self.options))

    def segformer_options(self) -> dict[str, Any]:
        """The ``transformers.SegformerConfig`` size fields: the size's, then ``options`` over them."""
        return {**SEGFORMER_SIZES[self.size], **self.options}
