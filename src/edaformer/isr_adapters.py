"""Inference Spatial Reduction for other spatial-reduction transformers (their FLOP count:
:func:`edaformer.flops.count_flops_external`).

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

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .utils import unwrap_model

__all__ = ["SUPPORTED_MODELS", "num_stages", "set_stage_factors", "stage_factors", "find_stages", "attention_factor"]

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


def find_stages(model: nn.Module) -> tuple[_Family, list[list[tuple[str, nn.Module]]]]:
    """The model's family and, per encoder stage, its ``(name, attention)`` layers (what the ISR
    hooks and :func:`edaformer.flops.count_flops_external` attach to).

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


def attention_factor(attn: nn.Module) -> int:
    """The active ISR factor of one attention layer (1: as built)."""
    state = attn.__dict__.get(_STATE)
    return state.factor if state is not None else 1


# -- public ISR entry points --------------------------------------------------------------
def num_stages(model: nn.Module) -> int:
    """Number of encoder stages (one ISR factor each); ``TypeError`` for an unsupported model."""
    return len(find_stages(model)[1])


def stage_factors(model: nn.Module) -> tuple[int, ...]:
    """The active ISR factor of every encoder stage (1 = the model as built)."""
    return tuple(attention_factor(layers[0][1]) if layers else 1 for layers in find_stages(model)[1])


def set_stage_factors(model: nn.Module, factors: Sequence[int]) -> None:
    """Set one ISR factor per encoder stage; factor 1 restores the stage's original attention exactly."""
    family, stages = find_stages(model)
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
