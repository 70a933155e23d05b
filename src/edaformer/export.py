"""ONNX export of an EDAFormer with its ISR setting baked in.

The exported graph computes exactly ``model(image)``: logits ``(B, K, H, W)`` at the input size.
Pooling ratios are constants of the graph (an ISR setting is a choice of fixed ``AveragePool``
kernels), so one file holds one ISR setting.

Dynamic height/width. An EFA pooling is ``AveragePool(kernel=r, stride=r)`` with floor rounding:
its kernel is fixed, but its output grid ``floor(h / r)`` follows any input size, exactly as in
PyTorch. Strided convolutions, attention over ``h*w`` tokens and the bilinear resizes are
shape-generic too, so a dynamic export is valid for every input at least as large as the smallest
size the ISR setting allows (every pooling window must fit its feature map at least once, e.g.
``64`` per side for ``1111-111``, ``128`` for ``2222-222``). That bound is declared on the graph's
input; a smaller example size, or a graph that cannot be kept shape-generic, raises ``ValueError``.
"""
from __future__ import annotations

import contextlib
import logging
import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from .isr import ISRSpec, isr as isr_context

__all__ = ["export_onnx", "min_input_side", "verify_onnx", "DEFAULT_OPSET"]

DEFAULT_OPSET = 18
log = logging.getLogger(__name__)


def min_input_side(model: nn.Module, axis: int = 0) -> int:
    """Smallest input height (``axis=0``) or width (``axis=1``) the active ISR setting accepts."""
    return model.min_input_size()[axis]


@contextlib.contextmanager
def _eval_mode(model: nn.Module):
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def export_onnx(model: nn.Module, path: str | os.PathLike, size: Sequence[int] = (512, 512),
                isr: ISRSpec | None = None, dynamic: bool = False, opset: int = DEFAULT_OPSET,
                batch: int = 1, verbose: bool = False) -> Path:
    """Export ``model`` (an :class:`~edaformer.EDAFormer`) to ONNX at ``path``.

    ``size``: the example input ``(H, W)`` (the fixed input size unless ``dynamic``). ``isr``: the
    ISR setting to bake in (default: the model's active one; the model's own setting is restored
    afterwards). ``dynamic``: height and width become symbolic (``height >= min_h``,
    ``width >= min_w`` for the ISR setting, see the module docstring); the batch size is fixed to
    ``batch``. Input ``image`` (float32 ``(B, C, H, W)``), output ``logits`` (``(B, K, H, W)``).

    Raises ``ValueError`` when ``size`` does not fit the ISR setting (the message names the stage,
    the feature map and the pooling ratio) or when the graph cannot be exported shape-generic.
    """
    path = Path(path)
    h, w = (int(s) for s in size)
    isr_ctx = isr_context(model, isr) if isr is not None else contextlib.nullcontext()
    with isr_ctx, _eval_mode(model):
        model.check_input_size(h, w)
        param = next(model.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
        in_chans = model.encoder.stages[0].downsample.proj.in_channels
        x = torch.randn(batch, in_chans, h, w, device=device)
        dynamic_shapes = None
        if dynamic:
            min_h, min_w = min_input_side(model, 0), min_input_side(model, 1)
            if h < min_h or w < min_w:
                raise ValueError(f"dynamic export: the example size {h}x{w} is below the smallest input the "
                                 f"ISR setting {model.isr} accepts ({min_h}x{min_w})")
            dynamic_shapes = ({2: torch.export.Dim("height", min=min_h), 3: torch.export.Dim("width", min=min_w)},)
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
                if not verbose:
                    warnings.simplefilter("ignore")
                torch.onnx.export(model, (x,), str(path), input_names=["image"], output_names=["logits"],
                                  opset_version=opset, dynamo=True, dynamic_shapes=dynamic_shapes,
                                  verbose=verbose, report=False, external_data=False)
        except Exception as e:
            if not dynamic:
                raise
            raise ValueError(
                f"dynamic export failed: the graph could not be kept generic in height/width for ISR "
                f"{model.isr} ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); export a fixed "
                f"size instead") from e
        log.info("exported %s (ISR %s, %s) to %s", getattr(model, "name", type(model).__name__), model.isr,
                 "dynamic HxW" if dynamic else f"{h}x{w}", path)
    return path


def verify_onnx(model: nn.Module, path: str | os.PathLike, sizes: Sequence[Sequence[int]], *, batch: int = 1,
                isr: ISRSpec | None = None, seed: int = 0) -> list[dict]:
    """Run the ONNX file in onnxruntime (CPU) and compare with ``model`` in float32 for each size.

    Returns ``[{"size": (H, W), "max_abs_diff": float}, ...]``. Needs ``onnxruntime``.
    """
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    in_chans = model.encoder.stages[0].downsample.proj.in_channels
    g = torch.Generator().manual_seed(seed)
    results = []
    isr_ctx = isr_context(model, isr) if isr is not None else contextlib.nullcontext()
    with isr_ctx, _eval_mode(model):
        device = next(model.parameters()).device
        for size in sizes:
            x = torch.randn(batch, in_chans, int(size[0]), int(size[1]), generator=g)
            with torch.inference_mode():
                expected = model(x.to(device)).float().cpu()
            got = torch.from_numpy(session.run(None, {name: x.numpy()})[0])
            if got.shape != expected.shape:
                raise ValueError(f"ONNX output shape {tuple(got.shape)} != PyTorch {tuple(expected.shape)}")
            results.append(dict(size=(int(size[0]), int(size[1])),
                                max_abs_diff=(got - expected).abs().max().item()))
    return results
