"""Shipped weights: ``<name>.safetensors`` files in the package's ``weights`` folder, found by name.

A file holds a model's weights in float16 (integer buffers as they are) and, as safetensors
metadata (:func:`edaformer.meta.encode_weights_metadata`), everything needed to use it: the model
name and class count, class names and palette, the test protocol, the recommended ISR setting and
its pooling kind, the training config, the source checkpoint's SHA-256, its iteration and
validation mIoU. :func:`package_weights` writes one from a training checkpoint (``edaformer
package-weights``), :func:`list_pretrained` lists the shipped names, :func:`resolve_checkpoint_source`
turns a name into its file, :func:`build_from_checkpoint` builds the model a checkpoint holds and
:func:`load_pretrained` that of a shipped name.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .checkpoint_io import (WEIGHTS_SUFFIX, CheckpointMismatchError, architecture_options, checkpoint_model_name,
                            checkpoint_num_classes, load_checkpoint, read_checkpoint, read_weights_fields,
                            save_weights, tensor_checksum)
from .checkpoint_io import read_weights as read_weights_file
from .config import load_config
from .isr import TRAINING_ISR, parse_isr
from .meta import (ITERATION, MIOU, SOURCE_SHA256, encode_weights_metadata, model_class_info, stored_classes,
                   stored_isr, stored_isr_pool, stored_palette, weights_checkpoint, weights_meta)
from .models import create_model
from .models.reduction import ISR_POOLS
from .protocol import TestProtocol

__all__ = ["DEFAULT_NAME", "SUFFIX", "PretrainedInfo", "PackagedWeights", "UnknownPretrainedError", "weights_dir",
           "list_pretrained", "weights_path", "check_name", "resolve_checkpoint_source", "find_checkpoint",
           "build_from_checkpoint", "load_pretrained", "read_info", "read_weights", "package_weights"]

DEFAULT_NAME = "edaformer-t-camvid"
SUFFIX = WEIGHTS_SUFFIX

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

    def fields(self) -> dict[str, Any]:
        """The metadata values (:func:`edaformer.meta.decode_weights_metadata`), ``name`` aside."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "name"}

    def meta(self) -> dict[str, Any]:
        """As a checkpoint's ``meta``: the keys that predict, eval and export read."""
        return weights_meta(self.fields())


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


def resolve_checkpoint_source(source: str | os.PathLike) -> Path:
    """The file a ``--checkpoint`` value names: the path itself when something exists there, else
    the shipped weights of that name (:func:`list_pretrained`), else the path."""
    path = Path(source)
    if path.exists() or not isinstance(source, str):
        return path
    return weights_path(source) if source in list_pretrained() else path


def find_checkpoint(source: str | os.PathLike) -> Path:
    """:func:`resolve_checkpoint_source`; ``FileNotFoundError`` when nothing is there (for a bare
    name, listing the shipped models)."""
    path = resolve_checkpoint_source(source)
    if not path.exists():
        shipped = list_pretrained() if len(path.parts) == 1 else []
        raise FileNotFoundError(f"checkpoint not found: {path}"
                                + (f" (nor a shipped model: {', '.join(shipped)})" if shipped else ""))
    return path


# -- reading ---------------------------------------------------------------------------------------
def _name(path: Path) -> str:
    return path.name[:-len(SUFFIX)] if path.name.endswith(SUFFIX) else path.stem


def read_info(path: str | os.PathLike) -> PretrainedInfo:
    """The metadata of a weights file, without reading the tensors."""
    path = Path(path)
    return PretrainedInfo(name=_name(path), **read_weights_fields(path))


def read_weights(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], PretrainedInfo]:
    """A weights file as (float32 state dict, :class:`PretrainedInfo`)."""
    path = Path(path)
    state_dict, fields = read_weights_file(path)
    return state_dict, PretrainedInfo(name=_name(path), **fields)


def build_from_checkpoint(checkpoint: str | os.PathLike | Mapping[str, Any], name: str | None = None,
                          num_classes: int | None = None, strict: bool = True) -> tuple[nn.Module, dict[str, Any]]:
    """The model a checkpoint (a file, a shipped name or a loaded dict) holds, with its weights:
    ``name`` (default: the checkpoint's :func:`~edaformer.checkpoint_io.checkpoint_model_name`),
    ``num_classes`` (default: its classifier's) and the architecture options of its training config
    (:func:`~edaformer.checkpoint_io.architecture_options`). Returns ``(model, report)``, the report
    of :func:`~edaformer.checkpoint_io.load_checkpoint`."""
    source = checkpoint if isinstance(checkpoint, (str, os.PathLike)) else None
    obj = read_checkpoint(find_checkpoint(source)) if source is not None else checkpoint
    name = name or checkpoint_model_name(obj, source)
    if num_classes is None:
        num_classes = checkpoint_num_classes(obj)
    config = obj.get("config") if isinstance(obj.get("config"), Mapping) else None
    model = create_model(name, num_classes=num_classes, **architecture_options(config))
    return model, load_checkpoint(model, obj, strict=strict)


def load_pretrained(name: str = DEFAULT_NAME, folder: str | os.PathLike | None = None
                    ) -> tuple[nn.Module, PretrainedInfo]:
    """The shipped model ``name`` in eval mode, float32 on the CPU, and its :class:`PretrainedInfo`.

    Built from the metadata (``create_model(model, num_classes, **architecture options of the
    training config)``), weights loaded strictly. The model runs at the training ISR; the
    recommended one is ``info.isr`` / ``info.isr_pool`` (:meth:`Segmenter.pretrained` applies it).
    """
    state_dict, info = read_weights(weights_path(name, folder))
    model, _ = build_from_checkpoint(weights_checkpoint(state_dict, info.fields()))
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
    if pool is not None and pool not in ISR_POOLS:
        raise ValueError(f"ISR pool {pool!r}: expected one of {', '.join(ISR_POOLS)}")
    source = find_checkpoint(checkpoint)
    obj = read_checkpoint(source)
    if config is not None:
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
    # the recommended setting: the given one, else the checkpoint's stored one, else the training ratios
    stored = stored_isr(meta, source) if isr is None else None
    setting = str(parse_isr(isr)) if isr is not None else stored or str(TRAINING_ISR)
    isr_pool = pool or (stored_isr_pool(meta) if stored else None) or "avg"
    model.set_isr(setting, pool=isr_pool)  # the model accepts the setting
    base = TestProtocol.from_config(config) if all(isinstance(config.get(k), Mapping) for k in ("data", "eval")) \
        else None
    protocol = TestProtocol.resolve(model, meta, base=base, source=source)
    num_classes = int(model.num_classes)
    data = config.get("data") if isinstance(config.get("data"), Mapping) else {}
    names = model_class_info(model, stored_classes(meta) or data.get("classes"),
                             stored_palette(meta) or data.get("palette"))
    tensors = _half(model.state_dict(), source)
    miou = meta.get(MIOU)
    iteration = obj.get("iteration", meta.get(ITERATION))
    info = PretrainedInfo(name=name, model=model.name, num_classes=num_classes, classes=names.classes,
                          palette=names.palette, protocol=protocol, isr=setting, isr_pool=isr_pool, config=config,
                          mIoU=float(miou) if isinstance(miou, (int, float)) and math.isfinite(miou) else None,
                          iteration=int(iteration) if isinstance(iteration, int) else None,
                          # a shipped file re-packaged (another ISR, say) keeps the training checkpoint's
                          source_sha256=meta.get(SOURCE_SHA256) or _sha256(source))
    metadata = encode_weights_metadata(**info.fields(), checksum=tensor_checksum(tensors))
    target = Path(out) if out is not None else weights_dir()
    if target.suffix != SUFFIX or target.is_dir():
        target = target / f"{name}{SUFFIX}"
    size = save_weights(tensors, metadata, target)
    return PackagedWeights(target, size, len(tensors), info)
