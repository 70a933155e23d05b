"""Training / evaluation configs: YAML files with ``_base_`` inheritance and dotted overrides.

The configs of the paper's models and of the ablations ship inside the package
(:func:`configs_dir`, listed by :func:`list_configs` and ``edaformer configs``). Wherever a config
is taken, a path or the name of a shipped one works: ``edaformer-t-camvid`` is
``<package>/configs/edaformer-t-camvid.yaml``, ``ablations/edaformer-t-camvid-dec123`` one of the
ablations (:func:`resolve_config`; an existing file wins over a name).

A config file may name one or more base files (paths relative to itself, else shipped names)::

    _base_: [_base_/default.yaml, _base_/ade20k.yaml]
    model: {name: edaformer-t-ade20k}

    # a config of your own, on top of a shipped one
    _base_: edaformer-t-camvid
    data: {root: /data/camvid}

Bases are merged in order, then the file itself on top (dicts merge key by key, everything
else is replaced). ``--set optim.lr=1e-4 data.root=/x`` overrides are applied last, each value
parsed as YAML (``1e-4`` a float, ``[1, 2]`` a list; ``352,352`` a list too for list-typed keys,
and text as it is for string-typed keys). Every key is declared in :data:`KEYS` with its default
and type: an unknown key or a value of the wrong type is a :class:`ConfigError` naming the key,
what it expects and the file or override it came from. :func:`load_config` returns the resolved
config with the defaults of :data:`DEFAULTS` filled in.

That is the segmentation family (:data:`SEGMENTATION`); encoder pretraining has its own keys
(:data:`PRETRAIN_KEYS`, :data:`PRETRAINING`) in the same files-bases-overrides system: pass the
:class:`Schema` to :func:`load_config`.
"""
from __future__ import annotations

import copy
import difflib
import logging
import numbers
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from .isr import parse_isr
from .models import DECODER_OPS, ISR_POOLS, TEST_MODES
from .utils import plain, to_pair

__all__ = ["ConfigError", "Key", "KEYS", "UNSET", "DEFAULTS", "REQUIRED", "Schema", "SEGMENTATION", "PRETRAIN_KEYS",
           "PRETRAINING", "load_config", "load_yaml", "merge_configs", "apply_overrides", "validate_config",
           "save_config", "parse_value", "configs_dir", "list_configs", "resolve_config"]

BASE_KEY = "_base_"

log = logging.getLogger("edaformer")


class ConfigError(ValueError):
    """A config file, override or value is invalid."""


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads ``1e-4`` (no dot) as a float, as YAML 1.2 does."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"))


def parse_value(text: str) -> Any:
    """Parse one override value as YAML (``1e-4`` -> float, ``[1, 2]`` -> list, ``null`` -> None)."""
    try:
        return yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as e:
        raise ConfigError(f"cannot parse value {text!r}: {e}") from None


# -- value types -------------------------------------------------------------------------------
class _Type:
    """A value type: ``check(value, name)`` returns the normalised value or raises ConfigError;
    ``parse(text)`` reads an override's text."""

    expected = "a value"

    def __init__(self, optional: bool = False):
        self.optional = optional

    def check(self, value: Any, name: str) -> Any:
        if value is None:
            if self.optional:
                return None
            self.fail(value, name)
        return self.convert(value, name)

    def convert(self, value: Any, name: str) -> Any:
        return value

    def fail(self, value: Any, name: str):
        shown = "null" if value is None else repr(value)
        raise ConfigError(f"{name} must be {self.expected}{' or null' if self.optional else ''}, got {shown}")

    def parse(self, text: str) -> Any:
        return parse_value(text)

    def describe(self) -> str:
        """What the type accepts, in words (``an integer >= 1 or null``)."""
        return self.expected + (" or null" if self.optional else "")

    def __repr__(self) -> str:
        return f"{type(self).__name__.lstrip('_')}({self.describe()})"


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


class _Int(_Type):
    def __init__(self, minimum: int = 0, maximum: int | None = None, optional: bool = False):
        super().__init__(optional)
        self.minimum, self.maximum = minimum, maximum
        self.expected = f"an integer >= {minimum}" if maximum is None else f"an integer in [{minimum}, {maximum}]"

    def convert(self, value, name):
        if not _is_int(value) or value < self.minimum or (self.maximum is not None and value > self.maximum):
            self.fail(value, name)
        return int(value)


class _Float(_Type):
    """A number in ``[minimum, maximum]`` (``[minimum, maximum)`` with ``open_max``)."""

    def __init__(self, minimum: float = 0.0, maximum: float | None = None, open_max: bool = False,
                 positive: bool = False, optional: bool = False):
        super().__init__(optional)
        self.minimum, self.maximum, self.open_max, self.positive = minimum, maximum, open_max, positive
        low = "> 0" if positive else f">= {minimum:g}"
        if maximum is None:
            self.expected = f"a number {low}"
        else:
            self.expected = f"a number in {'(' if positive else '['}{minimum:g}, {maximum:g}{')' if open_max else ']'}"

    def ok(self, value: Any) -> bool:
        if not _is_number(value) or value < self.minimum or (self.positive and value <= 0):
            return False
        return self.maximum is None or (value < self.maximum if self.open_max else value <= self.maximum)

    def convert(self, value, name):
        if not self.ok(value):
            self.fail(value, name)
        return float(value)


class _Bool(_Type):
    expected = "true or false"

    def convert(self, value, name):
        if not isinstance(value, bool):
            self.fail(value, name)
        return value


class _Str(_Type):
    """Text; an override's text is taken as it is (``data.root=2024`` is the folder ``2024``)."""

    expected = "a string"

    def convert(self, value, name):
        if not isinstance(value, str) or not value:
            self.fail(value, name)
        return value

    def parse(self, text):
        value = parse_value(text)
        return value if value is None or isinstance(value, str) else text.strip()


class _Suffix(_Str):
    """A file-name ending: ``.jpg``, ``_gtFine_labelTrainIds.png``; a bare extension is refused."""

    expected = "a file ending such as '.jpg'"

    def convert(self, value, name):
        value = super().convert(value, name)
        if value.isalnum():
            raise ConfigError(f"{name} must be a file ending such as '.{value}' (with its dot), got {value!r}")
        return value


class _Choice(_Type):
    def __init__(self, *choices: Any, optional: bool = False):
        super().__init__(optional)
        self.choices = choices
        self.expected = "one of " + ", ".join(str(c).lower() if isinstance(c, bool) else str(c) for c in choices)

    def convert(self, value, name):
        if not any(value == c and type(value) is type(c) for c in self.choices):
            self.fail(value, name)
        return value


class _Isr(_Type):
    expected = "an ISR setting such as 2211-222"

    def convert(self, value, name):
        try:
            return str(parse_isr(f"{value}-111" if str(value).isdigit() and len(str(value)) == 4 else str(value)))
        except ValueError as e:
            raise ConfigError(f"{name} must be {self.expected}: {e}") from None

    def parse(self, text):
        return _Str.parse(self, text)


class _List(_Type):
    """A list of ``item`` values (``length`` of them when given); ``a,b`` in an override is a list."""

    def __init__(self, item: _Type, length: int | None = None, what: str | None = None, optional: bool = False):
        super().__init__(optional)
        self.item, self.length = item, length
        count = f"{length} " if length else ""
        self.expected = what or f"a list of {count}{'items' if length != 1 else 'item'}, each {item.expected}"

    def convert(self, value, name):
        if isinstance(value, str) or not isinstance(value, (list, tuple)) or not value:
            self.fail(value, name)
        if self.length is not None and len(value) != self.length:
            self.fail(value, name)
        try:
            return [self.item.check(v, name) for v in value]
        except ConfigError:
            self.fail(value, name)

    def parse(self, text):
        stripped = text.strip()
        if "," in stripped and not stripped.startswith(("[", "{")):
            return [parse_value(part.strip()) for part in stripped.split(",")]
        return parse_value(text)


class _Names(_List):
    """A name, or a list of names (``a,b`` in an override)."""

    def __init__(self):
        super().__init__(_Str(), None, "a name or a list of names")

    def convert(self, value, name):
        if isinstance(value, str) and value:
            return value
        return super().convert(value, name)


class _Patterns(_List):
    """Shell-style patterns: a list, or one pattern; an override's text ``a*,!b*`` is taken as it is."""

    def __init__(self):
        super().__init__(_Str(), None, "a list of patterns such as ['0006R0_*'] or ['!0006R0_*']", optional=True)

    def convert(self, value, name):
        return super().convert([value] if isinstance(value, str) else value, name)

    def parse(self, text):
        stripped = text.strip()
        if stripped.startswith("[") or stripped in ("null", "~", ""):
            return parse_value(text)
        return [part.strip() for part in stripped.split(",")]


class _Size(_List):
    """A positive int ``n`` (meaning ``[n, n]``) or a pair of them; stored as a list of two."""

    def __init__(self, what: str = "(h, w)", optional: bool = False):
        super().__init__(_Int(1), 2, f"a positive integer or a pair {what} of them", optional)

    def convert(self, value, name):
        try:
            return list(to_pair(value, name))
        except ValueError:
            self.fail(value, name)


class _Range(_List):
    """Two numbers ``low <= high`` of ``item``'s range."""

    def __init__(self, item: _Float, optional: bool = False):
        super().__init__(item, 2, f"two numbers low <= high, each {item.expected}", optional)

    def convert(self, value, name):
        pair = super().convert(value, name)
        if pair[0] > pair[1]:
            self.fail(value, name)
        return pair


class _Classes(_List):
    """Class names (a list of strings) or a class count."""

    def __init__(self):
        super().__init__(_Str(), None, "a list of class names or a class count >= 1", optional=True)

    def convert(self, value, name):
        if _is_int(value) and value >= 1:
            return int(value)
        return super().convert(value, name)


class _Palette(_List):
    def __init__(self):
        super().__init__(_List(_Int(0, 255), 3), None, "a list of [r, g, b] colours with values 0-255",
                         optional=True)


class _ClassWeight(_List):
    """``median_freq`` or one positive weight per class."""

    def __init__(self):
        super().__init__(_Float(positive=True), None, "median_freq or a list of positive weights, one per class",
                         optional=True)

    def convert(self, value, name):
        if value == "median_freq":
            return value
        return super().convert(value, name)

    def parse(self, text):
        return text.strip() if text.strip() == "median_freq" else super().parse(text)


# -- the known keys ----------------------------------------------------------------------------
class _Unset:
    def __repr__(self) -> str:
        return "UNSET"


UNSET: Any = _Unset()


@dataclass(frozen=True)
class Key:
    """One config key: its default (``UNSET``: not filled in, the reader of the section decides),
    its type and its meaning (one line)."""

    default: Any
    type: _Type
    help: str = ""


def _keys(**keys: tuple[Any, _Type, str]) -> dict[str, Key]:
    return {name: Key(*spec) for name, spec in keys.items()}


_PROB = dict(minimum=0.0, maximum=1.0)

# Every section and key: default, type and meaning (one line; ``edaformer configs --defaults`` prints
# them, <package>/configs/_base_/default.yaml repeats them as comments). ``None`` defaults mean "derived
# at run time", UNSET ones "the dataset's / model's own" (the value in brackets); REQUIRED keys must be
# set by some config file. The work dir's config.yaml holds the value used for each.
KEYS: dict[str, dict[str, Key]] = {
    # ``create_model`` arguments: the named model, then EDAFormer constructor overrides.
    "model": _keys(
        name=(None, _Str(optional=True), "required: a model name from `edaformer list`"),
        num_classes=(None, _Int(1, optional=True), "class count; null: the dataset's"),
        drop_path_rate=(0.2, _Float(**_PROB, open_max=True), "encoder stochastic depth, rising linearly from 0"),
        encoder_weights=(None, _Str(optional=True), "ImageNet EFT encoder checkpoint (loaded non-strictly; "
                         "a whole model: all but its classifier)"),
        init_from=(None, _Str(optional=True),
                   "trained checkpoint or shipped model to start a fresh run from (all weights; other classes: "
                   "all but the classifier)"),
        decoder_drop_path=(UNSET, _Float(**_PROB, open_max=True), "decoder stochastic depth [the model's: 0.1]"),
        dropout=(UNSET, _Float(**_PROB, open_max=True), "dropout before the classifier [the model's: 0.1]"),
        in_chans=(UNSET, _Int(1), "input channels [the model's: 3]"),
        decoder_depths=(UNSET, _List(_Int(0), length=3), "EFA blocks at (c4, c3, c2) [the model's: 3, 2, 1]"),
        decoder_op=(UNSET, _Choice(*DECODER_OPS), "token mixer in the decoder [the model's: efa]"),
        train_isr=(UNSET, _Isr(optional=True), "train with raised reduction ratios, e.g. 2211-222 [1111-111]"),
        isr_pool=(UNSET, _Choice(*ISR_POOLS), "ISR key/value pooling kind [avg]"),
    ),
    # ``edaformer.data.build_dataset`` keys (see its docstring), plus the loader's.
    "data": _keys(
        type=(None, _Str(optional=True), "required: ade20k | cityscapes | cocostuff | folder"),
        root=(None, _Str(optional=True), "required: the dataset folder (folder: images/<split>, annotations/<split>)"),
        ignore_index=(255, _Int(0, 255), "label value in the files that means 'ignore' (255 always does)"),
        batch_size=(4, _Int(1), "images per batch, per GPU / process"),
        workers=(4, _Int(0), "loader workers per GPU / process (at most the CPU count)"),
        classes=(UNSET, _Classes(), "folder: class names or a class count [named datasets: their own]"),
        palette=(UNSET, _Palette(), "folder: one [r, g, b] per class [generated]"),
        reduce_zero_label=(UNSET, _Bool(), "folder: label 0 is ignored and 1.. become 0.. [false]"),
        img_suffix=(UNSET, _Suffix(), "file ending of the images [.jpg]"),
        seg_suffix=(UNSET, _Suffix(), "file ending of the labels [.png]"),
        train_split=(UNSET, _Names(), "training split folder, or (folder) a list of them [train]"),
        val_split=(UNSET, _Names(), "validation split folder, or (folder) a list of them [val]"),
        train_filter=(UNSET, _Patterns(), "stem patterns of the training images to keep; '!pattern' excludes [all]"),
        val_filter=(UNSET, _Patterns(), "stem patterns of the validation images to keep; '!pattern' excludes [all]"),
        scale=(UNSET, _Size("(long, short)"),
               "(long, short) box an image is resized to fit, times a random ratio [2048, 512]"),
        test_scale=(UNSET, _Size("(long, short)", optional=True), "resize box at test time [data.scale]"),
        size_divisor=(UNSET, _Int(1, optional=True), "test image sides rounded up to a multiple of this [32]"),
        ratio_range=(UNSET, _Range(_Float(positive=True), optional=True),
                     "random ratio range of the training resize [0.5, 2.0]"),
        crop_size=(UNSET, _Size(), "training crop (h, w) [512, 512]"),
        cat_max_ratio=(UNSET, _Float(positive=True, maximum=1.0),
                       "largest share one class may cover in a training crop [0.75]"),
        flip_prob=(UNSET, _Float(**_PROB), "horizontal flip probability [0.5]"),
        photometric=(UNSET, _Bool(), "photometric distortion of the training images [true]"),
    ),
    "optim": _keys(
        lr=(6e-5, _Float(), "peak learning rate (the encoder's)"),
        betas=([0.9, 0.999], _List(_Float(**_PROB, open_max=True), 2), "AdamW betas"),
        eps=(1e-8, _Float(), "AdamW epsilon"),
        weight_decay=(0.01, _Float(), "not applied to normalization parameters"),
        decoder_lr_mult=(10.0, _Float(), "the decoder's learning rate is lr times this"),
        impl=("auto", _Choice("auto", "loop", "foreach", "fused"),
              "AdamW kernels: auto (torch's choice: foreach on CUDA, loop on CPU) | loop | foreach | fused"),
    ),
    "schedule": _keys(
        iters=(None, _Int(1, optional=True), "required: training iterations (optimizer steps)"),
        warmup_iters=(1500, _Int(0), "iterations of linear warmup (fewer than schedule.iters)"),
        warmup_ratio=(1e-6, _Float(), "the warmup starts at lr times this"),
        power=(1.0, _Float(), "exponent of the poly decay"),
        min_lr=(0.0, _Float(), "learning rate at the end of the decay"),
        restarts=(None, _List(_Int(1), optional=True),
                  "iterations where an earlier, shorter schedule ended (a continued run)"),
    ),
    # the training loss (see edaformer.engine.losses)
    "loss": _keys(
        name=("ce", _Choice("ce", "ohem"), "ce | ohem (cross-entropy on the hardest pixels)"),
        class_weight=(None, _ClassWeight(), "null | median_freq | one weight per class"),
        ohem_thresh=(0.7, _Float(**_PROB), "ohem: keep pixels whose p(true class) is below this ..."),
        ohem_min_kept=(100000, _Int(1), "... and at least this many per image"),
    ),
    "train": _keys(
        amp=(False, _Choice(False, "bf16", "fp16", optional=True), "false | bf16 | fp16 (CUDA only)"),
        seed=(0, _Int(0), "seed of the initial weights, the data order and the augmentation"),
        deterministic=(False, _Bool(), "deterministic algorithms only (slower; warns where torch has none)"),
        checkpoint_interval=(16000, _Int(0), "write a checkpoint every N iterations; 0: at the end only"),
        checkpoint_minutes=(0, _Float(0.0), "also checkpoint every N minutes of training (e.g. 10 or 0.5); 0: off"),
        eval_interval=(16000, _Int(0), "validate every N iterations; 0: only at the end"),
        log_interval=(50, _Int(0), "a training record in log.jsonl every N iterations"),
        keep_checkpoints=(3, _Int(0), "iter_<n>.pth files kept; 0 keeps all (latest.pth and best_mIoU.pth always)"),
        grad_checkpointing=(False, _Bool(), "recompute activations in the backward pass (less memory, slower)"),
        channels_last=(False, _Bool(), "model weights and batches in channels-last memory format"),
        ema=(False, _Bool(), "keep an exponential moving average of the weights; validate and ship it"),
        ema_decay=(0.9998, _Float(**_PROB, open_max=True), "EMA decay per optimizer step"),
        ema_warmup=(False, _Bool(), "true: decay 1 - (1 + step) ** -ema_warmup_power, capped at ema_decay"),
        ema_warmup_power=(0.75, _Float(positive=True, maximum=1.0), "3/4 reaches 0.999 at 10k steps, 2/3 at 31.6k"),
        tensorboard=(False, _Bool(), "also write the log records to <work_dir>/tensorboard/ (pip install tensorboard)"),
    ),
    "eval": _keys(
        mode=("whole", _Choice(*TEST_MODES), "whole | slide (sliding window)"),
        crop_size=(None, _Size(optional=True), "slide window; null: data.crop_size"),
        stride=(None, _Size(optional=True), "slide stride; null: 2/3 of the window"),
        isr=(None, _Isr(optional=True), "ISR setting to validate at, e.g. 2211-222; null: the training setting"),
        tta=(False, _Bool(), "multi-scale + flip test"),
        tta_scales=([0.5, 0.75, 1.0, 1.25, 1.5, 1.75], _List(_Float(positive=True)),
                    "tta: ratios of the test resize box"),
        tta_flip=(True, _Bool(), "tta: also the flipped images"),
        flops_input_size=(None, _Size(optional=True), "(H, W) for GFLOPs in the ISR sweep; null: data.crop_size"),
    ),
}

# The defaults filled into every resolved config (keys with an UNSET default are left out).
DEFAULTS: dict[str, dict[str, Any]] = {
    section: {name: key.default for name, key in keys.items() if key.default is not UNSET}
    for section, keys in KEYS.items()}

REQUIRED = {"model": ["name"], "data": ["type", "root"], "schedule": ["iters"]}

# Keys that were renamed: ``section.old`` -> ``section.new``. The old name is refused with a message
# naming the new one; ``old: null``, which every config saved before the rename holds (a work dir's
# config.yaml), is read as the absent key it means.
RENAMED: dict[str, str] = {"model.pretrained": "model.encoder_weights"}


def _renamed_error(section: str, name: str) -> ConfigError:
    new = RENAMED[f"{section}.{name}"]
    return ConfigError(f"{section}.{name} was renamed: use {new}")


def _without_unset_renamed(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """``cfg`` without renamed keys whose value is null (see :data:`RENAMED`)."""
    out = dict(cfg)
    for old in RENAMED:
        section, name = old.split(".")
        values = out.get(section)
        if isinstance(values, Mapping) and name in values and values[name] is None:
            out[section] = {k: v for k, v in values.items() if k != name}
    return out


def _check_segmentation(cfg: dict[str, Any]) -> None:
    _check_classes(cfg)
    restarts = cfg["schedule"]["restarts"]
    if restarts and restarts != sorted(set(restarts)):
        raise ConfigError(f"schedule.restarts must be increasing iterations, got {restarts}")


@dataclass(frozen=True)
class Schema:
    """One family of configs: its sections and keys (default and type each), the keys some file
    must set, and a check of the whole resolved config (None: none)."""

    keys: Mapping[str, Mapping[str, Key]]
    required: Mapping[str, Sequence[str]] = field(default_factory=dict)
    check: Callable[[dict[str, Any]], None] | None = None

    @property
    def defaults(self) -> dict[str, dict[str, Any]]:
        """The defaults filled into every resolved config (keys with an UNSET default are left out)."""
        return {section: {name: key.default for name, key in keys.items() if key.default is not UNSET}
                for section, keys in self.keys.items()}


# segmentation training and evaluation (``edaformer train / eval / isr-tune``)
SEGMENTATION = Schema(KEYS, REQUIRED, _check_segmentation)


# ImageNet-style classification pretraining of the encoder (``edaformer pretrain``, see
# edaformer.engine.pretrain); the recipe's values and their sources are in
# edaformer/configs/_base_/imagenet.yaml.
PRETRAIN_KEYS: dict[str, dict[str, Key]] = {
    # ``timm.create_model`` arguments
    "model": _keys(
        name=(None, _Str(optional=True), "required: a timm model, eft_t or eft_b"),
        num_classes=(None, _Int(1, optional=True), "class count; null: the training set's"),
        drop_path_rate=(0.1, _Float(**_PROB, open_max=True), "stochastic depth, rising linearly from 0"),
        drop_rate=(0.0, _Float(**_PROB, open_max=True), "dropout before the classifier"),
    ),
    # ``timm.data.create_dataset`` / ``create_transform`` arguments, and the loader's
    "data": _keys(
        dataset=(None, _Str(optional=True), "null: a folder or tar; hfds/, hfids/, wds/, tfds/NAME"),
        root=(None, _Str(optional=True), "required: the dataset folder"),
        val_root=(None, _Str(optional=True), "the validation set's folder; null: data.root"),
        train_split=("train", _Str(), "training split"),
        val_split=("validation", _Str(), "validation split (folders: validation, val, ... are all found)"),
        class_map=(None, _Str(optional=True), "a class-map file (folder / tar datasets)"),
        num_samples=(None, _Int(1, optional=True), "iterable datasets: samples per epoch, if unknown"),
        img_size=(224, _Int(16), "training crop and validation side"),
        batch_size=(128, _Int(1), "images per batch, per process"),
        workers=(8, _Int(0), "loader workers per process"),
        interpolation=("bicubic", _Choice("bicubic", "bilinear", "random"), "resize interpolation"),
        crop_pct=(0.875, _Float(positive=True, maximum=1.0),
                  "validation: resize to img_size / crop_pct, then a centre crop"),
        scale=([0.08, 1.0], _Range(_Float(positive=True, maximum=1.0)), "random-resized-crop area range"),
        hflip=(0.5, _Float(**_PROB), "horizontal flip probability"),
        color_jitter=(0.4, _Float(), "colour jitter strength (not used with RandAugment, as in timm)"),
        auto_augment=("rand-m9-mstd0.5-inc1", _Str(optional=True), "timm augmentation policy; null: off"),
        re_prob=(0.25, _Float(**_PROB), "random erasing probability"),
        re_mode=("pixel", _Choice("pixel", "rand", "const"), "random erasing fill"),
        re_count=(1, _Int(1), "random erasing: regions per image"),
        repeated_aug=(3, _Int(0), "repeats per sample (0, 1: off), map-style datasets"),
        skip_bad_images=(False, _Bool(), "skip an unreadable image (named) instead of stopping"),
    ),
    # ``timm.data.Mixup``: Mixup and CutMix (both alphas 0: off)
    "mixup": _keys(
        mixup_alpha=(0.8, _Float(), "Mixup alpha; 0: off"),
        cutmix_alpha=(1.0, _Float(), "CutMix alpha; 0: off"),
        prob=(1.0, _Float(**_PROB), "probability of mixing a batch"),
        switch_prob=(0.5, _Float(**_PROB), "probability of CutMix instead of Mixup when both are on"),
        mode=("batch", _Choice("batch", "pair", "elem"), "mix per batch, pair or element"),
    ),
    "loss": _keys(
        label_smoothing=(0.1, _Float(**_PROB, open_max=True), "label smoothing of the cross-entropy"),
    ),
    # ``timm.optim.create_optimizer_v2``: no weight decay on biases and norms
    "optim": _keys(
        name=("adamw", _Str(), "a timm optimizer name"),
        lr=(1e-3, _Float(positive=True), "the peak learning rate of the run, as given"),
        lr_batch=(None, _Int(1, optional=True), "the global batch lr is set for (a warning otherwise)"),
        weight_decay=(0.05, _Float(), "not applied to biases and normalization parameters"),
        eps=(1e-8, _Float(positive=True), "optimizer epsilon"),
        betas=([0.9, 0.999], _List(_Float(**_PROB, open_max=True), 2), "optimizer betas"),
        clip_grad=(None, _Float(positive=True, optional=True), "gradient norm clipping; null: off"),
    ),
    # ``timm.scheduler.create_scheduler_v2``
    "schedule": _keys(
        name=("cosine", _Choice("cosine", "tanh", "poly", "step"), "learning-rate decay"),
        epochs=(300, _Int(1), "training epochs"),
        warmup_epochs=(5, _Int(0), "epochs of linear warmup"),
        warmup_lr=(1e-6, _Float(), "learning rate at the start of the warmup"),
        min_lr=(1e-5, _Float(), "learning rate at the end of the decay"),
        cooldown_epochs=(0, _Int(0), "epochs at min_lr after the decay"),
        decay_epochs=(30, _Int(1), "step: epochs between decays"),
        step_on_epochs=(True, _Bool(), "false: the rate changes every update"),
    ),
    # ``timm.utils.ModelEmaV3``: an exponential moving average of the weights, validated and exported
    "ema": _keys(
        enabled=(False, _Bool(), "keep an EMA of the weights; validate and export it"),
        decay=(0.99996, _Float(**_PROB, open_max=True), "EMA decay per update"),
        warmup=(False, _Bool(), "timm's EMA warmup"),
    ),
    "train": _keys(
        amp=(False, _Choice(False, "bf16", "fp16", optional=True), "false | bf16 | fp16 (CUDA only)"),
        seed=(0, _Int(0), "seed of the initial weights, the data order and the augmentation"),
        deterministic=(False, _Bool(), "deterministic algorithms only (slower)"),
        checkpoint_minutes=(15.0, _Float(0.0), "also checkpoint every N minutes; 0: at epoch ends only"),
        keep_checkpoints=(2, _Int(0), "iter_<n>.pth files kept (latest.pth always)"),
        eval_interval=(1, _Int(0), "validate every N epochs; 0: only at the end"),
        log_interval=(50, _Int(1), "a training record in log.jsonl every N updates"),
        grad_checkpointing=(False, _Bool(), "recompute activations in the backward pass (less memory, slower)"),
    ),
}


def _check_pretraining(cfg: dict[str, Any]) -> None:
    if cfg["schedule"]["warmup_epochs"] > cfg["schedule"]["epochs"]:
        raise ConfigError(f"schedule.warmup_epochs ({cfg['schedule']['warmup_epochs']}) is more than "
                          f"schedule.epochs ({cfg['schedule']['epochs']})")


PRETRAINING = Schema(PRETRAIN_KEYS, {"model": ["name"], "data": ["root"]}, _check_pretraining)


def _suggest(name: str, options: Iterable[str]) -> str:
    close = difflib.get_close_matches(name, list(options), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _check_known(cfg: Mapping[str, Any], keys: Mapping[str, Mapping[str, Key]] = KEYS) -> None:
    """Unknown sections or keys, and sections that are not mappings, raise ConfigError."""
    unknown = [k for k in cfg if k not in keys]
    if unknown:
        hints = ", ".join(f"{k!r}{_suggest(str(k), keys)}" for k in unknown)
        other = ("pretrain", PRETRAIN_KEYS) if keys is KEYS else ("train", KEYS)
        if all(k in other[1] for k in unknown):
            hints += f" (a config for `edaformer {other[0]}`?)"
        raise ConfigError(f"unknown config section(s) {hints}; valid sections: {', '.join(keys)}")
    for section, value in cfg.items():
        if value is None:
            continue
        if not isinstance(value, Mapping):
            raise ConfigError(f"config section {section!r} must be a mapping, got {value!r}")
        renamed = [k for k in value if f"{section}.{k}" in RENAMED]
        if renamed:
            raise _renamed_error(section, renamed[0])
        bad = [k for k in value if k not in keys[section]]
        if bad:
            hints = ", ".join(f"{k!r}{_suggest(str(k), keys[section])}" for k in bad)
            raise ConfigError(f"unknown key(s) in section {section!r}: {hints}; "
                              f"valid keys: {', '.join(keys[section])}")


def _check_classes(cfg: Mapping[str, Any]) -> None:
    """The class count stated twice (model.num_classes, data.classes) must agree, and the ignore
    value must not be a class id."""
    data, classes = cfg["data"], cfg["data"].get("classes")
    count = classes if isinstance(classes, int) else len(classes) if classes else None
    declared = cfg["model"].get("num_classes")
    if count is not None and declared is not None and declared != count:
        raise ConfigError(f"model.num_classes is {declared} but data.classes names {count} classes: "
                          "set model.num_classes to null (it follows the dataset) or make them agree")
    palette = data.get("palette")
    if count is not None and palette is not None and len(palette) != count:
        raise ConfigError(f"data.palette has {len(palette)} colours but data.classes names {count} classes: "
                          "give one [r, g, b] per class, or set data.palette to null to generate one")
    ignore = data["ignore_index"]
    if count is not None and ignore < count:
        raise ConfigError(f"data.ignore_index is {ignore}, which is also a class id (data.classes names {count} "
                          "classes): set it to the label value that means 'ignore' in your files (255 if none)")


def validate_config(cfg: Mapping[str, Any], schema: Schema = SEGMENTATION) -> dict[str, Any]:
    """Check sections, keys, required keys and value types against ``schema``; return the config
    with its defaults filled in."""
    if not isinstance(cfg, Mapping):
        raise ConfigError(f"a config must be a mapping, got {type(cfg).__name__}")
    cfg = _without_unset_renamed(cfg)
    _check_known(cfg, schema.keys)
    out = merge_configs(schema.defaults, {k: v for k, v in cfg.items() if v is not None})
    missing = [f"{s}.{k}" for s, keys in schema.required.items() for k in keys if out[s].get(k) in (None, "")]
    if missing:
        raise ConfigError(f"missing required config key(s): {', '.join(missing)}")
    for section, values in out.items():
        for name, value in values.items():
            values[name] = schema.keys[section][name].type.check(value, f"{section}.{name}")
    if schema.check is not None:
        schema.check(out)
    return out


# -- shipped configs ---------------------------------------------------------------------------
CONFIG_SUFFIX = ".yaml"


def configs_dir() -> Path:
    """The package's ``configs`` folder: the shipped configs, their bases in ``_base_/`` and the
    ablations in ``ablations/``."""
    return Path(str(resources.files(__package__).joinpath("configs")))


def list_configs(bases: bool = False) -> list[str]:
    """The names of the shipped configs: the models' (``edaformer-t-camvid``), then those in
    folders (``ablations/...``), each sorted; those in ``_base_/`` (defaults and datasets, not
    runnable alone) last and only with ``bases``."""
    root = configs_dir()
    if not root.is_dir():
        return []
    names = [p.relative_to(root).with_suffix("").as_posix() for p in root.rglob(f"*{CONFIG_SUFFIX}") if p.is_file()]
    return sorted((n for n in names if bases or not n.startswith(f"{BASE_KEY}/")),
                  key=lambda n: (n.startswith(f"{BASE_KEY}/"), "/" in n, n))


def _shipped(name: str) -> Path | None:
    """The shipped file of a config name (``.yaml`` optional), None when there is none."""
    parts = Path(name).parts
    if not parts or Path(name).is_absolute() or any(p in ("..", ".") for p in parts):
        return None
    path = configs_dir() / name
    if path.suffix != CONFIG_SUFFIX:
        path = path.with_name(path.name + CONFIG_SUFFIX)
    return path if path.is_file() else None


def resolve_config(config: str | os.PathLike) -> Path:
    """The file of a config path or shipped name: an existing path as it is (a file path wins over
    a name), else the shipped config of that name (:func:`list_configs`), else the path (whose
    reading then fails with the file name)."""
    path = Path(config)
    if path.exists():
        return path
    return _shipped(os.fspath(config)) or path


# -- files and overrides -----------------------------------------------------------------------
def load_yaml(path: str | os.PathLike) -> dict[str, Any]:
    """Read one YAML file (no inheritance); an empty file is ``{}``."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"config {path} is a directory, not a YAML file")
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path} (nor a shipped config of that name: "
                                "see `edaformer configs`)")
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.load(f, Loader=_Loader)
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a YAML file (binary content)") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {' '.join(str(e).split())}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping, got {type(data).__name__}")
    return data


def merge_configs(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """Deep merge: dicts merge key by key, any other value of ``override`` replaces the base's."""
    out = copy.deepcopy(dict(base))
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = merge_configs(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _base_file(path: Path, base: str) -> Path:
    """A ``_base_`` entry of ``path``: relative to its folder (an absolute path as it is), else a
    shipped config name."""
    local = path.parent / base
    if local.exists():
        return local
    return _shipped(base) or local


def _set_by(origins: dict[str, str], key: str, source: str) -> None:
    """Record that ``source`` (a file, or an override) set ``key`` last (``origins`` keeps that order)."""
    origins.pop(key, None)
    origins[key] = source


def _load_with_bases(path: Path, chain: tuple[Path, ...], schema: Schema = SEGMENTATION,
                     origins: dict[str, str] | None = None) -> dict[str, Any]:
    path = path.resolve()
    if path in chain:
        cycle = " -> ".join(str(p) for p in chain + (path,))
        raise ConfigError(f"circular _base_ inheritance: {cycle}")
    data = _without_unset_renamed(load_yaml(path))
    bases = data.pop(BASE_KEY, None) or []
    if isinstance(bases, str):
        bases = [bases]
    if not isinstance(bases, list) or not all(isinstance(b, str) for b in bases):
        raise ConfigError(f"{path}: {BASE_KEY} must be a path or a list of paths")
    try:
        _check_known(data, schema.keys)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    merged: dict[str, Any] = {}
    for base in bases:
        merged = merge_configs(merged, _load_with_bases(_base_file(path, base), chain + (path,), schema, origins))
    if origins is not None:
        for section, values in data.items():
            for key in values if isinstance(values, Mapping) else ():
                _set_by(origins, f"{section}.{key}", str(path))
    return merge_configs(merged, data)


def apply_overrides(cfg: Mapping[str, Any], overrides: Iterable[str], schema: Schema = SEGMENTATION) -> dict[str, Any]:
    """Apply ``section.key=value`` overrides to a copy of ``cfg``.

    The value is read for the key's type (YAML; ``a,b`` for lists; text as it is for strings) and
    checked; an unknown key or a bad value raises :class:`ConfigError` naming the override.
    """
    out = copy.deepcopy(dict(cfg))
    for item in overrides:
        key, sep, text = item.partition("=")
        parts = key.strip().split(".")
        if not sep or len(parts) != 2 or not all(parts):
            raise ConfigError(f"override {item!r} must look like section.key=value")
        section, name = parts
        try:
            _check_known({section: {name: None}}, schema.keys)
            kind = schema.keys[section][name].type
            value = kind.check(kind.parse(text), key.strip())
        except ConfigError as e:
            raise ConfigError(f"override {item!r}: {e}") from None
        if not isinstance(out.get(section), dict):
            out[section] = {}
        out[section][name] = value
    return out


def load_config(path: str | os.PathLike, overrides: Iterable[str] = (),
                schema: Schema = SEGMENTATION) -> dict[str, Any]:
    """Read ``path`` (a file, or the name of a shipped config: :func:`resolve_config`) with its
    ``_base_`` chain, apply ``overrides`` and validate against ``schema`` (default: the
    segmentation keys; :data:`PRETRAINING` for ``edaformer pretrain``)."""
    origins: dict[str, str] = {}
    overrides = list(overrides)
    cfg = apply_overrides(_load_with_bases(resolve_config(path), (), schema, origins), overrides, schema)
    for item in overrides:
        _set_by(origins, item.partition("=")[0].strip(), f"--set {item}")
    try:
        cfg = validate_config(cfg, schema)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    if schema is SEGMENTATION:
        _warn_inherited_ignore(cfg, origins)
    return cfg


def _warn_inherited_ignore(cfg: Mapping[str, Any], origins: Mapping[str, str]) -> None:
    """``data.ignore_index`` set by a ``_base_`` file while a later file (or override) redefines
    ``data.classes``: the ignore value of the base's dataset may not be that of these labels."""
    order = list(origins)
    ignore, classes = "data.ignore_index", "data.classes"
    if ignore not in origins or classes not in origins or origins[ignore] == origins[classes] \
            or order.index(classes) < order.index(ignore):
        return
    value, names = cfg["data"]["ignore_index"], cfg["data"]["classes"]
    count = names if isinstance(names, int) else len(names)
    log.warning("data.ignore_index is %d, inherited from %s, while data.classes (%d classes) is redefined by %s: "
                "using %d as the label value that means 'ignore'; if your labels mark it otherwise, set "
                "data.ignore_index beside data.classes (255 if none)", value, origins[ignore], count,
                origins[classes], value)


def save_config(cfg: Mapping[str, Any], path: str | os.PathLike) -> Path:
    """Write the resolved config as YAML (it loads back with :func:`load_config`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        yaml.safe_dump(plain(cfg), f, sort_keys=False, default_flow_style=None)
    os.replace(tmp, path)
    return path
