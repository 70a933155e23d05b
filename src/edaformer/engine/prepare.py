"""What evaluating a trained checkpoint on a config's validation set starts from.

:func:`prepare_evaluation` is the one set-up of ``edaformer eval`` and ``edaformer isr-tune``: the
validation dataset, the model with the checkpoint's weights and the test protocol, in that order.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..checkpoint import checkpoint_num_classes, load_checkpoint, read_checkpoint
from ..data import build_dataset, dataset_config
from ..data.datasets import SegmentationDataset
from ..data.transforms import eval_transforms
from ..inference.onnx_backend import OnnxModel, is_onnx_file
from ..meta import stored_isr
from ..protocol import TestProtocol
from .builders import build_model

__all__ = ["Evaluation", "prepare_evaluation", "evaluation_isr"]


@dataclass
class Evaluation:
    """A checkpoint ready to evaluate: ``model`` (eval mode, on the device), the validation
    ``dataset`` (its test pipeline set to ``protocol``), the ``protocol`` and the
    :func:`~edaformer.checkpoint.load_checkpoint` ``report`` (``format``, ``meta``, ...)."""

    model: nn.Module
    dataset: SegmentationDataset
    protocol: TestProtocol
    report: dict[str, Any]


def _check_class_count(trained_for: int | None, dataset: SegmentationDataset, source: Any) -> None:
    if trained_for is not None and trained_for != dataset.num_classes:
        names = list(getattr(dataset, "classes", None) or [])
        shown = ", ".join(map(str, names[:8])) + (f", ... ({len(names)} in all)" if len(names) > 8 else "")
        raise ValueError(f"checkpoint {source} has {trained_for} classes but the config's dataset has "
                         f"{dataset.num_classes}" + (f" ({shown})" if names else ""))


def prepare_evaluation(cfg: Mapping[str, Any], checkpoint: str | os.PathLike, device: torch.device | str = "cpu",
                       *, scale: Any = None, mode: str | None = None, tta: bool = False) -> Evaluation:
    """The validation set of the resolved config ``cfg`` and the model of ``cfg["model"]`` with the
    weights of ``checkpoint`` (a file or a shipped name), in eval mode on ``device``.

    The test protocol is ``scale`` / ``mode`` where given, else the one stored in the checkpoint,
    else the config's (:meth:`TestProtocol.from_config`); ``tta`` adds the config's multi-scale +
    flip test (``eval.tta_scales``, ``eval.tta_flip``). A checkpoint trained for another class
    count than the dataset's raises ``ValueError`` naming both (and the dataset's classes).
    An ``.onnx`` file (``edaformer export``) runs in ONNX Runtime with its baked-in ISR setting
    (:class:`~edaformer.inference.onnx_backend.OnnxModel`; report format ``onnx``).
    """
    dataset = build_dataset(dataset_config(cfg["data"]), "val")
    if is_onnx_file(checkpoint):
        model = OnnxModel(checkpoint)
        _check_class_count(model.num_classes, dataset, checkpoint)
        report = {"format": "onnx", "meta": model.checkpoint_meta()}
    else:
        obj = read_checkpoint(checkpoint)
        _check_class_count(checkpoint_num_classes(obj), dataset, checkpoint)
        model = build_model(cfg["model"], dataset.num_classes, init_weights=False)
        report = load_checkpoint(model, obj)
    model.to(device).eval()
    protocol = TestProtocol.resolve(model, report["meta"], base=TestProtocol.from_config(cfg), source=checkpoint,
                                    scale=scale, mode=mode)
    if tta:
        protocol = protocol.replace(tta_scales=tuple(cfg["eval"]["tta_scales"]), flip=bool(cfg["eval"]["tta_flip"]))
    dataset.transforms = eval_transforms(protocol.scale, protocol.size_divisor)
    return Evaluation(model, dataset, protocol, report)


def evaluation_isr(isr: Any, pool: str | None, meta: Mapping[str, Any] | None,
                   source: Any = None) -> tuple[str | None, str | None]:
    """The ISR setting and pool kind to evaluate at: ``isr`` (``eval.isr``) with ``pool``, else the
    setting stored in the checkpoint's ``meta`` by ``edaformer isr-tune --write`` with its pool
    kind (``pool`` wins), else ``(None, pool)``: the model's own setting."""
    if isr is not None:
        return isr, pool
    isr = stored_isr(meta, source=source)
    return isr, pool or ((meta or {}).get("isr_pool") if isr else None)
