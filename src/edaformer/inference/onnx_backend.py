"""ONNX Runtime as an inference backend: an ``edaformer export`` file run where the torch model runs.

:class:`OnnxModel` wraps an exported ``.onnx`` file in an ONNX Runtime session and reads its
metadata (:func:`edaformer.meta.decode_onnx_metadata`): classes, palette, test protocol, ISR
setting and output stride. It answers the calls the inference code makes of a model, so the
torch path's own functions run on the ONNX Runtime logits: ``decode(x)`` gives the file's
logits (at the output stride), which :func:`~edaformer.inference.infer.segment_input` resizes and
reduces in bands (:func:`edaformer.bands.labels_from_logits`) exactly as for the torch model;
``model(x)`` gives them resized to the input size, for sliding windows, flip and the multi-scale
test. Files exported before ``output_stride`` (logits at the input size) run the same way.

>>> seg = Segmenter.from_onnx("model.onnx")      # or Segmenter.from_checkpoint(None, "model.onnx")
>>> label = seg("street.jpg")

The ISR setting is baked into the file: asking for another one raises ``ValueError``.
``onnxruntime`` is an optional package (the ``onnx`` extras): it is imported inside the functions
that need it.
"""
from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..export import require_onnx
from ..isr import ISRSetting, parse_isr
from ..meta import OUTPUT_STRIDE, checkpoint_meta, decode_onnx_metadata
from ..models.fastpath import resize_bilinear
from ..protocol import TestProtocol

__all__ = ["ONNX_SUFFIX", "is_onnx_file", "OnnxModel"]

ONNX_SUFFIX = ".onnx"
_REQUIRED = ("model", "num_classes", "classes", "palette", "isr", "protocol")  # decoded metadata an export writes


def is_onnx_file(path: Any) -> bool:
    """Whether a ``--checkpoint`` value names an ONNX file (by its ``.onnx`` suffix)."""
    return isinstance(path, (str, os.PathLike)) and Path(path).suffix.lower() == ONNX_SUFFIX


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _session(path: Path, threads: int | None, providers: Sequence[str] | None):
    """An ONNX Runtime session of ``path``; ``ValueError`` naming the file when it is not an ONNX model."""
    require_onnx("onnxruntime")
    import onnxruntime as ort  # an optional package (the onnx extras)

    options = ort.SessionOptions()
    options.intra_op_num_threads = int(threads) if threads else torch.get_num_threads()
    options.inter_op_num_threads = 1
    options.log_severity_level = 3  # errors only
    # no busy-waiting of the pool's threads after a run: torch's resize + argmax follow on the same cores
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        return ort.InferenceSession(str(path), sess_options=options,
                                    providers=list(providers or ["CPUExecutionProvider"]))
    except Exception as e:  # onnxruntime raises its own exception types (InvalidProtobuf, Fail, ...)
        raise ValueError(f"{path}: not an ONNX model that ONNX Runtime can load ({_first_line(e)})") from None


def _metadata(path: Path, props: Mapping[str, str]) -> dict[str, Any]:
    """The decoded edaformer metadata of ``path``; ``ValueError`` naming the file when it has none."""
    try:
        meta = decode_onnx_metadata(props)
        missing = [key for key in _REQUIRED if key not in meta]
        if not missing:
            meta["protocol"] = TestProtocol.from_dict(meta["protocol"])
            meta["isr"] = parse_isr(meta["isr"])
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: invalid edaformer metadata: {_first_line(e)}") from None
    if missing:
        raise ValueError(f"{path}: an ONNX file without edaformer metadata (not written by `edaformer export`; "
                         f"missing {', '.join(missing)})")
    return meta


class OnnxModel(nn.Module):
    """An exported ``.onnx`` file in ONNX Runtime, with what its metadata says.

    ``threads``: ONNX Runtime's intra-op threads (default ``torch.get_num_threads()``);
    ``providers``: its execution providers (default the CPU one). Inputs are run on the CPU and
    the logits come back on the device of the input. Attributes: ``path``, ``name`` (the model
    name), ``num_classes``, ``classes``, ``palette``, ``protocol`` (a
    :class:`~edaformer.protocol.TestProtocol`), ``isr`` / ``isr_pool`` (baked in),
    ``output_stride`` and ``metadata`` (all decoded values).
    """

    def __init__(self, path: str | os.PathLike, threads: int | None = None, providers: Sequence[str] | None = None):
        super().__init__()
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"checkpoint not found: {self.path}")
        self.session = _session(self.path, threads, providers)
        self.metadata = _metadata(self.path, self.session.get_modelmeta().custom_metadata_map)
        meta = self.metadata
        self.name = str(meta["model"])
        self.num_classes = int(meta["num_classes"])
        self.classes = tuple(map(str, meta["classes"]))
        self.palette = tuple(tuple(int(v) for v in c) for c in meta["palette"])
        self.protocol: TestProtocol = meta["protocol"]
        self.output_stride = int(meta[OUTPUT_STRIDE])
        self._isr: ISRSetting = meta["isr"]
        self._isr_pool = str(meta.get("isr_pool") or "avg")
        graph_input = self.session.get_inputs()[0]
        self._input_name = graph_input.name
        self._input_shape = tuple(d if isinstance(d, int) else None for d in graph_input.shape)
        # no weights on the torch side: an empty parameter tells the inference code the device and dtype
        self.anchor = nn.Parameter(torch.empty(0), requires_grad=False)

    # the ISR setting is the file's ---------------------------------------------------------------
    @property
    def isr(self) -> ISRSetting:
        return self._isr

    @property
    def isr_pool(self) -> str:
        return self._isr_pool

    def set_isr(self, spec: Any, pool: str | None = None) -> "OnnxModel":
        """Accept the baked-in setting (and pool kind); another one raises ``ValueError``."""
        if parse_isr(spec) != self._isr or (pool is not None and pool != self._isr_pool):
            asked = f"{parse_isr(spec)}" + (f" ({pool} pooling)" if pool is not None else "")
            raise ValueError(f"{self.path} has ISR {self._isr} ({self._isr_pool} pooling) baked in, not {asked}; "
                             f"export a file with that setting (edaformer export --isr)")
        return self

    def checkpoint_meta(self) -> dict[str, Any]:
        """The file's metadata as a checkpoint's ``meta`` (:func:`edaformer.meta.checkpoint_meta`)."""
        return checkpoint_meta(classes=self.classes, palette=self.palette, protocol=self.protocol, isr=str(self._isr),
                               isr_pool=self._isr_pool)

    # running -----------------------------------------------------------------------------------
    def _check_input(self, x: torch.Tensor) -> None:
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"expected input (B, 3, H, W), got {tuple(x.shape)}")
        _, c, h, w = self._input_shape
        if (h is not None and h != x.shape[2]) or (w is not None and w != x.shape[3]):
            raise ValueError(f"{self.path} is a fixed-size export for {h}x{w} inputs; this input is "
                             f"{x.shape[2]}x{x.shape[3]} (export with --dynamic, or with --size {x.shape[2]} "
                             f"{x.shape[3]})")

    def _run(self, x: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self._input_name: x})[0]

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """The file's logits for a normalized batch ``x`` ``(B, 3, H, W)``: ``(B, K, ceil(H / s),
        ceil(W / s))`` with ``s`` = :attr:`output_stride` (1 for files exported before it)."""
        self._check_input(x)
        array = np.ascontiguousarray(x.detach().to("cpu", torch.float32).numpy())
        batch = self._input_shape[0]
        if batch is None or batch == array.shape[0]:
            out = self._run(array)
        elif batch == 1:  # a graph for one image: one image at a time
            out = np.concatenate([self._run(array[i:i + 1]) for i in range(array.shape[0])])
        else:
            raise ValueError(f"{self.path} is exported for batches of {batch}, got {array.shape[0]}")
        # channels-last, as the torch decoder's logits: the banded resize + argmax then reads classes-last rows
        return torch.from_numpy(out).to(x.device).contiguous(memory_format=torch.channels_last)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, K, H, W)`` at the input size, as the torch model's ``forward`` gives them."""
        logits = self.decode(x)
        return logits if logits.shape[-2:] == x.shape[-2:] else resize_bilinear(logits, x.shape[-2:])

    def extra_repr(self) -> str:
        return f"{self.path}, {self.name}, classes={self.num_classes}, isr={self._isr}, stride={self.output_stride}"
