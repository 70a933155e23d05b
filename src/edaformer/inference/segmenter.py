""":class:`Segmenter`: image -> label map with a model and its test protocol."""
from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from ..checkpoint import build_from_checkpoint, checkpoint_model_name, read_checkpoint
from ..data.transforms import prepare_test_image
from ..meta import model_class_info, stored_classes, stored_isr, stored_isr_pool, stored_palette
from ..pretrained import DEFAULT_NAME, load_pretrained
from ..protocol import TestProtocol
from ..utils import resolve_device
from .images import ImageInput, as_chw
from .infer import infer_logits, segment_image, segment_input
from .onnx_backend import OnnxModel, is_onnx_file

__all__ = ["Segmenter"]

Size = tuple[int, int]


class Segmenter:
    """Image -> label map with a model and its test protocol (:class:`TestProtocol`).

    The protocol is, field by field: the keyword arguments ``test_scale``, ``mode``,
    ``crop_size``, ``stride``, ``divisor``, ``flip`` when given, else ``protocol`` (e.g. a
    checkpoint's ``meta["test_protocol"]``), else the model spec's (ADE20K / COCO-Stuff: whole
    image, fit (2048, 512), sides rounded up to 32; Cityscapes: fit (2048, 1024), windows of
    1024 every 768).

    >>> seg = Segmenter.from_checkpoint("edaformer-t-ade20k", "edaformer_t_ade.pth", isr="2211-222")
    >>> label = seg("image.jpg")            # (H, W) class ids at the original size
    >>> overlay(load_image("image.jpg"), label, seg.palette).save("overlay.png")
    """

    def __init__(self, model: nn.Module, device: torch.device | str | None = None, isr: Any = None, *,
                 classes: Sequence[str] | None = None, palette: Sequence[Sequence[int]] | None = None,
                 protocol: TestProtocol | Mapping[str, Any] | None = None, test_scale: Size | None = None,
                 mode: str | None = None, crop_size: Size | None = None, stride: Size | None = None,
                 divisor: int | None = None, flip: bool | None = None, pool: str | None = None):
        self.device = resolve_device(device)
        self.model = model.to(self.device).eval()
        if pool is not None:
            model.set_isr(isr if isr is not None else model.isr, pool=pool)
        elif isr is not None:
            model.set_isr(isr)
        if isinstance(protocol, Mapping):
            protocol = TestProtocol.from_dict(protocol)
        self.protocol = TestProtocol.resolve(model, base=protocol, scale=test_scale, mode=mode, crop_size=crop_size,
                                             stride=stride, divisor=divisor, flip=flip)
        self.num_classes = int(getattr(model, "num_classes", 0) or 0)
        info = model_class_info(model, classes, palette)
        self.classes, self.palette = info.classes, info.palette


    @classmethod
    def from_checkpoint(cls, name: str | None, checkpoint_path: str | os.PathLike,
                        device: torch.device | str | None = None, isr: Any = None, num_classes: int | None = None,
                        **kwargs) -> "Segmenter":
        """Build the named model, load a checkpoint (any supported format, or the name of a
        shipped model, see :mod:`edaformer.pretrained`) and wrap it.

        ``name`` None: the model name the checkpoint stores (``edaformer train`` and shipped
        weights store one). From the checkpoint's ``meta`` when present: the test protocol
        (``test_protocol``, as ``edaformer train`` writes it), class names and palette
        (``CLASSES``, ``PALETTE``); else the model's; the ISR setting and pool kind stored by
        ``edaformer isr-tune --write`` (``isr``, ``isr_pool``) unless ``isr`` / ``pool`` are given;
        the architecture options of the training config (``decoder_depths``, ``decoder_op``,
        ``train_isr``). ``num_classes`` defaults to the checkpoint's classifier size.

        An ``.onnx`` file (``edaformer export``) runs in ONNX Runtime: :meth:`from_onnx`.
        """
        if is_onnx_file(checkpoint_path):
            return cls.from_onnx(checkpoint_path, name=name, device=device, isr=isr, num_classes=num_classes,
                                 **kwargs)
        device = resolve_device(device)
        obj = read_checkpoint(checkpoint_path)
        model, report = build_from_checkpoint(obj, name or checkpoint_model_name(obj, checkpoint_path), num_classes)
        meta = report.get("meta") or {}
        if isr is None:
            isr = stored_isr(meta, source=checkpoint_path)
            if kwargs.get("pool") is None and isr is not None and stored_isr_pool(meta):
                kwargs["pool"] = stored_isr_pool(meta)
        kwargs.setdefault("classes", stored_classes(meta))
        kwargs.setdefault("palette", stored_palette(meta))
        if kwargs.get("protocol") is None:
            kwargs["protocol"] = TestProtocol.resolve(model, meta, source=checkpoint_path)
        return cls(model, device=device, isr=isr, **kwargs)

    @classmethod
    def from_onnx(cls, path: str | os.PathLike, device: torch.device | str | None = None, isr: Any = None, *,
                  threads: int | None = None, name: str | None = None, num_classes: int | None = None,
                  **kwargs) -> "Segmenter":
        """An ``edaformer export`` file run in ONNX Runtime (:class:`~.onnx_backend.OnnxModel`, ``threads``
        intra-op threads, default ``torch.get_num_threads()``) with the classes, palette and test
        protocol of its metadata; protocol keywords win. Labels come from the same banded resize and
        argmax as the torch model's. The ISR setting is the file's: another ``isr``, or a ``name`` /
        ``num_classes`` other than the file's, raises ``ValueError``.
        """
        model = OnnxModel(path, threads=threads)
        for what, asked, held in (("model", name, model.name), ("num_classes", num_classes, model.num_classes)):
            if asked is not None and asked != held:
                raise ValueError(f"{path} holds {what} {held}, not {asked}")
        kwargs.setdefault("classes", model.classes)
        kwargs.setdefault("palette", model.palette)
        if kwargs.get("protocol") is None:
            kwargs["protocol"] = model.protocol
        return cls(model, device=device, isr=isr, **kwargs)

    @classmethod
    def pretrained(cls, name: str | None = None, device: torch.device | str | None = None, isr: Any = None,
                   **kwargs) -> "Segmenter":
        """The shipped model ``name`` (default :data:`edaformer.pretrained.DEFAULT_NAME`) with its
        stored test protocol, classes, palette and recommended ISR setting and pool kind; an
        explicit ``isr`` (with ``pool``, default avg) and protocol keywords win.

        >>> seg = Segmenter.pretrained()        # edaformer-t-camvid
        >>> label = seg("street.jpg")
        """
        model, info = load_pretrained(name or DEFAULT_NAME)
        if isr is None:
            isr = info.isr
            kwargs.setdefault("pool", info.isr_pool)
        kwargs.setdefault("classes", info.classes)
        kwargs.setdefault("palette", info.palette)
        if kwargs.get("protocol") is None:
            kwargs["protocol"] = info.protocol
        return cls(model, device=device, isr=isr, **kwargs)

    # prediction ------------------------------------------------------------------------------
    def _input(self, raw: torch.Tensor) -> torch.Tensor:
        return prepare_test_image(raw.to(self.device), self.protocol.scale, self.protocol.size_divisor)

    def logits(self, image: ImageInput) -> torch.Tensor:
        """Logits ``(1, K, H, W)`` at the original size of one image (``4 * K * H * W`` bytes; the
        label map from ``self(image)`` never holds them all)."""
        raw = as_chw(image)
        p = self.protocol
        return infer_logits(self.model, self._input(raw[None]), tuple(raw.shape[-2:]), mode=p.mode,
                            crop_size=p.crop_size, stride=p.stride, flip=p.flip)

    def predict(self, image: ImageInput, confidence: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
        """Label map ``(H, W)`` at the original size and, with ``confidence``, the largest softmax
        probability per pixel as uint8 (255 = 1.0)."""
        return segment_image(self.model, image, self.protocol, confidence)

    def __call__(self, image: ImageInput) -> np.ndarray:
        """Label map ``(H, W)`` (uint8, or int64 beyond 256 classes) at the original size."""
        return self.predict(image)[0]

    def predict_batch(self, images: Iterable[ImageInput], batch_size: int = 8) -> list[np.ndarray]:
        """Label maps for many images; images of the same size are run together in batches."""
        raws = [as_chw(img) for img in images]
        if self.protocol.tta_scales:
            return [self(raw) for raw in raws]
        out: list[np.ndarray | None] = [None] * len(raws)
        groups: dict[tuple[int, int, torch.dtype], list[int]] = {}
        for i, raw in enumerate(raws):
            groups.setdefault((raw.shape[-2], raw.shape[-1], raw.dtype), []).append(i)
        step = max(1, batch_size)
        for (h, w, _), idx in groups.items():
            for start in range(0, len(idx), step):
                chunk = idx[start:start + step]
                batch = self._input(torch.stack([raws[i] for i in chunk]))
                labels, _ = segment_input(self.model, batch, (h, w), self.protocol)
                for i, lab in zip(chunk, labels):
                    out[i] = lab
        return out  # type: ignore[return-value]

    def __repr__(self) -> str:
        name = getattr(self.model, "name", type(self.model).__name__)
        return f"Segmenter({name}, classes={self.num_classes}, {self.protocol.describe()}, device={self.device})"
