"""Iteration-based training of EDAFormer, single process or ``torchrun`` DDP.

Run it with ``edaformer train CONFIG`` or ``torchrun --nproc-per-node N -m edaformer train CONFIG``.
A work dir holds one run: ``config.yaml`` (every value used, :func:`~edaformer.effective.effective_config`),
``log.jsonl``, ``iter_<n>.pth`` / ``latest.pth`` (full training state and the resolved config) and
``best_mIoU.pth`` (model only), locked while it runs.
SIGTERM / SIGINT stop after the current step with a checkpoint; a killed run loses at most one
checkpoint interval (``train.checkpoint_interval`` iterations or ``train.checkpoint_minutes``).
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from timm.utils import ModelEmaV3
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from ..checkpoint import CheckpointWriteError, read_checkpoint, save_checkpoint
from ..config import save_config
from ..data import SkipBatches, usable_workers
from ..data.datasets import IGNORE_INDEX, DatasetError
from ..data.transforms import eval_transforms
from ..effective import effective_config
from ..meta import ITERATION, MIOU, WEIGHTS, checkpoint_meta
from ..plotting import plot_training_log
from ..protocol import TestProtocol
from ..utils import all_finite, unwrap_model
from .builders import build_datasets, build_model, build_optimizer, build_scheduler, build_train_loader, resolve_amp
from .distributed import (DistInfo, all_gather_object, all_reduce_mean, broadcast_object, cleanup_distributed,
                          convert_sync_batchnorm, init_distributed, is_distributed, on_main)
from .evaluate import evaluate
from .losses import SegmentationLoss, build_loss, segmentation_loss
from .runlog import JsonLog, memory_mb
from .signals import StopRequest, TrainingInterrupted
from .state import (TrainState, capture_rng_state, check_resume_config, checkpoint_payload, seed_everything,
                    write_training_checkpoint)
from .tensorboard import TensorBoardLog, require_tensorboard
from .workdir import check_free_space, open_work_dir

__all__ = ["train", "train_one_iteration", "validate", "NonFiniteLossError", "VERIFY_MODES"]

log = logging.getLogger("edaformer")

VERIFY_MODES = ("off", "fast", "full")


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or infinite."""


# -- data order -------------------------------------------------------------------------------


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
            partial = DataLoader(loader.dataset, batch_sampler=SkipBatches(loader.batch_sampler, skip),
                                 num_workers=loader.num_workers, collate_fn=loader.collate_fn,
                                 pin_memory=loader.pin_memory, worker_init_fn=loader.worker_init_fn,
                                 generator=loader.generator)
            yield from partial
            skip = 0
        else:
            yield from loader
        epoch += 1


def _next_batch(batches: Iterator[Any]) -> Any:
    """The next batch; a data error raised in a loader worker comes out as its own one-line message."""
    try:
        return next(batches)
    except DatasetError as e:
        text = str(e)
        if "Original Traceback" not in text:
            raise
        last = [line for line in text.splitlines() if line.strip()][-1]
        raise DatasetError(last.split("Error: ", 1)[-1] + " (in a data loader worker)") from None


# -- the work dir, on rank 0 ---------------------------------------------------------------------


def _verify_data(datasets: Mapping[str, Any], mode: str) -> None:
    if mode == "off":
        return
    t0 = time.perf_counter()
    for split, dataset in datasets.items():
        if hasattr(dataset, "verify"):
            dataset.verify(full=mode == "full")
    log.info("data check (%s): %s in %.1f s", mode, ", ".join(f"{len(d)} {s}" for s, d in datasets.items()),
             time.perf_counter() - t0)


def _best_so_far(work_dir: Path, iteration: int) -> float:
    """The mIoU in ``best_mIoU.pth`` if it was written by iteration ``iteration`` (else -1)."""
    path = work_dir / "best_mIoU.pth"
    if not path.is_file():
        return -1.0
    try:
        meta = read_checkpoint(path).get("meta") or {}
    except (ValueError, OSError) as e:
        log.warning("ignoring %s: %s", path, e)
        return -1.0
    return float(meta.get(MIOU, -1.0)) if int(meta.get(ITERATION, iteration + 1)) <= iteration else -1.0


def _checkpoint_meta(dataset: Any, iteration: int, protocol: TestProtocol, **extra: Any) -> dict[str, Any]:
    """The ``meta`` of every checkpoint a run writes: classes, palette and the test protocol that
    predict / eval read back."""
    return checkpoint_meta(iteration=iteration, classes=getattr(dataset, "classes", []),
                           palette=getattr(dataset, "palette", []), protocol=protocol, **extra)


def _state_bytes(state: TrainState) -> int:
    """About the size of a training checkpoint: weights and buffers plus AdamW's two moments (and the EMA)."""
    tensors = sum(t.numel() * t.element_size() for t in state.model.state_dict().values())
    moments = sum(2 * p.numel() * p.element_size() for p in state.model.parameters() if p.requires_grad)
    return tensors * (2 if state.ema is not None else 1) + moments




# -- one step, validation ------------------------------------------------------------------------
def train_one_iteration(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, state: TrainState,
                        amp_dtype: torch.dtype | None, criterion: SegmentationLoss | int,
                        flags: tuple[float, ...] = ()) -> tuple[float, list[bool]]:
    """Forward, loss, backward, optimizer and schedule step, then the EMA update (``state.ema``);
    ``state.iteration`` advances by one. ``criterion``: the run's loss, or an ignore index for
    plain cross-entropy.

    ``flags`` (per process) are averaged over the processes with the loss, in the same
    collective; returns the mean loss and, per flag, whether any process raised it.
    """
    with torch.autocast(images.device.type, dtype=amp_dtype) if amp_dtype else contextlib.nullcontext():
        logits = model(images)
    loss = segmentation_loss(logits, labels, criterion) if isinstance(criterion, int) else criterion(logits, labels)
    shared = torch.tensor([0.0, *flags], dtype=torch.float64, device=loss.device)
    shared[0] = loss.detach().double()
    shared = all_reduce_mean(shared).tolist()
    loss_value = shared[0]
    if not math.isfinite(loss_value):
        raise NonFiniteLossError(f"loss is {loss_value} at iteration {state.iteration + 1}; stopping. "
                                 "The weights were not updated with it")
    state.optimizer.zero_grad(set_to_none=True)
    state.scaler.scale(loss).backward()
    state.scaler.step(state.optimizer)
    state.scaler.update()
    state.scheduler.step()
    state.iteration += 1
    if state.ema is not None:
        state.ema.update(state.model, step=state.iteration)
    return loss_value, [v > 0 for v in shared[1:]]


def validate(model: nn.Module, val_set: Any, cfg: Mapping[str, Any], protocol: TestProtocol) -> dict[str, Any]:
    """``evaluate`` under the run's test protocol and ``eval.isr``; leaves ``model`` in the mode it had."""
    training = model.training
    metrics = evaluate(unwrap_model(model), val_set, protocol, isr=cfg["eval"]["isr"],
                       workers=min(usable_workers(cfg["data"]["workers"]), 2))
    model.train(training)
    return metrics


# -- training ---------------------------------------------------------------------------------
def train(cfg: Mapping[str, Any], work_dir: str | os.PathLike, resume: str | None = None,
          device: str | None = None, *, force: bool = False, verify_data: str = "fast") -> dict[str, Any]:
    """Train from a validated config (see :mod:`edaformer.config`).

    ``resume``: None (fresh start; a work dir that holds checkpoints is refused unless
    ``force``, which moves the earlier run's files aside), ``"auto"`` (newest loadable checkpoint
    in ``work_dir``, if any) or a checkpoint path. ``device``: ``cpu``, ``cuda`` or None (CUDA if
    available). ``verify_data``: ``fast`` (every header and label before the first step),
    ``full`` (also decode every image) or ``off``.
    Returns ``iteration``, ``best_mIoU`` and the last validation ``metrics``. On SIGTERM / SIGINT
    raises :class:`TrainingInterrupted` after writing a checkpoint.
    """
    if verify_data not in VERIFY_MODES:
        raise ValueError(f"verify_data must be one of {', '.join(VERIFY_MODES)}, got {verify_data!r}")
    owns_group = not is_distributed()
    deterministic = (torch.are_deterministic_algorithms_enabled(),
                     torch.is_deterministic_algorithms_warn_only_enabled(), torch.backends.cudnn.benchmark)
    info = init_distributed(device)
    try:
        with StopRequest() as stop, contextlib.ExitStack() as cleanup:
            run = _set_up(cfg, Path(work_dir), info, cleanup, resume=resume, force=force, verify_data=verify_data)
            return _train(run, stop, cleanup)
    finally:
        torch.use_deterministic_algorithms(deterministic[0], warn_only=deterministic[1])
        torch.backends.cudnn.benchmark = deterministic[2]
        if owns_group:
            cleanup_distributed()


@dataclass
class _Window:
    """The iterations since the last training log record: summed loss and times, the last lr."""

    loss: float = 0.0
    time: float = 0.0
    data_time: float = 0.0
    n: int = 0
    lr: float = 0.0


@dataclass
class _Run:
    """What the steps of one training run share: set up by :func:`_set_up`, then advanced by
    :func:`_train_step` and written by :func:`_save` / :func:`_validate`."""

    cfg: Mapping[str, Any]
    info: DistInfo
    work_dir: Path
    train_set: Any
    val_set: Any
    loader: DataLoader
    protocol: TestProtocol
    criterion: SegmentationLoss
    model: nn.Module                      # what the step calls: ``state.model`` or its DDP wrapper
    state: TrainState                     # the unwrapped model, optimizer, schedule, EMA, counters
    amp_dtype: torch.dtype | None
    checkpoint: Path | None               # the last complete checkpoint (named in error messages)
    saved_at: int = -1                    # its iteration
    last_save: float = field(default_factory=time.monotonic)
    jlog: JsonLog = field(default_factory=lambda: JsonLog(None))
    tblog: TensorBoardLog | None = None
    window: _Window = field(default_factory=_Window)

    @property
    def iters(self) -> int:
        return self.cfg["schedule"]["iters"]

    @property
    def param_dtype(self) -> torch.dtype:
        return next(self.state.model.parameters()).dtype

    @property
    def evaluated(self) -> tuple[nn.Module, str]:
        """The weights that validation measures and ``best_mIoU.pth`` keeps: the EMA's when there is one."""
        return (self.state.ema.module, "ema") if self.state.ema is not None else (self.state.model, "model")


def _due(interval: int, iteration: int, iters: int) -> bool:
    return bool(interval and iteration % interval == 0) or iteration == iters


def _train(run: _Run, stop: StopRequest, cleanup: contextlib.ExitStack) -> dict[str, Any]:
    """The loop: one iteration, then log, checkpoint and validate when due; stop after the step
    (with a checkpoint) on a signal."""
    tcfg, iters, metrics = run.cfg["train"], run.iters, {}
    batches = _batches(run.loader, run.state.iteration, tcfg["seed"], run.info.rank)
    bar = _start_loop(run, cleanup)
    while run.state.iteration < iters:
        stopping, time_due = _train_step(run, batches, stop)
        done = run.state.iteration
        bar.update(1)
        if done % max(tcfg["log_interval"], 1) == 0 or done == iters or stopping:
            _log_train(run, bar)
        if stopping:
            log.warning("%s received: writing a checkpoint at iteration %d (a second signal aborts at once)",
                        signal.Signals(stop.signum or signal.SIGTERM).name, done)
        if _due(tcfg["checkpoint_interval"], done, iters) or time_due or stopping:
            _save(run)
        if _due(tcfg["eval_interval"], done, iters):
            metrics = _validate(run)
            stopping = stopping or _stop_requested(stop, run.info)
            if stopping and run.saved_at != done:
                _save(run)
        if stopping:
            bar.close()
            raise TrainingInterrupted(stop.signum or signal.SIGTERM, done, run.checkpoint if run.saved_at == done
                                      else None)
    bar.close()
    _finish(run)
    return dict(iteration=iters, best_mIoU=run.state.best_miou, metrics=metrics, work_dir=str(run.work_dir))


# -- set-up -------------------------------------------------------------------------------------
def _set_up(cfg: Mapping[str, Any], work_dir: Path, info: DistInfo, cleanup: contextlib.ExitStack, *,
            resume: str | None, force: bool, verify_data: str) -> _Run:
    """Everything before the first step, in order: the process, the data, the work dir (lock,
    earlier run, resume checkpoint, config check) before anything in it is written, the data
    check, the loss, the model and its (resumed) training state, the logs."""
    _set_up_process(cfg["train"], info)
    on_main(info, _warn_schedule, cfg["schedule"])
    train_set, val_set, loader, protocol = _set_up_data(cfg, info)
    found = _claim_work_dir(info, work_dir, resume, force, cfg, cleanup)
    on_main(info, _verify_data, {"train": train_set, "val": val_set}, verify_data)
    criterion = build_loss(cfg.get("loss"), train_set, getattr(train_set, "ignore_index", IGNORE_INDEX))
    log.info("loss: %s", criterion.extra_repr())
    amp_dtype = resolve_amp(cfg["train"]["amp"], info.device)
    model, state = _set_up_model(cfg, info, train_set.num_classes, amp_dtype, found, work_dir)
    run = _Run(cfg, info, work_dir, train_set, val_set, loader, protocol, criterion, model, state, amp_dtype,
               checkpoint=found[0] if found else None)
    _start_logs(run, cleanup)
    return run


def _set_up_process(tcfg: Mapping[str, Any], info: DistInfo) -> None:
    """Log level (rank 0 logs), TensorBoard present (checked on every rank before any work), determinism."""
    if not info.is_main:
        log.setLevel(logging.WARNING)
    if tcfg["tensorboard"]:
        require_tensorboard()
    if tcfg["deterministic"]:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    elif info.device.type == "cuda":
        torch.backends.cudnn.benchmark = True


def _warn_schedule(schedule: Mapping[str, Any]) -> None:
    """A warmup as long as the run never reaches the learning rate set: say so, with the fix."""
    warmup, iters = schedule["warmup_iters"], schedule["iters"]
    if warmup >= iters:
        log.warning("schedule.warmup_iters (%d) >= schedule.iters (%d): the learning rate never reaches optim.lr; "
                    "set schedule.warmup_iters below %d (e.g. %d)", warmup, iters, iters, iters // 10)


def _set_up_data(cfg: Mapping[str, Any], info: DistInfo) -> tuple[Any, Any, DataLoader, TestProtocol]:
    """The datasets (validation under the run's test protocol) and the training loader."""
    data_cfg = cfg["data"]
    train_set, val_set = build_datasets(data_cfg)
    protocol = TestProtocol.from_config(cfg)
    val_set.transforms = eval_transforms(protocol.scale, protocol.size_divisor)
    loader = build_train_loader(train_set, data_cfg, info.distributed, cfg["train"]["seed"])
    log.info("data: %d train / %d val images, %d classes; batch %d x %d processes = %d; %d iterations/epoch",
             len(train_set), len(val_set), train_set.num_classes, data_cfg["batch_size"], info.world_size,
             data_cfg["batch_size"] * info.world_size, len(loader))
    return train_set, val_set, loader, protocol


def _claim_work_dir(info: DistInfo, work_dir: Path, resume: str | None, force: bool, cfg: Mapping[str, Any],
                    cleanup: contextlib.ExitStack) -> tuple[Path, dict] | None:
    """Rank 0 opens the work dir (:func:`~.workdir.open_work_dir`; the lock is released on the way out);
    every rank gets the checkpoint to resume, if any, as ``(path, checkpoint)``."""
    opened = on_main(info, open_work_dir, work_dir, resume, force,
                     lambda ckpt, path: check_resume_config(ckpt, cfg, path))
    if opened is not None:
        cleanup.callback(opened["lock"].release)
    path = broadcast_object(str(opened["found"][0]) if opened and opened["found"] else None)
    if path is None:
        return None
    return Path(path), opened["found"][1] if info.is_main else read_checkpoint(path)


def _set_up_model(cfg: Mapping[str, Any], info: DistInfo, num_classes: int, amp_dtype: torch.dtype | None,
                  found: tuple[Path, dict] | None, work_dir: Path) -> tuple[nn.Module, TrainState]:
    """The model, optimizer, schedule, scaler and EMA, resumed from ``found``; identical initial
    weights on every rank (DDP also broadcasts rank 0's). Returns the module to call (DDP-wrapped
    when distributed) and the state."""
    tcfg, dev = cfg["train"], info.device
    seed_everything(tcfg["seed"])
    net = build_model(cfg["model"], num_classes, init_weights=found is None)
    if tcfg["grad_checkpointing"]:
        net.set_grad_checkpointing(True)
    net.to(dev)
    if tcfg["channels_last"]:
        net.to(memory_format=torch.channels_last)
    if info.distributed:
        net = convert_sync_batchnorm(net, dev)
    optimizer = build_optimizer(net, cfg["optim"])
    ema = None
    if tcfg["ema"]:
        ema = ModelEmaV3(net, decay=tcfg["ema_decay"], use_warmup=tcfg["ema_warmup"],
                         warmup_power=tcfg["ema_warmup_power"])
    state = TrainState(net, optimizer, build_scheduler(optimizer, cfg["schedule"]),
                       torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16), ema=ema)
    warm_up = f" with warm-up (power {tcfg['ema_warmup_power']:g})" if tcfg["ema_warmup"] else ""
    log.info("model %s: %.2fM parameters, device %s, amp %s%s", cfg["model"]["name"],
             sum(p.numel() for p in net.parameters()) / 1e6, dev, amp_dtype or "off",
             f"; EMA of the weights, decay {tcfg['ema_decay']:g}{warm_up}" if ema is not None else "")
    if found is not None:
        _resume(state, found, info, work_dir)
    state.restore_rng(info.rank, info.world_size, tcfg["seed"])
    if info.distributed:
        return nn.parallel.DistributedDataParallel(net, device_ids=[dev.index] if dev.type == "cuda" else None), state
    return net, state


def _resume(state: TrainState, found: tuple[Path, dict], info: DistInfo, work_dir: Path) -> None:
    """``state`` from the checkpoint; the best mIoU also from ``best_mIoU.pth`` when resuming in its work dir."""
    path, ckpt = found
    state.load_state_dict(ckpt)
    if info.is_main and path.parent.resolve() == work_dir.resolve():
        state.best_miou = max(state.best_miou, _best_so_far(work_dir, state.iteration))
    state.best_miou = broadcast_object(state.best_miou)
    log.info("resumed from %s at iteration %d", path, state.iteration)


def _start_logs(run: _Run, cleanup: contextlib.ExitStack) -> None:
    """Rank 0: room for checkpoints, ``config.yaml``, ``log.jsonl`` cut to the resumed iteration, TensorBoard."""
    if not run.info.is_main:
        return
    run.jlog = JsonLog(run.work_dir / "log.jsonl")
    check_free_space(run.work_dir, _state_bytes(run.state))
    save_config(effective_config(run.cfg), run.work_dir / "config.yaml")  # every value the run uses
    run.jlog.start(run.state.iteration)
    if run.cfg["train"]["tensorboard"]:
        run.tblog = TensorBoardLog(run.work_dir / "tensorboard", run.state.iteration + 1,
                                   getattr(run.val_set, "classes", ()))
        cleanup.callback(run.tblog.close)


def _start_loop(run: _Run, cleanup: contextlib.ExitStack):
    """Training mode, the memory peak reset, the checkpoint clock, the progress bar (rank 0; log lines
    printed above it)."""
    run.model.train()
    if run.info.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(run.info.device)
    if run.state.iteration == run.iters:
        log.info("the checkpoint is at iteration %d = schedule.iters: nothing to train", run.iters)
    bar = cleanup.enter_context(tqdm(total=run.iters, initial=run.state.iteration, disable=not run.info.is_main,
                                     dynamic_ncols=True, desc="train"))
    cleanup.enter_context(logging_redirect_tqdm())
    run.saved_at, run.last_save = run.state.iteration, time.monotonic()
    return bar


# -- the steps of the loop -------------------------------------------------------------------------
def _train_step(run: _Run, batches: Iterator[Any], stop: StopRequest) -> tuple[bool, bool]:
    """One iteration on the next batch, timed into the log window. Returns whether to stop (a
    signal reached any process) and whether a timed checkpoint is due (rank 0's clock decides)."""
    t0 = time.perf_counter()
    images, labels = _next_batch(batches)
    memory_format = torch.channels_last if run.cfg["train"]["channels_last"] else torch.preserve_format
    images = images.to(run.info.device, dtype=run.param_dtype, non_blocking=True, memory_format=memory_format)
    labels = labels.to(run.info.device, non_blocking=True).long()
    t_data = time.perf_counter()
    run.window.lr = run.state.optimizer.param_groups[0]["lr"]
    minutes = float(run.cfg["train"]["checkpoint_minutes"])
    time_due = run.info.is_main and minutes > 0 and time.monotonic() - run.last_save >= 60 * minutes
    flags = (float(stop.requested), float(time_due))
    try:
        loss_value, (stopping, time_due) = train_one_iteration(run.model, images, labels, run.state, run.amp_dtype,
                                                               run.criterion, flags)
    except NonFiniteLossError as e:
        raise NonFiniteLossError(f"{e}; the last good checkpoint is "
                                 f"{run.checkpoint or 'none (no checkpoint written yet)'}") from None
    w = run.window
    w.loss, w.time, w.data_time, w.n = w.loss + loss_value, w.time + time.perf_counter() - t0, \
        w.data_time + t_data - t0, w.n + 1
    return stopping, time_due


def _log_train(run: _Run, bar) -> None:
    """A training record (means over the window) to ``log.jsonl``, TensorBoard and the bar."""
    w = run.window
    record = dict(iter=run.state.iteration, loss=w.loss / w.n, lr=w.lr, time=w.time / w.n,
                  data_time=w.data_time / w.n, memory_mb=round(memory_mb(run.info.device), 1))
    run.jlog.write(**record)
    if run.tblog:
        run.tblog.write(record)
    bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{w.lr:.2e}")
    run.window = _Window()


def _save(run: _Run) -> Path:
    """The training checkpoint of this iteration. Collective: every rank contributes its RNG
    state; rank 0 writes, then says how it went."""
    iteration, net = run.state.iteration, run.state.model
    if not all_finite(net):  # same weights on every rank: all raise together
        raise NonFiniteLossError(f"non-finite weights at iteration {iteration}; not writing a checkpoint "
                                 f"(the last good one is {run.checkpoint or 'none'})")
    run.state.rng_states = all_gather_object(capture_rng_state())
    path, error = run.work_dir / f"iter_{iteration}.pth", None
    if run.info.is_main:
        payload = checkpoint_payload(net, _checkpoint_meta(run.train_set, iteration, run.protocol), run.state,
                                     config=run.cfg)
        try:
            write_training_checkpoint(payload, run.work_dir, run.cfg["train"]["keep_checkpoints"])
        except CheckpointWriteError as e:
            last = path if path.exists() else run.checkpoint
            error = CheckpointWriteError(e.errno, f"{e}; the last complete checkpoint is {last or 'none'}. "
                                         "Free some space, then continue with --resume auto")
    message = broadcast_object(None if error is None else str(error))
    if message is not None:
        raise error or CheckpointWriteError(errno.ENOSPC, message)
    run.checkpoint, run.saved_at, run.last_save = path, iteration, time.monotonic()
    return path


def _validate(run: _Run) -> dict[str, Any]:
    """Validate the evaluated weights (the EMA's with ``train.ema``), log the metrics and keep a
    new best in ``best_mIoU.pth`` (those weights, model only)."""
    iteration, (module, weights) = run.state.iteration, run.evaluated
    try:
        metrics = validate(module, run.val_set, run.cfg, run.protocol)
    except DatasetError as e:
        raise DatasetError(f"{e} (validation at iteration {iteration}; the checkpoint {run.checkpoint} was "
                           "written first: fix the file, then continue with --resume auto)") from None
    log.info("iter %d/%d validation%s: aAcc %.2f  mIoU %.2f  mAcc %.2f", iteration, run.iters,
             " of the EMA weights" if weights == "ema" else "", 100 * metrics["aAcc"], 100 * metrics["mIoU"],
             100 * metrics["mAcc"])
    record = dict(iter=iteration, mode="val", weights=weights, aAcc=metrics["aAcc"], mIoU=metrics["mIoU"],
                  mAcc=metrics["mAcc"], mDice=metrics["mDice"])
    run.jlog.write(**record)
    if run.tblog:
        run.tblog.write(record, metrics["IoU"])
    if metrics["mIoU"] > run.state.best_miou and math.isfinite(metrics["mIoU"]):
        run.state.best_miou = metrics["mIoU"]
        if run.info.is_main:
            extra = {WEIGHTS: "ema"} if weights == "ema" else {}
            meta = _checkpoint_meta(run.val_set, iteration, run.protocol, **{MIOU: run.state.best_miou}, **extra)
            save_checkpoint(checkpoint_payload(module, meta), run.work_dir / "best_mIoU.pth")
    return metrics


def _stop_requested(stop: StopRequest, info: DistInfo) -> bool:
    """Whether a signal reached any process (a collective when distributed)."""
    if info.distributed:
        return bool(all_reduce_mean(torch.tensor(float(stop.requested))) > 0)
    return stop.requested


def _finish(run: _Run) -> None:
    if run.info.is_main:
        plot_training_log(run.work_dir / "log.jsonl", run.work_dir / "curves.png", title=str(run.cfg["model"]["name"]))
        log.info("done: %d iterations, best mIoU %.2f; checkpoints in %s", run.iters,
                 100 * max(run.state.best_miou, 0.0), run.work_dir)
