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
from ..isr import ISRSetting, get_isr, set_inference_isr
from ..meta import model_class_info, stored_classes, stored_isr, stored_isr_pool, stored_palette
from ..pretrained import DEFAULT_NAME, load_pretrained
from ..protocol import TestProtocol
from ..utils import resolve_device
from .images import ImageInput, as_chw
from .infer import image_probabilities, infer_logits, segment_image, segment_input
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

    >>> seg = Segmenter.from_checkpoint("best_mIoU.pth", isr="2211-222")
    >>> label = seg("image.jpg")            # (H, W) class ids at the original size
    >>> overlay(load_image("image.jpg"), label, seg.palette).save("overlay.png")
    """

    def __init__(self, model: nn.Module, device: torch.device | str | None = None, isr: Any = None, *,
                 classes: Sequence[str] | None = None, palette: Sequence[Sequence[int]] | None = None,
                 protocol: TestProtocol | Mapping[str, Any] | None = None, test_scale: Size | None = None,
                 mode: str | None = None, crop_size: Size | None = None, stride: Size | None = None,
                 divisor: int | None = None, flip: bool | None = None, pool: str | None = None,
                 source: str | os.PathLike | None = None):
        """``isr``: a setting to run with (:func:`~edaformer.isr.set_inference_isr`: factors 1 to
        8, a one-line ``ValueError`` otherwise). ``source``: where the weights came from (a shipped
        name or a checkpoint file), shown by ``repr``."""
        self.device = resolve_device(device)
        self.model = model.to(self.device).eval()
        if isr is not None or pool is not None:
            set_inference_isr(model, isr if isr is not None else get_isr(model), pool=pool)
        if isinstance(protocol, Mapping):
            protocol = TestProtocol.from_dict(protocol)
        self.protocol = TestProtocol.resolve(model, base=protocol, scale=test_scale, mode=mode, crop_size=crop_size,
                                             stride=stride, divisor=divisor, flip=flip)
        self.num_classes = int(getattr(model, "num_classes", 0) or 0)
        info = model_class_info(model, classes, palette)
        self.classes, self.palette = info.classes, info.palette
        self.source = None if source is None else str(source)

    @classmethod
    def from_checkpoint(cls, checkpoint: str | os.PathLike | None, checkpoint_path: str | os.PathLike | None = None,
                        *, model: str | None = None, device: torch.device | str | None = None, isr: Any = None,
                        num_classes: int | None = None, **kwargs) -> "Segmenter":
        """The model a checkpoint holds, with its settings: ``checkpoint`` is a file in any
        supported format (``.pth``, ``.safetensors``) or the name of a shipped model (see
        :mod:`edaformer.pretrained`).

        From the checkpoint: the model name (``edaformer train`` and shipped weights store one;
        ``model`` names it for a file that stores none, e.g. a reference mmseg checkpoint), its
        class count (``num_classes`` overrides) and the architecture options of its training
        config (``decoder_depths``, ``decoder_op``, ``train_isr``); from its ``meta`` when present:
        the test protocol (``test_protocol``), class names and palette (``CLASSES``, ``PALETTE``),
        else the model's; the ISR setting and pool kind stored by ``edaformer package-weights`` or
        ``edaformer isr-tune --write`` (``isr``, ``isr_pool``) unless ``isr`` / ``pool`` are given.

        An ``.onnx`` file (``edaformer export``) runs in ONNX Runtime: :meth:`from_onnx`.

        The earlier form ``from_checkpoint(name, path)`` (model name first) is read as
        ``from_checkpoint(path, model=name)``.

        >>> seg = Segmenter.from_checkpoint("work_dirs/camvid/best_mIoU.pth")
        """
        if checkpoint_path is not None:
            if model is not None:
                raise TypeError("from_checkpoint: the model name is given twice; call "
                                "from_checkpoint(path, model=name)")
            model, checkpoint = checkpoint, checkpoint_path
        if checkpoint is None:
            raise TypeError("from_checkpoint: no checkpoint given (a file or a shipped model name)")
        if is_onnx_file(checkpoint):
            return cls.from_onnx(checkpoint, model=model, device=device, isr=isr, num_classes=num_classes, **kwargs)
        device = resolve_device(device)
        obj = read_checkpoint(checkpoint)
        net, report = build_from_checkpoint(obj, model or checkpoint_model_name(obj, checkpoint), num_classes)
        meta = report.get("meta") or {}
        if isr is None:
            isr = stored_isr(meta, source=checkpoint)
            if kwargs.get("pool") is None and isr is not None and stored_isr_pool(meta):
                kwargs["pool"] = stored_isr_pool(meta)
        kwargs.setdefault("classes", stored_classes(meta))
        kwargs.setdefault("palette", stored_palette(meta))
        kwargs.setdefault("source", checkpoint)
        if kwargs.get("protocol") is None:
            kwargs["protocol"] = TestProtocol.resolve(net, meta, source=checkpoint)
        return cls(net, device=device, isr=isr, **kwargs)

    @classmethod
    def from_onnx(cls, path: str | os.PathLike, device: torch.device | str | None = None, isr: Any = None, *,
                  threads: int | None = None, model: str | None = None, num_classes: int | None = None,
                  **kwargs) -> "Segmenter":
        """An ``edaformer export`` file run in ONNX Runtime (:class:`~.onnx_backend.OnnxModel`, ``threads``
        intra-op threads, default ``torch.get_num_threads()``) with the classes, palette and test
        protocol of its metadata; protocol keywords win. Labels come from the same banded resize and
        argmax as the torch model's. The ISR setting is the file's: another ``isr``, or a ``model`` /
        ``num_classes`` other than the file's, raises ``ValueError``.
        """
        net = OnnxModel(path, threads=threads)
        for what, asked, held in (("model", model, net.name), ("num_classes", num_classes, net.num_classes)):
            if asked is not None and asked != held:
                raise ValueError(f"{path} holds {what} {held}, not {asked}")
        kwargs.setdefault("classes", net.classes)
        kwargs.setdefault("palette", net.palette)
        kwargs.setdefault("source", path)
        if kwargs.get("protocol") is None:
            kwargs["protocol"] = net.protocol
        return cls(net, device=device, isr=isr, **kwargs)

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
        kwargs.setdefault("source", info.name)
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
        """Label map ``(H, W)`` at the original size and, with ``confidence``, the probability of
        the chosen class per pixel, float32 in 0-1 (else None). ``edaformer predict --save-probs``
        writes it as an 8-bit PNG, scaled to 0-255 (:func:`~.visualize.confidence_image`)."""
        return segment_image(self.model, image, self.protocol, confidence)

    def probabilities(self, image: ImageInput) -> np.ndarray:
        """Softmax probabilities ``(C, H, W)``, float32, at the original size of one image (the
        average of the multi-scale test under ``protocol.tta_scales``); their argmax over the classes
        is the label map of ``self(image)`` (but where two classes tie to within float rounding).
        Holds ``4 * C * H * W`` bytes."""
        return image_probabilities(self.model, image, self.protocol)[0].cpu().numpy()

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
        arch = getattr(self.model, "name", type(self.model).__name__)
        parts = [f"model={self.source}", f"architecture={arch}"] if self.source else [f"model={arch}"]
        parts.append(f"classes={self.num_classes}")
        try:
            setting = get_isr(self.model)
        except TypeError:  # a model without ISR
            setting = None
        if setting is not None:
            pool = getattr(self.model, "isr_pool", None)
            shown = str(setting) if isinstance(setting, ISRSetting) else "".join(map(str, setting))
            parts.append(f"isr={shown}" + (f" ({pool})" if pool else ""))
        return f"Segmenter({', '.join(parts)}, {self.protocol.describe()}, device={self.device})"
