"""The effective config of a segmentation run: every key a config leaves unset (or null where null
means "the default") written with the value the run actually uses.

A resolved config (:func:`edaformer.config.load_config`) keeps the keys a file left out as they
are: the dataset, the model and the test protocol decide. :func:`effective_config` fills them in
the way those readers do, so that the work dir's ``config.yaml`` says what was used (the dataset's
splits, suffixes, classes and palette, the resize box, crop and test protocol, the model's class
count and architecture) and loads back as the same run.
"""
from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

from .config import KEYS, UNSET
from .data import effective_data_config
from .models import get_model_spec
from .protocol import TestProtocol

__all__ = ["effective_config"]


def _model_section(model: Mapping[str, Any], num_classes: int | None) -> dict[str, Any]:
    """``num_classes`` (null: the dataset's) and the named model's own value of every unset key."""
    out = dict(model)
    if out.get("num_classes") is None and num_classes is not None:
        out["num_classes"] = num_classes
    try:
        spec = get_model_spec(str(out.get("name")))
    except ValueError:  # an unknown model: building it says so
        return out
    for key, declared in KEYS["model"].items():
        if declared.default is UNSET and key not in out and key in spec.keys():
            value = getattr(spec, key)
            out[key] = list(value) if isinstance(value, tuple) else value
    return out


def _eval_section(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The slide window and stride of the test protocol, and the GFLOPs input size."""
    out = dict(cfg["eval"])
    try:
        protocol = TestProtocol.from_config(cfg)
    except ValueError:  # an inconsistent protocol: validation says so
        return out
    out["crop_size"], out["stride"] = list(protocol.crop_size), list(protocol.stride)
    if out.get("flops_input_size") is None and cfg["data"].get("crop_size") is not None:
        out["flops_input_size"] = list(cfg["data"]["crop_size"])
    return out


def _ordered(section: Mapping[str, Any], keys: Mapping[str, Any]) -> dict[str, Any]:
    """The section's keys in the order of the key table (unknown ones last)."""
    return {**{k: section[k] for k in keys if k in section}, **{k: v for k, v in section.items() if k not in keys}}


def effective_config(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of the resolved segmentation config ``cfg`` with the values the run uses filled in
    (see the module docstring); keys already set are kept as they are. It validates and trains
    as ``cfg`` does."""
    out = copy.deepcopy(dict(cfg))
    if not isinstance(out.get("data"), Mapping):
        return out
    out["data"] = effective_data_config(out["data"])
    classes = out["data"].get("classes")
    count = classes if isinstance(classes, int) else len(classes) if isinstance(classes, list) else None
    if isinstance(out.get("model"), Mapping):
        out["model"] = _model_section(out["model"], count)
    if isinstance(out.get("eval"), Mapping):
        out["eval"] = _eval_section(out)
    return {section: _ordered(values, KEYS.get(section, {})) if isinstance(values, Mapping) else values
            for section, values in out.items()}
