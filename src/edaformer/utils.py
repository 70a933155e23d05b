"""Small helpers shared across the package: device choice, ``(h, w)`` pairs, model unwrapping,
plain data."""
from __future__ import annotations

import numbers
import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

__all__ = ["resolve_device", "to_pair", "unwrap_model", "plain", "flatten_dict", "all_finite"]


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """``cpu``, ``cuda``, ``cuda:N`` or None (CUDA when available) as a :class:`torch.device`.

    Raises ``ValueError`` with one wording everywhere when CUDA is asked for but not available.
    """
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"unknown device {device!r}: {e}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {str(device)!r} requested but CUDA is not available on this machine "
                         "(use --device cpu)")
    return device


def to_pair(value: Any, name: str = "size", *, allow_none: bool = False) -> tuple[int, int] | None:
    """A positive int ``n`` -> ``(n, n)``; a pair of positive ints -> itself, as a tuple.

    Anything else raises ``ValueError`` naming ``name``; None passes through when ``allow_none``.
    """
    if value is None and allow_none:
        return None
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        pair = (value, value)
    elif isinstance(value, Sequence) and not isinstance(value, str):
        pair = tuple(value)
    else:
        pair = ()
    if len(pair) != 2 or any(isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1 for v in pair):
        raise ValueError(f"{name} must be a positive integer or a pair (h, w) of them, got {value!r}")
    return int(pair[0]), int(pair[1])


def unwrap_model(model: nn.Module) -> nn.Module:
    """The model inside ``DistributedDataParallel`` / ``DataParallel`` / ``torch.compile`` wrappers."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model


def plain(obj: Any) -> Any:
    """Mappings as dicts with string keys, tuples as lists, paths as strings, recursively: what
    ``yaml.safe_dump`` writes and ``torch.load(weights_only=True)`` reads back."""
    if isinstance(obj, Mapping):
        return {str(k): plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [plain(v) for v in obj]
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    return obj


def flatten_dict(cfg: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mappings as one level of dotted keys (``{"a": {"b": 1}}`` -> ``{"a.b": 1}``); tuples
    become lists, so that a config read back from YAML compares equal."""
    out: dict[str, Any] = {}
    for key, value in cfg.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten_dict(value, name + "."))
        else:
            out[name] = list(value) if isinstance(value, tuple) else value
    return out


def all_finite(model: nn.Module) -> bool:
    """Whether every parameter of ``model`` is finite."""
    return all(bool(torch.isfinite(p).all()) for p in model.parameters())
