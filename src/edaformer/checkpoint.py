"""Checkpoints: load, save, convert. A checkpoint is a file (``.pth`` in any supported format, or
``.safetensors`` weights) or the name of a model shipped with the package.

This is the public checkpoint API. The files are read and written by :mod:`edaformer.checkpoint_io`
(which knows no shipped names and builds no model); shipped names are resolved by
:mod:`edaformer.pretrained` (:func:`resolve_checkpoint_source`); the reference (mmseg) <-> native
key map is :mod:`edaformer.models.keymap`; what a checkpoint's ``meta`` holds is
:mod:`edaformer.meta`.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from torch import nn

from . import checkpoint_io
from .checkpoint_io import (ARCHITECTURE_KEYS, CheckpointMismatchError, CheckpointWriteError, CorruptCheckpointError,
                            architecture_options, checkpoint_model_name, export_reference, save_checkpoint,
                            tensor_checksum, write_bytes_atomically)
from .meta import FORMAT
from .models.keymap import native_to_reference, reference_to_native
from .pretrained import build_from_checkpoint, find_checkpoint, resolve_checkpoint_source

__all__ = ["load_checkpoint", "save_checkpoint", "read_checkpoint", "resolve_checkpoint_source",
           "checkpoint_num_classes", "checkpoint_model_name", "architecture_options", "build_from_checkpoint",
           "reference_to_native", "native_to_reference", "export_reference", "CheckpointMismatchError",
           "CorruptCheckpointError", "CheckpointWriteError", "tensor_checksum", "write_bytes_atomically", "FORMAT",
           "ARCHITECTURE_KEYS"]

Checkpoint = str | os.PathLike | Mapping[str, Any]


def _source(checkpoint: Checkpoint) -> Checkpoint:
    """A path or name as the file it names (:func:`~edaformer.pretrained.find_checkpoint`); a loaded dict as it is."""
    return find_checkpoint(checkpoint) if isinstance(checkpoint, (str, os.PathLike)) else checkpoint


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """:func:`edaformer.checkpoint_io.read_checkpoint` of a file or a shipped model's name.

    Raises ``FileNotFoundError`` for a missing path (for a bare name, listing the shipped models)
    and ``ValueError`` naming the file for one that is no checkpoint or holds Python objects other
    than tensors and plain containers; :class:`CorruptCheckpointError` when its tensors do not
    match the stored checksum.
    """
    return checkpoint_io.read_checkpoint(find_checkpoint(path))


def load_checkpoint(model: nn.Module, checkpoint: Checkpoint, strict: bool = True) -> dict[str, Any]:
    """Load weights into an :class:`~edaformer.EDAFormer` (or a bare :class:`~edaformer.EFT`) from a
    file, a shipped model's name or a loaded dict: :func:`edaformer.checkpoint_io.load_checkpoint`.

    Returns a report: ``format``, ``meta``, ``missing``, ``unexpected``, ``mismatched``.
    With ``strict=True`` any mismatch raises :class:`CheckpointMismatchError` listing them.
    """
    return checkpoint_io.load_checkpoint(model, _source(checkpoint), strict=strict)


def checkpoint_num_classes(checkpoint: Checkpoint) -> int | None:
    """The class count a checkpoint (a file, a shipped name or a loaded dict) was trained for;
    None for an encoder-only checkpoint."""
    return checkpoint_io.checkpoint_num_classes(_source(checkpoint))
