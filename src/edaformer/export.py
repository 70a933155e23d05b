"""ONNX export of an EDAFormer with its ISR setting baked in.

The exported graph computes ``model.decode(image)``: the decoder's logits ``(B, K, ceil(H / s),
ceil(W / s))`` at its output stride ``s`` (8, see :func:`output_stride`), without the final resize to
the input size, so the full-size logits are never made; a reader resizes them (bilinear,
``align_corners=False``) to the input size before the argmax, or reduces them in bands as
:func:`edaformer.bands.labels_from_logits` does. Pooling ratios are constants of the graph (an
ISR setting is a choice of fixed ``AveragePool`` kernels), so one file holds one ISR setting.

Dynamic height/width. An EFA pooling is ``AveragePool(kernel=r, stride=r)`` with floor rounding:
its kernel is fixed, but its output grid ``floor(h / r)`` follows any input size, exactly as in
PyTorch. Strided convolutions, attention over ``h*w`` tokens and the bilinear resizes are
shape-generic too, so a dynamic export is valid for every input at least as large as the smallest
size the ISR setting allows (every pooling window must fit its feature map at least once, e.g.
29 per side for ``1111-111``, 61 for ``2222-222``: ``model.min_input_size()``). That bound is declared on the graph's
input; a smaller example size, or a graph that cannot be kept shape-generic, raises ``ValueError``.
A dynamic export also makes the batch size symbolic.

Metadata. The file's ``metadata_props`` (see :func:`onnx_metadata`; the schema is
:mod:`edaformer.meta`, which also reads them back) say how to feed and read it: class names and
colours, the ISR setting, the output stride, the input normalisation (RGB on 0-255 values,
``(x - mean) / std``) and the test protocol, also as a resize rule in words.
:mod:`edaformer.inference.onnx_backend` runs such a file in ONNX Runtime.
"""
from __future__ import annotations

import contextlib
import importlib
import io
import logging
import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from .data.transforms import MEAN, STD
from .isr import ISRSpec, isr as isr_context
from .meta import OUTPUT_STRIDE, decode_onnx_metadata, encode_onnx_metadata, model_class_info
from .models import EDAFormer
from .protocol import TestProtocol
from .utils import unwrap_model

__all__ = ["export_onnx", "min_input_side", "output_stride", "onnx_metadata", "verify_onnx", "require_onnx",
           "OnnxExtrasMissing", "DEFAULT_OPSET"]

DEFAULT_OPSET = 18
ONNX_EXTRAS = 'pip install "edaformer[onnx]"'
log = logging.getLogger(__name__)


class OnnxExtrasMissing(ImportError):
    """A package of the ``onnx`` extras (onnx, onnxscript, onnxruntime) is not installed."""


def require_onnx(*modules: str) -> None:
    """Import ``modules`` (default: what export needs) or raise :class:`OnnxExtrasMissing` with the install hint."""
    for name in modules or ("onnx", "onnxscript"):
        try:
            importlib.import_module(name)
        except ImportError as e:
            raise OnnxExtrasMissing(f"ONNX export needs the onnx extras ({name} is not installed): "
                                    f"{ONNX_EXTRAS}") from e


def min_input_side(model: nn.Module, axis: int = 0) -> int:
    """Smallest input height (``axis=0``) or width (``axis=1``) the active ISR setting accepts."""
    return model.min_input_size()[axis]


def output_stride(model: nn.Module) -> int:
    """Input size / size of the logits an export writes: the reduction of the encoder stage the
    decoder's output lies on (its first input, stage 2: 8)."""
    return int(model.encoder.feature_info[1]["reduction"])


class _DecoderLogits(nn.Module):
    """What an export computes: ``model.decode``, the logits before the final resize."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.decode(x)


@contextlib.contextmanager
def _eval_mode(model: nn.Module):
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def _resize_rule(protocol: TestProtocol) -> str:
    """A :class:`~edaformer.protocol.TestProtocol`'s test-time resize rule in words."""
    if protocol.scale is None:
        rule = "keep the image size"
    else:
        long, short = protocol.scale
        rule = (f"resize keeping the aspect ratio to fit a ({long}, {short}) (long, short) box (bilinear, no "
                "antialiasing)")
    if protocol.size_divisor:
        rule += f", then resize it so that both sides are rounded up to a multiple of {protocol.size_divisor}"
    if protocol.mode == "slide":
        (ch, cw), (sh, sw) = protocol.crop_size, protocol.stride
        rule += f"; run {ch}x{cw} windows every {sh}x{sw} pixels and average the overlapping logits"
    return rule + ("; resize the logits (output_stride) bilinearly to the input size (in slide mode: to each "
                   "window's size), then to the image size, before argmax")


def onnx_metadata(model: nn.Module, classes: Sequence[str] | None = None,
                  palette: Sequence[Sequence[int]] | None = None, dynamic: bool = False,
                  protocol: TestProtocol | None = None) -> dict[str, str]:
    """The ``metadata_props`` an export writes (:func:`edaformer.meta.encode_onnx_metadata`; read
    back by :func:`edaformer.meta.decode_onnx_metadata`): what the model is and how to feed / read it.

    Keys: ``model``, ``num_classes``, ``classes`` and ``palette`` (JSON), ``isr``, ``input``, ``mean`` and
    ``std`` (JSON, RGB on 0-255 values), ``test_protocol`` (JSON of ``TestProtocol.to_dict()``),
    ``resize``, ``output``, ``output_stride``, ``isr_pool``, ``dynamic``. ``classes`` / ``palette`` that do
    not fit the class count are replaced by the dataset's or generated ones. ``protocol``: the
    :class:`~edaformer.protocol.TestProtocol` to state (default: the model spec's).
    """
    names = model_class_info(model, classes, palette)
    protocol = protocol or TestProtocol.from_model(model)
    return encode_onnx_metadata(model=getattr(model, "name", type(model).__name__), num_classes=model.num_classes,
                                classes=names.classes, palette=names.palette, isr=model.isr, protocol=protocol,
                                mean=MEAN, std=STD, resize=_resize_rule(protocol), dynamic=dynamic,
                                output_stride=output_stride(model), isr_pool=model.isr_pool)


@contextlib.contextmanager
def _quiet(enabled: bool):
    """Hide the exporter's INFO logging, prints and warnings (replayed at debug level on failure)."""
    if not enabled:
        yield
        return
    previous = logging.root.manager.disable
    captured = io.StringIO()
    logging.disable(max(previous, logging.INFO))
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(captured), contextlib.redirect_stderr(captured):
            warnings.simplefilter("ignore")
            yield
    except BaseException:
        logging.disable(previous)
        log.debug("exporter output:\n%s", captured.getvalue())
        raise
    finally:
        logging.disable(previous)


def export_onnx(model: nn.Module, path: str | os.PathLike, size: Sequence[int] = (512, 512),
                isr: ISRSpec | None = None, dynamic: bool = False, opset: int = DEFAULT_OPSET,
                batch: int = 1, verbose: bool = False, classes: Sequence[str] | None = None,
                palette: Sequence[Sequence[int]] | None = None, protocol=None) -> Path:
    """Export ``model`` (an :class:`~edaformer.EDAFormer`) to ONNX at ``path``.

    ``size``: the example input ``(H, W)`` (the fixed input size unless ``dynamic``). ``isr``: the
    ISR setting to bake in (default: the model's active one; the model's own setting is restored
    afterwards). ``dynamic``: batch, height and width become symbolic (``height >= min_h``,
    ``width >= min_w`` for the ISR setting, see the module docstring); else the batch is ``batch``.
    Input ``image`` (float32 ``(B, C, H, W)``), output ``logits`` (``(B, K, ceil(H / s), ceil(W / s))``,
    ``s`` = :func:`output_stride`: ``model.decode``, not resized to the input size). ``classes`` /
    ``palette`` and the test ``protocol`` go to the file's metadata (:func:`onnx_metadata`). The
    exporter's own logging is shown only with ``verbose``.

    Raises ``ValueError`` when ``size`` does not fit the ISR setting (the message names the stage,
    the feature map and the pooling ratio) or when the graph cannot be exported shape-generic, and
    :class:`OnnxExtrasMissing` without the onnx extras.
    """
    if not isinstance(unwrap_model(model), EDAFormer):
        raise ValueError(f"ONNX export takes EDAFormer models, not {type(unwrap_model(model)).__name__}")
    require_onnx()
    path = Path(path)
    h, w = (int(s) for s in size)
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    isr_ctx = isr_context(model, isr) if isr is not None else contextlib.nullcontext()
    with isr_ctx, _eval_mode(model):
        model.check_input_size(h, w)
        param = next(model.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
        in_chans = model.encoder.stages[0].downsample.proj.in_channels
        dynamic_shapes = None
        if dynamic:
            min_h, min_w = min_input_side(model, 0), min_input_side(model, 1)
            if h < min_h or w < min_w:
                raise ValueError(f"dynamic export: the example size {h}x{w} is below the smallest input the "
                                 f"ISR setting {model.isr} accepts ({min_h}x{min_w})")
            batch = max(batch, 2)  # an example batch of 1 would be specialised to a constant
            dynamic_shapes = ({0: torch.export.Dim("batch", min=1), 2: torch.export.Dim("height", min=min_h),
                               3: torch.export.Dim("width", min=min_w)},)
        x = torch.randn(batch, in_chans, h, w, device=device)
        metadata = onnx_metadata(model, classes, palette, dynamic=dynamic, protocol=protocol)
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            with torch.inference_mode(False), torch.no_grad(), _quiet(not verbose):
                program = torch.onnx.export(_DecoderLogits(model), (x,), input_names=["image"],
                                            output_names=["logits"], opset_version=opset, dynamo=True,
                                            dynamic_shapes=dynamic_shapes, verbose=verbose, report=False)
                program.model.metadata_props.update(metadata)
                program.save(str(path), external_data=False)
        except Exception as e:
            if not dynamic:
                raise
            raise ValueError(
                f"dynamic export failed: the graph could not be kept generic in batch/height/width for ISR "
                f"{model.isr} ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); export a fixed "
                f"size instead") from e
        log.debug("exported %s (ISR %s, %s) to %s", metadata["model"], model.isr,
                 "dynamic batch and HxW" if dynamic else f"{batch}x{h}x{w}", path)
    return path


def verify_onnx(model: nn.Module, path: str | os.PathLike, sizes: Sequence[Sequence[int]], *, batch: int = 1,
                isr: ISRSpec | None = None, seed: int = 0) -> list[dict]:
    """Run the ONNX file in onnxruntime (CPU) and compare with ``model`` in float32 for each size:
    with ``model.decode`` for a file with an ``output_stride`` above 1, else with ``model(x)``.

    Returns ``[{"size": (H, W), "max_abs_diff": float}, ...]``. Needs ``onnxruntime``.
    """
    require_onnx("onnxruntime")
    import onnxruntime as ort  # an optional package (the onnx extras)

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    stride = decode_onnx_metadata(session.get_modelmeta().custom_metadata_map)[OUTPUT_STRIDE]
    in_chans = model.encoder.stages[0].downsample.proj.in_channels
    g = torch.Generator().manual_seed(seed)
    results = []
    isr_ctx = isr_context(model, isr) if isr is not None else contextlib.nullcontext()
    with isr_ctx, _eval_mode(model):
        device = next(model.parameters()).device
        for size in sizes:
            x = torch.randn(batch, in_chans, int(size[0]), int(size[1]), generator=g)
            with torch.inference_mode():
                run = model.decode if stride > 1 else model
                expected = run(x.to(device)).float().cpu()
            got = torch.from_numpy(session.run(None, {name: x.numpy()})[0])
            if got.shape != expected.shape:
                raise ValueError(f"ONNX output shape {tuple(got.shape)} != PyTorch {tuple(expected.shape)}")
            results.append(dict(size=(int(size[0]), int(size[1])),
                                max_abs_diff=(got - expected).abs().max().item()))
    return results
