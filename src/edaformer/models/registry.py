"""The named models (configs of :mod:`.config`) and :func:`create_model`."""
from __future__ import annotations

from dataclasses import fields

from torch import nn

from .config import EDAFormerConfig, HFSegFormerConfig, ModelConfig
from .eft import EFT_CONFIGS
from .hf_segformer import SEGFORMER_OPTIONS, SegFormer
from .segmentor import EDAFormer

__all__ = ["MODEL_SPECS", "create_model", "list_models", "get_model_spec"]


_DECODER = {"t": dict(decoder_dim=128, decoder_mlp_ratio=2.0), "b": dict(decoder_dim=768, decoder_mlp_ratio=1.0)}
_DATASETS = {
    "ade20k": dict(num_classes=150),
    "cocostuff": dict(num_classes=171),
    "cityscapes": dict(num_classes=19, test_scale=(2048, 1024), test_mode="slide", crop_size=(1024, 1024),
                       slide_stride=(768, 768)),
}

# name -> config: the architecture and the reference test protocol of each named model
MODEL_SPECS: dict[str, ModelConfig] = {
    f"edaformer-{size}-{dataset}": EDAFormerConfig(name=f"edaformer-{size}-{dataset}", dataset=dataset,
                                                   **EFT_CONFIGS[size], **_DECODER[size], **ds)
    for size in ("t", "b") for dataset, ds in _DATASETS.items()
}
# SegFormer-B0 / B1 as published for ADE20K (MiT encoder, all-MLP head 256 wide)
MODEL_SPECS.update({f"segformer-{size}": HFSegFormerConfig(name=f"segformer-{size}", dataset="ade20k",
                                                           num_classes=150, size=size)
                    for size in ("b0", "b1")})

# create_model keywords of SegFormer models beyond the SegformerConfig fields
_SEGFORMER_KEYWORDS = ("drop_path_rate", "dropout", "in_chans")
# EDAFormerConfig fields create_model does not take as options: the named model's identity and protocol
_NOT_OPTIONS = ("name", "num_classes", "dataset", "test_scale", "test_mode", "crop_size", "slide_stride")
_EDAFORMER_OPTIONS = tuple(f.name for f in fields(EDAFormerConfig) if f.name not in _NOT_OPTIONS)


def list_models() -> list[str]:
    """Names accepted by :func:`create_model`."""
    return sorted(MODEL_SPECS)


def get_model_spec(name: str) -> ModelConfig:
    """The config of a named model (:class:`~.config.EDAFormerConfig` or
    :class:`~.config.HFSegFormerConfig`)."""
    try:
        return MODEL_SPECS[name.lower()]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; available: {', '.join(list_models())}") from None


def create_model(name: str, num_classes: int | None = None, *, isr: str | None = None, isr_pool: str = "avg",
                 **overrides) -> nn.Module:
    """Build a named EDAFormer (random init) from its config. ``num_classes`` replaces the
    dataset's class count; ``overrides`` replace fields of :class:`~.config.EDAFormerConfig`
    (e.g. ``drop_path_rate=0.1``), among them the paper's ablation options
    ``decoder_depths=(a, b, c)`` (blocks at c4, c3, c2), ``decoder_op`` (one of
    :data:`~.mixers.DECODER_OPS`) and ``train_isr`` (e.g. ``"2211-222"``: training pooling
    ratios raised by those factors). ``isr`` / ``isr_pool``: the run-time ISR setting and its
    pooling kind (:meth:`EDAFormer.set_isr`; ``isr_pool`` is kept in the config).

    ``segformer-b0`` / ``segformer-b1`` build a :class:`~.hf_segformer.SegFormer` (needs the ``hf``
    extra) and take ``drop_path_rate``, ``dropout``, ``in_chans`` and ``SegformerConfig`` size
    fields (``hidden_sizes``, ``depths``, ...); EDAFormer options are refused."""
    spec = get_model_spec(name)
    if spec.family == "segformer":
        return _create_segformer(spec, num_classes, isr, isr_pool, overrides)
    unknown = sorted(set(overrides) - set(_EDAFORMER_OPTIONS))
    if unknown:
        raise ValueError(f"unknown model option(s) {', '.join(map(repr, unknown))}; "
                         f"known: {', '.join(_EDAFORMER_OPTIONS)}")
    if num_classes is not None:
        overrides["num_classes"] = num_classes
    model = EDAFormer(spec.replace(isr_pool=isr_pool, **overrides))
    if isr is not None:
        model.set_isr(isr, pool=isr_pool)
    return model


def _create_segformer(spec: HFSegFormerConfig, num_classes: int | None, isr, isr_pool: str, overrides: dict):
    """A named SegFormer (:mod:`.hf_segformer`); EDAFormer-only options are refused by name."""
    known = (*_SEGFORMER_KEYWORDS, *SEGFORMER_OPTIONS)
    unknown = sorted(set(overrides) - set(known))
    if unknown:
        edaformer_only = [k for k in unknown if k in _EDAFORMER_OPTIONS]
        what = " (EDAFormer options)" if len(edaformer_only) == len(unknown) else ""
        raise ValueError(f"{spec.name} does not take model option(s) {', '.join(map(repr, unknown))}{what}; "
                         f"known: {', '.join(known)}")
    changes = {k: v for k, v in overrides.items() if k in _SEGFORMER_KEYWORDS}
    options = {k: v for k, v in overrides.items() if k in SEGFORMER_OPTIONS}
    if num_classes is not None:
        changes["num_classes"] = num_classes
    model = SegFormer.from_config(spec.replace(options={**spec.options, **options}, **changes))
    if isr is not None or isr_pool != "avg":
        model.set_isr("1111" if isr is None else isr, pool=isr_pool)
    return model
