"""Training / evaluation configs: YAML files with ``_base_`` inheritance and dotted overrides.

A config file may name one or more base files (paths relative to itself)::

    _base_: [_base_/default.yaml, _base_/ade20k.yaml]
    model: {name: edaformer-t-ade20k}

Bases are merged in order, then the file itself on top (dicts merge key by key, everything
else is replaced). ``--set optim.lr=1e-4 data.root=/x`` overrides are applied last, each value
parsed as YAML. :func:`load_config` returns the resolved config, checked by
:func:`validate_config`, with the defaults of :data:`DEFAULTS` filled in.
"""
from __future__ import annotations

import copy
import difflib
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml

from .utils import to_pair

__all__ = ["ConfigError", "DEFAULTS", "REQUIRED", "load_config", "load_yaml", "merge_configs",
           "apply_overrides", "validate_config", "save_config", "parse_value"]

BASE_KEY = "_base_"

# Every section and its default values; ``None`` means "derived at run time" (see comments).
DEFAULTS: dict[str, dict[str, Any]] = {
    "model": {
        "name": None,              # required: a name from `edaformer list`
        "num_classes": None,       # None: the dataset's class count
        "drop_path_rate": 0.2,     # encoder stochastic depth (linear 0 -> rate)
        "pretrained": None,        # optional ImageNet encoder checkpoint
    },
    "data": {
        "type": None,              # required: ade20k | cityscapes | cocostuff | folder
        "root": None,              # required
        "ignore_index": 255,
        "batch_size": 4,           # per GPU / process
        "workers": 4,              # per GPU / process
    },
    "optim": {
        "lr": 6e-5,
        "betas": [0.9, 0.999],
        "eps": 1e-8,
        "weight_decay": 0.01,
        "decoder_lr_mult": 10.0,
    },
    "schedule": {
        "iters": None,             # required
        "warmup_iters": 1500,
        "warmup_ratio": 1e-6,
        "power": 1.0,
        "min_lr": 0.0,
    },
    "train": {
        "amp": False,              # false | bf16 | fp16 (CUDA only)
        "seed": 0,
        "deterministic": False,
        "checkpoint_interval": 16000,
        "checkpoint_minutes": 0,   # also checkpoint every this many minutes (0: off)
        "eval_interval": 16000,    # 0: validate only at the end
        "log_interval": 50,
        "keep_checkpoints": 3,     # iter_<n>.pth files kept (latest.pth and best_mIoU.pth always)
        "grad_checkpointing": False,
    },
    "eval": {
        "mode": "whole",           # whole | slide
        "crop_size": None,         # slide window; None: data.crop_size
        "stride": None,            # slide stride; None: 2/3 of the window
        "isr": None,               # None: the training setting 1111-111
        "tta": False,              # multi-scale + flip
        "tta_scales": [0.5, 0.75, 1.0, 1.25, 1.5, 1.75],
        "tta_flip": True,
        "flops_input_size": None,  # (H, W) for GFLOPs in the ISR sweep; None: data.crop_size
    },
}

REQUIRED = {"model": ["name"], "data": ["type", "root"], "schedule": ["iters"]}

# Sections whose keys are checked against DEFAULTS. ``model`` keys beyond the defaults go to
# ``create_model`` as overrides and ``data`` keys to ``edaformer.data.build_dataset``.
_STRICT_SECTIONS = ("optim", "schedule", "train", "eval")


class ConfigError(ValueError):
    """A config file, override or value is invalid."""


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads ``1e-4`` (no dot) as a float, as YAML 1.2 does."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"))


def parse_value(text: str) -> Any:
    """Parse one override value as YAML (``1e-4`` -> float, ``[1, 2]`` -> list, ``null`` -> None)."""
    try:
        return yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as e:
        raise ConfigError(f"cannot parse value {text!r}: {e}") from None


def load_yaml(path: str | os.PathLike) -> dict[str, Any]:
    """Read one YAML file (no inheritance); an empty file is ``{}``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.load(f, Loader=_Loader)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping, got {type(data).__name__}")
    return data


def merge_configs(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """Deep merge: dicts merge key by key, any other value of ``override`` replaces the base's."""
    out = copy.deepcopy(dict(base))
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = merge_configs(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _load_with_bases(path: Path, chain: tuple[Path, ...]) -> dict[str, Any]:
    path = path.resolve()
    if path in chain:
        cycle = " -> ".join(str(p) for p in chain + (path,))
        raise ConfigError(f"circular _base_ inheritance: {cycle}")
    data = load_yaml(path)
    bases = data.pop(BASE_KEY, None) or []
    if isinstance(bases, str):
        bases = [bases]
    if not isinstance(bases, list) or not all(isinstance(b, str) for b in bases):
        raise ConfigError(f"{path}: {BASE_KEY} must be a path or a list of paths")
    merged: dict[str, Any] = {}
    for base in bases:
        merged = merge_configs(merged, _load_with_bases(path.parent / base, chain + (path,)))
    return merge_configs(merged, data)


def apply_overrides(cfg: Mapping[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """Apply ``section.key=value`` overrides (values parsed as YAML) to a copy of ``cfg``."""
    out = copy.deepcopy(dict(cfg))
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key or any(not part for part in key.split(".")):
            raise ConfigError(f"override {item!r} must look like section.key=value")
        *parents, leaf = key.split(".")
        node = out
        for i, part in enumerate(parents):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {item!r}: {'.'.join(parents[:i + 1])} is not a section")
            node = child
        node[leaf] = parse_value(text)
    return out


def _suggest(name: str, options: Iterable[str]) -> str:
    close = difflib.get_close_matches(name, list(options), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _pair(value: Any, what: str) -> list[int] | None:
    try:
        pair = to_pair(value, what, allow_none=True)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return None if pair is None else list(pair)


def _number(cfg: dict, section: str, key: str, minimum: float = 0.0, integer: bool = False) -> None:
    value = cfg[section][key]
    kind = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind) or value < minimum:
        what = "an integer" if integer else "a number"
        raise ConfigError(f"{section}.{key} must be {what} >= {minimum}, got {value!r}")


def validate_config(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """Check sections, required keys and value types; return the config with defaults filled in."""
    if not isinstance(cfg, Mapping):
        raise ConfigError(f"a config must be a mapping, got {type(cfg).__name__}")
    unknown = [k for k in cfg if k not in DEFAULTS]
    if unknown:
        hints = ", ".join(f"{k!r}{_suggest(k, DEFAULTS)}" for k in unknown)
        raise ConfigError(f"unknown config section(s): {hints}; valid sections: {', '.join(DEFAULTS)}")
    for section, value in cfg.items():
        if value is not None and not isinstance(value, Mapping):
            raise ConfigError(f"config section {section!r} must be a mapping, got {type(value).__name__}")
    out = merge_configs(DEFAULTS, {k: v for k, v in cfg.items() if v is not None})
    for section in _STRICT_SECTIONS:
        bad = [k for k in out[section] if k not in DEFAULTS[section]]
        if bad:
            hints = ", ".join(f"{k!r}{_suggest(k, DEFAULTS[section])}" for k in bad)
            raise ConfigError(f"unknown key(s) in section {section!r}: {hints}; "
                              f"valid keys: {', '.join(DEFAULTS[section])}")
    missing = [f"{s}.{k}" for s, keys in REQUIRED.items() for k in keys if out[s].get(k) in (None, "")]
    if missing:
        raise ConfigError(f"missing required config key(s): {', '.join(missing)}")

    _number(out, "optim", "lr", 0.0)
    _number(out, "optim", "weight_decay", 0.0)
    _number(out, "optim", "eps", 0.0)
    _number(out, "optim", "decoder_lr_mult", 0.0)
    betas = out["optim"]["betas"]
    if not (isinstance(betas, (list, tuple)) and len(betas) == 2 and all(0 <= float(b) < 1 for b in betas)):
        raise ConfigError(f"optim.betas must be two numbers in [0, 1), got {betas!r}")
    _number(out, "schedule", "iters", 1, integer=True)
    _number(out, "schedule", "warmup_iters", 0, integer=True)
    _number(out, "schedule", "warmup_ratio", 0.0)
    _number(out, "schedule", "power", 0.0)
    _number(out, "schedule", "min_lr", 0.0)
    for key in ("checkpoint_interval", "eval_interval", "log_interval", "keep_checkpoints", "seed"):
        _number(out, "train", key, 0, integer=True)
    _number(out, "data", "batch_size", 1, integer=True)
    _number(out, "data", "workers", 0, integer=True)
    if out["train"]["amp"] not in (False, None, "bf16", "fp16"):
        raise ConfigError(f"train.amp must be false, bf16 or fp16, got {out['train']['amp']!r}")
    if out["eval"]["mode"] not in ("whole", "slide"):
        raise ConfigError(f"eval.mode must be whole or slide, got {out['eval']['mode']!r}")
    for key in ("crop_size", "stride", "flops_input_size"):
        out["eval"][key] = _pair(out["eval"][key], f"eval.{key}")
    if out["eval"]["isr"] is not None:
        from .isr import parse_isr

        try:
            out["eval"]["isr"] = str(parse_isr(str(out["eval"]["isr"])))
        except ValueError as e:
            raise ConfigError(f"eval.isr: {e}") from None
    return out


def load_config(path: str | os.PathLike, overrides: Iterable[str] = ()) -> dict[str, Any]:
    """Read ``path`` with its ``_base_`` chain, apply ``overrides`` and validate."""
    cfg = _load_with_bases(Path(path), ())
    return validate_config(apply_overrides(cfg, overrides))


def _plain(obj: Any) -> Any:
    """Tuples -> lists, paths -> str, recursively, so that ``yaml.safe_dump`` accepts the config."""
    if isinstance(obj, Mapping):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    return obj


def save_config(cfg: Mapping[str, Any], path: str | os.PathLike) -> Path:
    """Write the resolved config as YAML (it loads back with :func:`load_config`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        yaml.safe_dump(_plain(cfg), f, sort_keys=False, default_flow_style=None)
    os.replace(tmp, path)
    return path
