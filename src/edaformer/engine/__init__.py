"""Training and evaluation: :func:`train` (single process or ``torchrun`` DDP), :func:`evaluate`,
:func:`isr_sweep`."""
from .builders import (WarmupPolyLR, build_datasets, build_model, build_optimizer, build_param_groups, build_scheduler,
                       build_train_loader)
from .evaluate import evaluate, format_sweep_table, isr_sweep, plot_sweep, save_sweep
from .losses import SegmentationLoss, build_loss, segmentation_loss
from .signals import TrainingAborted, TrainingInterrupted
from .state import ResumeConfigError, TrainState, checkpoint_payload, find_resume_checkpoint
from .train import NonFiniteLossError, train
from .workdir import WorkDirError

__all__ = ["train", "evaluate", "isr_sweep", "format_sweep_table", "save_sweep", "plot_sweep", "build_model",
           "build_datasets", "build_train_loader", "build_optimizer", "build_param_groups", "build_scheduler",
           "WarmupPolyLR", "segmentation_loss", "SegmentationLoss", "build_loss", "TrainState", "checkpoint_payload", "find_resume_checkpoint",
           "NonFiniteLossError", "TrainingInterrupted", "TrainingAborted", "ResumeConfigError", "WorkDirError"]
