"""Training and evaluation: :func:`train` (single process or ``torchrun`` DDP), :func:`evaluate`,
:func:`isr_sweep`."""
from .evaluate import evaluate, format_sweep_table, isr_sweep, plot_sweep, save_sweep
from .train import (NonFiniteLossError, WarmupPolyLR, build_model, build_optimizer, build_param_groups,
                    build_scheduler, find_resume_checkpoint, segmentation_loss, train)

__all__ = ["train", "evaluate", "isr_sweep", "format_sweep_table", "save_sweep", "plot_sweep", "build_model",
           "build_optimizer", "build_param_groups", "build_scheduler", "WarmupPolyLR", "segmentation_loss",
           "find_resume_checkpoint", "NonFiniteLossError"]
