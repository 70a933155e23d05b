"""What travels with weights: one schema for checkpoint ``meta``, safetensors metadata and ONNX
metadata, and the functions that write and read it.

A checkpoint in this library's format is the dict :func:`native_checkpoint` builds::

    {"format": "edaformer", "model": <create_model name>, "num_classes": K,
     "state_dict": {...}, "meta": {...}, "config": {...}}

(a training checkpoint adds the training state). Its ``meta`` holds, one key per concept
(:func:`checkpoint_meta` writes it, the ``stored_*`` functions read it):

=================  ============================================================================
key                value
=================  ============================================================================
``CLASSES``        class names (the key of reference mmseg checkpoints)
``PALETTE``        RGB colours ``[r, g, b]``, one per class
``test_protocol``  the test protocol, ``TestProtocol.to_dict()``
``isr``            the recommended run-time ISR setting, ``"2211-222"``
``isr_pool``       its key/value pooling kind
``isr_tune``       how ``edaformer isr-tune`` chose it
``iteration``      the training iteration of the weights
``mIoU``           their validation mIoU (a fraction)
=================  ============================================================================

Shipped weights (safetensors) and ONNX exports hold the same values as string metadata: JSON for
lists and dicts, class names and colours under ``classes`` / ``palette``
(:func:`encode_weights_metadata` / :func:`decode_weights_metadata`,
:func:`encode_onnx_metadata` / :func:`decode_onnx_metadata`).

ONNX exports also state ``output_stride``: the file's logits are ``(N, K, ceil(H / s), ceil(W / s))``
for an ``H x W`` input, to be resized to the input size before the argmax. Files exported before
that key wrote the logits at the input size; they read as ``output_stride`` 1. ``isr_pool`` is
the pooling kind baked in with the ISR setting (absent in earlier files).

The test protocol is written under one schema everywhere, the field names of
:class:`~edaformer.protocol.TestProtocol` (``scale``, ``divisor``, ``mode``, ``crop_size``,
``stride``, ``tta_scales``, ``flip``). ONNX files exported before wrote ``test_scale`` and
``size_divisor``; they are read as ``scale`` and ``divisor`` (:func:`protocol_fields`).
"""
from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

from .data.palettes import DatasetInfo, class_info
from .isr import parse_isr
from .utils import plain

__all__ = ["FORMAT", "WEIGHTS_FORMAT", "WEIGHTS_FORMAT_VERSION", "CLASSES", "PALETTE", "TEST_PROTOCOL", "ISR",
           "ISR_POOL", "ISR_TUNE", "ITERATION", "MIOU", "SOURCE_SHA256", "native_checkpoint", "model_checkpoint",
           "checkpoint_meta", "stored_classes", "stored_palette", "stored_isr", "stored_isr_pool", "protocol_fields",
           "model_class_info", "encode_weights_metadata", "decode_weights_metadata", "weights_meta",
           "weights_checkpoint", "encode_onnx_metadata", "decode_onnx_metadata", "OUTPUT_STRIDE"]

FORMAT = "edaformer"                     # checkpoint["format"] of a checkpoint in this library's format
WEIGHTS_FORMAT = "edaformer-weights"     # metadata["format"] of a shipped weights file
WEIGHTS_FORMAT_VERSION = "1"

# keys of a checkpoint's meta
CLASSES = "CLASSES"
PALETTE = "PALETTE"
TEST_PROTOCOL = "test_protocol"
ISR = "isr"
ISR_POOL = "isr_pool"
ISR_TUNE = "isr_tune"
ITERATION = "iteration"
MIOU = "mIoU"
SOURCE_SHA256 = "source_sha256"          # a shipped weights file's: the SHA-256 of the training checkpoint
WEIGHTS = "weights"                      # "ema" when the weights are the training run's moving average
OUTPUT_STRIDE = "output_stride"          # ONNX: input size / logits size (1 in files exported before the key)

# the same concepts in string metadata (safetensors, ONNX): names and colours in lower case
_CLASSES_FIELD = "classes"
_PALETTE_FIELD = "palette"

# test protocol names of files written before one schema -> TestProtocol field names
_LEGACY_PROTOCOL_KEYS = {"test_scale": "scale", "size_divisor": "divisor"}

_ONNX_INPUT = "image: float32 (N, 3, H, W), RGB, (pixel - mean) / std with pixels in 0-255"
_ONNX_OUTPUT = ("logits: float32 (N, num_classes, ceil(H / {s}), ceil(W / {s})) (output_stride {s}); resize them "
                "bilinearly (align_corners=False) to the input size, then argmax over dim 1 = class id")
_ONNX_DYNAMIC = "batch, height, width"


# -- the checkpoint dict ----------------------------------------------------------------------------
def native_checkpoint(state_dict: Mapping[str, Any], model: str | None, num_classes: int | None,
                      meta: Mapping[str, Any] | None = None, config: Mapping[str, Any] | None = None
                      ) -> dict[str, Any]:
    """A checkpoint in this library's format: ``format``, ``model`` (the ``create_model`` name),
    ``num_classes``, ``state_dict``, and ``meta`` / ``config`` (as plain data) when given."""
    ckpt = {"format": FORMAT, "model": model, "num_classes": num_classes, "state_dict": state_dict}
    if meta is not None:
        ckpt["meta"] = dict(meta)
    if config is not None:
        ckpt["config"] = plain(config)
    return ckpt


def model_checkpoint(model: Any, meta: Mapping[str, Any] | None = None,
                     config: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """:func:`native_checkpoint` of a module: its state dict, ``name`` and ``num_classes``."""
    return native_checkpoint(model.state_dict(), getattr(model, "name", None), getattr(model, "num_classes", None),
                             meta, config)


# -- a checkpoint's meta ----------------------------------------------------------------------------
def _protocol_dict(protocol: Any) -> dict[str, Any]:
    return dict(protocol) if isinstance(protocol, Mapping) else protocol.to_dict()


def checkpoint_meta(*, classes: Sequence[str] | None = None, palette: Sequence[Sequence[int]] | None = None,
                    protocol: Any = None, isr: Any = None, isr_pool: str | None = None, iteration: int | None = None,
                    mIoU: float | None = None, source_sha256: str | None = None, **extra: Any) -> dict[str, Any]:
    """A checkpoint's ``meta`` holding the given values (None: left out) under their keys, plus
    ``extra`` as given. ``protocol``: a :class:`~edaformer.protocol.TestProtocol` or its dict."""
    meta: dict[str, Any] = {}
    if iteration is not None:
        meta[ITERATION] = int(iteration)
    if classes is not None:
        meta[CLASSES] = [str(c) for c in classes]
    if palette is not None:
        meta[PALETTE] = [[int(v) for v in c] for c in palette]
    if protocol is not None:
        meta[TEST_PROTOCOL] = _protocol_dict(protocol)
    if isr is not None:
        meta[ISR] = str(isr)
    if isr_pool is not None:
        meta[ISR_POOL] = str(isr_pool)
    if mIoU is not None:
        meta[MIOU] = float(mIoU)
    if source_sha256:
        meta[SOURCE_SHA256] = str(source_sha256)
    meta.update(extra)
    return meta


def _sequence(value: Any) -> tuple | None:
    return tuple(value) if isinstance(value, (list, tuple)) and value else None


def stored_classes(meta: Mapping[str, Any] | None) -> tuple | None:
    """The class names a checkpoint's ``meta`` stores; None when it stores none."""
    return _sequence((meta or {}).get(CLASSES))


def stored_palette(meta: Mapping[str, Any] | None) -> tuple | None:
    """The colours a checkpoint's ``meta`` stores; None when it stores none."""
    return _sequence((meta or {}).get(PALETTE))


def stored_isr(meta: Mapping[str, Any] | None, source: str | os.PathLike | None = None) -> str | None:
    """The ISR setting a checkpoint's ``meta`` stores (``"2211-222"``), None when it stores none.

    Predict / eval use it when no ISR is given. A malformed value raises ``ValueError`` naming
    ``source`` (the checkpoint file) when given.
    """
    value = (meta or {}).get(ISR)
    if value is None:
        return None
    try:
        return str(parse_isr(str(value)))
    except ValueError as e:
        where = f"checkpoint {source}: " if source is not None else ""
        raise ValueError(f"{where}meta.{ISR} is not an ISR setting: {e}") from None


def stored_isr_pool(meta: Mapping[str, Any] | None) -> str | None:
    """The pooling kind stored with the ISR setting; None when none is stored."""
    value = (meta or {}).get(ISR_POOL)
    return str(value) if value else None


def protocol_fields(data: Any) -> Any:
    """A stored test protocol with the names of earlier files (``test_scale``, ``size_divisor``)
    read as the :class:`~edaformer.protocol.TestProtocol` fields (``scale``, ``divisor``)."""
    if not isinstance(data, Mapping):
        return data
    return {(_LEGACY_PROTOCOL_KEYS[k] if k in _LEGACY_PROTOCOL_KEYS and _LEGACY_PROTOCOL_KEYS[k] not in data else k): v
            for k, v in data.items()}


def model_class_info(model: Any, classes: Sequence[str] | None = None,
                     palette: Sequence[Sequence[int]] | None = None) -> DatasetInfo:
    """Names and colours for ``model.num_classes`` classes: the given ones when they fit the
    class count, else those of the model's dataset (``model.spec.dataset``), else generated."""
    num_classes = int(getattr(model, "num_classes", 0) or 0)
    return class_info(num_classes, getattr(getattr(model, "spec", None), "dataset", None), classes, palette)


# -- safetensors metadata ---------------------------------------------------------------------------
def encode_weights_metadata(*, model: str, num_classes: int, classes: Sequence[str],
                            palette: Sequence[Sequence[int]], protocol: Any, isr: Any, isr_pool: str,
                            config: Mapping[str, Any], checksum: str, source_sha256: str | None = None,
                            iteration: int | None = None, mIoU: float | None = None) -> dict[str, str]:
    """The safetensors metadata (strings) of a shipped weights file."""
    return {"format": WEIGHTS_FORMAT, "format_version": WEIGHTS_FORMAT_VERSION, "model": model,
            "num_classes": str(num_classes), _CLASSES_FIELD: json.dumps(list(classes)),
            _PALETTE_FIELD: json.dumps([list(c) for c in palette]), TEST_PROTOCOL: json.dumps(_protocol_dict(protocol)),
            ISR: str(isr), ISR_POOL: isr_pool, "config": json.dumps(config), SOURCE_SHA256: source_sha256 or "",
            ITERATION: "" if iteration is None else str(iteration), MIOU: "" if mIoU is None else repr(mIoU),
            "checksum": checksum}


def _json(metadata: Mapping[str, str], key: str, source: Any) -> Any:
    try:
        return json.loads(metadata[key])
    except KeyError:
        raise ValueError(f"weights {source}: metadata has no {key!r}") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"weights {source}: metadata {key!r} is not JSON ({e})") from None


def decode_weights_metadata(metadata: Mapping[str, str], source: Any) -> dict[str, Any]:
    """The values of a shipped weights file's metadata: ``model``, ``num_classes``, ``classes``,
    ``palette`` (tuples), ``protocol`` (its dict), ``isr`` (normalised), ``isr_pool``, ``config``,
    ``mIoU``, ``iteration``, ``source_sha256`` (None when empty).

    ``ValueError`` naming ``source`` for metadata not written by ``edaformer package-weights``,
    a missing or malformed value, or class names and colours that do not fit ``num_classes``.
    """
    if metadata.get("format") != WEIGHTS_FORMAT:
        raise ValueError(f"weights {source}: a safetensors file without edaformer metadata (not written by "
                         "`edaformer package-weights`)")
    try:
        fields = dict(
            model=metadata["model"], num_classes=int(metadata["num_classes"]),
            classes=tuple(map(str, _json(metadata, _CLASSES_FIELD, source))),
            palette=tuple(tuple(int(v) for v in c) for c in _json(metadata, _PALETTE_FIELD, source)),
            protocol=protocol_fields(_json(metadata, TEST_PROTOCOL, source)),
            isr=str(parse_isr(metadata[ISR])), isr_pool=metadata.get(ISR_POOL) or "avg",
            config=_json(metadata, "config", source) if metadata.get("config") else {},
            mIoU=float(metadata[MIOU]) if metadata.get(MIOU) else None,
            iteration=int(metadata[ITERATION]) if metadata.get(ITERATION) else None,
            source_sha256=metadata.get(SOURCE_SHA256) or None)
    except KeyError as e:
        raise ValueError(f"weights {source}: metadata has no {e.args[0]!r}") from None
    except (TypeError, ValueError) as e:
        if str(source) in str(e):
            raise
        raise ValueError(f"weights {source}: invalid metadata: {e}") from None
    if len(fields["classes"]) != fields["num_classes"] or len(fields["palette"]) != fields["num_classes"]:
        raise ValueError(f"weights {source}: metadata lists {len(fields['classes'])} classes and "
                         f"{len(fields['palette'])} colours for num_classes={fields['num_classes']}")
    return fields


def weights_meta(fields: Mapping[str, Any]) -> dict[str, Any]:
    """The checkpoint ``meta`` of a weights file's values (:func:`decode_weights_metadata`)."""
    return checkpoint_meta(classes=fields["classes"], palette=fields["palette"], protocol=fields["protocol"],
                           isr=fields["isr"], isr_pool=fields["isr_pool"], iteration=fields.get("iteration"),
                           mIoU=fields.get("mIoU"), source_sha256=fields.get(SOURCE_SHA256))


def weights_checkpoint(state_dict: Mapping[str, Any], fields: Mapping[str, Any]) -> dict[str, Any]:
    """A weights file (its state dict and :func:`decode_weights_metadata` values) as a checkpoint
    in this library's format, with its ``meta`` and training ``config``."""
    return native_checkpoint(state_dict, fields["model"], fields["num_classes"], weights_meta(fields),
                             fields["config"])


# -- ONNX metadata ----------------------------------------------------------------------------------
def encode_onnx_metadata(*, model: str, num_classes: int, classes: Sequence[str], palette: Sequence[Sequence[int]],
                         isr: Any, protocol: Any, mean: Sequence[float], std: Sequence[float], resize: str,
                         dynamic: bool, output_stride: int, isr_pool: str = "avg") -> dict[str, str]:
    """The ``metadata_props`` (strings) of an ONNX export; ``output_stride``: input size / logits size."""
    return {
        "model": str(model),
        "num_classes": str(int(num_classes)),
        _CLASSES_FIELD: json.dumps(list(classes)),
        _PALETTE_FIELD: json.dumps([list(c) for c in palette]),
        ISR: str(isr),
        ISR_POOL: str(isr_pool),
        "input": _ONNX_INPUT,
        "mean": json.dumps(list(mean)),
        "std": json.dumps(list(std)),
        TEST_PROTOCOL: json.dumps(_protocol_dict(protocol)),
        "resize": resize,
        "output": _ONNX_OUTPUT.format(s=int(output_stride)),
        OUTPUT_STRIDE: str(int(output_stride)),
        "dynamic": _ONNX_DYNAMIC if dynamic else "none",
    }


def decode_onnx_metadata(props: Mapping[str, str]) -> dict[str, Any]:
    """The values of an ONNX export's ``metadata_props`` (a ``{key: value}`` mapping): ``model``,
    ``num_classes``, ``classes``, ``palette``, ``isr``, ``mean``, ``std``, ``protocol`` (a dict of
    :class:`~edaformer.protocol.TestProtocol` fields, also from files written with ``test_scale`` /
    ``size_divisor``), ``resize``, ``dynamic`` (a bool), ``isr_pool`` and ``output_stride`` (an int; 1 for
    files exported before it, whose logits are at the input size). Other absent keys are left out."""
    out: dict[str, Any] = {OUTPUT_STRIDE: int(props.get(OUTPUT_STRIDE) or 1)}
    for key in ("model", ISR, ISR_POOL, "resize"):
        if key in props:
            out[key] = props[key]
    if "num_classes" in props:
        out["num_classes"] = int(props["num_classes"])
    for key in (_CLASSES_FIELD, _PALETTE_FIELD, "mean", "std"):
        if key in props:
            out[key] = json.loads(props[key])
    if TEST_PROTOCOL in props:
        out["protocol"] = protocol_fields(json.loads(props[TEST_PROTOCOL]))
    if "dynamic" in props:
        out["dynamic"] = props["dynamic"] == _ONNX_DYNAMIC
    return out
