"""Named EDAFormer configurations and :func:`create_model`."""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field

from torch import nn

from .eft import EFT_CONFIGS
from .hf_segformer import SEGFORMER_OPTIONS, SEGFORMER_SIZES, SegFormer
from .segmentor import EDAFormer

__all__ = ["ModelSpec", "MODEL_SPECS", "create_model", "list_models", "get_model_spec"]


@dataclass(frozen=True)
class ModelSpec:
    """What a named model is: architecture size, classes and the reference test protocol."""

    size: str
    dataset: str
    num_classes: int
    decoder_dim: int
    decoder_mlp_ratio: float
    test_scale: tuple[int, int] = (2048, 512)      # (long, short) box the image is resized to fit
    test_mode: str = "whole"                       # "whole" or "slide"
    crop_size: tuple[int, int] = (512, 512)        # training crop; the slide window in slide mode
    slide_stride: tuple[int, int] = (341, 341)
    extra: dict = field(default_factory=dict)
    family: str = "edaformer"                      # "edaformer" or "segformer" (transformers, edaformer[hf])


_DECODER = {"t": dict(decoder_dim=128, decoder_mlp_ratio=2.0), "b": dict(decoder_dim=768, decoder_mlp_ratio=1.0)}
_DATASETS = {
    "ade20k": dict(num_classes=150),
    "cocostuff": dict(num_classes=171),
    "cityscapes": dict(num_classes=19, test_scale=(2048, 1024), test_mode="slide", crop_size=(1024, 1024),
                       slide_stride=(768, 768)),
}

MODEL_SPECS: dict[str, ModelSpec] = {
    f"edaformer-{size}-{dataset}": ModelSpec(size=size, dataset=dataset, **_DECODER[size], **ds)
    for size in ("t", "b") for dataset, ds in _DATASETS.items()
}
# SegFormer-B0 / B1 as published for ADE20K (MiT encoder, all-MLP head 256 wide; no MLP ratio)
MODEL_SPECS.update({f"segformer-{size}": ModelSpec(size=size, dataset="ade20k", num_classes=150, decoder_dim=256,
                                                   decoder_mlp_ratio=0.0, family="segformer")
                    for size in ("b0", "b1")})

# create_model keywords of SegFormer models beyond the SegformerConfig fields
_SEGFORMER_KEYWORDS = ("drop_path_rate", "dropout", "in_chans")


def list_models() -> list[str]:
    """Names accepted by :func:`create_model`."""
    return sorted(MODEL_SPECS)


def get_model_spec(name: str) -> ModelSpec:
    try:
        return MODEL_SPECS[name.lower()]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; available: {', '.join(list_models())}") from None


def create_model(name: str, num_classes: int | None = None, *, isr: str | None = None, isr_pool: str = "avg",
                 **overrides) -> nn.Module:
    """Build a named EDAFormer (random init). ``num_classes`` replaces the dataset's class count;
    ``overrides`` go to :class:`EDAFormer` (e.g. ``drop_path_rate=0.1``), among them the paper's
    ablation options ``decoder_depths=(a, b, c)`` (blocks at c4, c3, c2), ``decoder_op``
    (``efa`` / ``attention`` / ``dwconv`` / ``conv``) and ``train_isr`` (e.g. ``"2211-222"``:
    training pooling ratios raised by those factors). ``isr`` / ``isr_pool``: the run-time ISR
    setting and its pooling kind (:meth:`EDAFormer.set_isr`).

    ``segformer-b0`` / ``segformer-b1`` build a :class:`~.hf_segformer.SegFormer` (needs the ``hf``
    extra) and take ``drop_path_rate``, ``dropout``, ``in_chans`` and ``SegformerConfig`` size
    fields (``hidden_sizes``, ``depths``, ...); EDAFormer options are refused."""
    spec = get_model_spec(name)
    if spec.family == "segformer":
        return _create_segformer(name.lower(), spec, num_classes, isr, isr_pool, overrides)
    known = [p for p in inspect.signature(EDAFormer).parameters if p != "num_classes"]
    unknown = sorted(set(overrides) - set(known))
    if unknown:
        raise ValueError(f"unknown model option(s) {', '.join(map(repr, unknown))}; known: {', '.join(known)}")
    kwargs = dict(EFT_CONFIGS[spec.size], num_classes=spec.num_classes if num_classes is None else num_classes,
                  decoder_dim=spec.decoder_dim, decoder_mlp_ratio=spec.decoder_mlp_ratio)
    kwargs.update(overrides)
    model = EDAFormer(**kwargs)
    model.name = spec_name = name.lower()
    model.spec = MODEL_SPECS[spec_name]
    if isr is not None or isr_pool != "avg":
        model.set_isr("1111-111" if isr is None else isr, pool=isr_pool)
    return model


def _create_segformer(name: str, spec: ModelSpec, num_classes: int | None, isr, isr_pool: str, overrides: dict):
    """A named SegFormer (:mod:`.hf_segformer`); EDAFormer-only options are refused by name."""
    known = (*_SEGFORMER_KEYWORDS, *SEGFORMER_OPTIONS)
    unknown = sorted(set(overrides) - set(known))
    if unknown:
        edaformer_only = [k for k in unknown if k in inspect.signature(EDAFormer).parameters]
        what = " (EDAFormer options)" if len(edaformer_only) == len(unknown) else ""
        raise ValueError(f"{name} does not take model option(s) {', '.join(map(repr, unknown))}{what}; "
                         f"known: {', '.join(known)}")
    model = SegFormer(spec.num_classes if num_classes is None else num_classes,
                      **{**SEGFORMER_SIZES[spec.size], **overrides})
    model.name, model.spec = name, spec
    if isr is not None or isr_pool != "avg":
        model.set_isr("1111" if isr is None else isr, pool=isr_pool)
    return model
