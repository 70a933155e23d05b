"""ImageNet-style pretraining of the EFT encoder as a classifier: the PVTv2 (DeiT) recipe on timm's parts.

Run it with ``edaformer pretrain eft-t-imagenet --set data.root=/data/imagenet`` or under
``torchrun --nproc-per-node N`` (``--nnodes`` for several machines). Everything the recipe is
made of comes from timm: ``create_dataset`` (folders, tar files, Hugging Face datasets,
webdataset shards), ``create_transform`` (random-resized crop, flip, RandAugment, random
erasing), ``Mixup`` (Mixup and CutMix with label smoothing), ``SoftTargetCrossEntropy`` /
``LabelSmoothingCrossEntropy``, ``create_optimizer_v2`` (AdamW, no decay on biases and norms),
``create_scheduler_v2`` (warm-up then cosine), ``RepeatAugSampler`` and ``ModelEmaV3``.

The run discipline is segmentation training's: one run per work dir (a lock), ``--resume auto``
from the newest good checkpoint (``iter_<n>.pth`` / ``latest.pth``, ``n`` the update count,
written at every epoch end and every ``train.checkpoint_minutes``), SIGTERM / SIGINT stop after
the current update with a checkpoint, an unreadable image is named, ``log.jsonl`` holds the
training records and the validation top-1 / top-5 of every epoch. After every validation the
validated weights (the EMA's when ``ema.enabled``) are written to ``encoder.pth``: a classifier
state dict (``stages.*``, ``head.*``) that segmentation training loads through
``model.encoder_weights`` and timm through ``pretrained_cfg_overlay=dict(file=...)``.

A resumed run continues exactly where it stopped (same weights as an uninterrupted run) when
the loader has no workers (``data.workers=0``: the augmentations then draw from the restored
random state); with workers, the data order is the same and their random draws restart.
"""
from __future__ import annotations

import contextlib
import errno
import logging
import math
import os
import signal
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import timm
import torch
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, Mixup
from timm.data.distributed_sampler import RepeatAugSampler
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.models import get_pretrained_cfg
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3, accuracy
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, IterableDataset, Subset
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from .. import models  # noqa: F401  (registers the EFT encoders with timm)
from ..checkpoint import CheckpointWriteError, read_checkpoint, save_checkpoint
from ..config import save_config
from ..data import SkipBatches, seed_worker
from ..data.classification import build_classification_dataset, eval_transform, train_transform
from ..data.datasets import DatasetError
from ..meta import native_checkpoint
from ..utils import all_finite, flatten_dict, unwrap_model
from .builders import resolve_amp
from .distributed import (DistInfo, all_gather_object, all_reduce_mean, broadcast_object, cleanup_distributed, get_rank,
                          get_world_size, init_distributed, is_distributed, on_main)
from .runlog import JsonLog, memory_mb
from .signals import StopRequest, TrainingInterrupted
from .state import capture_rng_state, restore_rng_state, seed_everything, write_training_checkpoint
from .train import NonFiniteLossError
from .workdir import check_free_space, open_work_dir

__all__ = ["pretrain", "PretrainState", "build_classifier", "build_pretrain_data", "build_mixup", "build_criterion",
           "build_pretrain_optimizer", "build_pretrain_scheduler", "evaluate_classifier", "export_encoder",
           "ENCODER_FILE"]

log = logging.getLogger("edaformer")

ENCODER_FILE = "encoder.pth"


# -- building blocks ----------------------------------------------------------------------------
def build_classifier(model_cfg: Mapping[str, Any], num_classes: int) -> nn.Module:
    """``timm.create_model`` from the ``model`` section (``eft_t`` / ``eft_b`` or any timm classifier)."""
    return timm.create_model(model_cfg["name"], num_classes=num_classes, drop_rate=model_cfg["drop_rate"],
                             drop_path_rate=model_cfg["drop_path_rate"])


def _mean_std(name: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The normalisation the model's timm config declares (ImageNet's by default)."""
    cfg = get_pretrained_cfg(name)
    mean, std = getattr(cfg, "mean", None) or IMAGENET_DEFAULT_MEAN, getattr(cfg, "std", None) or IMAGENET_DEFAULT_STD
    return tuple(mean), tuple(std)


def build_pretrain_data(data_cfg: Mapping[str, Any], mean, std, seed: int = 0) -> tuple[Dataset, Dataset, int | None]:
    """The training and validation sets with their transforms, and the class count (None when the
    data cannot tell: streaming datasets). The validation set keeps the training set's numbering."""
    train_set = build_classification_dataset(data_cfg, "train", train_transform(data_cfg, mean, std), is_training=True,
                                             class_map=data_cfg["class_map"], seed=seed,
                                             batch_size=data_cfg["batch_size"])
    class_to_idx = getattr(train_set, "class_to_idx", None)
    val_set = build_classification_dataset(data_cfg, "val", eval_transform(data_cfg, mean, std), is_training=False,
                                           class_map=data_cfg["class_map"] or class_to_idx or None,
                                           batch_size=data_cfg["batch_size"])
    return train_set, val_set, (len(class_to_idx) if class_to_idx else None)


def build_mixup(mixup_cfg: Mapping[str, Any], label_smoothing: float, num_classes: int):
    """``timm.data.Mixup`` (None when both alphas are 0)."""
    if mixup_cfg["mixup_alpha"] <= 0 and mixup_cfg["cutmix_alpha"] <= 0:
        return None
    return Mixup(mixup_alpha=mixup_cfg["mixup_alpha"], cutmix_alpha=mixup_cfg["cutmix_alpha"], prob=mixup_cfg["prob"],
                 switch_prob=mixup_cfg["switch_prob"], mode=mixup_cfg["mode"], label_smoothing=label_smoothing,
                 num_classes=num_classes)


def build_criterion(mixup: Any, label_smoothing: float) -> nn.Module:
    """Soft-target cross-entropy after Mixup (which smooths the labels), else label smoothing, else CE."""
    if mixup is not None:
        return SoftTargetCrossEntropy()
    if label_smoothing > 0:
        return LabelSmoothingCrossEntropy(smoothing=label_smoothing)
    return nn.CrossEntropyLoss()


def build_pretrain_optimizer(model: nn.Module, optim_cfg: Mapping[str, Any]) -> torch.optim.Optimizer:
    """``timm.optim.create_optimizer_v2``; biases, norms and ``no_weight_decay()`` get no decay."""
    return create_optimizer_v2(model, opt=optim_cfg["name"], lr=optim_cfg["lr"], weight_decay=optim_cfg["weight_decay"],
                               eps=optim_cfg["eps"], betas=tuple(optim_cfg["betas"]))


def build_pretrain_scheduler(optimizer: torch.optim.Optimizer, schedule_cfg: Mapping[str, Any], updates_per_epoch: int):
    """``timm.scheduler.create_scheduler_v2``: linear warm-up from ``warmup_lr``, then the decay
    to ``min_lr``; per epoch (``step(epoch)``) or per update (``step_update(n)``)."""
    scheduler, _ = create_scheduler_v2(
        optimizer, sched=schedule_cfg["name"], num_epochs=schedule_cfg["epochs"],
        decay_epochs=schedule_cfg["decay_epochs"], cooldown_epochs=schedule_cfg["cooldown_epochs"],
        min_lr=schedule_cfg["min_lr"], warmup_lr=schedule_cfg["warmup_lr"], warmup_epochs=schedule_cfg["warmup_epochs"],
        step_on_epochs=schedule_cfg["step_on_epochs"], updates_per_epoch=updates_per_epoch)
    return scheduler


# -- the state -----------------------------------------------------------------------------------
@dataclass
class PretrainState:
    """Everything a resumed run needs: weights, optimizer moments, loss scaler, EMA, the update
    count and position in the epoch, the best top-1 so far and every process's random state.
    The learning rate is a function of (epoch, update) and is not stored."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    ema: Any = None
    iteration: int = 0
    epoch: int = 0
    epoch_step: int = 0
    updates_per_epoch: int = 0
    best_top1: float = -1.0
    epoch_loss: float = 0.0          # the sum of this epoch's update losses so far
    pending_eval: bool = False       # stopped at an epoch's end before its validation
    rng_states: list[dict[str, Any]] | None = None

    def state_dict(self) -> dict[str, Any]:
        return {"state_dict": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scaler": self.scaler.state_dict(), "ema": self.ema.module.state_dict() if self.ema else None,
                "iteration": self.iteration, "epoch": self.epoch, "epoch_step": self.epoch_step,
                "updates_per_epoch": self.updates_per_epoch, "best_top1": self.best_top1,
                "epoch_loss": self.epoch_loss, "pending_eval": self.pending_eval, "rng": self.rng_states,
                "world_size": len(self.rng_states) if self.rng_states else 1}

    def load_state_dict(self, ckpt: Mapping[str, Any]) -> None:
        """Restore from ``ckpt``; the optimizer's hyper-parameters stay the config's."""
        self.model.load_state_dict(ckpt["state_dict"])
        configured = [{k: v for k, v in g.items() if k != "params"} for g in self.optimizer.param_groups]
        self.optimizer.load_state_dict(ckpt["optimizer"])
        for group, settings in zip(self.optimizer.param_groups, configured):
            group.update(settings)
        if ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
        if self.ema is not None:
            if ckpt.get("ema"):
                self.ema.module.load_state_dict(ckpt["ema"])
            else:
                log.warning("the checkpoint holds no EMA weights: the EMA starts from the current weights")
                self.ema.set(self.model)
        self.iteration, self.epoch = int(ckpt["iteration"]), int(ckpt["epoch"])
        self.epoch_step = int(ckpt["epoch_step"])
        saved_per_epoch = int(ckpt.get("updates_per_epoch") or self.updates_per_epoch)
        if saved_per_epoch != self.updates_per_epoch and self.epoch_step:
            step = round(self.epoch_step * self.updates_per_epoch / saved_per_epoch)
            log.warning("the checkpoint was written with %d updates per epoch, this run has %d (another global "
                        "batch): epoch %d continues at update %d of %d", saved_per_epoch, self.updates_per_epoch,
                        self.epoch + 1, step, self.updates_per_epoch)
            self.epoch_step = step
        self.best_top1 = float(ckpt.get("best_top1", -1.0))
        self.epoch_loss = float(ckpt.get("epoch_loss", 0.0))
        self.pending_eval = bool(ckpt.get("pending_eval", False))
        self.rng_states = ckpt.get("rng")

    def restore_rng(self, rank: int, world_size: int, seed: int) -> None:
        if self.rng_states is not None and len(self.rng_states) == world_size:
            restore_rng_state(self.rng_states[rank])
            return
        if self.rng_states is not None:
            log.warning("checkpoint holds random states of %d processes, running %d: reseeding",
                        len(self.rng_states), world_size)
        seed_everything(seed + rank + 1_000_003 * self.iteration)


def _model_name(cfg: Mapping[str, Any]) -> str:
    return str(cfg["model"]["name"])




def _payload(state: PretrainState, cfg: Mapping[str, Any], meta: Mapping[str, Any]) -> dict[str, Any]:
    ckpt = native_checkpoint({}, _model_name(cfg), getattr(state.model, "num_classes", None), meta, cfg)
    return {**ckpt, **state.state_dict(), "task": "pretrain"}


def export_encoder(model: nn.Module, path: str | os.PathLike, name: str, meta: Mapping[str, Any]) -> Path:
    """Write ``model``'s classifier state dict (``stages.*``, ``head.*``) as a checkpoint of this
    library's format (atomic, with a checksum): segmentation's ``model.encoder_weights`` loads its
    encoder tensors, ``timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=path))``
    the whole classifier (for another class count than 1000, pass ``num_classes`` too)."""
    net = unwrap_model(model)
    state_dict = {k: v.detach().cpu() for k, v in net.state_dict().items()}
    return save_checkpoint(native_checkpoint(state_dict, name, getattr(net, "num_classes", None), meta), path)


# -- data order ---------------------------------------------------------------------------------


def _train_loader(dataset: Dataset, data_cfg: Mapping[str, Any], info: DistInfo, seed: int) -> DataLoader:
    """Per-process batches, the incomplete last one dropped; map-style sets go through the
    repeated-augmentation sampler (``data.repeated_aug`` > 1) or a seeded shuffling sampler, both
    a function of the epoch alone."""
    sampler = None
    if not isinstance(dataset, IterableDataset):
        if data_cfg["repeated_aug"] > 1:
            sampler = RepeatAugSampler(dataset, num_replicas=info.world_size, rank=info.rank,
                                       num_repeats=data_cfg["repeated_aug"])
        else:
            sampler = DistributedSampler(dataset, num_replicas=info.world_size, rank=info.rank, shuffle=True,
                                         seed=seed, drop_last=True)
    workers = data_cfg["workers"]
    return DataLoader(dataset, batch_size=data_cfg["batch_size"], sampler=sampler, num_workers=workers,
                      pin_memory=info.device.type == "cuda", drop_last=True, generator=torch.Generator(),
                      worker_init_fn=seed_worker, persistent_workers=workers > 0)


def _epoch_batches(loader: DataLoader, epoch: int, skip: int, seed: int, rank: int) -> Iterator[Any]:
    """The batches of ``epoch`` from batch ``skip`` on; the order and the workers' seeds are a
    function of (seed, epoch, rank)."""
    if hasattr(loader.sampler, "set_epoch"):
        loader.sampler.set_epoch(epoch)
    if hasattr(loader.dataset, "set_epoch"):
        loader.dataset.set_epoch(epoch)
    loader.generator.manual_seed(seed + rank + 10_007 * (epoch + 1))
    if not skip:
        yield from loader
    elif loader.batch_sampler is not None:
        yield from DataLoader(loader.dataset, batch_sampler=SkipBatches(loader.batch_sampler, skip),
                              num_workers=loader.num_workers, pin_memory=loader.pin_memory,
                              worker_init_fn=loader.worker_init_fn, generator=loader.generator)
    else:  # a streaming dataset: read past the batches done
        for i, batch in enumerate(loader):
            if i >= skip:
                yield batch


def _updates_per_epoch(loader: DataLoader) -> int:
    try:
        return len(loader)
    except TypeError:
        raise ValueError("the training set cannot tell its length (a streaming dataset without a size): "
                         "set data.num_samples") from None


def _next(batches: Iterator[Any]) -> Any:
    """The next batch, or None at the epoch's end; a data error raised in a loader worker comes
    out as its own one-line message."""
    try:
        return next(batches)
    except StopIteration:
        return None
    except DatasetError as e:
        text = str(e)
        if "Original Traceback" not in text:
            raise
        last = [line for line in text.splitlines() if line.strip()][-1]
        raise DatasetError(last.split("Error: ", 1)[-1] + " (in a data loader worker)") from None


# -- validation ---------------------------------------------------------------------------------
@torch.no_grad()
def evaluate_classifier(model: nn.Module, dataset: Dataset, device: torch.device, batch_size: int = 64,
                        workers: int = 0, amp_dtype: torch.dtype | None = None) -> dict[str, float]:
    """Top-1 / top-5 accuracy (percent) and the mean cross-entropy over ``dataset``; under
    ``torch.distributed`` each process takes every ``world_size``-th image and the counts are summed."""
    was_training = model.training
    model.eval()
    world, rank = get_world_size(), get_rank()
    if world > 1 and not isinstance(dataset, IterableDataset):
        dataset = Subset(dataset, range(rank, len(dataset), world))
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers,
                        pin_memory=device.type == "cuda")
    totals = torch.zeros(4, dtype=torch.float64)  # images, top-1 hits, top-5 hits, loss sum
    for images, targets in loader:
        images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else contextlib.nullcontext():
            logits = model(images)
        logits = logits.float()
        k = min(5, logits.shape[1])
        top1, topk = accuracy(logits, targets, topk=(1, k))
        n = len(targets)
        totals += torch.tensor([n, float(top1) * n / 100, float(topk) * n / 100,
                                float(F.cross_entropy(logits, targets, reduction="sum"))], dtype=torch.float64)
    if world > 1:
        totals = all_reduce_mean(totals) * world
    model.train(was_training)
    n = max(float(totals[0]), 1.0)
    return {"top1": 100 * float(totals[1]) / n, "top5": 100 * float(totals[2]) / n, "loss": float(totals[3]) / n,
            "images": int(round(float(totals[0])))}


# -- the work dir --------------------------------------------------------------------------------
_FIXED_KEYS = ("model.name", "model.num_classes", "data.dataset", "data.train_split", "data.class_map")


def _check_resume(ckpt: Mapping[str, Any], cfg: Mapping[str, Any], path: Path) -> list[str]:
    """The config changes since checkpoint ``path`` (``key: old -> new``); another model, class
    set or training data, or fewer epochs than done, raise ``ValueError``."""
    if ckpt.get("task") != "pretrain":
        raise ValueError(f"{path} is not a pretraining checkpoint (written by `edaformer train`?)")
    done = int(ckpt["epoch"])
    if cfg["schedule"]["epochs"] < done:
        raise ValueError(f"schedule.epochs={cfg['schedule']['epochs']} is below the {done} epochs of {path}")
    old, new = flatten_dict(ckpt.get("config") or {}), flatten_dict(cfg)
    changed = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
    fixed = [k for k in changed if k in _FIXED_KEYS]
    if fixed:
        shown = "; ".join(f"{k} is {new.get(k)!r} but {old.get(k)!r} in the checkpoint" for k in fixed)
        raise ValueError(f"cannot resume from {path} with another model or training data: {shown}. Use the "
                         "checkpoint's config, or start a new run in another --work-dir")
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in changed]


# -- pretraining ---------------------------------------------------------------------------------
def pretrain(cfg: Mapping[str, Any], work_dir: str | os.PathLike, resume: str | None = None,
             device: str | None = None, *, force: bool = False) -> dict[str, Any]:
    """Pretrain a classifier from a validated pretraining config (``edaformer.config.PRETRAINING``).

    ``resume``: None (a fresh run; a work dir holding an earlier run is refused unless ``force``,
    which moves its files aside), ``"auto"`` (the newest loadable checkpoint in ``work_dir``, if
    any) or a checkpoint path. Returns ``top1`` / ``top5`` (percent, the last validation),
    ``checkpoint`` (the ``encoder.pth`` path), ``epochs``, ``iteration``, ``ema`` and ``work_dir``.
    On SIGTERM / SIGINT raises :class:`~edaformer.engine.signals.TrainingInterrupted` after
    writing a checkpoint.
    """
    owns_group = not is_distributed()
    flags = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
             torch.backends.cudnn.benchmark)
    info = init_distributed(device)
    try:
        with StopRequest() as stop, contextlib.ExitStack() as cleanup:
            return _pretrain(cfg, Path(work_dir), resume, info, force, stop, cleanup)
    finally:
        torch.use_deterministic_algorithms(flags[0], warn_only=flags[1])
        torch.backends.cudnn.benchmark = flags[2]
        if owns_group:
            cleanup_distributed()


def _after_update(iteration: int) -> None:
    """Called after every update (a seam for tests that stop a run at a given update)."""


def _pretrain(cfg: Mapping[str, Any], work_dir: Path, resume: str | None, info: DistInfo, force: bool,
              stop: StopRequest, cleanup: contextlib.ExitStack) -> dict[str, Any]:
    dev, main = info.device, info.is_main
    if not main:
        log.setLevel(logging.WARNING)
    tcfg, data_cfg, scfg, seed = cfg["train"], cfg["data"], cfg["schedule"], cfg["train"]["seed"]
    epochs = scfg["epochs"]
    amp_dtype = resolve_amp(tcfg["amp"], dev)
    if tcfg["deterministic"]:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    elif dev.type == "cuda":
        torch.backends.cudnn.benchmark = True

    # data, then the work dir (lock, earlier run, resume checkpoint, config check) before any write
    mean, std = _mean_std(_model_name(cfg))
    train_set, val_set, found_classes = build_pretrain_data(data_cfg, mean, std, seed)
    num_classes = cfg["model"]["num_classes"] or found_classes
    if num_classes is None:
        raise ValueError("the training set does not tell its class count: set model.num_classes")
    if found_classes is not None and found_classes != num_classes:
        raise ValueError(f"model.num_classes is {num_classes} but the training set has {found_classes} classes")
    loader = _train_loader(train_set, data_cfg, info, seed)
    per_epoch = _updates_per_epoch(loader)
    if per_epoch == 0:
        raise ValueError(f"the training set ({len(train_set)} images) gives no complete batch of "
                         f"{data_cfg['batch_size']} per process")
    global_batch = data_cfg["batch_size"] * info.world_size
    lr, lr_batch = cfg["optim"]["lr"], cfg["optim"]["lr_batch"]
    log.info("data: %s train / %s val images, %d classes; batch %d x %d processes = %d; %d updates per epoch",
             _size(train_set), _size(val_set), num_classes, data_cfg["batch_size"], info.world_size, global_batch,
             per_epoch)
    if lr_batch and lr_batch != global_batch:
        log.warning("optim.lr=%g is set for a global batch of %d (optim.lr_batch), this run's is %d: the linear "
                    "rule gives --set optim.lr=%.3g (optim.lr_batch=%d, or null, silences this)", lr, lr_batch,
                    global_batch, lr * global_batch / lr_batch, global_batch)
    opened = on_main(info, open_work_dir, work_dir, resume, force,
                     lambda ckpt, path: _check_resume(ckpt, cfg, path), (ENCODER_FILE,))
    if opened is not None:
        cleanup.callback(opened["lock"].release)
    ckpt_path = broadcast_object(str(opened["found"][0]) if opened and opened["found"] else None)
    ckpt = None
    if ckpt_path is not None:
        ckpt_path = Path(ckpt_path)
        ckpt = opened["found"][1] if main else read_checkpoint(ckpt_path)

    # model and state: the same initial weights on every process
    seed_everything(seed)
    model = build_classifier(cfg["model"], num_classes)
    if tcfg["grad_checkpointing"]:
        model.set_grad_checkpointing(True)
    model.to(dev)
    optimizer = build_pretrain_optimizer(model, cfg["optim"])
    scheduler = build_pretrain_scheduler(optimizer, scfg, per_epoch)
    ema = ModelEmaV3(model, decay=cfg["ema"]["decay"], use_warmup=cfg["ema"]["warmup"]) if cfg["ema"]["enabled"] \
        else None
    state = PretrainState(model, optimizer, torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16), ema,
                          updates_per_epoch=per_epoch)
    mixup = build_mixup(cfg["mixup"], cfg["loss"]["label_smoothing"], num_classes)
    if mixup is not None and data_cfg["batch_size"] % 2:
        raise ValueError(f"Mixup / CutMix pair the images of a batch: data.batch_size must be even, got "
                         f"{data_cfg['batch_size']}")
    criterion = build_criterion(mixup, cfg["loss"]["label_smoothing"])
    log.info("model %s: %.2fM parameters, %d classes, device %s, amp %s, EMA %s", _model_name(cfg),
             sum(p.numel() for p in model.parameters()) / 1e6, num_classes, dev, amp_dtype or "off",
             cfg["ema"]["decay"] if ema else "off")
    if ckpt is not None:
        state.load_state_dict(ckpt)
        log.info("resumed from %s at update %d (epoch %d, update %d of %d)", ckpt_path, state.iteration,
                 state.epoch + 1, state.epoch_step, per_epoch)
        ckpt = None
    state.restore_rng(info.rank, info.world_size, seed)
    if info.distributed:
        model = nn.parallel.DistributedDataParallel(model, device_ids=[dev.index] if dev.type == "cuda" else None)
    net = state.model
    jlog = JsonLog(work_dir / "log.jsonl" if main else None)
    if main:
        check_free_space(work_dir, 4 * sum(p.numel() * p.element_size() for p in net.parameters()))
        save_config(cfg, work_dir / "config.yaml")
        jlog.start(state.iteration)
    meta_base = dict(task="imagenet-pretrain", num_classes=num_classes, img_size=data_cfg["img_size"],
                     crop_pct=data_cfg["crop_pct"], interpolation=data_cfg["interpolation"], mean=list(mean),
                     std=list(std), classes=_class_names(train_set))
    encoder_path = work_dir / ENCODER_FILE
    last: dict[str, Any] = {}

    def save() -> Path:
        """Collective: every process gives its random state; rank 0 writes, then says how it went."""
        if not all_finite(net):
            raise NonFiniteLossError(f"non-finite weights at update {state.iteration}; not writing a checkpoint "
                                     f"(the last good one is {ckpt_path or 'none'})")
        state.rng_states = all_gather_object(capture_rng_state())
        path, error = work_dir / f"iter_{state.iteration}.pth", None
        if main:
            payload = _payload(state, cfg, dict(meta_base, iteration=state.iteration, epoch=state.epoch))
            try:
                write_training_checkpoint(payload, work_dir, tcfg["keep_checkpoints"])
            except CheckpointWriteError as e:
                error = CheckpointWriteError(e.errno, f"{e}; the last complete checkpoint is {ckpt_path or 'none'}. "
                                             "Free some space, then continue with --resume auto")
        message = broadcast_object(None if error is None else str(error))
        if message is not None:
            raise error or CheckpointWriteError(errno.ENOSPC, message)
        return path

    def validate(epoch: int, train_loss: float) -> dict[str, Any]:
        kwargs = dict(batch_size=2 * data_cfg["batch_size"], workers=min(data_cfg["workers"], 4), amp_dtype=amp_dtype)
        metrics = evaluate_classifier(net, val_set, dev, **kwargs)
        record = dict(epoch=epoch, iter=state.iteration, mode="val", top1=metrics["top1"], top5=metrics["top5"],
                      loss=metrics["loss"], train_loss=train_loss)
        exported, result = net, metrics
        if ema is not None:
            ema_metrics = evaluate_classifier(ema.module, val_set, dev, **kwargs)
            record.update(ema_top1=ema_metrics["top1"], ema_top5=ema_metrics["top5"], ema_loss=ema_metrics["loss"])
            exported, result = ema.module, ema_metrics
        jlog.write(**record)
        log.info("epoch %d/%d validation: top-1 %.2f  top-5 %.2f  loss %.4f%s", epoch, epochs, metrics["top1"],
                 metrics["top5"], metrics["loss"], f"  (EMA top-1 {result['top1']:.2f}  top-5 {result['top5']:.2f})"
                 if ema is not None else "")
        state.best_top1 = max(state.best_top1, result["top1"])
        error = None
        if main:
            try:
                export_encoder(exported, encoder_path, _model_name(cfg),
                               dict(meta_base, epoch=epoch, iteration=state.iteration, top1=result["top1"],
                                    top5=result["top5"], ema=ema is not None))
            except CheckpointWriteError as e:
                error = f"{e}; free some space, then continue with --resume auto"
        message = broadcast_object(error)
        if message is not None:
            raise CheckpointWriteError(errno.ENOSPC, message)
        return result

    model.train()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    cleanup.enter_context(logging_redirect_tqdm())
    last_save = time.monotonic()
    param_dtype = next(net.parameters()).dtype
    if state.pending_eval:  # the validation a stop at the epoch's end left out
        last = validate(state.epoch, state.epoch_loss / per_epoch)
        state.pending_eval, state.epoch_loss = False, 0.0
    if state.epoch >= epochs:
        log.info("the checkpoint is at epoch %d = schedule.epochs: nothing to train", state.epoch)
    while state.epoch < epochs:
        epoch, skip = state.epoch, state.epoch_step
        scheduler.step(epoch)
        batches = _epoch_batches(loader, epoch, skip, seed, info.rank)
        bar = tqdm(total=per_epoch * global_batch, initial=skip * global_batch, unit="img", unit_scale=True,
                   desc=f"epoch {epoch + 1}/{epochs}", disable=not main, dynamic_ncols=True, leave=False)
        window = dict(loss=0.0, n=0, time=0.0, data_time=0.0)
        if not skip:
            state.epoch_loss = 0.0
        t_end = time.perf_counter()
        stopping = False
        while state.epoch_step < per_epoch:
            batch = _next(batches)
            if batch is None:
                break
            images, targets = batch[0], batch[1]
            images = images.to(dev, dtype=param_dtype, non_blocking=True)
            targets = targets.to(dev, non_blocking=True)
            t_data = time.perf_counter()
            scheduler.step_update(state.iteration)
            lr = optimizer.param_groups[0]["lr"]
            if mixup is not None:
                images, targets = mixup(images, targets)
            with torch.autocast(dev.type, dtype=amp_dtype) if amp_dtype else contextlib.nullcontext():
                loss = criterion(model(images), targets)
            time_due = main and tcfg["checkpoint_minutes"] > 0 and \
                time.monotonic() - last_save >= 60 * tcfg["checkpoint_minutes"]
            shared = torch.tensor([float(loss.detach()), float(stop.requested), float(time_due)], dtype=torch.float64)
            loss_value, stopping, time_due = all_reduce_mean(shared.to(dev)).tolist()
            stopping, time_due = stopping > 0, time_due > 0
            if not math.isfinite(loss_value):
                raise NonFiniteLossError(f"loss is {loss_value} at update {state.iteration + 1} (epoch {epoch + 1}); "
                                         "stopping, the weights were not updated with it. The last good checkpoint "
                                         f"is {ckpt_path or 'none (none written yet)'}")
            optimizer.zero_grad(set_to_none=True)
            state.scaler.scale(loss).backward()
            if cfg["optim"]["clip_grad"]:
                state.scaler.unscale_(optimizer)
                nn.utils.clip_grad_norm_(net.parameters(), cfg["optim"]["clip_grad"])
            state.scaler.step(optimizer)
            state.scaler.update()
            state.iteration += 1
            state.epoch_step += 1
            if ema is not None:
                ema.update(net, step=state.iteration)
            _after_update(state.iteration)
            t_now = time.perf_counter()
            window["loss"] += loss_value
            window["n"] += 1
            window["time"] += t_now - t_end
            window["data_time"] += t_data - t_end
            state.epoch_loss += loss_value
            bar.update(global_batch)
            if state.iteration % tcfg["log_interval"] == 0 or state.epoch_step == per_epoch or stopping:
                n = window["n"]
                record = dict(epoch=epoch + 1, iter=state.iteration, loss=window["loss"] / n, lr=lr,
                              time=window["time"] / n, data_time=window["data_time"] / n,
                              images_per_s=global_batch * n / max(window["time"], 1e-9),
                              memory_mb=round(memory_mb(dev), 1))
                jlog.write(**record)
                bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{lr:.2e}")
                window = dict(loss=0.0, n=0, time=0.0, data_time=0.0)
            if state.epoch_step == per_epoch:
                break
            if stopping or time_due:
                if stopping:
                    log.warning("%s received: writing a checkpoint at update %d (a second signal aborts at once)",
                                signal.Signals(stop.signum or signal.SIGTERM).name, state.iteration)
                ckpt_path, last_save = save(), time.monotonic()
                if stopping:
                    bar.close()
                    raise TrainingInterrupted(stop.signum or signal.SIGTERM, state.iteration, ckpt_path)
            t_end = time.perf_counter()
        bar.close()
        if state.epoch_step < per_epoch:  # a streaming set ran out early
            log.warning("epoch %d ended after %d of %d updates", epoch + 1, state.epoch_step, per_epoch)
        updates = state.epoch_step
        state.epoch, state.epoch_step = epoch + 1, 0
        done = state.epoch
        train_loss = state.epoch_loss / max(updates, 1)
        eval_due = (tcfg["eval_interval"] and done % tcfg["eval_interval"] == 0) or done == epochs
        if stopping:  # no validation before the checkpoint: the resumed run does it first
            state.pending_eval = bool(eval_due)
            ckpt_path = save()
            raise TrainingInterrupted(stop.signum or signal.SIGTERM, state.iteration, ckpt_path)
        if eval_due:
            last = validate(done, train_loss)
        else:
            log.info("epoch %d/%d: training loss %.4f", done, epochs, train_loss)
        state.epoch_loss = 0.0
        ckpt_path, last_save = save(), time.monotonic()
        stopping = bool(all_reduce_mean(torch.tensor(float(stop.requested), device=dev)) > 0)
        if stopping and done < epochs:
            raise TrainingInterrupted(stop.signum or signal.SIGTERM, state.iteration, ckpt_path)
    if not last:
        if main and encoder_path.is_file():
            meta = read_checkpoint(encoder_path).get("meta") or {}
            last = {"top1": meta.get("top1"), "top5": meta.get("top5")}
        last = broadcast_object(last)
    if main:
        log.info("done: %d epochs, top-1 %s; encoder weights in %s", epochs,
                 f"{last['top1']:.2f}" if last.get("top1") is not None else "?", encoder_path)
    return dict(top1=last.get("top1"), top5=last.get("top5"), checkpoint=str(encoder_path.resolve()), epochs=epochs,
                iteration=state.iteration, ema=ema is not None, model=_model_name(cfg), num_classes=num_classes,
                work_dir=str(work_dir), best_top1=state.best_top1)


def _size(dataset: Any) -> str:
    try:
        return str(len(dataset))
    except TypeError:
        return "?"


def _class_names(dataset: Any) -> list[str]:
    mapping = getattr(dataset, "class_to_idx", None) or {}
    return [name for name, _ in sorted(mapping.items(), key=lambda kv: kv[1])] if len(mapping) <= 1000 else []


