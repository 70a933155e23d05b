"""Shipped weights: ``<name>.safetensors`` files in the package's ``weights`` folder.

A file holds a model's weights in float16 (integer buffers as they are) and, as safetensors
metadata, everything needed to use it: the model name and class count, class names and palette,
the test protocol, the recommended ISR setting and its pooling kind, the training config, the
source checkpoint's SHA-256, its iteration and validation mIoU. :func:`package_weights` writes
one from a training checkpoint (``edaformer package-weights``), :func:`list_pretrained` lists the
shipped names and :func:`load_pretrained` builds the model of one.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
import struct
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .checkpoint import (FORMAT, CheckpointMismatchError, CorruptCheckpointError, build_from_checkpoint,
                         checkpoint_model_name, read_checkpoint, resolve_checkpoint_source, tensor_checksum,
                         write_bytes_atomically)
from .data.palettes import class_info
from .inference.protocol import META_KEY as PROTOCOL_KEY
from .inference.protocol import TestProtocol
from .isr import TRAINING_ISR, parse_isr

__all__ = ["DEFAULT_NAME", "SUFFIX", "WEIGHTS_FORMAT", "PretrainedInfo", "PackagedWeights", "UnknownPretrainedError",
           "weights_dir", "list_pretrained", "weights_path", "load_pretrained", "read_info", "read_weights",
           "read_as_checkpoint", "is_safetensors", "package_weights", "check_name"]

DEFAULT_NAME = "edaformer-t-camvid"
SUFFIX = ".safetensors"
WEIGHTS_FORMAT = "edaformer-weights"  # metadata["format"] of a file written by package_weights
FORMAT_VERSION = "1"
POOLS = ("avg", "max", "overlap", "merge")

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


class UnknownPretrainedError(ValueError):
    """The name is not among the shipped weights."""


@dataclasses.dataclass(frozen=True)
class PretrainedInfo:
    """What a shipped weights file says about its model. ``isr`` / ``isr_pool``: the recommended
    run-time setting (``model.set_isr(info.isr, pool=info.isr_pool)``); ``mIoU`` (a fraction),
    ``iteration`` and ``source_sha256`` describe the training checkpoint it came from."""

    name: str
    model: str
    num_classes: int
    classes: tuple[str, ...]
    palette: tuple[tuple[int, int, int], ...]
    protocol: TestProtocol
    isr: str
    isr_pool: str
    config: dict[str, Any]
    mIoU: float | None = None
    iteration: int | None = None
    source_sha256: str | None = None

    def meta(self) -> dict[str, Any]:
        """As a checkpoint's ``meta``: the keys that predict, eval and export read."""
        meta = {"CLASSES": list(self.classes), "PALETTE": [list(c) for c in self.palette],
                PROTOCOL_KEY: self.protocol.to_dict(), "isr": self.isr, "isr_pool": self.isr_pool}
        if self.iteration is not None:
            meta["iteration"] = self.iteration
        if self.mIoU is not None:
            meta["mIoU"] = self.mIoU
        return meta


# -- where the shipped files are -------------------------------------------------------------------
def weights_dir() -> Path:
    """The package's ``weights`` folder, which holds the shipped ``<name>.safetensors`` files."""
    return Path(str(resources.files(__package__).joinpath("weights")))


def list_pretrained(folder: str | os.PathLike | None = None) -> list[str]:
    """The shipped names (``<name>.safetensors`` in ``folder``, default :func:`weights_dir`), sorted."""
    folder = weights_dir() if folder is None else Path(folder)
    if not folder.is_dir():
        return []
    return sorted(p.name[:-len(SUFFIX)] for p in folder.iterdir()
                  if p.name.endswith(SUFFIX) and not p.name.startswith(".") and p.is_file())


def weights_path(name: str, folder: str | os.PathLike | None = None) -> Path:
    """The file of a shipped name; :class:`UnknownPretrainedError` listing the shipped ones."""
    folder = weights_dir() if folder is None else Path(folder)
    shipped = list_pretrained(folder)
    if name not in shipped:
        if not shipped:
            raise UnknownPretrainedError(f"no shipped model {name!r}: no model is shipped with this install "
                                         f"(no *{SUFFIX} in {folder})")
        raise UnknownPretrainedError(f"no shipped model {name!r}; available: {', '.join(shipped)}")
    return folder / f"{name}{SUFFIX}"


def check_name(name: str) -> str:
    """A shipped name: letters, digits, ``.``, ``_``, ``-``, starting with a letter or digit."""
    if not isinstance(name, str) or not _NAME.match(name) or name.endswith(SUFFIX):
        raise ValueError(f"weights name {name!r} must be letters, digits, '.', '_' or '-' (starting with a letter "
                         f"or digit, without {SUFFIX}), e.g. {DEFAULT_NAME}")
    return name


# -- reading ---------------------------------------------------------------------------------------
def is_safetensors(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a safetensors file (by its suffix or its header)."""
    path = Path(path)
    if path.suffix == SUFFIX:
        return True
    with open(path, "rb") as f:
        head = f.read(9)
    if len(head) < 9 or head[8:9] != b"{":
        return False
    (size,) = struct.unpack("<Q", head[:8])
    return size <= path.stat().st_size - 8


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0]}" if text else type(error).__name__


def _metadata(path: Path) -> dict[str, str]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception as e:  # noqa: BLE001 - the safetensors error, re-raised with the file name
        raise ValueError(f"could not read weights {path}: it is corrupt or not a safetensors file "
                         f"({_first_line(e)})") from None


def _json(meta: Mapping[str, str], key: str, path: Path) -> Any:
    try:
        return json.loads(meta[key])
    except KeyError:
        raise ValueError(f"weights {path}: metadata has no {key!r}") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"weights {path}: metadata {key!r} is not JSON ({e})") from None


def _info(meta: Mapping[str, str], path: Path) -> PretrainedInfo:
    if meta.get("format") != WEIGHTS_FORMAT:
        raise ValueError(f"weights {path}: a safetensors file without edaformer metadata (not written by "
                         "`edaformer package-weights`)")
    try:
        protocol = TestProtocol.from_dict(_json(meta, PROTOCOL_KEY, path))
        info = PretrainedInfo(
            name=path.name[:-len(SUFFIX)] if path.name.endswith(SUFFIX) else path.stem,
            model=meta["model"], num_classes=int(meta["num_classes"]),
            classes=tuple(map(str, _json(meta, "classes", path))),
            palette=tuple(tuple(int(v) for v in c) for c in _json(meta, "palette", path)),
            protocol=protocol, isr=str(parse_isr(meta["isr"])), isr_pool=meta.get("isr_pool") or "avg",
            config=_json(meta, "config", path) if meta.get("config") else {},
            mIoU=float(meta["mIoU"]) if meta.get("mIoU") else None,
            iteration=int(meta["iteration"]) if meta.get("iteration") else None,
            source_sha256=meta.get("source_sha256") or None)
    except KeyError as e:
        raise ValueError(f"weights {path}: metadata has no {e.args[0]!r}") from None
    except (TypeError, ValueError) as e:
        if str(path) in str(e):
            raise
        raise ValueError(f"weights {path}: invalid metadata: {e}") from None
    if len(info.classes) != info.num_classes or len(info.palette) != info.num_classes:
        raise ValueError(f"weights {path}: metadata lists {len(info.classes)} classes and {len(info.palette)} "
                         f"colours for num_classes={info.num_classes}")
    return info


def read_info(path: str | os.PathLike) -> PretrainedInfo:
    """The metadata of a weights file, without reading the tensors."""
    path = Path(path)
    return _info(_metadata(path), path)


def _tensors(path: Path, meta: Mapping[str, str]) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file, checked against the stored checksum, floats as float32."""
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(path))
    except Exception as e:  # noqa: BLE001 - re-raised with the file name
        raise ValueError(f"could not read weights {path}: it is corrupt or truncated ({_first_line(e)})") from None
    stored = meta.get("checksum")
    if stored and tensor_checksum(tensors) != stored:
        raise CorruptCheckpointError(f"weights {path} are corrupt: their tensors do not match the checksum stored "
                                     "when they were written")
    return {k: v.float() if v.is_floating_point() else v for k, v in tensors.items()}


def read_weights(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], PretrainedInfo]:
    """A weights file as (float32 state dict, :class:`PretrainedInfo`)."""
    path = Path(path)
    meta = _metadata(path)
    info = _info(meta, path)
    return _tensors(path, meta), info


def _as_checkpoint(state_dict: dict[str, torch.Tensor], info: PretrainedInfo) -> dict[str, Any]:
    return {"format": FORMAT, "model": info.model, "num_classes": info.num_classes, "state_dict": state_dict,
            "meta": info.meta(), "config": info.config}


def read_as_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """A safetensors file as a checkpoint dict in this library's format (float32 ``state_dict``,
    ``meta``, ``config``), what :func:`edaformer.checkpoint.read_checkpoint` returns for it. A
    file without edaformer metadata gives its tensors as a bare ``state_dict``."""
    path = Path(path)
    meta = _metadata(path)
    if meta.get("format") != WEIGHTS_FORMAT:
        return {"state_dict": _tensors(path, meta)}
    info = _info(meta, path)
    return _as_checkpoint(_tensors(path, meta), info)


def load_pretrained(name: str = DEFAULT_NAME, folder: str | os.PathLike | None = None
                    ) -> tuple[nn.Module, PretrainedInfo]:
    """The shipped model ``name`` in eval mode, float32 on the CPU, and its :class:`PretrainedInfo`.

    Built from the metadata (``create_model(model, num_classes, **architecture options of the
    training config)``), weights loaded strictly. The model runs at the training ISR; the
    recommended one is ``info.isr`` / ``info.isr_pool`` (:meth:`Segmenter.pretrained` applies it).
    """
    state_dict, info = read_weights(weights_path(name, folder))
    model, _ = build_from_checkpoint(_as_checkpoint(state_dict, info))
    return model.eval(), info


# -- writing ---------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class PackagedWeights:
    """A file written by :func:`package_weights`."""

    path: Path
    size: int          # bytes
    tensors: int
    info: PretrainedInfo


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _half(state_dict: Mapping[str, torch.Tensor], source: Path) -> dict[str, torch.Tensor]:
    """Floating tensors as float16 (an error naming any value beyond its range), others as they are."""
    out = {}
    for key, value in state_dict.items():
        value = value.detach().cpu()
        if value.is_floating_point():
            if not bool(torch.isfinite(value).all()):
                raise ValueError(f"checkpoint {source}: {key} holds non-finite values")
            half = value.to(torch.float16)
            if not bool(torch.isfinite(half).all()):
                raise ValueError(f"checkpoint {source}: {key} holds values beyond the float16 range (largest "
                                 f"|value| {value.abs().max().item():.4g} > 65504); it cannot be shipped as float16")
            value = half
        out[key] = value.clone().contiguous()
    return out


def _recommended_isr(meta: Mapping[str, Any], isr: Any, pool: str | None, source: Path) -> tuple[str, str]:
    """The ISR setting and pool kind to store: the given ones, else the checkpoint's (meta.isr,
    meta.isr_pool), else the training setting with average pooling."""
    if pool is not None and pool not in POOLS:
        raise ValueError(f"ISR pool {pool!r}: expected one of {', '.join(POOLS)}")
    if isr is not None:
        return str(parse_isr(isr)), pool or "avg"
    stored = meta.get("isr")
    if stored is None:
        return str(TRAINING_ISR), pool or "avg"
    try:
        setting = str(parse_isr(str(stored)))
    except ValueError as e:
        raise ValueError(f"checkpoint {source}: meta.isr is not an ISR setting: {e}") from None
    return setting, pool or str(meta.get("isr_pool") or "avg")


def _class_info(num_classes: int, model: nn.Module, meta: Mapping[str, Any], config: Mapping[str, Any]):
    data = config.get("data") if isinstance(config.get("data"), Mapping) else {}
    spec = getattr(model, "spec", None)
    return class_info(num_classes, getattr(spec, "dataset", None), meta.get("CLASSES") or data.get("classes"),
                      meta.get("PALETTE") or data.get("palette"))


def package_weights(checkpoint: str | os.PathLike, name: str, isr: Any = None, pool: str | None = None,
                    out: str | os.PathLike | None = None,
                    config: str | os.PathLike | Mapping[str, Any] | None = None) -> PackagedWeights:
    """Write the shipped weights file ``name`` from a training checkpoint.

    The model is rebuilt from the checkpoint (its name, class count and architecture options)
    and loaded strictly; its state dict (BN running statistics included) is written in float16,
    integer buffers unchanged, atomically, to ``out`` (a ``.safetensors`` file, else a folder to
    hold ``<name>.safetensors``; default: :func:`weights_dir`). ``isr`` / ``pool``: the recommended
    setting (default: the checkpoint's stored one, else ``1111-111`` with ``avg``). ``config``:
    the training config to store (a YAML file or a resolved config) in place of the one the
    checkpoint stores (``best_mIoU.pth`` stores none; the work dir's ``config.yaml`` is it). Test
    protocol, classes and palette: the checkpoint's meta, else the training config, else the
    model spec's.
    """
    check_name(name)
    source = resolve_checkpoint_source(checkpoint)
    obj = read_checkpoint(source)
    if config is not None:
        from .config import load_config

        obj["config"] = load_config(config) if isinstance(config, (str, os.PathLike)) else config
    try:
        model, report = build_from_checkpoint(obj, checkpoint_model_name(obj, source))
    except CheckpointMismatchError as e:
        if isinstance(obj.get("config"), Mapping):
            raise
        raise CheckpointMismatchError(f"checkpoint {source} stores no training config, so the model was built "
                                      f"with the default architecture options; pass the config it was trained "
                                      f"with (--config)\n{e}") from None
    meta = report.get("meta") or {}
    config = json.loads(json.dumps(obj["config"], default=str)) if isinstance(obj.get("config"), Mapping) else {}
    setting, isr_pool = _recommended_isr(meta, isr, pool, source)
    model.set_isr(setting, pool=isr_pool)  # the model accepts the setting
    base = TestProtocol.from_config(config) if all(isinstance(config.get(k), Mapping) for k in ("data", "eval")) \
        else None
    protocol = TestProtocol.resolve(model, meta, base=base, source=source)
    num_classes = int(model.num_classes)
    names = _class_info(num_classes, model, meta, config)
    tensors = _half(model.state_dict(), source)
    miou = meta.get("mIoU")
    iteration = obj.get("iteration", meta.get("iteration"))
    info = PretrainedInfo(name=name, model=model.name, num_classes=num_classes, classes=names.classes,
                          palette=names.palette, protocol=protocol, isr=setting, isr_pool=isr_pool, config=config,
                          mIoU=float(miou) if isinstance(miou, (int, float)) and math.isfinite(miou) else None,
                          iteration=int(iteration) if isinstance(iteration, int) else None,
                          source_sha256=_sha256(source))
    metadata = {"format": WEIGHTS_FORMAT, "format_version": FORMAT_VERSION, "model": info.model,
                "num_classes": str(num_classes), "classes": json.dumps(list(info.classes)),
                "palette": json.dumps([list(c) for c in info.palette]), PROTOCOL_KEY: json.dumps(protocol.to_dict()),
                "isr": info.isr, "isr_pool": info.isr_pool, "config": json.dumps(config),
                "source_sha256": info.source_sha256 or "", "iteration": "" if info.iteration is None
                else str(info.iteration), "mIoU": "" if info.mIoU is None else repr(info.mIoU),
                "checksum": tensor_checksum(tensors)}
    from safetensors.torch import save

    data = save(tensors, metadata=metadata)
    target = Path(out) if out is not None else weights_dir()
    if target.suffix != SUFFIX or target.is_dir():
        target = target / f"{name}{SUFFIX}"
    write_bytes_atomically(data, target)
    return PackagedWeights(target, len(data), len(tensors), info)
