"""Parameter and FLOP counts in the convention of the published EDAFormer figures.

:func:`count_flops` runs one forward pass of a weightless (``meta`` device) copy
of the model with forward hooks on its modules, so the count follows the
model's real structure and the real pooled token grids of the active ISR
setting. No data is computed, so EDAFormer-B at 1024x2048 costs about as much
as at 64x64 (a fraction of a second).

The counting rules are those of the mmcv 1.x hook counter
(``get_model_complexity_info``), one multiply-add = one FLOP:

* ``Conv2d``: ``k_h * k_w * C_in / groups * C_out`` per output position, plus
  ``C_out`` per output position for the bias.
* ``Linear``: input numel x ``out_features`` (bias not counted).
* ``ReLU``: output numel.
* average pooling: input numel. EFA pools with ``F.avg_pool2d`` (and skips it
  for ratio 1); it is counted as the reference's ``AvgPool2d`` module, which
  also runs for ratio 1. The ISR pooling variants (:mod:`.models.reduction`):
  ``max`` is counted as ``MaxPool2d``, input numel (the mmcv pooling rule, so it equals
  ``avg``); ``overlap`` as ``AvgPool2d (overlapping)``, output numel x kernel area
  (each window reads kernel-area inputs, about 4x the input numel for the 2r kernel).
* the token-merging step of ``pool="merge"``: :func:`~.models.reduction.merge_flops`
  per image (squared norms, the cosine-similarity matrix, the merge additions), reported
  as ``merge_flops`` and included in the totals; its attention term uses the merged
  key/value count.
* ``LayerNorm`` (``mmcv130`` only): numel, x2 with an elementwise affine.
* GELU, softmax, matmul / SDPA, dropout and functional resizes: zero.
* ``BatchNorm2d``: not counted. The reference configurations build the decoder's
  fuse norm as ``SyncBatchNorm``, a type the mmcv counter skips; its would-be
  count is reported under ``FlopReport.uncounted``.

Each EFA (and the ``attention`` decoder op, which adds q/k/v ``Linear`` layers counted by
the Linear rule) adds an analytic attention term; the ``dwconv`` / ``conv`` decoder ops are
plain convolutions. The report's ``flops`` / ``gflops`` follow
the reference FLOP tool (``tools/get_flops.py`` of the reference code, as described in
``fixtures/official/README.md``): ``2 * (h * w) * (h / r * w / r) * C`` with TRUE
division, where ``h, w`` are the input height and width integer-divided by the
layer's stride (``H // 4``, ``H // 8``, ``H // 16``, ``H // 32`` for encoder stages 1-4;
``H // 8``, ``H // 16``, ``H // 32`` for decoder levels c2, c3, c4; not the conv output
grid) and ``r`` the active pooling ratio. ``flops_exact`` / ``gflops_exact`` use
``2 * N_query * N_keyvalue * C`` with the grids the model really runs (conv output
grid, floored pooled grid; after merging, the merged token count). Under ``merge`` the
reference term is that of the training ratio halved. The two agree whenever every window divides its map
(all reference rows); elsewhere the reference rule is fractional.

Conventions: ``"mmcv130"`` (LayerNorm counted; the paper's figures) and
``"mmcv127"`` (LayerNorm not counted; what the reference FLOP tool prints).

The same rules count the models :mod:`edaformer.isr_adapters` runs ISR on (transformers SegFormer,
timm PVTv2): :func:`count_flops_external`, which matches module types with ``isinstance`` and also
counts ``BatchNorm2d``, LayerNorm and average pooling, and adds ``2 * N_q * N_kv * C`` per
attention call with the real (pooled) key/value token count. :func:`count_flops` of a
:class:`~edaformer.models.hf_segformer.SegFormer` reports that count under the conventions above.
:func:`gflops` is the one GFLOPs number of a model at a size.
"""
from __future__ import annotations

import copy
import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from fractions import Fraction

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from .isr_adapters import attention_factor, find_stages, stage_factors
from .models import reduction
from .models.decoder import AllAttentionDecoder
from .models.efa import EFA
from .models.eft import EFTStage
from .models.hf_segformer import SegFormer
from .models.keymap import CONV_SEG_CHANNELS
from .models.segmentor import EDAFormer
from .utils import to_pair, unwrap_model

__all__ = ["CONVENTIONS", "AttentionTerm", "FlopReport", "count_flops", "gflops", "conv_seg_params",
           "reference_attention_flops", "AttentionCall", "ExternalFlopReport", "count_flops_external"]

CONVENTIONS = ("mmcv130", "mmcv127")

_Rule = Callable[[nn.Module, tuple, torch.Tensor], int]


# -- per-module rules -------------------------------------------------------------------
def _conv_flops(m: nn.Conv2d, inputs: tuple, output: torch.Tensor) -> int:
    positions = output.shape[0] * math.prod(output.shape[2:])
    per_position = math.prod(m.kernel_size) * m.in_channels * (m.out_channels // m.groups)
    bias = m.out_channels if m.bias is not None else 0
    return (per_position + bias) * positions


def _linear_flops(m: nn.Linear, inputs: tuple, output: torch.Tensor) -> int:
    return inputs[0].numel() * output.shape[-1]


def _output_numel(m: nn.Module, inputs: tuple, output: torch.Tensor) -> int:
    return output.numel()


def _input_numel(m: nn.Module, inputs: tuple, output: torch.Tensor) -> int:
    return inputs[0].numel()


def _norm_flops(m: nn.Module, inputs: tuple, output: torch.Tensor) -> int:
    affine = getattr(m, "affine", False) or getattr(m, "elementwise_affine", False)
    return inputs[0].numel() * (2 if affine else 1)


# EDAFormer: rules by exact module type, as the mmcv counter matches them.
_RULES: dict[type, _Rule] = {
    nn.Conv2d: _conv_flops, nn.Linear: _linear_flops, nn.ReLU: _output_numel,
    nn.LayerNorm: _norm_flops, nn.BatchNorm2d: _norm_flops,
}
# Module types each convention adds to the total; the others are measured and reported as uncounted.
_COUNTED: dict[str, frozenset[str]] = {
    "mmcv127": frozenset({"Conv2d", "Linear", "ReLU"}),
    "mmcv130": frozenset({"Conv2d", "Linear", "ReLU", "LayerNorm"}),
}
# Models of other families (count_flops_external): (name, module types, rule), matched with
# isinstance in this order; other modules count zero.
_EXTERNAL_RULES: tuple[tuple[str, tuple[type, ...], _Rule], ...] = (
    ("Conv2d", (nn.Conv2d,), _conv_flops),
    ("Linear", (nn.Linear,), _linear_flops),
    ("LayerNorm", (nn.LayerNorm,), _norm_flops),
    ("BatchNorm2d", (nn.BatchNorm2d,), _norm_flops),
    ("ReLU", (nn.ReLU,), _output_numel),
    ("AvgPool2d", (nn.AvgPool2d, nn.AdaptiveAvgPool2d), _input_numel),
)
ISR_POOLING = "ISR pooling"  # the external models' ISR pooling in ExternalFlopReport.by_type


def _exact_rule(m: nn.Module) -> tuple[str, _Rule] | None:
    rule = _RULES.get(type(m))
    return (type(m).__name__, rule) if rule is not None else None


def _external_rule(m: nn.Module) -> tuple[str, _Rule] | None:
    for name, types, rule in _EXTERNAL_RULES:
        if isinstance(m, types):
            return name, rule
    return None


# -- report -----------------------------------------------------------------------------
@dataclass(frozen=True)
class AttentionTerm:
    """One EFA call: query grid, pooled key/value grid, channels, stride and its two counts.

    ``pool``: the reduction this layer ran (``avg``, ``max``, ``overlap`` or ``merge``; a layer
    at ISR factor 1 runs ``avg``); ``kv_tokens``: key/value tokens attended to (the pooled
    grid, or fewer after merging); ``merge_flops``: the merging step's own cost.

    ``flops``: the reference rule ``2 * (h*w) * (h/r * w/r) * C`` with ``h, w = H // stride,
    W // stride`` (the exact count where the layer's stride is unknown); ``flops_exact``:
    ``2 * Nq * Nkv * C`` with the real query and floored key/value grids.
    """

    layer: str
    group: str
    query_hw: tuple[int, int]
    kv_hw: tuple[int, int]
    channels: int
    pool_ratio: int
    stride: int | None
    flops: float
    flops_exact: int
    pool: str = "avg"
    kv_tokens: int = 0
    merge_flops: int = 0


@dataclass
class FlopReport:
    """What :func:`count_flops` measured. ``flops`` = ``module_flops + attention_flops +
    merge_flops`` (reference rule); ``flops_exact`` = ``module_flops + attention_flops_exact +
    merge_flops`` (real floored grids). ``merge_flops``: token merging (``pool="merge"``).

    ``by_type`` splits ``module_flops``; ``uncounted`` holds what the same rules give for
    module types the convention leaves out (``LayerNorm`` under ``mmcv127``, ``BatchNorm2d``).
    ``flops_by_convention`` gives the reference-rule total under every convention (one pass
    measures all).
    """

    model: str | None
    input_size: tuple[int, int]
    convention: str
    params: int
    params_excluding_conv_seg: int
    module_flops: int
    attention_flops: float
    attention_flops_exact: int
    by_type: dict[str, int]
    uncounted: dict[str, int] = field(default_factory=dict)
    flops_by_convention: dict[str, int] = field(default_factory=dict)
    attention: list[AttentionTerm] = field(default_factory=list)
    isr: str | None = None
    pool_ratios: dict[str, int] | None = None
    merge_flops: int = 0
    isr_pool: str | None = None

    @property
    def flops(self) -> float:
        """Total under the reference FLOP tool's attention rule (the published convention)."""
        return self.module_flops + self.attention_flops + self.merge_flops

    @property
    def gflops(self) -> float:
        return self.flops / 1e9

    @property
    def flops_exact(self) -> int:
        """Total with the attention counted on the real (floored) grids."""
        return self.module_flops + self.attention_flops_exact + self.merge_flops

    @property
    def gflops_exact(self) -> float:
        return self.flops_exact / 1e9

    def attention_by_group(self) -> dict[str, float]:
        """Attention FLOPs (reference rule) summed per EFA group (encoder stage / decoder level)."""
        out: dict[str, float] = {}
        for term in self.attention:
            out[term.group] = out.get(term.group, 0) + term.flops
        return out

    def to_dict(self) -> dict:
        """JSON-ready summary; ``attention`` holds the per-layer terms."""
        d = asdict(self)
        d.update(input_size=list(self.input_size), flops=self.flops, gflops=self.gflops,
                 flops_exact=self.flops_exact, gflops_exact=self.gflops_exact,
                 attention_by_group=self.attention_by_group())
        d["attention"] = [dict(asdict(t), query_hw=list(t.query_hw), kv_hw=list(t.kv_hw)) for t in self.attention]
        return d

    def format_table(self) -> str:
        """A readable multi-line summary."""
        h, w = self.input_size
        title = f"{self.model or 'model'}  input {h}x{w}"
        if self.isr is not None:
            title += f"  ISR {self.isr}"
            if self.isr_pool not in (None, "avg"):
                title += f" ({self.isr_pool})"
        lines = [title + f"  convention {self.convention}"]
        if self.pool_ratios:
            lines.append("pool ratios: " + ", ".join(f"{k} {v}" for k, v in self.pool_ratios.items()))
        lines += [
            f"{'params (with conv_seg)':28s}{self.params:>16,d}  ({self.params / 1e6:.2f} M)",
            f"{'params (excluding conv_seg)':28s}{self.params_excluding_conv_seg:>16,d}"
            f"  ({self.params_excluding_conv_seg / 1e6:.2f} M)",
            f"{'GFLOPs':28s}{self.gflops:>16.2f}",
            f"{'GFLOPs (exact grids)':28s}{self.gflops_exact:>16.2f}",
            "",
            f"{'breakdown':28s}{'GFLOPs':>16s}{'share':>9s}",
        ]
        rows = [*self.by_type.items(), ("attention (2*hw*hw/r^2*C)", self.attention_flops)]
        if self.merge_flops:
            rows.append(("token merging", self.merge_flops))
        for name, value in rows:
            share = value / self.flops if self.flops else 0.0
            lines.append(f"  {name:26s}{value / 1e9:>16.4f}{share:>9.1%}")
        for name, value in self.uncounted.items():
            lines.append(f"  {name + ' (not counted)':26s}{value / 1e9:>16.4f}")
        groups = self.attention_by_group()
        if groups:
            lines += ["", f"{'attention per group':28s}{'GFLOPs':>16s}"]
            lines += [f"  {g:26s}{v / 1e9:>16.4f}" for g, v in groups.items()]
        return "\n".join(lines)


@dataclass(frozen=True)
class AttentionCall:
    """One attention call of an external model: query and (pooled) key/value token counts,
    channels, ``2 * Nq * Nkv * C``, and the query and key/value grids."""

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
    """What :func:`count_flops_external` measured (one multiply-add = one FLOP);
    ``flops = module_flops + attention_flops``."""

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


# -- shape-only execution ---------------------------------------------------------------
class _MetaKernelCache(TorchDispatchMode):
    """Reuse the output metadata of pure (non-aliasing, non-mutating) ops on ``meta`` tensors.

    Many meta kernels are Python reference implementations; repeated blocks and
    repeated counts meet the same shapes, so the cache makes a count several times cheaper.
    """

    _cache: dict[tuple, tuple] = {}
    _max_entries = 20000

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not _is_pure(func):
            return func(*args, **kwargs)
        key = (func, _meta_key(args), _meta_key(kwargs))
        try:
            spec = self._cache.get(key)
        except TypeError:  # an unhashable argument: run uncached
            return func(*args, **kwargs)
        if spec is not None:
            return _from_spec(spec)
        out = func(*args, **kwargs)
        spec = _to_spec(out)
        if spec is not None:
            if len(self._cache) >= self._max_entries:
                self._cache.clear()
            self._cache[key] = spec
        return out


_PURE: dict[object, bool] = {}


def _is_pure(func) -> bool:
    """No argument is written and no output aliases an input."""
    pure = _PURE.get(func)
    if pure is None:
        schema = func._schema
        pure = _PURE[func] = not schema.is_mutable and all(r.alias_info is None for r in schema.returns)
    return pure


def _meta_key(obj):
    """Hashable metadata of an op argument: tensor geometry, or the value itself (with its type)."""
    cls = type(obj)
    if cls is torch.Tensor or isinstance(obj, torch.Tensor):
        return obj.shape, obj.stride(), obj.dtype, obj.device
    if cls is list or cls is tuple:
        if all(type(o) is int for o in obj):  # sizes, strides, dims: the common case
            return cls, int, tuple(obj)
        return cls, tuple([_meta_key(o) for o in obj])
    if cls is dict:
        return cls, tuple([(k, _meta_key(v)) for k, v in obj.items()])
    return cls, obj


def _to_spec(out) -> tuple | None:
    """Output metadata, or ``None`` when an output is not a meta tensor (then nothing is cached)."""
    if isinstance(out, torch.Tensor):
        return ("tensor", tuple(out.shape), out.stride(), out.dtype) if out.device.type == "meta" else None
    if isinstance(out, tuple) and out:
        specs = tuple(_to_spec(o) for o in out)
        return None if any(s is None for s in specs) else ("tuple", specs)
    return None


def _from_spec(spec: tuple):
    if spec[0] == "tuple":
        return tuple(_from_spec(s) for s in spec[1])
    _, shape, stride, dtype = spec
    return torch.empty_strided(shape, stride, dtype=dtype, device="meta")


# -- counting ---------------------------------------------------------------------------
def conv_seg_params(model: nn.Module) -> int:
    """Parameters of the reference decoder's unused ``conv_seg``: ``Conv2d(128, num_classes, 1)``.

    Its input width is the reference decode head's ``channels=128`` for every model
    size (not the fuse width), so it holds ``129 * num_classes`` parameters.
    """
    if not isinstance(model, EDAFormer):
        return 0
    return (CONV_SEG_CHANNELS + 1) * model.decoder.num_classes


def _meta_copy(model: nn.Module) -> nn.Module:
    """Deep copy whose parameters and buffers live on ``meta`` (no data is copied); hooks and the
    ISR state of :mod:`edaformer.isr_adapters` carry over."""
    memo: dict[int, object] = {}
    for p in model.parameters():
        memo[id(p)] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
    for b in model.buffers():
        memo[id(b)] = torch.empty_like(b, device="meta")
    return copy.deepcopy(model, memo)


def _in_channels(model: nn.Module) -> int:
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            return m.in_channels
    raise ValueError(f"cannot infer the input channels of {type(model).__name__}: it has no Conv2d")


def _check_size(input_size: Sequence[int]) -> tuple[int, int]:
    try:
        h, w = (int(s) for s in input_size)
    except (TypeError, ValueError):
        raise ValueError(f"input_size must be (height, width), got {input_size!r}") from None
    if h < 1 or w < 1:
        raise ValueError(f"input_size must be positive, got {h}x{w}")
    return h, w


def _attention_strides(modules: Sequence[tuple[str, nn.Module]]) -> dict[int, int]:
    """``id(EFA) -> stride`` (input pixels per token) for the EFAs of encoder stages and decoder levels."""
    strides: dict[int, int] = {}
    for _, m in modules:
        if isinstance(m, EFTStage):
            strides.update((id(blk.attn), m.reduction) for blk in m.blocks)
        elif isinstance(m, AllAttentionDecoder):
            for blocks, stride in zip(m.levels(), m.level_reductions):
                strides.update((id(blk.attn), stride) for blk in blocks)
    return strides


def reference_attention_flops(height: int, width: int, stride: int, pool_ratio: int, channels: int) -> Fraction:
    """The reference FLOP tool's term ``2 * (h*w) * (h/r * w/r) * C``, ``h, w = H // s, W // s``, exactly."""
    h, w = height // stride, width // stride
    return Fraction(2 * h * w * h * w * channels, pool_ratio * pool_ratio)


class _Counter:
    """Forward hooks summing module FLOPs by rule name (``rule_of(module) -> (name, rule) | None``);
    subclasses add the attention terms of their model family."""

    def __init__(self, rule_of: Callable[[nn.Module], tuple[str, _Rule] | None]) -> None:
        self.rule_of = rule_of
        self.measured: dict[str, int] = {}

    def add(self, name: str, flops: int) -> None:
        self.measured[name] = self.measured.get(name, 0) + flops

    def module_hooks(self, modules: Sequence[tuple[str, nn.Module]]) -> list:
        handles = []
        for _, m in modules:
            found = self.rule_of(m)
            if found is not None:
                name, rule = found
                handles.append(m.register_forward_hook(
                    lambda mod, inputs, output, name=name, rule=rule: self.add(name, rule(mod, inputs, output))))
        return handles

    def attach(self, modules: Sequence[tuple[str, nn.Module]]) -> list:
        """Hooks on ``modules`` (``named_modules()`` of the model, the root first); their handles."""
        return self.module_hooks(modules)


class _EFACounter(_Counter):
    """EDAFormer: module FLOPs by exact type, EFA pooling and merging, and one attention term per EFA call."""

    def __init__(self, height: int, width: int) -> None:
        super().__init__(_exact_rule)
        self.input_hw = (height, width)
        self.pool_flops: dict[str, int] = {}
        self.merge_flops = 0
        self.attention: list[AttentionTerm] = []
        self.attention_reference = Fraction(0)
        self.strides: dict[int, int] = {}

    def efa_hook(self, layer: str) -> Callable:
        def hook(m: EFA, args: tuple, kwargs: dict, output: torch.Tensor) -> None:
            bound = {**dict(zip(("x", "h", "w"), args)), **kwargs}
            x, qh, qw = bound["x"], bound["h"], bound["w"]
            step = m.kv_reduction(qh, qw)
            kh, kw = step.pooled_hw
            b, n, c = x.shape
            if step.op == "overlap":
                kind, pool = "AvgPool2d (overlapping)", b * c * kh * kw * step.kernel ** 2
            else:
                kind, pool = ("MaxPool2d" if step.op == "max" else "AvgPool2d"), x.numel()
            self.pool_flops[kind] = self.pool_flops.get(kind, 0) + pool
            merging = b * reduction.merge_flops(kh * kw, c) if step.merged else 0
            self.merge_flops += merging
            exact = 2 * b * n * step.tokens * c
            stride = self.strides.get(id(m))
            reference = exact if stride is None else b * reference_attention_flops(*self.input_hw, stride,
                                                                                   m.pool_ratio, c)
            if step.merged and stride is not None:
                reference /= 2
            self.attention_reference += reference
            self.attention.append(AttentionTerm(layer, m.name, (qh, qw), (kh, kw), c, m.pool_ratio, stride,
                                                float(reference), exact, "merge" if step.merged else step.op,
                                                step.tokens, merging))
        return hook

    def attach(self, modules: Sequence[tuple[str, nn.Module]]) -> list:
        self.strides = _attention_strides(modules)
        efas = [(name, m) for name, m in modules if isinstance(m, EFA)]
        handles = [m.register_forward_hook(self.efa_hook(name), with_kwargs=True) for name, m in efas]
        return handles + self.module_hooks([(name, m) for name, m in modules if not isinstance(m, EFA)])

    def totals(self) -> dict[str, float]:
        """Total FLOPs (reference attention rule) under every convention."""
        return {c: float(sum(v for t, v in self.measured.items() if t in types) + sum(self.pool_flops.values())
                         + self.attention_reference + self.merge_flops) for c, types in _COUNTED.items()}


class _AttentionCallCounter(_Counter):
    """SegFormer / PVTv2 (:mod:`edaformer.isr_adapters` families): module FLOPs by ``isinstance``
    rule, the ISR pooling, and one :class:`AttentionCall` per attention call."""

    def __init__(self) -> None:
        super().__init__(_external_rule)
        self.attention: list[AttentionCall] = []
        self._open: dict[int, dict] = {}

    def attach(self, modules: Sequence[tuple[str, nn.Module]]) -> list:
        handles = self.module_hooks(modules)
        family, stages = find_stages(modules[0][1])
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
        factor = attention_factor(attn)
        if factor > 1:  # pooling input: the reduced grid, or the tokens themselves
            self.add(ISR_POOLING, b * math.prod(raw_hw) * channels)
        self.attention.append(AttentionCall(layer, stage, n_query, shapes["kv"], channels,
                                            2 * b * n_query * shapes["kv"] * channels, shapes["query_hw"],
                                            (raw_hw[0] // factor, raw_hw[1] // factor)))


def _run_counted(model: nn.Module, counter: _Counter, height: int, width: int) -> None:
    """One eval-mode forward on ``meta`` with ``counter`` attached; ``model`` keeps its state.

    A model that already lives on ``meta`` runs as it is (its train / eval flags restored after);
    otherwise a meta copy runs.
    """
    on_meta = all(t.is_meta for t in itertools.chain(model.parameters(), model.buffers()))
    modules = list((model if on_meta else _meta_copy(model)).named_modules())
    in_training = [m for _, m in modules if m.training]
    handles = counter.attach(modules)
    try:
        for m in in_training:
            m.training = False
        root = modules[0][1]
        with torch.no_grad(), _MetaKernelCache():
            root(torch.empty(1, _in_channels(root), height, width, device="meta"))
    finally:
        for handle in handles:
            handle.remove()
        for m in in_training:
            m.training = True


def count_flops(model: nn.Module, input_size: Sequence[int] = (512, 512),
                convention: str = "mmcv130") -> FlopReport:
    """Count parameters and FLOPs of ``model`` on a ``(1, C, H, W)`` input.

    The forward pass runs in eval mode on a ``meta`` copy, so ``model`` is left
    untouched; a model that already lives on ``meta`` is run as it is (cheapest),
    its train/eval flags restored after. ``params`` follows the reference
    convention (it includes the unused ``conv_seg`` of EDAFormer's decoder);
    ``params_excluding_conv_seg`` is the model's own parameter count. Raises
    ``ValueError`` for an unknown convention or an input too small for the active
    ISR setting. A :class:`~edaformer.models.hf_segformer.SegFormer` is counted by
    :func:`count_flops_external` and reported under the same conventions.
    """
    if convention not in _COUNTED:
        raise ValueError(f"unknown FLOP convention {convention!r}; choose one of {', '.join(CONVENTIONS)}")
    h, w = _check_size(input_size)
    model = unwrap_model(model)
    if isinstance(model, SegFormer):
        return _segformer_report(model, h, w, convention)
    is_edaformer = isinstance(model, EDAFormer)
    if is_edaformer:
        model.check_input_size(h, w)
    counter = _EFACounter(h, w)
    _run_counted(model, counter, h, w)

    counted = _COUNTED[convention]
    by_type = {t: v for t, v in counter.measured.items() if t in counted}
    by_type.update(counter.pool_flops)
    uncounted = {t: v for t, v in counter.measured.items() if t not in counted}
    n_params = sum(p.numel() for p in model.parameters())
    return FlopReport(
        model=getattr(model, "name", None) or type(model).__name__,
        input_size=(h, w), convention=convention,
        params=n_params + conv_seg_params(model), params_excluding_conv_seg=n_params,
        module_flops=sum(by_type.values()), attention_flops=float(counter.attention_reference),
        attention_flops_exact=sum(t.flops_exact for t in counter.attention),
        by_type=dict(sorted(by_type.items())), uncounted=dict(sorted(uncounted.items())),
        flops_by_convention=counter.totals(), attention=counter.attention,
        isr=str(model.isr) if is_edaformer else None,
        pool_ratios=model.pool_ratios() if is_edaformer else None,
        merge_flops=counter.merge_flops, isr_pool=model.isr_pool if is_edaformer else None)


def gflops(model: nn.Module, input_size: Sequence[int] = (512, 512), convention: str = "mmcv130") -> float:
    """GFLOPs of ``model`` at ``input_size`` in the published convention: :func:`count_flops`'s ``gflops``."""
    return float(count_flops(model, tuple(input_size), convention).gflops)


# -- other model families ------------------------------------------------------------------------
def count_flops_external(model: nn.Module, input_size: Sequence[int] = (512, 512)) -> ExternalFlopReport:
    """FLOPs of a SegFormer / PVTv2 model (:mod:`edaformer.isr_adapters`) on a ``(1, C, H, W)``
    input under its active ISR factors.

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
    counter = _AttentionCallCounter()
    _run_counted(target, counter, h, w)
    return ExternalFlopReport(type(target).__name__, (h, w), factors, sum(p.numel() for p in target.parameters()),
                              dict(sorted(counter.measured.items())), tuple(counter.attention))


def _segformer_report(model: SegFormer, h: int, w: int, convention: str) -> FlopReport:
    """A :class:`FlopReport` of a SegFormer from :func:`count_flops_external` under the conventions
    of :func:`count_flops`: BatchNorm2d not counted (the reference configurations use SyncBN),
    LayerNorm counted under ``mmcv130`` only; attention ``2 * N_q * N_kv * C`` on the real pooled
    grids (both totals)."""
    model.check_input_size(h, w)
    ext = count_flops_external(model, (h, w))
    not_counted = {"BatchNorm2d"} | ({"LayerNorm"} if convention == "mmcv127" else set())
    by_type = {k: v for k, v in ext.by_type.items() if k not in not_counted}
    uncounted = {k: v for k, v in ext.by_type.items() if k in not_counted}
    layer_norm = ext.by_type.get("LayerNorm", 0)
    counted_130 = sum(v for k, v in ext.by_type.items() if k != "BatchNorm2d") + ext.attention_flops
    ratios = list(model.pool_ratios().values())
    terms = [AttentionTerm(c.layer, f"encoder.stage{c.stage}", c.query_hw, c.kv_hw, c.channels,
                           ratios[c.stage - 1], None, float(c.flops), c.flops, "avg", c.n_kv)
             for c in ext.attention]
    params = ext.params
    return FlopReport(model=getattr(model, "name", None) or type(model).__name__, input_size=(h, w),
                      convention=convention, params=params, params_excluding_conv_seg=params,
                      module_flops=sum(by_type.values()), attention_flops=float(ext.attention_flops),
                      attention_flops_exact=ext.attention_flops, by_type=by_type, uncounted=uncounted,
                      flops_by_convention={"mmcv130": counted_130, "mmcv127": counted_130 - layer_norm},
                      attention=terms, isr=str(model.isr), pool_ratios=model.pool_ratios(), isr_pool="avg")
