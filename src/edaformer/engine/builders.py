"""What a training run is built from: model, datasets and loader, optimizer, schedule, loss.

The recipe is the reference (mmsegmentation-style) one: AdamW with the decoder at 10x the
learning rate and no weight decay on normalization parameters; linear warmup then poly decay,
stepped per iteration; pixel-wise cross-entropy (ignore index 255) on logits at crop size, or
another loss of :mod:`edaformer.engine.losses`.
"""
from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from ..checkpoint import CheckpointMismatchError, checkpoint_num_classes, load_checkpoint, read_checkpoint
from ..data import build_dataloader, build_dataset, dataset_config, usable_workers
from ..data.datasets import SegmentationDataset
from ..meta import ISR, ITERATION, MIOU
from ..models import create_model
from ..models.registry import get_model_spec

__all__ = ["build_model", "load_init_from", "load_encoder_weights", "build_datasets", "build_train_loader",
           "build_param_groups", "build_optimizer", "WarmupPolyLR", "build_scheduler", "resolve_amp"]

log = logging.getLogger("edaformer")


def build_model(model_cfg: Mapping[str, Any], num_classes: int, init_weights: bool = True) -> nn.Module:
    """``create_model`` from the ``model`` config section, then its starting weights.

    With ``init_weights`` (a fresh run): ``model.init_from`` loads every weight of a trained
    checkpoint, strictly, all but the classifier when it was trained for another class count (see
    :func:`load_init_from`); otherwise ``model.encoder_weights`` loads an ImageNet encoder, every
    encoder tensor (see :func:`load_encoder_weights`). A resumed run or an evaluation passes
    False: its weights come from its own checkpoint.
    """
    extra = {k: v for k, v in model_cfg.items() if k not in _NOT_MODEL_ARGUMENTS and v is not None}
    model = create_model(model_cfg["name"], num_classes=model_cfg.get("num_classes") or num_classes, **extra)
    if not init_weights:
        return model
    init_from, path = model_cfg.get("init_from"), model_cfg.get("encoder_weights")
    if path and get_model_spec(model_cfg["name"]).family != "edaformer":
        raise ValueError(f"model.encoder_weights loads an EFT encoder checkpoint; {model_cfg['name']} is not an "
                         "EDAFormer model (use model.init_from for a checkpoint of this model)")
    if init_from:
        if path:
            log.info("model.encoder_weights %s not loaded: model.init_from sets every weight", path)
        load_init_from(model, init_from)
    elif path:
        load_encoder_weights(model, path)
    return model


def load_encoder_weights(model: nn.Module, path: str | os.PathLike) -> dict[str, Any]:
    """Load ``model.encoder_weights`` into ``model`` and say how many tensors it used.

    An encoder checkpoint (an ImageNet classifier or backbone, e.g. the ``encoder.pth`` of
    ``edaformer pretrain``; its classifier head is dropped) must fill every encoder tensor: a
    missing or mis-shaped one raises :class:`CheckpointMismatchError` (the encoder of another
    model size, say). A whole segmentor checkpoint loads what matches, with warnings; its
    classifier, when trained for another class count, is re-initialised, said in one line.
    """
    obj = read_checkpoint(path)
    report = load_checkpoint(model, obj, strict=False)
    if report["format"] == "encoder":
        total = len(model.encoder.state_dict())
        if report["missing"] or report["mismatched"]:
            problems = report["mismatched"][:3] + [f"{k} missing" for k in report["missing"][:3]]
            raise CheckpointMismatchError(
                f"model.encoder_weights {path}: only {report['loaded']} of the model's {total} encoder tensors match it "
                f"({len(report['missing'])} missing, {len(report['mismatched'])} of another shape, e.g. "
                f"{'; '.join(problems)}): the encoder of another model size?")
        meta = report["meta"]
        origin = ", ".join(f"{key} {meta[key]:.2f}" if isinstance(meta[key], float) else f"{key} {meta[key]}"
                           for key in ("epoch", "top1") if key in meta)
        log.info("model.encoder_weights %s (encoder format%s): all %d encoder tensors loaded", path,
                 f"; {origin}" if origin else "", total)
        if report["unexpected"]:
            log.warning("model.encoder_weights: %d tensors not of this encoder ignored: %s", len(report["unexpected"]),
                        ", ".join(report["unexpected"][:8]) + (" ..." if len(report["unexpected"]) > 8 else ""))
        return report
    log.info("encoder weights %s (%s format): %d tensors loaded", path, report["format"], report["loaded"])
    classifier = _classifier_tensors(report, checkpoint_num_classes(obj), model.num_classes)
    if classifier:
        log.info(_fresh_classifier_line("model.encoder_weights", path, report, classifier, model.num_classes))
        report = {**report, "mismatched": [m for m in report["mismatched"] if m.split(":")[0] not in classifier]}
    for what in ("missing", "unexpected", "mismatched"):
        if report[what]:
            shown = ", ".join(report[what][:8]) + (" ..." if len(report[what]) > 8 else "")
            log.warning("encoder weights: %d %s: %s", len(report[what]), what, shown)
    return report


# ``model`` config keys that are no EDAFormer constructor argument
_NOT_MODEL_ARGUMENTS = ("name", "num_classes", "encoder_weights", "init_from")


def _classifier_tensors(report: Mapping[str, Any], found: int | None, num_classes: int) -> dict[str, tuple]:
    """The tensors of a loading report that differ only in the class count (``found`` in the
    checkpoint, ``num_classes`` in the model): the classifier's, by name with both shapes."""
    if found is None or found == num_classes:
        return {}
    return {k: (old, new) for k, (old, new) in report.get("shapes", {}).items()
            if old[:1] == (found,) and new[:1] == (num_classes,) and old[1:] == new[1:]}


def _fresh_classifier_line(key: str, path: Any, report: Mapping[str, Any], classifier: Mapping[str, tuple],
                           num_classes: int) -> str:
    """The one line that says a checkpoint of another class count was loaded without its classifier."""
    found = next(iter(classifier.values()))[0][0]
    shapes = ", ".join(f"{k} {tuple(old)} -> {tuple(new)}" for k, (old, new) in classifier.items())
    return (f"{key} {path} was trained for {found} classes, this model has {num_classes}: {report['loaded']} "
            f"tensors loaded, the classifier re-initialised ({shapes})")


def load_init_from(model: nn.Module, path: str | os.PathLike) -> dict[str, Any]:
    """Load all weights of the trained checkpoint ``path`` (a file or a shipped model's name) into
    ``model`` (``model.init_from``).

    The checkpoint must be a whole segmentor: an encoder-only file raises
    :class:`CheckpointMismatchError` naming the file; any missing, unexpected or mis-shaped
    tensor too (strict loading). Trained for another class count (fine-tuning to one's own
    classes), it loads everything but the classifier, which keeps its fresh initialisation, and
    says so in one line naming those tensors and their shapes.
    """
    obj = read_checkpoint(path)
    found = checkpoint_num_classes(obj)
    if found is None:
        raise CheckpointMismatchError(f"model.init_from {path} holds no classifier (an encoder-only checkpoint?): "
                                      "it must be a whole trained model; an ImageNet encoder goes in model.encoder_weights")
    if found != model.num_classes:
        return _load_but_the_classifier(model, obj, path, found)
    try:
        report = load_checkpoint(model, obj, strict=True)
    except CheckpointMismatchError as e:
        raise CheckpointMismatchError(f"model.init_from {path}: {e}") from None
    meta = report["meta"]
    origin = ", ".join(f"{key} {meta[key]}" for key in (ITERATION, MIOU, ISR) if key in meta)
    log.info("init_from %s (%s format%s): all %d tensors loaded", path, report["format"],
             f"; {origin}" if origin else "", report["loaded"])
    return report


def _load_but_the_classifier(model: nn.Module, obj: Mapping[str, Any], path: Any, found: int) -> dict[str, Any]:
    """``model.init_from`` of another class count: every tensor but the classifier's, strictly."""
    report = load_checkpoint(model, obj, strict=False)
    classifier = _classifier_tensors(report, found, model.num_classes)
    others = [m for m in report["mismatched"] if m.split(":")[0] not in classifier]
    if report["missing"] or report["unexpected"] or others or not classifier:
        problems = others[:3] + [f"{k} missing" for k in report["missing"][:3]] + \
            [f"{k} unexpected" for k in report["unexpected"][:3]]
        raise CheckpointMismatchError(f"model.init_from {path} (trained for {found} classes; the model has "
                                      f"{model.num_classes}) does not match the model beyond its classifier: "
                                      f"{'; '.join(problems) or 'no classifier tensor found'}")
    log.info(_fresh_classifier_line("model.init_from", path, report, classifier, model.num_classes))
    return report


def build_datasets(data_cfg: Mapping[str, Any]) -> tuple[SegmentationDataset, SegmentationDataset]:
    """The training and validation datasets of a config's ``data`` section."""
    dataset_cfg = dataset_config(data_cfg)
    return build_dataset(dataset_cfg, "train"), build_dataset(dataset_cfg, "val")


def build_train_loader(train_set: SegmentationDataset, data_cfg: Mapping[str, Any], distributed: bool,
                       seed: int) -> DataLoader:
    """The shuffled, seeded training loader (per-process batches, incomplete last batch dropped;
    ``data.workers`` at most the CPU count)."""
    return build_dataloader(train_set, data_cfg["batch_size"], shuffle=True,
                            workers=usable_workers(data_cfg["workers"]), distributed=distributed, seed=seed,
                            drop_last=True)


def build_param_groups(model: nn.Module, lr: float, weight_decay: float,
                       decoder_lr_mult: float = 10.0) -> list[dict[str, Any]]:
    """AdamW parameter groups: encoder / decoder (lr x ``decoder_lr_mult``), each split into
    decayed parameters and normalization parameters (``model.no_weight_decay()``, no decay)."""
    no_decay = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    groups: dict[str, dict[str, Any]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        part = "decoder" if name.startswith("decoder.") else "encoder"
        decay = name not in no_decay
        key = part if decay else f"{part}_no_decay"
        if key not in groups:
            groups[key] = dict(name=key, params=[], lr=lr * (decoder_lr_mult if part == "decoder" else 1.0),
                               weight_decay=weight_decay if decay else 0.0)
        groups[key]["params"].append(param)
    order = ("encoder", "encoder_no_decay", "decoder", "decoder_no_decay")
    return [groups[k] for k in order if k in groups]


# ``optim.impl``: torch.optim.AdamW's implementation arguments (auto: foreach on CUDA, a loop on CPU)
ADAMW_IMPLS = {"auto": {}, "loop": dict(foreach=False), "foreach": dict(foreach=True), "fused": dict(fused=True)}


def build_optimizer(model: nn.Module, optim_cfg: Mapping[str, Any]) -> torch.optim.AdamW:
    """AdamW over :func:`build_param_groups` from the ``optim`` config section, with the
    implementation of ``optim.impl`` (the same update up to rounding; build it after the model
    is on its device: ``fused`` checks that torch has the kernel there)."""
    groups = build_param_groups(model, optim_cfg["lr"], optim_cfg["weight_decay"], optim_cfg["decoder_lr_mult"])
    impl = optim_cfg.get("impl", "auto")
    if impl not in ADAMW_IMPLS:
        raise ValueError(f"optim.impl must be one of {', '.join(ADAMW_IMPLS)}, got {impl!r}")
    try:
        return torch.optim.AdamW(groups, lr=optim_cfg["lr"], betas=tuple(optim_cfg["betas"]),
                                 eps=optim_cfg.get("eps", 1e-8), weight_decay=optim_cfg["weight_decay"],
                                 **ADAMW_IMPLS[impl])
    except RuntimeError as e:
        if impl != "fused":
            raise
        raise ValueError(f"optim.impl=fused: torch {torch.__version__} has no fused AdamW for these parameters "
                         f"({e}); use optim.impl=foreach") from None


class WarmupPolyLR:
    """Learning-rate factor at iteration ``i`` (0-based) for a group whose base lr is ``base_lr``.

    ``poly(i) = ((base_lr - min_lr) * (1 - i / iters) ** power + min_lr) / base_lr``; during the
    first ``warmup_iters`` iterations it is scaled by ``1 - (1 - i / warmup_iters) * (1 - warmup_ratio)``,
    i.e. linear from ``warmup_ratio`` (mmcv's linear warmup). The schedule is per optimizer step,
    so it is the same for any number of processes.

    ``restarts``: iterations where an earlier, shorter schedule ended (a run continued with a longer
    ``iters``). Before ``restarts[k]`` the decay runs to ``min_lr`` at ``restarts[k]``; from there
    ``i / iters`` is used again, so the rate steps back up onto the longer schedule's curve. Restarts
    at or after ``iters`` are never reached (a shortened run of the same config is a plain poly).
    """

    def __init__(self, base_lr: float, iters: int, warmup_iters: int = 1500, warmup_ratio: float = 1e-6,
                 power: float = 1.0, min_lr: float = 0.0, restarts: Sequence[int] | None = None):
        self.base_lr, self.iters, self.warmup_iters = float(base_lr), int(iters), int(warmup_iters)
        self.warmup_ratio, self.power, self.min_lr = float(warmup_ratio), float(power), float(min_lr)
        self.restarts = tuple(int(r) for r in restarts or () if int(r) < self.iters)

    def __call__(self, i: int) -> float:
        if self.base_lr <= 0:
            return 0.0
        end = next((r for r in self.restarts if i < r), self.iters)
        progress = min(i, end) / end
        factor = ((self.base_lr - self.min_lr) * (1.0 - progress) ** self.power + self.min_lr) / self.base_lr
        if i < self.warmup_iters:
            factor *= 1.0 - (1.0 - i / self.warmup_iters) * (1.0 - self.warmup_ratio)
        return factor


def build_scheduler(optimizer: torch.optim.Optimizer,
                    schedule_cfg: Mapping[str, Any]) -> torch.optim.lr_scheduler.LambdaLR:
    """A ``LambdaLR`` with one :class:`WarmupPolyLR` per parameter group; call ``step()`` per iteration."""
    lambdas = [WarmupPolyLR(group["lr"], schedule_cfg["iters"], schedule_cfg["warmup_iters"],
                            schedule_cfg["warmup_ratio"], schedule_cfg["power"], schedule_cfg["min_lr"],
                            schedule_cfg.get("restarts"))
               for group in optimizer.param_groups]
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambdas)


def resolve_amp(amp: Any, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of ``train.amp`` on ``device`` (None: full precision; CUDA only)."""
    if amp in (None, False, "none", "false"):
        return None
    if device.type != "cuda":
        warnings.warn(f"train.amp={amp} needs CUDA; training in float32 on {device.type}", stacklevel=3)
        return None
    if amp == "bf16":
        return torch.bfloat16
    if amp == "fp16":
        return torch.float16
    raise ValueError(f"train.amp must be false, bf16 or fp16, got {amp!r}")
