"""Checkpoint files: reading and writing ``.pth`` checkpoints and ``.safetensors`` weights, the
checkpoint formats, and loading a checkpoint's weights into a model.

A checkpoint is read in any of these forms: the reference (mmseg) format (``state_dict`` keyed
``backbone.* / decode_head.*`` plus ``meta``; the key map is :mod:`edaformer.models.keymap`), a
bare state dict in either naming, this library's own format (:func:`edaformer.meta.native_checkpoint`),
an encoder-only (ImageNet) checkpoint, or a safetensors weights file (:mod:`edaformer.pretrained`).
Files written here are atomic and carry a checksum of their tensors.

This module reads and writes files: it knows no shipped model names (:mod:`edaformer.pretrained`
resolves them; :mod:`edaformer.checkpoint` takes either) and builds no model.
"""
from __future__ import annotations

import errno
import hashlib
import os
import pickle
import re
import struct
import tempfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save
from torch import nn

from .meta import FORMAT, WEIGHTS_FORMAT, decode_weights_metadata, model_checkpoint, weights_checkpoint
from .models.config import ARCHITECTURE_KEYS
from .models.eft import EFT, checkpoint_filter_fn
from .models.keymap import native_to_reference, reference_to_native
from .protocol import TestProtocol

__all__ = ["read_checkpoint", "save_checkpoint", "load_checkpoint", "checkpoint_num_classes", "checkpoint_model_name",
           "architecture_options", "export_reference", "is_safetensors", "read_weights", "read_weights_fields",
           "save_weights", "tensor_checksum", "write_bytes_atomically", "CheckpointMismatchError",
           "CorruptCheckpointError", "CheckpointWriteError", "ARCHITECTURE_KEYS", "WEIGHTS_SUFFIX"]

WEIGHTS_SUFFIX = ".safetensors"


class CheckpointMismatchError(ValueError):
    """The checkpoint's keys or shapes do not match the model."""


class CorruptCheckpointError(ValueError):
    """A checkpoint file's tensors do not match the checksum stored when it was written."""


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (e.g. no space left on device); the previous file is kept."""

    def __str__(self) -> str:
        return str(self.strerror) if self.strerror else super().__str__()


_ZIP_MAGIC = b"PK\x03\x04"  # torch.save files are zip archives
_PICKLE_PROTOCOL = 0x80  # the first byte of a pickle of protocol 2 or later (legacy torch.save files)


def _not_a_checkpoint_reason(path: Path) -> str | None:
    """Why ``path`` is clearly not a ``torch.save`` file (None when it may be one)."""
    with open(path, "rb") as f:
        head = f.read(512)
    if not head:
        return "the file is empty"
    if head.startswith(_ZIP_MAGIC) or head[0] == _PICKLE_PROTOCOL:
        return None
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        text = "\0"
    if any(ord(c) < 32 and c not in "\t\n\r" for c in text):
        return "it is not a PyTorch checkpoint (.pth / .pt written by torch.save)"
    kind = "a YAML config" if path.suffix.lower() in (".yaml", ".yml") or re.match(r"^\s*[\w_]+\s*:", text) \
        else "a text file"
    return f"it is {kind}, not a PyTorch checkpoint (.pth / .pt written by torch.save)"


def _tensors(obj: Any, path: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor of a nested dict / list structure with its key path, in a fixed order."""
    if isinstance(obj, torch.Tensor):
        yield path, obj
    elif isinstance(obj, Mapping):
        for key in sorted(obj, key=str):
            if not (path == "" and key == "checksum"):
                yield from _tensors(obj[key], f"{path}/{key}")
    elif isinstance(obj, (list, tuple)):
        for i, item in enumerate(obj):
            yield from _tensors(item, f"{path}/{i}")


def tensor_checksum(obj: Any) -> str | None:
    """SHA-256 over every tensor's key path, dtype, shape and bytes (None when there is no tensor)."""
    digest, found = hashlib.sha256(), False
    for key, t in _tensors(obj):
        found = True
        t = t.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        if t.numel():
            digest.update(memoryview(t.view(torch.uint8).numpy()))
    return digest.hexdigest() if found else None


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """``torch.load`` a checkpoint file safely (``weights_only=True``) onto the CPU.

    A ``.safetensors`` file (shipped weights, :mod:`edaformer.pretrained`) reads as a checkpoint in
    this library's format, float32, with its ``meta`` and training ``config``; one without
    edaformer metadata gives its tensors as a bare ``state_dict``.

    Raises ``FileNotFoundError`` for a missing path and ``ValueError`` naming the file for a
    folder, an empty or text file, a file that is no ``torch.save`` output, or one that holds
    Python objects other than tensors and plain containers (never unpickled, for safety).

    A file written by :func:`save_checkpoint` carries a checksum of its tensors; a mismatch
    (a corrupted file) raises :class:`CorruptCheckpointError`.
    """
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"checkpoint {path} is a directory, not a checkpoint file")
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if is_safetensors(path):
        return _weights_as_checkpoint(path)
    reason = _not_a_checkpoint_reason(path)
    if reason is None:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            found = re.search(r"unsupported GLOBAL (\S+)", str(e), re.IGNORECASE)
            reason = (f"it holds a Python object ({found[1]}) beyond tensors and plain containers, which is not "
                      "loaded for safety" if found else "it is not a readable PyTorch checkpoint (corrupt or "
                      "another format)")
        except Exception as e:  # noqa: BLE001 - re-raised with the file name
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            reason = f"it is corrupt or truncated ({type(e).__name__}{': ' + first if first else ''})"
    if reason is not None:
        raise ValueError(f"could not read checkpoint {path}: {reason}")
    if not isinstance(obj, Mapping):
        raise ValueError(f"checkpoint {path} holds a {type(obj).__name__}, not a dict")
    stored = obj.get("checksum")
    if isinstance(stored, Mapping) and stored.get("algorithm") == "sha256":
        if tensor_checksum(obj) != stored.get("tensors"):
            raise CorruptCheckpointError(f"checkpoint {path} is corrupt: its tensors do not match the checksum "
                                         "stored when it was written")
    return dict(obj)


def checkpoint_num_classes(checkpoint: str | os.PathLike | Mapping[str, Any]) -> int | None:
    """The class count a checkpoint (a path or a loaded dict) was trained for, from its classifier
    weight in any supported format; None for an encoder-only checkpoint."""
    obj = read_checkpoint(checkpoint) if isinstance(checkpoint, (str, os.PathLike)) else checkpoint
    state_dict, _ = _unwrap(obj)
    for key, value in _strip_wrappers(state_dict).items():
        if isinstance(value, torch.Tensor) and key in ("decoder.classifier.weight", "decode_head.linear_pred.weight"):
            return int(value.shape[0])
    return None


def architecture_options(config: Mapping[str, Any] | None) -> dict[str, Any]:
    """The ``create_model`` keywords of a training config's ``model`` section that change the
    architecture beyond the named model (the :class:`~edaformer.models.EDAFormerConfig` fields
    :data:`~edaformer.models.config.ARCHITECTURE_KEYS`, those set)."""
    model_cfg = (config or {}).get("model") or {}
    return {k: model_cfg[k] for k in ARCHITECTURE_KEYS if model_cfg.get(k) is not None}


def checkpoint_model_name(obj: Mapping[str, Any], source: Any = None) -> str:
    """The model name a loaded checkpoint stores (``model``, else its config's ``model.name``);
    ``ValueError`` naming ``source`` when it stores none."""
    name = obj.get("model")
    if not isinstance(name, str):
        config = obj.get("config")
        name = ((config.get("model") or {}).get("name")) if isinstance(config, Mapping) else None
    if not isinstance(name, str) or not name:
        what = f"checkpoint {source}" if source is not None else "the checkpoint"
        raise ValueError(f"{what} stores no model name; give one (--model, see `edaformer list`)")
    return name


def _unwrap(obj: Mapping[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split a checkpoint into (state dict, meta)."""
    meta = dict(obj.get("meta") or {}) if isinstance(obj.get("meta"), Mapping) else {}
    for key in ("state_dict", "model", "module"):
        if key in obj and isinstance(obj[key], Mapping):
            return dict(obj[key]), meta
    return dict(obj), meta


def _strip_wrappers(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    for prefix in ("module.", "_orig_mod."):
        if state_dict and all(k.startswith(prefix) for k in state_dict):
            state_dict = {k[len(prefix):]: v for k, v in state_dict.items()}
    return state_dict


def _format_list(title: str, items: list[str]) -> str:
    shown = "\n    ".join(items[:10])
    more = f"\n    ... and {len(items) - 10} more" if len(items) > 10 else ""
    return f"  {title} ({len(items)}):\n    {shown}{more}"


def _check_and_load(module: nn.Module, state_dict: dict[str, torch.Tensor], strict: bool, what: str) -> dict:
    target = module.state_dict()
    missing = [k for k in target if k not in state_dict]
    unexpected = [k for k in state_dict if k not in target]
    mismatched = [f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(target[k].shape)}"
                  for k in target if k in state_dict and state_dict[k].shape != target[k].shape]
    if strict and (missing or unexpected or mismatched):
        parts = [f"checkpoint does not match the {what}:"]
        for title, items in (("missing keys", missing), ("unexpected keys", unexpected),
                             ("shape mismatches", mismatched)):
            if items:
                parts.append(_format_list(title, items))
        raise CheckpointMismatchError("\n".join(parts))
    usable = {k: v for k, v in state_dict.items() if k in target and v.shape == target[k].shape}
    module.load_state_dict(usable, strict=False)
    shapes = {k: (tuple(state_dict[k].shape), tuple(target[k].shape))
              for k in target if k in state_dict and state_dict[k].shape != target[k].shape}
    return dict(missing=missing, unexpected=unexpected, mismatched=mismatched, shapes=shapes, loaded=len(usable))


def load_checkpoint(model: nn.Module, checkpoint: str | os.PathLike | Mapping[str, Any],
                    strict: bool = True) -> dict[str, Any]:
    """Load weights into an :class:`~edaformer.EDAFormer` (or a bare :class:`~edaformer.EFT`).

    Accepts a path or an already loaded dict in any of these forms: the reference format
    (``state_dict`` keyed ``backbone.* / decode_head.*`` plus ``meta``), a bare state dict in
    either naming, this library's own format, or an encoder-only (ImageNet) checkpoint, which
    is loaded into the encoder with its classifier ``head.*`` ignored.

    Returns a report: ``format``, ``meta``, ``missing``, ``unexpected``, ``mismatched`` (and their
    ``shapes``: name -> (checkpoint shape, model shape)), ``loaded`` (how many tensors).
    With ``strict=True`` any mismatch raises :class:`CheckpointMismatchError` listing them.
    """
    obj = read_checkpoint(checkpoint) if isinstance(checkpoint, (str, os.PathLike)) else dict(checkpoint)
    state_dict, meta = _unwrap(obj)
    state_dict = _strip_wrappers(state_dict)
    tensors = {k: v for k, v in state_dict.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise ValueError("checkpoint holds no tensors")
    keys = list(tensors)
    if any(k.startswith(("backbone.", "decode_head.")) for k in keys):
        fmt = "reference"
        tensors = reference_to_native(tensors)
    elif any(k.startswith(("encoder.", "decoder.")) for k in keys):
        fmt = obj.get("format", "native") if isinstance(obj.get("format"), str) else "native"
    else:
        fmt = "encoder"
    if fmt == "encoder" or isinstance(model, EFT):
        encoder = model if isinstance(model, EFT) else model.encoder
        if fmt != "encoder":  # a full segmentor checkpoint loaded into a bare encoder
            tensors = {k[len("encoder."):]: v for k, v in tensors.items() if k.startswith("encoder.")}
        tensors = checkpoint_filter_fn(tensors, encoder)
        if not isinstance(model, EFT) or encoder.num_classes == 0:
            tensors = {k: v for k, v in tensors.items() if not k.startswith("head.")}
        report = _check_and_load(encoder, tensors, strict, "encoder")
    else:
        report = _check_and_load(model, tensors, strict, "model")
    report.update(format=fmt, meta=meta)
    return report


# -- safetensors weights ------------------------------------------------------------------------------
def is_safetensors(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a safetensors file (by its suffix or its header)."""
    path = Path(path)
    if path.suffix == WEIGHTS_SUFFIX:
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


def _safetensors_metadata(path: Path) -> dict[str, str]:
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception as e:  # noqa: BLE001 - the safetensors error, re-raised with the file name
        raise ValueError(f"could not read weights {path}: it is corrupt or not a safetensors file "
                         f"({_first_line(e)})") from None


def _safetensors_tensors(path: Path, metadata: Mapping[str, str]) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file, checked against the stored checksum, floats as float32."""
    try:
        tensors = load_file(str(path))
    except Exception as e:  # noqa: BLE001 - re-raised with the file name
        raise ValueError(f"could not read weights {path}: it is corrupt or truncated ({_first_line(e)})") from None
    stored = metadata.get("checksum")
    if stored and tensor_checksum(tensors) != stored:
        raise CorruptCheckpointError(f"weights {path} are corrupt: their tensors do not match the checksum stored "
                                     "when they were written")
    return {k: v.float() if v.is_floating_point() else v for k, v in tensors.items()}


def _fields(metadata: Mapping[str, str], path: Path) -> dict[str, Any]:
    """:func:`~edaformer.meta.decode_weights_metadata` with the test protocol as a :class:`TestProtocol`."""
    fields = decode_weights_metadata(metadata, path)
    try:
        fields["protocol"] = TestProtocol.from_dict(fields["protocol"])
    except (TypeError, ValueError) as e:
        raise ValueError(f"weights {path}: invalid metadata: {e}") from None
    return fields


def read_weights_fields(path: str | os.PathLike) -> dict[str, Any]:
    """What a weights file's metadata says (:func:`~edaformer.meta.decode_weights_metadata`, the
    protocol as a :class:`TestProtocol`), without reading the tensors."""
    path = Path(path)
    return _fields(_safetensors_metadata(path), path)


def read_weights(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """A weights file as (float32 state dict, :func:`read_weights_fields`)."""
    path = Path(path)
    metadata = _safetensors_metadata(path)
    fields = _fields(metadata, path)
    return _safetensors_tensors(path, metadata), fields


def _weights_as_checkpoint(path: Path) -> dict[str, Any]:
    metadata = _safetensors_metadata(path)
    if metadata.get("format") != WEIGHTS_FORMAT:
        return {"state_dict": _safetensors_tensors(path, metadata)}
    fields = _fields(metadata, path)
    return weights_checkpoint(_safetensors_tensors(path, metadata), fields)


def save_weights(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str], path: str | os.PathLike) -> int:
    """Write ``tensors`` with ``metadata`` as a safetensors file, atomically (as
    :func:`save_checkpoint`); returns its size in bytes."""
    data = save(dict(tensors), metadata=dict(metadata))
    write_bytes_atomically(data, path)
    return len(data)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


class _RecordingWriter:
    """A file wrapper that remembers the ``OSError`` of a failed write (``torch.save`` replaces it
    by a ``RuntimeError`` that hides the cause)."""

    def __init__(self, f):
        self.f, self.error = f, None

    def write(self, data) -> int:
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = e
            raise

    def flush(self) -> None:
        self.f.flush()


def save_checkpoint(obj: Mapping[str, Any] | nn.Module, path: str | os.PathLike) -> Path:
    """Write a checkpoint atomically: a temporary file in the same folder, then a rename.

    A module is saved in this library's format (state dict plus its name and classes). A dict in
    this format (``format: edaformer``) also gets a ``checksum`` of its tensors, verified by
    :func:`read_checkpoint`; other dicts (e.g. reference-format exports) are written as given. The file
    mode follows the umask. A full disk raises :class:`CheckpointWriteError` and leaves the
    previous file at ``path`` untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(obj, nn.Module):
        obj = model_checkpoint(obj)
    checksum = tensor_checksum(obj) if obj.get("format") == FORMAT else None
    if checksum is not None:
        obj = {**obj, "checksum": {"algorithm": "sha256", "tensors": checksum}}
    return _write_atomically(path, lambda f: torch.save(obj, f))


def write_bytes_atomically(data: bytes, path: str | os.PathLike) -> Path:
    """Write ``data`` to ``path`` as :func:`save_checkpoint` writes: a temporary file, then a
    rename; a full disk raises :class:`CheckpointWriteError` and keeps the previous file."""
    return _write_atomically(Path(path), lambda f: f.write(data))


def _write_atomically(path: Path, write: Callable[[Any], Any]) -> Path:
    """``write(file)`` into a temporary file beside ``path``, fsync, rename onto ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    writer = None
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            writer = _RecordingWriter(f)
            write(writer)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        cause = writer.error if writer is not None and writer.error is not None else e
        if isinstance(cause, OSError) and cause.errno == errno.ENOSPC:
            raise CheckpointWriteError(errno.ENOSPC, f"no space left on device while writing {path} "
                                       "(the previous file there is kept)") from e
        raise
    return path


def export_reference(model: nn.Module, path: str | os.PathLike, meta: Mapping[str, Any] | None = None) -> Path:
    """Write ``model`` as a reference-format checkpoint (``state_dict`` + ``meta``)."""
    state = native_to_reference({k: v.detach().cpu() for k, v in model.state_dict().items()})
    return save_checkpoint({"state_dict": state, "meta": dict(meta or {})}, path)
