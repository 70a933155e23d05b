"""Iteration-based training of EDAFormer, single process or ``torchrun`` DDP.

The recipe is the reference (mmsegmentation-style) one: AdamW with the decoder at 10x the
learning rate and no weight decay on normalization parameters; linear warmup then poly decay,
stepped per iteration; pixel-wise cross-entropy (ignore index 255) on logits at crop size.

Run it with ``edaformer train CONFIG`` or ``torchrun --nproc-per-node N -m edaformer train CONFIG``.
A work dir receives ``config.yaml``, ``log.jsonl``, ``iter_<n>.pth`` / ``latest.pth`` (full
training state) and ``best_mIoU.pth`` (model only).
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import re
import time
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from ..checkpoint import FORMAT, load_checkpoint, read_checkpoint, save_checkpoint
from ..config import save_config
from ..data.datasets import IGNORE_INDEX
from ..plotting import plot_training_log
from .distributed import (DistInfo, all_gather_object, all_reduce_mean, barrier, broadcast_object,
                          cleanup_distributed, convert_sync_batchnorm, init_distributed, is_distributed)
from ..utils import unwrap_model

__all__ = ["train", "build_model", "build_param_groups", "build_optimizer", "WarmupPolyLR", "build_scheduler",
           "segmentation_loss", "capture_rng_state", "restore_rng_state", "find_resume_checkpoint",
           "NonFiniteLossError", "IGNORE_INDEX"]

log = logging.getLogger("edaformer")

_ITER_CKPT = re.compile(r"^iter_(\d+)\.pth$")


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or infinite."""


# -- model, optimizer, schedule, loss ---------------------------------------------------------
def build_model(model_cfg: Mapping[str, Any], num_classes: int, load_pretrained: bool = True) -> nn.Module:
    """``create_model`` from the ``model`` config section; optionally load the ImageNet encoder."""
    from ..models import create_model

    extra = {k: v for k, v in model_cfg.items() if k not in ("name", "num_classes", "pretrained") and v is not None}
    model = create_model(model_cfg["name"], num_classes=model_cfg.get("num_classes") or num_classes, **extra)
    path = model_cfg.get("pretrained")
    if load_pretrained and path:
        report = load_checkpoint(model, path, strict=False)
        log.info("pretrained weights %s (%s format): %d tensors loaded", path, report["format"], report["loaded"])
        for what in ("missing", "unexpected", "mismatched"):
            if report[what]:
                shown = ", ".join(report[what][:8]) + (" ..." if len(report[what]) > 8 else "")
                log.warning("pretrained weights: %d %s: %s", len(report[what]), what, shown)
    return model


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


def build_optimizer(model: nn.Module, optim_cfg: Mapping[str, Any]) -> torch.optim.AdamW:
    groups = build_param_groups(model, optim_cfg["lr"], optim_cfg["weight_decay"], optim_cfg["decoder_lr_mult"])
    return torch.optim.AdamW(groups, lr=optim_cfg["lr"], betas=tuple(optim_cfg["betas"]),
                             eps=optim_cfg.get("eps", 1e-8), weight_decay=optim_cfg["weight_decay"])


class WarmupPolyLR:
    """Learning-rate factor at iteration ``i`` (0-based) for a group whose base lr is ``base_lr``.

    ``poly(i) = ((base_lr - min_lr) * (1 - i / iters) ** power + min_lr) / base_lr``; during the
    first ``warmup_iters`` iterations it is scaled by ``1 - (1 - i / warmup_iters) * (1 - warmup_ratio)``,
    i.e. linear from ``warmup_ratio`` (mmcv's linear warmup). The schedule is per optimizer step,
    so it is the same for any number of processes.
    """

    def __init__(self, base_lr: float, iters: int, warmup_iters: int = 1500, warmup_ratio: float = 1e-6,
                 power: float = 1.0, min_lr: float = 0.0):
        self.base_lr, self.iters, self.warmup_iters = float(base_lr), int(iters), int(warmup_iters)
        self.warmup_ratio, self.power, self.min_lr = float(warmup_ratio), float(power), float(min_lr)

    def __call__(self, i: int) -> float:
        if self.base_lr <= 0:
            return 0.0
        progress = min(i, self.iters) / self.iters
        factor = ((self.base_lr - self.min_lr) * (1.0 - progress) ** self.power + self.min_lr) / self.base_lr
        if i < self.warmup_iters:
            factor *= 1.0 - (1.0 - i / self.warmup_iters) * (1.0 - self.warmup_ratio)
        return factor


def build_scheduler(optimizer: torch.optim.Optimizer, schedule_cfg: Mapping[str, Any]) -> torch.optim.lr_scheduler.LambdaLR:
    """A ``LambdaLR`` with one :class:`WarmupPolyLR` per parameter group; call ``step()`` per iteration."""
    lambdas = [WarmupPolyLR(group["lr"], schedule_cfg["iters"], schedule_cfg["warmup_iters"],
                            schedule_cfg["warmup_ratio"], schedule_cfg["power"], schedule_cfg["min_lr"])
               for group in optimizer.param_groups]
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambdas)


def segmentation_loss(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Pixel-wise cross-entropy, summed over the non-ignored pixels and divided by *all* pixels
    (mmseg 0.x ``CrossEntropyLoss`` with ``reduction='mean'``). This is finite even for a crop
    with no labelled pixel, and equal-sized per-rank batches average to the global-batch loss."""
    loss = F.cross_entropy(logits.float(), labels, ignore_index=ignore_index, reduction="sum")
    return loss / labels.numel()


# -- RNG state --------------------------------------------------------------------------------
def capture_rng_state() -> dict[str, Any]:
    """Torch (CPU, CUDA), NumPy and ``random`` states as tensors / plain types (``weights_only`` safe)."""
    _, keys, pos, has_gauss, cached = np.random.get_state()
    version, py_state, gauss_next = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else [],
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss),
                  "cached_gaussian": float(cached)},
        "python": {"version": int(version), "state": torch.tensor(py_state, dtype=torch.int64),
                   "gauss_next": gauss_next},
    }


def restore_rng_state(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    npy = state["numpy"]
    np.random.set_state(("MT19937", npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"],
                         npy["cached_gaussian"]))
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"].tolist()), py["gauss_next"]))


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# -- data order -------------------------------------------------------------------------------
class _SkipBatches:
    """A batch sampler without its first ``skip`` batches (to resume inside an epoch)."""

    def __init__(self, batch_sampler, skip: int):
        self.batch_sampler, self.skip = batch_sampler, skip

    def __iter__(self):
        for i, batch in enumerate(self.batch_sampler):
            if i >= self.skip:
                yield batch

    def __len__(self) -> int:
        return max(len(self.batch_sampler) - self.skip, 0)


def _start_epoch(loader: DataLoader, epoch: int, seed: int, rank: int) -> None:
    """Make the epoch's order and worker seeds a function of (seed, epoch, rank) alone."""
    if hasattr(loader.sampler, "set_epoch"):
        loader.sampler.set_epoch(epoch)
    if loader.generator is not None:
        loader.generator.manual_seed(seed + rank + 10_007 * (epoch + 1))


def _batches(loader: DataLoader, start_iter: int, seed: int, rank: int) -> Iterator[Any]:
    """Endless batches from ``loader``, positioned at global iteration ``start_iter``.

    Batch ``i`` is batch ``i % len(loader)`` of epoch ``i // len(loader)``. Resuming inside an
    epoch skips the sampler's first batches without loading them. With ``workers=0`` (the
    augmentations then draw from the restored main-process RNG) a resumed run sees exactly the
    batches of an uninterrupted one; with workers, the order is the same but their random
    augmentation draws restart.
    """
    epoch_len = len(loader)
    if epoch_len == 0:
        raise ValueError(f"the training set ({len(loader.dataset)} images) is smaller than one global batch")
    epoch, skip = divmod(start_iter, epoch_len)
    while True:
        _start_epoch(loader, epoch, seed, rank)
        if skip:
            partial = DataLoader(loader.dataset, batch_sampler=_SkipBatches(loader.batch_sampler, skip),
                                 num_workers=loader.num_workers, collate_fn=loader.collate_fn,
                                 pin_memory=loader.pin_memory, worker_init_fn=loader.worker_init_fn,
                                 generator=loader.generator)
            yield from partial
            skip = 0
        else:
            yield from loader
        epoch += 1


# -- checkpoints ------------------------------------------------------------------------------
def _iter_checkpoints(work_dir: Path) -> list[tuple[int, Path]]:
    found = [(int(m[1]), p) for p in work_dir.glob("iter_*.pth") if (m := _ITER_CKPT.match(p.name))]
    return sorted(found, reverse=True)


def find_resume_checkpoint(work_dir: str | os.PathLike) -> tuple[Path, dict] | None:
    """The newest training checkpoint in ``work_dir`` that loads, with its contents.

    ``latest.pth`` is tried first, then ``iter_<n>.pth`` newest first; unreadable files are
    skipped with a warning. An ``iter_<n>.pth`` newer than ``latest.pth`` (a run stopped
    between writing the two) wins.
    """
    work_dir = Path(work_dir)
    latest = work_dir / "latest.pth"
    candidates = ([latest] if latest.is_file() else []) + [p for _, p in _iter_checkpoints(work_dir)]
    best: tuple[Path, dict] | None = None
    for path in candidates:
        if best is not None and os.path.samefile(path, best[0]):
            continue  # latest.pth is a hard link to the newest iter_<n>.pth
        try:
            ckpt = read_checkpoint(path)
            if "iteration" not in ckpt or "state_dict" not in ckpt:
                raise ValueError("not a training checkpoint (no iteration / state_dict)")
        except (ValueError, OSError) as e:
            log.warning("skipping checkpoint %s: %s", path, e)
            continue
        if best is None or ckpt["iteration"] > best[1]["iteration"]:
            best = (path, ckpt)
        if path != latest:
            break
    return best


def _link_or_copy(src: Path, dst: Path, obj: Mapping[str, Any]) -> None:
    """Make ``dst`` hold the same checkpoint as ``src`` (a hard link, replaced atomically)."""
    tmp = dst.with_name(f".{dst.name}.link")
    try:
        tmp.unlink(missing_ok=True)
        os.link(src, tmp)
        os.replace(tmp, dst)
    except OSError:
        tmp.unlink(missing_ok=True)
        save_checkpoint(obj, dst)


def _all_finite(model: nn.Module) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in model.parameters())


# -- logging helpers --------------------------------------------------------------------------
def _memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        import resource
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class _JsonLog:
    """Appends one JSON object per line to ``log.jsonl`` (rank 0 only)."""

    def __init__(self, path: Path | None):
        self.path = path

    def write(self, **record: Any) -> None:
        if self.path is not None:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")


def _resolve_amp(amp: Any, device: torch.device) -> torch.dtype | None:
    if amp in (None, False, "none", "false"):
        return None
    if device.type != "cuda":
        warnings.warn(f"train.amp={amp} needs CUDA; training in float32 on {device.type}", stacklevel=2)
        return None
    if amp == "bf16":
        return torch.bfloat16
    if amp == "fp16":
        return torch.float16
    raise ValueError(f"train.amp must be false, bf16 or fp16, got {amp!r}")


# -- training ---------------------------------------------------------------------------------
def train(cfg: Mapping[str, Any], work_dir: str | os.PathLike, resume: str | None = None,
          device: str | None = None) -> dict[str, Any]:
    """Train from a validated config (see :mod:`edaformer.config`).

    ``resume``: None (fresh start), ``"auto"`` (newest loadable checkpoint in ``work_dir``, if
    any) or a checkpoint path. ``device``: ``cpu``, ``cuda`` or None (CUDA if available).
    Returns ``iteration``, ``best_mIoU`` and the last validation ``metrics``.
    """
    owns_group = not is_distributed()
    deterministic = (torch.are_deterministic_algorithms_enabled(),
                     torch.is_deterministic_algorithms_warn_only_enabled(), torch.backends.cudnn.benchmark)
    info = init_distributed(device)
    try:
        return _train(cfg, Path(work_dir), resume, info)
    finally:
        torch.use_deterministic_algorithms(deterministic[0], warn_only=deterministic[1])
        torch.backends.cudnn.benchmark = deterministic[2]
        if owns_group:
            cleanup_distributed()


def _train(cfg: Mapping[str, Any], work_dir: Path, resume: str | None, info: DistInfo) -> dict[str, Any]:
    from ..data import build_dataloader, build_dataset, test_transforms
    from ..inference.protocol import META_KEY, TestProtocol
    from .evaluate import evaluate

    dev, main = info.device, info.is_main
    if not main:
        log.setLevel(logging.WARNING)
    tcfg, data_cfg, sched = cfg["train"], cfg["data"], cfg["schedule"]
    iters, seed = sched["iters"], tcfg["seed"]
    amp_dtype = _resolve_amp(tcfg["amp"], dev)
    if main:
        work_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, work_dir / "config.yaml")
    jlog = _JsonLog(work_dir / "log.jsonl" if main else None)
    if tcfg["deterministic"]:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    elif dev.type == "cuda":
        torch.backends.cudnn.benchmark = True

    # data
    dataset_cfg = {k: v for k, v in data_cfg.items() if k not in ("batch_size", "workers")}
    train_set = build_dataset(dataset_cfg, "train")
    val_set = build_dataset(dataset_cfg, "val")
    protocol = TestProtocol.from_config(cfg)
    val_set.transforms = test_transforms(protocol.scale, protocol.size_divisor)
    loader = build_dataloader(train_set, data_cfg["batch_size"], shuffle=True, workers=data_cfg["workers"],
                              distributed=info.distributed, seed=seed, drop_last=True)
    ignore_index = getattr(train_set, "ignore_index", IGNORE_INDEX)
    log.info("data: %d train / %d val images, %d classes; batch %d x %d processes = %d; %d iterations/epoch",
             len(train_set), len(val_set), train_set.num_classes, data_cfg["batch_size"], info.world_size,
             data_cfg["batch_size"] * info.world_size, len(loader))

    # resume: rank 0 picks the checkpoint, every rank loads it
    ckpt_path, ckpt = None, None
    if resume:
        found = None
        if main:
            found = find_resume_checkpoint(work_dir) if resume == "auto" else (Path(resume), read_checkpoint(resume))
            if found is None:
                log.info("resume auto: no checkpoint in %s, starting from scratch", work_dir)
        ckpt_path = broadcast_object(str(found[0]) if found else None)
        if ckpt_path is not None:
            ckpt_path = Path(ckpt_path)
            ckpt = found[1] if main else read_checkpoint(ckpt_path)

    # model: identical initial weights on every rank (DDP also broadcasts rank 0's)
    _seed_everything(seed)
    model = build_model(cfg["model"], train_set.num_classes, load_pretrained=ckpt is None)
    if tcfg["grad_checkpointing"]:
        model.set_grad_checkpointing(True)
    model.to(dev)
    if info.distributed:
        model = convert_sync_batchnorm(model, dev)
    optimizer = build_optimizer(model, cfg["optim"])
    scheduler = build_scheduler(optimizer, sched)
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)
    log.info("model %s: %.2fM parameters, device %s, amp %s", cfg["model"]["name"],
             sum(p.numel() for p in model.parameters()) / 1e6, dev, amp_dtype or "off")

    start_iter, best_miou, rng_states = 0, -1.0, None
    if ckpt is not None:
        model.load_state_dict(ckpt["state_dict"])
        optimizer.load_state_dict(ckpt["optimizer"])
        # the schedule's shape comes from the config (e.g. a raised schedule.iters), its position
        # from the checkpoint
        scheduler.load_state_dict({**ckpt["scheduler"], "lr_lambdas": [None] * len(optimizer.param_groups)})
        for group, base_lr, factor in zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
            group["lr"] = base_lr * factor(scheduler.last_epoch)
        if ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        start_iter, best_miou = int(ckpt["iteration"]), float(ckpt.get("best_mIoU", -1.0))
        rng_states = ckpt.get("rng")
        log.info("resumed from %s at iteration %d", ckpt_path, start_iter)
        ckpt = None
    # per-rank RNG: restored, or seeded from (seed, rank, iteration)
    if rng_states is not None and len(rng_states) == info.world_size:
        restore_rng_state(rng_states[info.rank])
    else:
        if rng_states is not None:
            log.warning("checkpoint holds RNG states of %d processes, running %d: reseeding", len(rng_states),
                        info.world_size)
        _seed_everything(seed + info.rank + 1_000_003 * start_iter)

    if info.distributed:
        model = nn.parallel.DistributedDataParallel(model, device_ids=[dev.index] if dev.type == "cuda" else None)
    net = unwrap_model(model)

    def save_training_state(iteration: int) -> Path:
        """Collective: every rank contributes its RNG state; rank 0 writes."""
        if not _all_finite(net):  # same weights on every rank: all raise together
            raise NonFiniteLossError(f"non-finite weights at iteration {iteration}; not writing a checkpoint "
                                     f"(the last good one is {ckpt_path or 'none'})")
        rng = all_gather_object(capture_rng_state())
        path = work_dir / f"iter_{iteration}.pth"
        if main:
            state = {"format": FORMAT, "model": getattr(net, "name", None), "num_classes": net.num_classes,
                     "state_dict": net.state_dict(), "optimizer": optimizer.state_dict(),
                     "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "iteration": iteration,
                     "best_mIoU": best_miou, "rng": rng, "world_size": info.world_size,
                     "meta": {"iteration": iteration, "CLASSES": list(getattr(train_set, "classes", [])),
                              "PALETTE": [list(c) for c in getattr(train_set, "palette", [])],
                              META_KEY: protocol.to_dict()}}
            save_checkpoint(state, path)
            _link_or_copy(path, work_dir / "latest.pth", state)
            keep = tcfg["keep_checkpoints"]
            for _, old in (_iter_checkpoints(work_dir)[keep:] if keep > 0 else []):
                old.unlink(missing_ok=True)
        barrier()
        return path

    def validate(iteration: int) -> dict:
        nonlocal best_miou
        ecfg = cfg["eval"]
        metrics = evaluate(net, val_set, protocol, isr=ecfg["isr"], workers=min(data_cfg["workers"], 2))
        model.train()
        log.info("iter %d/%d validation: aAcc %.2f  mIoU %.2f  mAcc %.2f", iteration, iters,
                 100 * metrics["aAcc"], 100 * metrics["mIoU"], 100 * metrics["mAcc"])
        jlog.write(iter=iteration, mode="val", aAcc=metrics["aAcc"], mIoU=metrics["mIoU"], mAcc=metrics["mAcc"])
        if metrics["mIoU"] > best_miou and math.isfinite(metrics["mIoU"]):
            best_miou = metrics["mIoU"]
            if main:
                save_checkpoint({"format": FORMAT, "model": getattr(net, "name", None), "num_classes": net.num_classes,
                                 "state_dict": net.state_dict(),
                                 "meta": {"iteration": iteration, "mIoU": best_miou,
                                          "CLASSES": list(getattr(val_set, "classes", [])),
                                          "PALETTE": [list(c) for c in getattr(val_set, "palette", [])],
                                          META_KEY: protocol.to_dict()}},
                                work_dir / "best_mIoU.pth")
        return metrics

    # loop
    from tqdm import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    model.train()
    batches = _batches(loader, start_iter, seed, info.rank)
    metrics: dict = {}
    window = dict(loss=0.0, time=0.0, data_time=0.0, n=0)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    bar = tqdm(total=iters, initial=start_iter, disable=not main, dynamic_ncols=True, desc="train")
    with logging_redirect_tqdm():
        t_end = time.perf_counter()
        for it in range(start_iter, iters):
            images, labels = next(batches)
            images = images.to(dev, non_blocking=True)
            labels = labels.to(dev, non_blocking=True).long()
            t_data = time.perf_counter()
            lr = optimizer.param_groups[0]["lr"]

            with torch.autocast(dev.type, dtype=amp_dtype) if amp_dtype else contextlib.nullcontext():
                logits = model(images)
            loss = segmentation_loss(logits, labels, ignore_index)
            loss_value = float(all_reduce_mean(loss))
            if not math.isfinite(loss_value):
                bar.close()
                raise NonFiniteLossError(
                    f"loss is {loss_value} at iteration {it + 1}; stopping. The weights were not updated with it; "
                    f"the last good checkpoint is {ckpt_path or 'none (no checkpoint written yet)'}")
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()

            done = it + 1
            t_now = time.perf_counter()
            window["loss"] += loss_value
            window["time"] += t_now - t_end
            window["data_time"] += t_data - t_end
            window["n"] += 1
            t_end = t_now
            bar.update(1)
            if done % max(tcfg["log_interval"], 1) == 0 or done == iters:
                n = window["n"]
                record = dict(iter=done, loss=window["loss"] / n, lr=lr, time=window["time"] / n,
                              data_time=window["data_time"] / n, memory_mb=round(_memory_mb(dev), 1))
                jlog.write(**record)
                bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{lr:.2e}")
                window = dict(loss=0.0, time=0.0, data_time=0.0, n=0)
            if (tcfg["eval_interval"] and done % tcfg["eval_interval"] == 0) or done == iters:
                metrics = validate(done)
            if (tcfg["checkpoint_interval"] and done % tcfg["checkpoint_interval"] == 0) or done == iters:
                ckpt_path = save_training_state(done)
            t_end = time.perf_counter()
    bar.close()
    if main:
        plot_training_log(work_dir / "log.jsonl", work_dir / "curves.png", title=str(cfg["model"]["name"]))
        log.info("done: %d iterations, best mIoU %.2f; checkpoints in %s", iters, 100 * max(best_miou, 0.0), work_dir)
    return dict(iteration=iters, best_mIoU=best_miou, metrics=metrics, work_dir=str(work_dir))
