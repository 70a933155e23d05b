"""The reference (mmseg) <-> native state-dict key map.

Reference checkpoints name the encoder ``backbone.patch_embed1 / block1.0 / norm1`` and the
decoder ``decode_head.attn4 / attn44 / attn444 / attn3 / attn33 / attn2 / linear_fuse /
linear_pred`` (plus an unused ``decode_head.conv_seg``). This library names them
``encoder.stages.0.downsample / .blocks.0 / .norm`` and ``decoder.c4.0 ... decoder.c2.0 /
fuse / classifier``. :func:`reference_to_native` and :func:`native_to_reference` convert.
"""
from __future__ import annotations

import re
from collections.abc import Mapping

import torch

from .eft import reference_encoder_key

__all__ = ["reference_to_native", "native_to_reference", "CONV_SEG", "CONV_SEG_CHANNELS"]

_DECODER_BLOCKS = {"attn4": "c4.0", "attn44": "c4.1", "attn444": "c4.2", "attn3": "c3.0", "attn33": "c3.1",
                   "attn2": "c2.0"}
_DECODER_BLOCKS_INV = {v: k for k, v in _DECODER_BLOCKS.items()}
_DECODER_MODULES = {"linear_fuse.conv": "fuse.conv", "linear_fuse.bn": "fuse.bn", "linear_pred": "classifier"}
_DECODER_MODULES_INV = {v: k for k, v in _DECODER_MODULES.items()}
CONV_SEG = "decode_head.conv_seg."
CONV_SEG_CHANNELS = 128  # the reference head's unused conv_seg takes 128 channels for T and B


def _reference_decoder_key(key: str) -> str:
    m = re.match(r"^(attn\d+)\.(.*)$", key)
    if m and m[1] in _DECODER_BLOCKS:
        rest = m[2].replace("mlp.dwconv.dwconv.", "mlp.dwconv.")
        return f"{_DECODER_BLOCKS[m[1]]}.{rest}"
    for old, new in _DECODER_MODULES.items():
        if key.startswith(old + "."):
            return new + key[len(old):]
    return key


def reference_to_native(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename reference keys to this library's names; drops the unused ``conv_seg``."""
    out = {}
    for k, v in state_dict.items():
        if k.startswith(CONV_SEG):
            continue
        if k.startswith("backbone."):
            out["encoder." + reference_encoder_key(k[len("backbone."):])] = v
        elif k.startswith("decode_head."):
            out["decoder." + _reference_decoder_key(k[len("decode_head."):])] = v
        else:
            out[k] = v
    return out


def _native_encoder_to_reference(key: str) -> str:
    m = re.match(r"^stages\.(\d)\.(downsample|blocks|norm)\.(.*)$", key)
    if not m:
        return key
    n, part, rest = int(m[1]) + 1, m[2], m[3]
    if part == "downsample":
        return f"patch_embed{n}.{rest}"
    if part == "norm":
        return f"norm{n}.{rest}"
    rest = re.sub(r"^(\d+)\.mlp\.dwconv\.", r"\1.mlp.dwconv.dwconv.", rest)
    return f"block{n}.{rest}"


def _native_decoder_to_reference(key: str) -> str:
    m = re.match(r"^(c\d\.\d)\.(.*)$", key)
    if m and m[1] in _DECODER_BLOCKS_INV:
        rest = m[2].replace("mlp.dwconv.", "mlp.dwconv.dwconv.")
        return f"{_DECODER_BLOCKS_INV[m[1]]}.{rest}"
    for new, old in _DECODER_MODULES_INV.items():
        if key.startswith(new + "."):
            return old + key[len(new):]
    return key


def native_to_reference(state_dict: Mapping[str, torch.Tensor],
                        conv_seg: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Rename this library's keys to the reference names.

    The reference decoder also holds an unused ``conv_seg`` conv, ``(K, 128, 1, 1)`` for every
    model size; it is written from ``conv_seg`` when given, else as zeros.
    """
    out = {}
    for k, v in state_dict.items():
        if k.startswith("encoder."):
            out["backbone." + _native_encoder_to_reference(k[len("encoder."):])] = v
        elif k.startswith("decoder."):
            out["decode_head." + _native_decoder_to_reference(k[len("decoder."):])] = v
        else:
            out[k] = v
    if "decode_head.linear_pred.weight" in out:
        b = out["decode_head.linear_pred.bias"]
        out[CONV_SEG + "weight"] = conv_seg["weight"] if conv_seg else b.new_zeros(len(b), CONV_SEG_CHANNELS, 1, 1)
        out[CONV_SEG + "bias"] = conv_seg["bias"] if conv_seg else torch.zeros_like(b)
    return out
