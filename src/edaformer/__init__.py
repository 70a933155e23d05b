"""edaformer: EDAFormer semantic segmentation (EFT encoder, all-attention decoder, ISR).

The models, ISR, checkpoints and shipped weights are imported with the package; ONNX export, the
FLOP counter and :class:`Segmenter` (with the inference package) on first use.
"""
from __future__ import annotations

import importlib
from typing import Any

from .checkpoint import export_reference, load_checkpoint, save_checkpoint
from .isr import ISRSetting, isr, parse_isr, set_isr
from .models import EFT, EDAFormer, create_model, list_models
from .pretrained import list_pretrained, load_pretrained

__version__ = "0.1.0"

# name -> module (relative to the package) that defines it, imported when the name is first used
_LAZY_IMPORTS = {"export_onnx": ".export", "count_flops": ".flops", "Segmenter": ".inference"}

__all__ = ["EDAFormer", "EFT", "create_model", "list_models", "load_checkpoint", "save_checkpoint",
           "export_reference", "isr", "set_isr", "parse_isr", "ISRSetting", "count_flops", "Segmenter", "export_onnx",
           "load_pretrained", "list_pretrained", "__version__"]


def __getattr__(name: str) -> Any:
    module = _LAZY_IMPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
