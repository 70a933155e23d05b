"""The training state (model, optimizer, schedule, scaler, RNG, iteration, best mIoU, the EMA of the
weights), the one checkpoint payload, resume-checkpoint selection and the resume config check."""
from __future__ import annotations

import logging
import os
import random
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from ..checkpoint import read_checkpoint, save_checkpoint
from ..config import KEYS
from ..effective import effective_config
from ..meta import model_checkpoint
from ..utils import flatten_dict

if TYPE_CHECKING:
    from timm.utils import ModelEmaV3

__all__ = ["TrainState", "checkpoint_payload", "write_training_checkpoint", "iter_checkpoints",
           "find_resume_checkpoint", "check_resume_config", "ResumeConfigError", "capture_rng_state",
           "restore_rng_state", "seed_everything"]

log = logging.getLogger("edaformer")

_ITER_CKPT = re.compile(r"^iter_(\d+)\.pth$")


# -- RNG --------------------------------------------------------------------------------------
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


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# -- the state ----------------------------------------------------------------------------------
@dataclass
class TrainState:
    """Everything a resumed run needs to continue exactly. ``model`` is the unwrapped module;
    ``rng_states`` holds one :func:`capture_rng_state` per process; ``ema`` (``train.ema``) the
    moving average of ``model``'s weights, updated after every optimizer step and stored in the
    checkpoint as ``state_dict_ema`` (timm's name)."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    iteration: int = 0
    best_miou: float = -1.0
    rng_states: list[dict[str, Any]] | None = field(default=None)
    ema: ModelEmaV3 | None = None

    def state_dict(self) -> dict[str, Any]:
        out = {"state_dict": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
               "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
               "iteration": self.iteration, "best_mIoU": self.best_miou, "rng": self.rng_states,
               "world_size": len(self.rng_states) if self.rng_states else 1}
        if self.ema is not None:
            out["state_dict_ema"] = self.ema.module.state_dict()
        return out

    def load_state_dict(self, ckpt: Mapping[str, Any]) -> None:
        """Weights, optimizer moments, schedule position, scaler, RNG and counters from ``ckpt``.

        Hyper-parameters come from the config the state was built with: the optimizer's
        ``lr`` / ``betas`` / ``eps`` / ``weight_decay`` and the schedule's shape (base lrs,
        ``iters``, warmup) and the AdamW implementation (``foreach`` / ``fused``, which also
        decides where the step counts live); the schedule's position (``last_epoch``) from the
        checkpoint. With an EMA, its weights come from the checkpoint, or, from one written
        without an EMA, are the loaded weights.
        """
        self.model.load_state_dict(ckpt["state_dict"])
        saved = ckpt["optimizer"]
        if len(saved["param_groups"]) == len(self.optimizer.param_groups):  # else load_state_dict says so
            configured = [{k: v for k, v in g.items() if k != "params"} for g in self.optimizer.param_groups]
            saved = {**saved, "param_groups": [{**g, **c} for g, c in zip(saved["param_groups"], configured)]}
        self.optimizer.load_state_dict(saved)
        base_lrs = list(self.scheduler.base_lrs)
        self.scheduler.load_state_dict({**ckpt["scheduler"], "lr_lambdas": [None] * len(base_lrs)})
        self.scheduler.base_lrs = base_lrs
        for group, base_lr, factor in zip(self.optimizer.param_groups, base_lrs, self.scheduler.lr_lambdas):
            group["lr"] = base_lr * factor(self.scheduler.last_epoch)
        if ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
        self.iteration = int(ckpt["iteration"])
        self.best_miou = float(ckpt.get("best_mIoU", -1.0))
        self.rng_states = ckpt.get("rng")
        self._load_ema(ckpt)

    def _load_ema(self, ckpt: Mapping[str, Any]) -> None:
        if self.ema is None:
            if "state_dict_ema" in ckpt:
                log.info("the checkpoint's EMA weights are not used (train.ema is off)")
        elif "state_dict_ema" in ckpt:
            self.ema.module.load_state_dict(ckpt["state_dict_ema"])
        else:
            self.ema.set(self.model)
            log.info("the checkpoint holds no EMA weights: the EMA starts from its weights at iteration %d",
                     self.iteration)

    def restore_rng(self, rank: int, world_size: int, seed: int) -> None:
        """This process's RNG: restored from the checkpoint, or seeded from (seed, rank, iteration)."""
        if self.rng_states is not None and len(self.rng_states) == world_size:
            restore_rng_state(self.rng_states[rank])
            return
        if self.rng_states is not None:
            log.warning("checkpoint holds RNG states of %d processes, running %d: reseeding", len(self.rng_states),
                        world_size)
        seed_everything(seed + rank + 1_000_003 * self.iteration)


def checkpoint_payload(model: nn.Module, meta: Mapping[str, Any], state: TrainState | None = None,
                       config: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """What a checkpoint file holds: the model in this library's format plus ``meta``; with
    ``state`` the full training state and with ``config`` the resolved config it was trained with."""
    payload = model_checkpoint(model, meta, config)
    if state is not None:
        payload.update(state.state_dict())
    return payload


def iter_checkpoints(work_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """``(iteration, path)`` of the ``iter_<n>.pth`` files in ``work_dir``, newest first."""
    found = [(int(m[1]), p) for p in Path(work_dir).glob("iter_*.pth") if (m := _ITER_CKPT.match(p.name))]
    return sorted(found, reverse=True)


def write_training_checkpoint(payload: Mapping[str, Any], work_dir: Path, keep: int) -> Path:
    """``iter_<n>.pth``, then its copy ``latest.pth`` (an independent file: damage to one leaves
    the other), then prune to the newest ``keep`` ``iter_<n>.pth`` (0 keeps all)."""
    path = save_checkpoint(payload, work_dir / f"iter_{payload['iteration']}.pth")
    save_checkpoint(payload, work_dir / "latest.pth")
    for _, old in (iter_checkpoints(work_dir)[keep:] if keep > 0 else []):
        old.unlink(missing_ok=True)
    return path


def find_resume_checkpoint(work_dir: str | os.PathLike) -> tuple[Path, dict] | None:
    """The newest training checkpoint in ``work_dir`` that loads and passes its checksum.

    ``latest.pth`` is tried first, then ``iter_<n>.pth`` newest first; unreadable or corrupt
    files are skipped with a warning. An ``iter_<n>.pth`` newer than ``latest.pth`` (a run
    stopped between writing the two) wins.
    """
    work_dir = Path(work_dir)
    latest = work_dir / "latest.pth"
    candidates = ([(None, latest)] if latest.is_file() else []) + iter_checkpoints(work_dir)
    best: tuple[Path, dict] | None = None
    for n, path in candidates:
        if best is not None and n is not None and n <= best[1]["iteration"]:
            break
        try:
            ckpt = read_checkpoint(path)
            if "iteration" not in ckpt or "state_dict" not in ckpt:
                raise ValueError("not a training checkpoint (no iteration / state_dict)")
        except (ValueError, OSError) as e:
            log.warning("skipping checkpoint %s: %s", path, e)
            continue
        if best is None or ckpt["iteration"] > best[1]["iteration"]:
            best = (path, ckpt)
        if n is not None:
            break
    return best


# -- resuming with a changed config ---------------------------------------------------------------
class ResumeConfigError(ValueError):
    """The config differs from the checkpoint's in a way the run cannot continue with."""


# config keys that define what is trained on what: a change makes the checkpoint another run
_FIXED_DATA_KEYS = ("type", "classes", "ignore_index", "reduce_zero_label", "img_suffix", "seg_suffix",
                    "train_split", "val_split", "train_filter", "val_filter")
# (model.pretrained: the name of model.encoder_weights in checkpoints written before the rename)
_UNUSED_ON_RESUME = ("model.encoder_weights", "model.init_from", "model.pretrained")


def _is_fixed(key: str) -> bool:
    section, _, name = key.partition(".")
    return section == "model" or (section == "data" and name in _FIXED_DATA_KEYS)


def _new_at_default(key: str, old: Mapping[str, Any], new: Mapping[str, Any]) -> bool:
    """``key`` was added to the library after the checkpoint was written and is at its default."""
    section, _, name = key.partition(".")
    declared = KEYS.get(section, {}).get(name)
    return key not in old and declared is not None and new.get(key) == declared.default


def _effective(cfg: Mapping[str, Any]) -> Mapping[str, Any]:
    """``cfg`` with the values a run uses filled in (:func:`~edaformer.effective.effective_config`);
    a config that cannot be filled in (of an older library, say) as it is."""
    try:
        return effective_config(cfg)
    except (ValueError, TypeError, KeyError):
        return cfg


def check_resume_config(ckpt: Mapping[str, Any], cfg: Mapping[str, Any], path: Path) -> list[str]:
    """Compare ``cfg`` with the config stored in checkpoint ``path``; raise
    :class:`ResumeConfigError` for a changed model / classes / data layout or a ``schedule.iters``
    below the checkpoint's iteration; return the other changes as ``key: old -> new`` lines."""
    iteration = int(ckpt["iteration"])
    if cfg["schedule"]["iters"] < iteration:
        raise ResumeConfigError(f"schedule.iters={cfg['schedule']['iters']} is below the iteration of {path} "
                                f"({iteration}); use schedule.iters >= {iteration}, or start a new run")
    saved = ckpt.get("config")
    if not isinstance(saved, Mapping):
        if ckpt.get("model") and cfg["model"]["name"] != ckpt["model"]:
            raise ResumeConfigError(f"model.name is {cfg['model']['name']!r} but {path} holds {ckpt['model']!r}")
        log.warning("%s stores no config: changes to the config since it was written cannot be checked", path)
        return []
    old, new = flatten_dict(saved), flatten_dict(cfg)
    # a key written out with the value used (the work dir's config.yaml) is no change
    old_used, new_used = flatten_dict(_effective(saved)), flatten_dict(_effective(cfg))
    changed = sorted(k for k in old.keys() | new.keys()
                     if old.get(k) != new.get(k) and old_used.get(k, old.get(k)) != new_used.get(k, new.get(k))
                     and k not in _UNUSED_ON_RESUME and not _new_at_default(k, old, new))
    fixed = [k for k in changed if _is_fixed(k)]
    if fixed:
        shown = "; ".join(f"{k} is {new.get(k)!r} but {old.get(k)!r} in the checkpoint" for k in fixed)
        raise ResumeConfigError(f"cannot resume from {path} with a different model or data layout: {shown}. "
                                "Use the checkpoint's config, or start a new run in another --work-dir")
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in changed]
