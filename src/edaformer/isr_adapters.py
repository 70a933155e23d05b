"""Inference Spatial Reduction for other spatial-reduction transformers, and their FLOP count.

Supported families, recognised by class name and defining module (neither package is imported):

* transformers SegFormer: ``SegformerModel``, ``SegformerForSemanticSegmentation`` or any model
  holding ``SegformerStage`` modules, in the layout of transformers >= 5.9 (``SegformerAttention``
  with ``k_proj`` / ``v_proj``);
* timm PVTv2: ``pvt_v2_b0`` ... ``pvt_v2_b5``, ``pvt_v2_b2_li`` or any model holding
  ``PyramidVisionTransformerStage`` modules.

An ISR factor ``f`` for an encoder stage average-pools (kernel = stride = ``f``, floor) the
key/value tokens of every attention layer of that stage after the model's own spatial reduction
and right before the key/value projection(s): SegFormer after its sequence-reduction conv and
LayerNorm, PVTv2 after ``sr`` and ``norm`` (the linear variant: after its 7x7 adaptive pooling,
``sr``, ``norm`` and ``act``), a stage without reduction on the tokens themselves.

Each attention layer with a factor above 1 gets hooks, removed again when its factor returns to
1: the attention module records the query grid, the reduction conv the reduced grid, and the
pooling runs on the input of PVTv2's ``kv`` projection, on the output of SegFormer's sequence
reduction, or, for a SegFormer stage built without reduction, in a parameter-free module put in
its place (SegFormer sizes its key/value views before projecting, so it must see the pooled
tokens). Weights and ``state_dict()`` never change; factor 1 restores the exact original modules.
The factor and the hook handles live on the attention module as one plain attribute.
"""
from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .utils import to_pair, unwrap_model

__all__ = ["SUPPORTED_MODELS", "AttentionCall", "ExternalFlopReport", "count_flops_external",
           "num_stages", "set_stage_factors", "stage_factors"]

SUPPORTED_MODELS = ("EDAFormer, transformers SegFormer (SegformerModel, SegformerForSemanticSegmentation) "
                    "and timm PVTv2 (pvt_v2_b0 ... pvt_v2_b5, pvt_v2_b2_li)")

_STATE = "_isr_kv_pool"  # attribute holding an attention layer's _KVPool while its factor is > 1


# -- families ---------------------------------------------------------------------------
class _KVPool:
    """An attention layer's ISR factor, the grids of the running call and its hooks.

    ``query_hw`` is recorded when the attention starts, ``kv_hw`` when its reduction conv has run;
    :meth:`pool` pools the key/value tokens of that (reduced) grid.
    """

    def __init__(self, query_grid: Callable, stage: int, factor: int, ratio: int, linear: bool) -> None:
        self.query_grid = query_grid
        self.stage = stage
        self.factor = factor
        self.ratio = ratio
        self.linear = linear
        self.handles: list = []
        self.replaced_ratio: int | None = None  # SegFormer stage without reduction: its own ratio
        self._reset()

    def _reset(self) -> None:
        self.query_hw: tuple[int, int] | None = None
        self.kv_hw: tuple[int, int] | None = None

    # hooks
    def on_attention_start(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self._reset()
        self.query_hw = self.query_grid(args, kwargs)

    def on_attention_end(self, module: nn.Module, args: tuple, output) -> None:
        self._reset()

    def on_reduction(self, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        self.kv_hw = (int(output.shape[-2]), int(output.shape[-1]))

    def on_reduced_tokens(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        return self.pool(output)

    def on_projection_input(self, module: nn.Module, args: tuple) -> tuple | None:
        if self.query_hw is None:  # called outside the attention forward: leave it alone
            return None
        return (self.pool(args[0]), *args[1:])

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        """Average-pool key/value tokens ``(B, h*w, C)`` by the factor (floor)."""
        h, w = self.kv_hw or self.query_hw
        b, n, c = x.shape
        if h * w != n:
            raise RuntimeError(f"encoder stage {self.stage}: expected {h}x{w} = {h * w} key/value tokens, got {n}")
        f = self.factor
        if h < f or w < f:
            if self.linear:
                raise ValueError(f"encoder stage {self.stage}: ISR factor {f} does not fit the {h}x{w} key/value "
                                 f"grid of the linear spatial reduction (adaptive pooling to {h}x{w}); "
                                 "use a smaller ISR factor")
            qh, qw = self.query_hw
            raise ValueError(f"encoder stage {self.stage}: pooling ratio {self.ratio * f} (train {self.ratio} x "
                             f"ISR {f}) does not fit the {qh}x{qw} feature map; use a smaller ISR factor "
                             "or a larger input")
        grid = x.transpose(1, 2).reshape(b, c, h, w)
        return F.avg_pool2d(grid, f, f).flatten(2).transpose(1, 2)


class _TokenPool(nn.Module):
    """Parameter-free key/value reduction for a SegFormer stage built without one (ISR pooling only)."""

    def __init__(self, state: _KVPool) -> None:
        super().__init__()
        self.state = state

    def forward(self, hidden_states: torch.Tensor, height: int, width: int) -> torch.Tensor:
        return self.state.pool(hidden_states)

    def extra_repr(self) -> str:
        return f"isr_factor={self.state.factor}"


def _bind(args: tuple, kwargs: dict, names: Sequence[str]) -> dict:
    bound = dict(zip(names, args))
    bound.update((k, kwargs[k]) for k in names if k in kwargs)
    return bound


def _segformer_query_grid(args: tuple, kwargs: dict) -> tuple[int, int]:
    bound = _bind(args, kwargs, ("hidden_states", "height", "width"))
    return int(bound["height"]), int(bound["width"])


def _segformer_reduction(attn: nn.Module) -> tuple[nn.Module | None, int, bool]:
    ratio = int(attn.sequence_reduction_ratio)
    if ratio == 1 or isinstance(attn.sequence_reduction, _TokenPool):
        return None, 1, False
    return attn.sequence_reduction.sequence_reduction, ratio, False


def _segformer_pool_site(attn: nn.Module, state: _KVPool) -> None:
    # The forward sizes its key/value views from the reduced tokens, so the pooling must come
    # before the projections: on the output of the sequence reduction, or in its place.
    if state.ratio > 1:
        state.handles.append(attn.sequence_reduction.register_forward_hook(state.on_reduced_tokens))
    else:
        state.replaced_ratio = attn.sequence_reduction_ratio
        attn.sequence_reduction = _TokenPool(state)
        attn.sequence_reduction_ratio = state.factor


def _pvt_query_grid(args: tuple, kwargs: dict) -> tuple[int, int]:
    h, w = _bind(args, kwargs, ("x", "feat_size"))["feat_size"]
    return int(h), int(w)


def _pvt_reduction(attn: nn.Module) -> tuple[nn.Module | None, int, bool]:
    linear = attn.pool is not None
    if attn.sr is None:
        return None, 1, linear
    return attn.sr, (1 if linear else int(attn.sr.stride[0])), linear


def _pvt_pool_site(attn: nn.Module, state: _KVPool) -> None:
    state.handles.append(attn.kv.register_forward_pre_hook(state.on_projection_input))


@dataclass(frozen=True)
class _Family:
    """Where a model family keeps its stages, attention layers, reductions and key/value projections."""

    name: str
    module: str  # module defining the classes below
    stage_class: str
    attention_class: str
    kv_projections: tuple[str, ...]
    query_grid: Callable[[tuple, dict], tuple[int, int]]
    reduction: Callable[[nn.Module], tuple[nn.Module | None, int, bool]]  # conv, model ratio, linear
    pool_site: Callable[[nn.Module, _KVPool], None]

    def owns(self, m: nn.Module, class_name: str) -> bool:
        return type(m).__name__ == class_name and type(m).__module__ == self.module


_FAMILIES = (
    _Family("transformers SegFormer", "transformers.models.segformer.modeling_segformer",
            "SegformerStage", "SegformerAttention", ("k_proj", "v_proj"),
            _segformer_query_grid, _segformer_reduction, _segformer_pool_site),
    _Family("timm PVTv2", "timm.models.pvt_v2", "PyramidVisionTransformerStage", "Attention", ("kv",),
            _pvt_query_grid, _pvt_reduction, _pvt_pool_site),
)

_OLD_SEGFORMER = "SegformerEfficientSelfAttention"


def _find_stages(model: nn.Module) -> tuple[_Family, list[list[tuple[str, nn.Module]]]]:
    """The model's family and, per encoder stage, its ``(name, attention)`` layers.

    Raises ``TypeError`` for a model of no supported family.
    """
    model = unwrap_model(model)
    for family in _FAMILIES:
        stages = [[(f"{name}.{sub}" if name else sub, attn) for sub, attn in stage.named_modules()
                   if family.owns(attn, family.attention_class)]
                  for name, stage in model.named_modules() if family.owns(stage, family.stage_class)]
        if stages:
            for layers in stages:
                for name, attn in layers:
                    if not all(isinstance(getattr(attn, p, None), nn.Linear) for p in family.kv_projections):
                        raise TypeError(f"{name} ({family.name}) has no {' / '.join(family.kv_projections)} "
                                        "projection: this version of the library is not supported")
            return family, stages
    if any(type(m).__name__ == _OLD_SEGFORMER for m in model.modules()):
        raise TypeError(f"{type(model).__name__}: SegFormer from transformers < 5.9 ({_OLD_SEGFORMER}) is not "
                        "supported; ISR needs the transformers >= 5.9 layout")
    raise TypeError(f"{type(model).__name__} is not a supported model: ISR works on {SUPPORTED_MODELS} models")


def _install(family: _Family, attn: nn.Module, stage: int, factor: int) -> None:
    conv, ratio, linear = family.reduction(attn)
    state = _KVPool(family.query_grid, stage, factor, ratio, linear)
    state.handles.append(attn.register_forward_pre_hook(state.on_attention_start, with_kwargs=True))
    state.handles.append(attn.register_forward_hook(state.on_attention_end))
    if conv is not None:
        state.handles.append(conv.register_forward_hook(state.on_reduction))
    family.pool_site(attn, state)
    setattr(attn, _STATE, state)


def _uninstall(attn: nn.Module) -> None:
    state = attn.__dict__.pop(_STATE, None)
    if state is None:
        return
    for handle in state.handles:
        handle.remove()
    if state.replaced_ratio is not None:
        del attn.sequence_reduction
        attn.sequence_reduction_ratio = state.replaced_ratio


def _factor(attn: nn.Module) -> int:
    state = attn.__dict__.get(_STATE)
    return state.factor if state is not None else 1


# -- public ISR entry points --------------------------------------------------------------
def num_stages(model: nn.Module) -> int:
    """Number of encoder stages (one ISR factor each); ``TypeError`` for an unsupported model."""
    return len(_find_stages(model)[1])


def stage_factors(model: nn.Module) -> tuple[int, ...]:
    """The active ISR factor of every encoder stage (1 = the model as built)."""
    return tuple(_factor(layers[0][1]) if layers else 1 for layers in _find_stages(model)[1])


def set_stage_factors(model: nn.Module, factors: Sequence[int]) -> None:
    """Set one ISR factor per encoder stage; factor 1 restores the stage's original attention exactly."""
    family, stages = _find_stages(model)
    factors = tuple(factors)
    if len(factors) != len(stages):
        raise ValueError(f"{type(unwrap_model(model)).__name__} has {len(stages)} encoder stages, "
                         f"got {len(factors)} ISR factors")
    if any(isinstance(f, bool) or not isinstance(f, int) or f < 1 for f in factors):
        raise ValueError(f"ISR factors must be positive integers, got {factors}")
    for stage, (layers, factor) in enumerate(zip(stages, factors), start=1):
        for _, attn in layers:
            _uninstall(attn)
            if factor > 1:
                _install(family, attn, stage, factor)


# -- FLOP count ---------------------------------------------------------------------------
@dataclass(frozen=True)
class AttentionCall:
    """One attention call: query and (pooled) key/value token counts, channels, ``2 * Nq * Nkv * C``,
    and the query and key/value grids."""

    layer: str
    stage: int
    n_query: int
    n_kv: int
    channels: int
    flops: int
    query_hw: tuple[int, int] = (0, 0)
    kv_hw: tuple[int, int] = (0, 0)


@dataclass(frozen=True)
class ExternalFlopReport:
    """FLOPs of one forward pass (one multiply-add = one FLOP); ``flops = module_flops + attention_flops``."""

    model: str
    input_size: tuple[int, int]
    isr: tuple[int, ...]
    params: int
    by_type: dict[str, int]
    attention: tuple[AttentionCall, ...]

    @property
    def module_flops(self) -> int:
        return sum(self.by_type.values())

    @property
    def attention_flops(self) -> int:
        return sum(call.flops for call in self.attention)

    @property
    def flops(self) -> int:
        return self.module_flops + self.attention_flops

    @property
    def gflops(self) -> float:
        return self.flops / 1e9

    def attention_by_stage(self) -> dict[int, int]:
        """Attention FLOPs summed per encoder stage (1-based)."""
        out: dict[int, int] = {}
        for call in self.attention:
            out[call.stage] = out.get(call.stage, 0) + call.flops
        return out


def _conv(m: nn.Conv2d, inputs: tuple, output: torch.Tensor) -> int:
    per_position = math.prod(m.kernel_size) * m.in_channels * (m.out_channels // m.groups)
    bias = m.out_channels if m.bias is not None else 0
    return (per_position + bias) * output.shape[0] * math.prod(output.shape[2:])


def _linear(m: nn.Linear, inputs: tuple, output: torch.Tensor) -> int:
    return inputs[0].numel() * m.out_features


def _norm(m: nn.Module, inputs: tuple, output: torch.Tensor) -> int:
    affine = getattr(m, "elementwise_affine", False) or getattr(m, "affine", False)
    return inputs[0].numel() * (2 if affine else 1)


def _output_numel(m: nn.Module, inputs: tuple, output: torch.Tensor) -> int:
    return output.numel()


def _input_numel(m: nn.Module, inputs: tuple, output: torch.Tensor) -> int:
    return inputs[0].numel()


# (name, module types, rule), matched with isinstance in this order; other modules count zero.
_RULES = (
    ("Conv2d", (nn.Conv2d,), _conv),
    ("Linear", (nn.Linear,), _linear),
    ("LayerNorm", (nn.LayerNorm,), _norm),
    ("BatchNorm2d", (nn.BatchNorm2d,), _norm),
    ("ReLU", (nn.ReLU,), _output_numel),
    ("AvgPool2d", (nn.AvgPool2d, nn.AdaptiveAvgPool2d), _input_numel),
)
ISR_POOLING = "ISR pooling"


class _Counter:
    """Forward hooks summing module FLOPs by rule and one :class:`AttentionCall` per attention call."""

    def __init__(self) -> None:
        self.by_type: dict[str, int] = {}
        self.attention: list[AttentionCall] = []
        self._open: dict[int, dict] = {}

    def add(self, name: str, flops: int) -> None:
        self.by_type[name] = self.by_type.get(name, 0) + flops

    def attach(self, model: nn.Module, family: _Family, stages: list) -> list:
        handles = []
        for m in model.modules():
            for name, types, rule in _RULES:
                if isinstance(m, types):
                    handles.append(m.register_forward_hook(
                        lambda mod, inputs, output, name=name, rule=rule: self.add(name, rule(mod, inputs, output))))
                    break
        for stage, layers in enumerate(stages, start=1):
            for layer, attn in layers:
                key = id(attn)
                handles.append(attn.register_forward_pre_hook(
                    lambda mod, args, kwargs, key=key: self._open.__setitem__(
                        key, {"x": args[0].shape, "query_hw": family.query_grid(args, kwargs)}), with_kwargs=True))
                conv = family.reduction(attn)[0]
                if conv is not None:
                    handles.append(conv.register_forward_hook(
                        lambda mod, args, out, key=key: self._open[key].__setitem__("raw", tuple(out.shape[-2:]))))
                handles.append(getattr(attn, family.kv_projections[0]).register_forward_hook(
                    lambda mod, args, out, key=key: self._open[key].__setitem__("kv", args[0].shape[1])))
                handles.append(attn.register_forward_hook(
                    lambda mod, args, out, key=key, layer=layer, stage=stage: self._close(key, mod, layer, stage)))
        return handles

    def _close(self, key: int, attn: nn.Module, layer: str, stage: int) -> None:
        shapes = self._open.pop(key)
        b, n_query, channels = shapes["x"]
        raw_hw = shapes.get("raw", shapes["query_hw"])
        factor = _factor(attn)
        if factor > 1:  # pooling input: the reduced grid, or the tokens themselves
            self.add(ISR_POOLING, b * math.prod(raw_hw) * channels)
        self.attention.append(AttentionCall(layer, stage, n_query, shapes["kv"], channels,
                                            2 * b * n_query * shapes["kv"] * channels, shapes["query_hw"],
                                            (raw_hw[0] // factor, raw_hw[1] // factor)))


def _meta_copy(model: nn.Module) -> nn.Module:
    """Deep copy with parameters and buffers on ``meta`` (no data copied); hooks and ISR state carry over."""
    memo: dict[int, object] = {id(p): nn.Parameter(torch.empty_like(p, device="meta"), p.requires_grad)
                               for p in model.parameters()}
    memo.update({id(b): torch.empty_like(b, device="meta") for b in model.buffers()})
    return copy.deepcopy(model, memo)


def count_flops_external(model: nn.Module, input_size: Sequence[int] = (512, 512)) -> ExternalFlopReport:
    """FLOPs of a SegFormer / PVTv2 model on a ``(1, C, H, W)`` input under its active ISR factors.

    Runs one eval-mode forward on a ``meta`` copy (``model`` is untouched) with mmcv-style
    rules: Conv2d ``k_h*k_w*C_in/groups*C_out`` (+ ``C_out`` bias) per output position, Linear
    input numel x ``out_features``, LayerNorm / BatchNorm2d numel (x2 with affine), ReLU output
    numel, average pooling (and the ISR pooling) input numel; GELU, softmax, dropout and
    functional resizes count zero. Each attention call adds ``2 * N_q * N_kv * C`` with the real
    (pooled) key/value token count.
    """
    h, w = to_pair(input_size, "input_size")
    target = unwrap_model(model)
    try:
        factors = stage_factors(target)
    except TypeError:
        if callable(getattr(target, "set_isr", None)) and hasattr(target, "isr"):  # EDAFormer
            raise TypeError(f"{type(target).__name__} counts its own FLOPs: use edaformer.count_flops") from None
        raise
    meta = _meta_copy(target).eval()
    family, stages = _find_stages(meta)
    in_chans = next(m.in_channels for m in meta.modules() if isinstance(m, nn.Conv2d))
    counter = _Counter()
    handles = counter.attach(meta, family, stages)
    try:
        with torch.no_grad():
            meta(torch.empty(1, in_chans, h, w, device="meta"))
    finally:
        for handle in handles:
            handle.remove()
    return ExternalFlopReport(type(target).__name__, (h, w), factors, sum(p.numel() for p in target.parameters()),
                              dict(sorted(counter.by_type.items())), tuple(counter.attention))
